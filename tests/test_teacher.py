"""OKD teachers: local safetensors file, timm model, EMA copy; targets and resume state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from codemae_cli.config import from_dict
from codemae_cli.errors import UserError
from codemae_cli.model import ModelConfig, build_model
from codemae_cli.model.teacher import TimmTeacher, teacher_targets

torch.set_num_threads(1)

TEACHER = "vit_small_patch16_dinov3"


def cfg_with(**okd) -> ModelConfig:
    return from_dict(ModelConfig, {"preset": "tiny", "img_size": 32, "patch_size": 8, "okd": okd})


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    model = timm.create_model(TEACHER, pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "dinov3_small.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.state_dict()


def test_teacher_loaded_from_local_safetensors(weights_file):
    path, reference = weights_file
    model = build_model(cfg_with(teacher="file", teacher_model=TEACHER, teacher_weights=str(path)), 3, 2)
    teacher = model.teacher
    assert isinstance(teacher, TimmTeacher)
    assert teacher.dim == 384 and teacher.num_prefix_tokens == 5
    loaded = teacher.model.state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(loaded[k], v)
    # the input statistics are the teacher's own (pretrained_cfg), not the dataset's
    torch.testing.assert_close(teacher.mean.flatten(), torch.tensor(teacher.model.pretrained_cfg["mean"]))
    out = model(torch.randn(2, 3, 32, 32), torch.randn(2, 2, 32, 32))
    assert torch.isfinite(out["losses"]["okd"])
    assert model.teacher_state_dict() == {}  # frozen teachers are rebuilt from the file


def test_teacher_file_errors(tmp_path, weights_file):
    with pytest.raises(UserError, match="does not exist"):
        build_model(cfg_with(teacher="file", teacher_model=TEACHER, teacher_weights=str(tmp_path / "x.safetensors")), 3, 2)
    pickle = tmp_path / "w.pth"
    pickle.write_bytes(b"not read")
    with pytest.raises(UserError, match="safetensors"):
        build_model(cfg_with(teacher="file", teacher_model=TEACHER, teacher_weights=str(pickle)), 3, 2)
    path, _ = weights_file
    with pytest.raises(UserError, match="does not fit"):  # another DINOv3 ViT (SwiGLU MLPs), 1/4 of a base's cost
        build_model(cfg_with(teacher="file", teacher_model="vit_small_plus_patch16_dinov3", teacher_weights=str(path)),
                    3, 2)
    with pytest.raises(UserError, match="not a timm model"):
        build_model(cfg_with(teacher="timm", teacher_model="no_such_model_xyz"), 3, 2)
    with pytest.raises(UserError, match="teacher_bands"):
        build_model(cfg_with(teacher="timm", teacher_model=TEACHER), 2, 2)


def test_teacher_file_must_fit_the_model_strictly(tmp_path):
    """A weights file is taken only when it fills every weight of the model (its classifier
    head aside): weights of another architecture would otherwise leave a half-random teacher."""
    import timm
    from safetensors.torch import save_file

    from codemae_cli.model.teacher import create_timm_teacher

    def save(state: dict, name: str) -> str:
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return str(path)

    def teacher(path: str) -> torch.nn.Module:
        cfg = cfg_with(teacher="file", teacher_model="vit_tiny_patch16_224", teacher_weights=path).okd
        return create_timm_teacher(cfg)

    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", num_classes=10).state_dict()  # with a head
    loaded = teacher(save(full, "fits.safetensors")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in full.items() if not k.startswith("head."))
    assert not any(k.startswith("head.") for k in loaded)

    shallow = timm.create_model("vit_tiny_patch16_224", depth=2).state_dict()  # blocks 2..11 missing
    with pytest.raises(UserError, match=r"shallow\.safetensors' does not fit model 'vit_tiny_patch16_224': "
                                        r"missing key 'blocks\.2\."):
        teacher(save(shallow, "shallow.safetensors"))
    with pytest.raises(UserError, match=r"unexpected key 'storage_tokens'"):
        teacher(save({**full, "storage_tokens": torch.zeros(1, 4, 192)}, "extra.safetensors"))
    narrow = {k: v[..., :8] if k == "blocks.0.mlp.fc2.weight" else v for k, v in full.items()}
    with pytest.raises(UserError, match=r"'blocks\.0\.mlp\.fc2\.weight' has shape"):
        teacher(save(narrow, "narrow.safetensors"))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        teacher(str(garbage))


def test_teacher_input_and_targets():
    torch.manual_seed(0)
    model = build_model(cfg_with(teacher="timm", teacher_model=TEACHER, teacher_bands=[2, 1, 0]), 4, 2)
    teacher = model.teacher
    optical = torch.rand(2, 4, 32, 32)  # source scale in [0, 1]
    x = teacher.prepare(optical)
    # bands 2,1,0 as they are (no per-image stretch), then the teacher's own mean/std
    torch.testing.assert_close(x * teacher.std + teacher.mean, optical[:, [2, 1, 0]])
    # teacher grid 2x2 (patch 16) resampled to the student's 4x4 grid, prefix tokens dropped
    t = teacher_targets(teacher, optical, (4, 4))
    assert t.shape == (2, 16, 384)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 16), atol=1e-4, rtol=0)  # LN without affine
    torch.testing.assert_close(t.var(-1, unbiased=False), torch.ones(2, 16), atol=1e-3, rtol=0)
    tokens, grid = teacher(optical)
    assert grid == (2, 2) and tokens.shape == (2, 4, 384)


def test_ema_teacher_update_and_resume_state():
    torch.manual_seed(0)
    model = build_model(cfg_with(teacher="ema", ema_momentum=0.5), 3, 2)
    teacher = model.teacher
    t0 = {k: v.clone() for k, v in model.teacher_state_dict().items()}
    # starts as an exact copy of the student's optical path (no SAR patch embedding)
    student = model.encoder.state_dict()
    assert all(torch.equal(v, student[k.removeprefix("encoder.")]) for k, v in t0.items())
    assert not any("patch_embed.sar" in k for k in t0)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_teacher()
    t1 = model.teacher_state_dict()
    key = "encoder.blocks.0.attn.qkv.weight"
    torch.testing.assert_close(t1[key], 0.5 * t0[key] + 0.5 * (t0[key] + 1.0))
    # resume: a fresh model takes the saved EMA weights
    other = build_model(cfg_with(teacher="ema", ema_momentum=0.5), 3, 2)
    other.load_teacher_state_dict(t1)
    torch.testing.assert_close(other.teacher_state_dict()[key], t1[key])
    assert teacher is model.teacher
    # the EMA teacher follows .to(): dtype conversion reaches it
    model.to(torch.float64)
    assert next(model.teacher.parameters()).dtype == torch.float64


# -- which optical bands a frozen teacher sees -----------------------------------------------
S2_NAMES = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]


def _prepared(tmp_path, name: str, descriptions=None) -> dict:
    """A tiny dataset prepared from one 4-band optical file (``descriptions``: its band names)."""
    import json

    import numpy as np
    from rasters import write_raster

    from codemae_cli.data.prepare import run_prepare

    rng = np.random.default_rng(0)
    opt = write_raster(tmp_path / f"{name}_opt.tif", rng.integers(1, 255, (4, 32, 32), dtype=np.uint8),
                       descriptions=descriptions)
    sar = write_raster(tmp_path / f"{name}_sar.tif", rng.uniform(-25, -5, (2, 32, 32)).astype(np.float32))
    out = tmp_path / name
    run_prepare(out=str(out), optical=[opt], sar=[sar], tile=32, split="1,0,0", quicklook=False)
    return json.loads((out / "metadata.json").read_text())


def _same_bands_everywhere(tmp_path, name: str, meta: dict) -> tuple[int, ...]:
    """The bands the teacher, CDR's luminance, the quick-look and analyze read as R, G, B for the
    prepared dataset ``tmp_path / name``; asserted to be the same."""
    from codemae_cli.analysis.analyze import load_analysis_chips
    from codemae_cli.data.quicklook import _rgb_bands
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.data.shards import PreparedDataset

    rgb = choose_rgb([(name, meta)])
    model = build_model(cfg_with(teacher="timm", teacher_model=TEACHER), 4, 2, rgb=rgb)
    bands = model.teacher.bands
    assert model.rgb_bands == bands  # CDR's luminance
    assert tuple(_rgb_bands(tmp_path / name, meta, 4)) == bands  # the quick-look
    chips = load_analysis_chips(PreparedDataset(tmp_path / name), "train", 2)  # analyze's structure image
    lum, raw = chips.luminance, chips.optical
    np.testing.assert_allclose(lum, 0.299 * raw[:, bands[0]] + 0.587 * raw[:, bands[1]] + 0.114 * raw[:, bands[2]],
                               rtol=1e-6)
    return bands


def test_band_names_choose_red_green_blue_for_teacher_luminance_quicklook_and_analyze(tmp_path):
    from codemae_cli.data.raster import choose_rgb

    # A B, G, R, NIR file: its descriptions reach metadata.json, and the teacher reads bands 3, 2, 1.
    bgrn = _prepared(tmp_path, "bgrn", ["blue", "green", "red", "nir"])
    model = build_model(cfg_with(teacher="timm", teacher_model=TEACHER), 4, 2,
                        rgb=choose_rgb([("bgrn", bgrn)]))
    assert model.teacher.bands == (2, 1, 0) and model.teacher_input.names == ("red", "green", "blue")
    optical = torch.rand(2, 4, 32, 32)
    x = model.teacher.prepare(optical)
    torch.testing.assert_close(x * model.teacher.std + model.teacher.mean, optical[:, [2, 1, 0]])
    # CDR's luminance, the quick-look and analyze read the same bands
    assert _same_bands_everywhere(tmp_path, "bgrn", bgrn) == (2, 1, 0)
    line = model.describe_rgb()[0]
    assert line.endswith("red, green, blue as the band names say; CDR's luminance (0.299 R + 0.587 G + 0.114 B) "
                         "reads the same bands")
    # The same file without descriptions is named B1..B4 by prepare: B4/B3/B2 are not taken for
    # Sentinel-2's red/green/blue; the first three are kept and the start-up line says so.
    plain = _prepared(tmp_path, "plain")
    assert plain["optical"]["bands"] == ["B1", "B2", "B3", "B4"]
    chosen = build_model(cfg_with(teacher="timm", teacher_model=TEACHER), 4, 2,
                         rgb=choose_rgb([("plain", plain)]))
    assert chosen.teacher_input.bands == (0, 1, 2)
    line, = chosen.describe_rgb()
    assert "B1, B2, B3" in line and "do not say" in line and "model.okd.teacher_bands" in line
    assert "set model.cdr.rgb_bands too" in line and "\n" not in line
    assert _same_bands_everywhere(tmp_path, "plain", plain) == (0, 1, 2)


def test_one_and_three_bands_read_as_before_by_every_user():
    from codemae_cli.data.quicklook import _rgb_bands
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.model.teacher import choose_teacher_input

    for names, teacher, shown, lum in ((["PAN"], (0, 0, 0), [0], None), (["B1", "B2", "B3"], (0, 1, 2), [0, 1, 2], (0, 1, 2)),
                                       (["VV", "VH"], None, [0], None)):
        meta = {"optical": {"bands": names}}
        rgb = choose_rgb([("d", meta)])
        if teacher is not None:
            assert choose_teacher_input(len(names), None, 3, rgb).bands == teacher
        assert _rgb_bands("d", meta, len(names)) == shown
        model = build_model(cfg_with(teacher="ema"), len(names), 2, rgb=rgb)
        assert model.rgb_bands == lum == build_model(cfg_with(teacher="ema"), len(names), 2).rgb_bands


def test_sentinel2_short_names_only_where_the_names_are_clearly_sentinel2():
    from codemae_cli.data.raster import fallback_band_names, rgb_band_indices

    assert rgb_band_indices(S2_NAMES) == (3, 2, 1)
    assert rgb_band_indices(["B02_10m", "B03_10m", "B04_10m", "B08_10m"]) == (2, 1, 0)  # L2A file names
    # prepare's names for bands without descriptions (B<input band>) never say a colour, also
    # where enough of them look like Sentinel-2's (B11, B12) or after --optical-bands
    assert rgb_band_indices(fallback_band_names(13)) is None
    assert rgb_band_indices(["B1", "B2", "B3", "B4"]) is None
    assert rgb_band_indices(["B4", "B3", "B2", "B11"], input_bands=[4, 3, 2, 11]) is None
    # described Sentinel-2 bands kept with --optical-bands 4,3,2,8,12 (input band 12 is B11)
    assert rgb_band_indices(["B4", "B3", "B2", "B8", "B11"], input_bands=[4, 3, 2, 8, 12]) == (0, 1, 2)
    # Landsat 7 (B3 red, B4 NIR): nothing Sentinel-2 among the names
    assert rgb_band_indices(["B1", "B2", "B3", "B4", "B5", "B7"]) is None


def test_teacher_band_rules_explicit_grey_and_several_datasets():
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.model.teacher import choose_teacher_input

    s2 = choose_rgb([("s2", {"optical": {"bands": S2_NAMES}})])
    assert choose_teacher_input(13, None, 3, s2).bands == (3, 2, 1)
    assert choose_teacher_input(13, [7, 3, 2], 3, s2).names == ("B8", "B4", "B3")  # teacher_bands wins
    assert choose_teacher_input(1, None, 3, choose_rgb([("p", {"optical": {"bands": ["PAN"]}})])).bands == (0,) * 3
    three = choose_rgb([("x", {"optical": {"bands": ["B1", "B2", "B3"]}})])
    assert choose_teacher_input(3, None, 3, three).bands == (0, 1, 2)
    # Datasets whose names do not say follow the ones that do; names that disagree are refused.
    bgrn = {"optical": {"bands": ["blue", "green", "red", "nir"]}}
    follow = choose_teacher_input(4, None, 3, choose_rgb(
        [("a", {"optical": {"bands": ["B1", "B2", "B3", "B4"]}}), ("b", bgrn)]))
    assert follow.bands == (2, 1, 0) and follow.names == ("red", "green", "blue") and "'b'" in follow.rule
    mixed = choose_rgb([("a", bgrn), ("b", {"optical": {"bands": ["red", "green", "blue", "nir"]}})])
    with pytest.raises(UserError, match="different optical bands") as err:
        choose_teacher_input(4, None, 3, mixed)
    assert "'a'" in str(err.value) and "'b'" in str(err.value) and "\n" not in str(err.value)
    assert choose_teacher_input(4, [0, 1, 2], 3, mixed).bands == (0, 1, 2)  # an explicit choice settles it
    with pytest.raises(UserError, match="names band 13 but the optical input has 13 bands"):
        choose_teacher_input(13, [3, 2, 13], 3, s2)


def test_pretrain_feeds_sentinel2_red_green_blue_records_them_and_resumes_exactly(tmp_path):
    import json

    from fakes import make_synthetic_dataset
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from codemae_cli.cli import app

    data = make_synthetic_dataset(tmp_path / "s2", n_chips=4, tile=32, optical_bands=13, seed=1)
    meta = json.loads((data / "metadata.json").read_text())
    meta["optical"]["bands"] = S2_NAMES
    (data / "metadata.json").write_text(json.dumps(meta))
    runner = CliRunner()

    def run(out, *extra, resume=False):
        sets = ["model.preset=tiny", "model.img_size=32", "data.img_size=32", "model.patch_size=8",
                "model.ccl.num_heads=4", "model.okd.teacher=timm", f"model.okd.teacher_model={TEACHER}",
                "optim.batch_size=2", "optim.lr=1e-3", "run.device=cpu", "run.precision=fp32",
                "run.tensorboard=false", "data.num_workers=0", "data.pin_memory=false", f"data.datasets=[{data}]",
                *extra]
        args = ["pretrain", "smoke", "--output-dir", str(out)] + (["--resume"] if resume else [])
        for s in sets:
            args += ["--set", s]
        return runner.invoke(app, args)

    res = run(tmp_path / "a", "optim.max_steps=1")
    assert res.exit_code == 0, res.output
    assert "OKD teacher input (R, G, B): optical bands B4, B3, B2 (model.okd.teacher_bands=[3,2,1])" in res.output
    ck = json.loads((tmp_path / "a" / "checkpoints" / "last" / "meta.json").read_text())
    rec = ck["rgb_input"]
    assert rec["bands"] == rec["teacher"] == rec["luminance"] == [3, 2, 1] and rec["source"] == "names"
    assert rec["names"] == S2_NAMES and "CDR's luminance (0.299 R + 0.587 G + 0.114 B) reads the same bands" in res.output
    res = run(tmp_path / "a", "optim.max_steps=2", resume=True)
    assert res.exit_code == 0 and "resumed from" in res.output and "as in the run being resumed" in res.output
    res = run(tmp_path / "b", "optim.max_steps=2")
    assert res.exit_code == 0, res.output
    a, b = (load_file(str(tmp_path / r / "checkpoints" / "last" / "model.safetensors")) for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Datasets whose names now put the colours elsewhere cannot continue the run.
    meta["optical"]["bands"] = ["red", "green", "blue"] + S2_NAMES[3:]
    (data / "metadata.json").write_text(json.dumps(meta))
    res = run(tmp_path / "a", "optim.max_steps=3", resume=True)
    assert res.exit_code == 2 and "the run being resumed read red, green, blue from optical bands [3, 2, 1]" in res.output
    assert "Traceback" not in res.output
    # A bad explicit choice: one sentence, nothing written.
    res = run(tmp_path / "c", "model.okd.teacher_bands=[3,2,13]")
    assert res.exit_code == 2 and "model.okd.teacher_bands names band 13" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "c").exists()


def test_real_sentinel2_files_feed_b04_b03_b02(tmp_path, real_dir):
    import json

    from codemae_cli.data.prepare import run_prepare
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.model.teacher import choose_teacher_input

    # BigEarthNet: one file per Sentinel-2 band (B01 ... B12, B8A), named by what tells the files apart
    s2 = next((real_dir / "bigearthnet_s1s2" / "BigEarthNet-S2-Example").glob("*_87_48"))
    s1 = next((real_dir / "bigearthnet_s1s2" / "BigEarthNet-S1-Example").glob("*_87_48"))
    run_prepare(out=str(tmp_path / "ben"), optical=[str(s2)], sar=[str(s1 / "*_VV.tif"), str(s1 / "*_VH.tif")],
                tile=40, split="1,0,0", quicklook=False)
    meta = json.loads((tmp_path / "ben" / "metadata.json").read_text())
    chosen = choose_teacher_input(len(meta["optical"]["bands"]), None, 3, choose_rgb([("ben", meta)]))
    assert chosen.names == ("B04", "B03", "B02")
    assert [meta["optical"]["bands"][b] for b in chosen.bands] == ["B04", "B03", "B02"]


def test_resume_keeps_the_luminance_of_checkpoints_written_before_it_followed_the_names(tmp_path):
    import json

    from fakes import make_synthetic_dataset
    from typer.testing import CliRunner

    from codemae_cli.analysis.analyze import load_pretrained
    from codemae_cli.cli import app
    from codemae_cli.train.checkpoint import read_checkpoint_meta

    data = make_synthetic_dataset(tmp_path / "bgrn", n_chips=4, tile=32, optical_bands=4, seed=2)
    meta = json.loads((data / "metadata.json").read_text())
    meta["optical"]["bands"] = ["blue", "green", "red", "nir"]
    (data / "metadata.json").write_text(json.dumps(meta))
    runner, out = CliRunner(), tmp_path / "run"
    last = out / "checkpoints" / "last" / "meta.json"

    def run(steps, resume=False, code=0):
        sets = ["model.preset=tiny", "model.img_size=32", "data.img_size=32", "model.patch_size=8", "model.ccl.num_heads=4",
                "optim.batch_size=2", "optim.lr=1e-3", "run.device=cpu", "run.precision=fp32", "run.tensorboard=false",
                "data.num_workers=0", "data.pin_memory=false", f"data.datasets=[{data}]", f"optim.max_steps={steps}"]
        res = runner.invoke(app, ["pretrain", "smoke", "--output-dir", str(out), *(["--resume"] if resume else []),
                                  *[a for x in sets for a in ("--set", x)]])
        assert res.exit_code == code, res.output
        return res.output

    # An EMA teacher: the decision reaches CDR's luminance alone (red, green, blue = bands 3, 2, 1).
    said = run(1)
    assert ("CDR luminance (0.299 R + 0.587 G + 0.114 B): optical bands red, green, blue (model.cdr.rgb_bands=[2,1,0]); "
            "red, green, blue as the band names say") in said
    rec = read_checkpoint_meta(last.parent).rgb_input
    assert rec.written == "rgb_input" and rec.choice.bands == rec.luminance == (2, 1, 0) and rec.teacher is None
    assert load_pretrained(last.parent).model.rgb_bands == (2, 1, 0)  # analyze rebuilds CDR's targets as trained
    # Names that now put the colours elsewhere: the luminance cannot continue the run.
    (data / "metadata.json").write_text(json.dumps({**meta, "optical": {**meta["optical"], "bands": ["red", "green", "blue", "nir"]}}))
    refused = run(2, resume=True, code=2)
    assert "read red, green, blue from optical bands [2, 1, 0]" in refused and "Traceback" not in refused
    (data / "metadata.json").write_text(json.dumps(meta))
    # The same checkpoint as written before: `teacher_input` null, its luminance on the first three bands.
    old = json.loads(last.read_text())
    del old["rgb_input"]
    old["teacher_input"] = None
    last.write_text(json.dumps(old))
    said = run(2, resume=True)
    assert "optical bands blue, green, red (model.cdr.rgb_bands=[0,1,2]); the first three bands" in said
    assert read_checkpoint_meta(last.parent).rgb_input.luminance == (0, 1, 2)
    # ... and keeps them at the next resume (now recorded as `rgb_input`)
    assert "optical bands blue, green, red (model.cdr.rgb_bands=[0,1,2]); as in the run being resumed" in run(3, True)
    assert read_checkpoint_meta(last.parent).rgb_input.luminance == (0, 1, 2)
    assert load_pretrained(last.parent).model.rgb_bands == (0, 1, 2)


def test_checkpoint_rgb_record_reads_every_format():
    from codemae_cli.data.raster import choose_rgb
    from codemae_cli.train.checkpoint import RGBRecord

    now = choose_rgb([("d", {"optical": {"bands": ["blue", "green", "red", "nir"]}})])
    new = RGBRecord.from_meta({"rgb_input": {"bands": [2, 1, 0], "names": ["blue", "green", "red", "nir"],
                                             "rule": "r", "source": "names", "teacher": None, "luminance": [2, 1, 0]}})
    assert new.teacher_choice(now, 4).bands == (2, 1, 0) and new.luminance_choice(now.names, 4).bands == (2, 1, 0)
    assert RGBRecord.from_meta({"rgb_input": new.to_meta()}) == new
    # written before the decision was shared: the teacher's record (or the first three), luminance on 1, 2, 3
    timm = RGBRecord.from_meta({"teacher_input": {"bands": [2, 1, 0], "names": ["red", "green", "blue"], "rule": "r"}})
    assert timm.teacher_choice(now, 4).bands == (2, 1, 0) and timm.luminance_choice(now.names, 4).bands == (0, 1, 2)
    ema = RGBRecord.from_meta({"teacher_input": None})
    assert ema.teacher_choice(now, 4) is now and ema.luminance_choice(now.names, 4).bands == (0, 1, 2)
    oldest = RGBRecord.from_meta({})
    assert oldest.teacher_choice(now, 4).bands == (0, 1, 2) and oldest.luminance_choice(now.names, 5).bands is None
