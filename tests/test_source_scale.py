"""The source scale: recorded at prepare, undone exactly in the model; what the OKD teacher sees."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from rasters import write_raster

from codemae_cli.config import from_dict
from codemae_cli.data.dataset import PairedChips
from codemae_cli.data.prepare import run_prepare
from codemae_cli.data.shards import PreparedDataset
from codemae_cli.data.source_scale import SourceScale, optical_range_rule, read_source_range
from codemae_cli.errors import UserError
from codemae_cli.model import ModelConfig, build_model

torch.set_num_threads(1)

TEACHER = "vit_small_patch16_dinov3"
TILE = 32


def _scene(tmp_path, name: str, dtype, lo: float, hi: float, **options):
    """A 64 x 128 scene: left half dark (lo..lo+span/5), right half bright; SAR in linear power."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    span = hi - lo
    opt = np.empty((3, 64, 128))
    opt[:, :, :64] = lo + rng.uniform(0.0, 0.2 * span, (3, 64, 64))
    opt[:, :, 64:] = lo + rng.uniform(0.7 * span, span, (3, 64, 64))
    opt[1] *= 1.05  # a colour cast the teacher must keep
    opt = np.clip(opt, 1, np.iinfo(dtype).max).astype(dtype)
    sar = rng.uniform(0.01, 0.5, (2, 64, 128)).astype(np.float32)
    o = write_raster(tmp_path / f"{name}_opt.tif", opt)
    s = write_raster(tmp_path / f"{name}_sar.tif", sar)
    out = tmp_path / name
    run_prepare(out=str(out), optical=[o], sar=[s], tile=TILE, nodata_optical="none", min_valid=0.0,
                split="1,0,0", sar_scale="linear", quicklook=False, **options)
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("src")
    return _scene(tmp, "u8", np.uint8, 0, 255), _scene(tmp, "u16", np.uint16, 0, 4000)


def _model():
    cfg = from_dict(ModelConfig, {"preset": "tiny", "img_size": TILE, "patch_size": 8,
                                  "okd": {"teacher": "timm", "teacher_model": TEACHER},
                                  "cdr": {"degradation": "sar_gradient"}})
    return build_model(cfg, 3, 2)


def _teacher_view(model, chips, indices):
    """What the teacher is fed for these chips, back in [0, 1] (its own normalisation undone),
    and the stored (source-unit) optical values of the same chips."""
    items = [chips[int(i)] for i in indices]
    optical = torch.stack([it["optical"] for it in items])
    sar = torch.stack([it["sar"] for it in items])
    source = torch.stack([it["dataset"] for it in items])
    teacher_input, _, _ = model.source_images(optical, sar, source)
    seen = model.teacher.prepare(teacher_input) * model.teacher.std + model.teacher.mean
    raw = []
    for i in indices:
        d, pos = chips.locate(int(i))
        raw.append(PreparedDataset(chips.sources[d].root).read(int(chips.sources[d].rows[pos]))["optical"])
    return seen, torch.from_numpy(np.stack(raw))


def test_prepare_records_the_source_range(datasets):
    u8, u16 = datasets
    m8 = json.loads((u8 / "metadata.json").read_text())
    m16 = json.loads((u16 / "metadata.json").read_text())
    assert m8["optical"]["source_range"] == [0.0, 255.0]
    assert m16["optical"]["source_range"] == [0.0, 65535.0]
    assert "uint16" in m16["optical"]["source_range_rule"]
    lo, hi = m8["sar"]["source_range"]
    mean, std = np.asarray(m8["stats"]["sar"]["mean"]), np.asarray(m8["stats"]["sar"]["std"])
    assert lo == pytest.approx((mean - 3 * std).min()) and hi == pytest.approx((mean + 3 * std).max())
    assert optical_range_rule("float32") == ([0.0, 1.0], "float32: reflectance in [0, 1]")
    # 12-bit data in uint16: --optical-range overrides the dtype rule
    r12 = json.loads((_scene(u16.parent, "u12", np.uint16, 0, 4000, optical_range=4095) / "metadata.json").read_text())
    assert r12["optical"]["source_range"] == [0.0, 4095.0] and r12["optical"]["source_range_rule"] == "--optical-range"
    with pytest.raises(UserError, match="optical-range"):
        optical_range_rule("uint16", -1.0)


def test_teacher_sees_uint8_over_255_and_uint16_over_its_range_for_dark_and_bright_scenes(datasets):
    torch.manual_seed(0)
    chips = PairedChips(list(datasets), "train", img_size=TILE, train=False)
    model = _model()
    model.set_source_scale(SourceScale.from_sources(chips.sources))
    everything = np.arange(len(chips))
    seen, raw = _teacher_view(model, chips, everything)
    is_u8 = torch.tensor([chips.locate(int(i))[0] == 0 for i in everything])
    torch.testing.assert_close(seen[is_u8], raw[is_u8] / 255.0, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(seen[~is_u8], raw[~is_u8] / 65535.0, atol=2e-6, rtol=1e-5)
    # dark chips stay dark and bright ones bright: no per-image stretch; the colour cast is kept
    means = seen.mean(dim=(1, 2, 3))
    u8_means = means[is_u8]
    assert u8_means.min() < 0.15 and u8_means.max() > 0.8
    assert seen[~is_u8].max() < 1.05 * 4000 / 65535 + 1e-6  # a dark 12-bit-like image under the dtype rule
    u8_seen, u8_raw = seen[is_u8], raw[is_u8]
    green_red = float(u8_seen[:, 1].mean() / u8_seen[:, 0].mean())
    assert green_red == pytest.approx(float(u8_raw[:, 1].mean() / u8_raw[:, 0].mean()), rel=1e-4)
    # the whole step runs: OKD against those inputs, ratio gradients on the SAR source scale
    optical = torch.stack([chips[int(i)]["optical"] for i in everything[:4]])
    sar = torch.stack([chips[int(i)]["sar"] for i in everything[:4]])
    out = model(optical, sar, source=torch.stack([chips[int(i)]["dataset"] for i in everything[:4]]))
    assert torch.isfinite(out["loss"])


def test_mixed_batches_need_their_dataset_numbers(datasets):
    chips = PairedChips(list(datasets), "train", img_size=TILE, train=False)
    model = _model()
    model.set_source_scale(SourceScale.from_sources(chips.sources))
    with pytest.raises(ValueError, match="dataset number"):
        model.source_images(torch.zeros(1, 3, TILE, TILE), torch.zeros(1, 2, TILE, TILE), None)


def test_datasets_without_the_field_fall_back_with_a_warning(datasets, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(datasets[0], old)
    meta = json.loads((old / "metadata.json").read_text())
    for m in ("optical", "sar"):
        meta[m].pop("source_range")
        meta[m].pop("source_range_rule")
    (old / "metadata.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no optical source_range"):
        assert read_source_range(meta, "optical") == (0.0, 255.0)  # from source_dtype uint8
    del meta["optical"]["source_dtype"]
    with pytest.warns(UserWarning, match="8-bit"):
        assert read_source_range(meta, "optical") == (0.0, 255.0)
    new = json.loads((datasets[0] / "metadata.json").read_text())
    with pytest.warns(UserWarning, match="no sar source_range"):
        assert read_source_range(meta, "sar") == pytest.approx(tuple(new["sar"]["source_range"]))


def test_sar_source_scale_is_the_recorded_db_window_whatever_the_storage_units(datasets):
    """SAR shards hold fixed-point counts; the source scale still maps dB values by the dB window."""
    chips = PairedChips([datasets[0]], "train", img_size=TILE, train=False)
    model = _model()
    model.set_source_scale(SourceScale.from_sources(chips.sources))
    meta = json.loads((datasets[0] / "metadata.json").read_text())
    lo, hi = meta["sar"]["source_range"]
    item = chips[0]
    seen = model.source(item["sar"][None], "sar", item["dataset"][None])[0]
    d, pos = chips.locate(0)
    raw = torch.from_numpy(PreparedDataset(chips.sources[d].root).read(int(chips.sources[d].rows[pos]))["sar"])
    valid = torch.isfinite(raw)
    expected = ((raw - lo) / (hi - lo)).clamp(0, 1)
    torch.testing.assert_close(seen[valid], expected[valid], atol=1e-3, rtol=0)
