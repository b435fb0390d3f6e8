"""Shard writer/reader contracts: .npy streaming, part numbering, PreparedDataset reads."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from codemae_cli.data.shards import (
    FORMAT_VERSION,
    NpyStreamWriter,
    PreparedDataset,
    ShardLayout,
    ShardWriter,
    finish_dataset,
    shard_name,
)
from codemae_cli.data.stats import BandNorm, RunningStats
from codemae_cli.errors import UserError


def test_npy_stream_writer_roundtrip(tmp_path):
    path = tmp_path / "a.npy"
    w = NpyStreamWriter(path, np.float32, (2, 3))
    rng = np.random.default_rng(0)
    items = rng.standard_normal((5, 2, 3)).astype(np.float32)
    w.append(items[0])
    w.append(items[1:])
    w.close()
    back = np.load(path, mmap_mode="r")
    assert back.shape == (5, 2, 3) and back.dtype == np.float32
    np.testing.assert_array_equal(back, items)
    with pytest.raises(ValueError):
        NpyStreamWriter(tmp_path / "b.npy", np.uint8, (3,)).append(np.zeros((1, 4)))


def _write_dataset(root, n=7, tile=8, shard_size=3, labels=True, optical_dtype="float32", version=None):
    """``n`` random chips through the one writer; ``version=1`` rewrites the metadata as an
    old float32 dataset had it (no "shards" key)."""
    from shapely.geometry import box

    layout = ShardLayout.for_source(optical_dtype, tile=tile, optical_bands=3, sar_bands=2, labels=labels)
    if version == 1:
        layout = ShardLayout(tile=tile, optical_bands=3, sar_bands=2, labels=labels, sar_dtype="float32")
    writer = ShardWriter(root / "shards", layout, shard_size=shard_size)
    rng = np.random.default_rng(1)
    chips, rows = [], []
    for i in range(n):
        o = rng.standard_normal((3, tile, tile)).astype(np.float32)
        s = rng.standard_normal((2, tile, tile)).astype(np.float32)
        lab = rng.integers(0, 3, (tile, tile)).astype(np.uint8) if labels else None
        part, off = writer.write(o, s, lab, train=bool(i % 3))
        chips.append((o, s, lab))
        rows.append({"chip_id": f"c{i}", "split": "train" if i % 3 else "val", "shard": part, "offset": off})
    parts = writer.close()
    meta = finish_dataset(root, layout, parts, rows, [box(i, 0, i + 1, 1) for i in range(n)], "EPSG:32631",
                          writer.stats, {"labels": {"classes": {"0": "a", "1": "b", "2": "c"}, "ignore_index": 255}
                                         if labels else None})
    if version == 1:
        meta = {k: v for k, v in meta.items() if k not in ("shards", "n_shards")}
        meta["format_version"] = 1
        (root / "metadata.json").write_text(json.dumps(meta))
    return chips, parts


def test_shard_writer_splits_parts_and_reader_returns_copies(tmp_path):
    chips, parts = _write_dataset(tmp_path, n=7, shard_size=3)
    assert [p["count"] for p in parts] == [3, 3, 1]
    ds = PreparedDataset(tmp_path)
    assert len(ds) == 7 and ds.tile == 8 and ds.classes == ["a", "b", "c"]
    for i in range(7):
        item = ds.read(i)
        np.testing.assert_array_equal(item["optical"], chips[i][0])
        np.testing.assert_array_equal(item["sar"], np.rint(chips[i][1] * 256) / 256)  # 1/256 dB steps
        np.testing.assert_array_equal(item["label"], chips[i][2])
        assert item["chip_id"] == f"c{i}"
    item = ds.read(0)
    item["optical"][:] = 0  # a copy: the shard is untouched
    assert np.abs(ds.read(0)["optical"]).sum() > 0
    np.testing.assert_array_equal(ds.indices("val"), [0, 3, 6])
    with pytest.raises(IndexError):
        ds.read(7)
    # Picklable for spawned DataLoader workers; maps are reopened lazily.
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2.read(5)["optical"], chips[5][0])


def test_reader_after_fork(tmp_path):
    chips, _ = _write_dataset(tmp_path, n=4, shard_size=2, labels=False)
    ds = PreparedDataset(tmp_path)
    assert ds.read(0)["label"] is None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: reads through its own maps
        try:
            ok = np.array_equal(ds.read(3)["optical"], chips[3][0])
            os.write(w, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"


def test_reader_refuses_non_dataset(tmp_path):
    with pytest.raises(UserError):
        PreparedDataset(tmp_path)


def test_integer_optical_keeps_its_dtype_and_nodata_round_trips(tmp_path):
    """uint16 optical is stored as uint16 with a packed validity mask, SAR as 1/256 dB counts;
    reads give back the same float values, NaN exactly where the input was nodata."""
    rng = np.random.default_rng(2)
    layout = ShardLayout.for_source("uint16", tile=12, optical_bands=4, sar_bands=2, labels=False)
    writer = ShardWriter(tmp_path / "shards", layout, shard_size=2)
    chips = []
    for i in range(3):
        o = rng.integers(1, 10000, (4, 12, 12)).astype(np.float32)
        o[:, :, : 3 * i] = np.nan  # nodata columns (0, 3, 6 of them)
        s = rng.uniform(-40, 20, (2, 12, 12)).astype(np.float32)
        s[:, 0, :i] = np.nan
        writer.write(o, s, train=True)
        chips.append((o, s))
    from shapely.geometry import box

    rows = [{"chip_id": f"c{i}", "split": "train", "shard": i // 2, "offset": i % 2} for i in range(3)]
    meta = finish_dataset(tmp_path, layout, writer.close(), rows, [box(0, 0, 1, 1)] * 3, "EPSG:32631",
                          writer.stats, {})
    assert meta["shards"] == {"optical": "uint16", "optical_valid": "packbits", "sar": "int16", "sar_step_db": 1 / 256}
    assert meta["format_version"] == FORMAT_VERSION == 2
    stored = np.load(tmp_path / "shards" / shard_name("optical", 0), mmap_mode="r")
    assert stored.dtype == np.uint16 and stored.shape == (2, 4, 12, 12)
    ds = PreparedDataset(tmp_path)
    for i, (o, s) in enumerate(chips):
        item = ds.read(i)
        np.testing.assert_array_equal(item["optical"], o)  # NaN where NaN, same values elsewhere
        np.testing.assert_allclose(item["sar"], s, rtol=0, atol=2.0**-9)  # half a 1/256 dB step
        assert np.array_equal(np.isnan(item["sar"]), np.isnan(s))
    # Stats are those of the stored values over the valid pixels.
    flat = np.stack([ds.read(i)["optical"] for i in range(3)]).transpose(1, 0, 2, 3).reshape(4, -1)
    np.testing.assert_allclose(meta["stats"]["optical"]["mean"], np.nanmean(flat.astype(np.float64), 1), rtol=1e-9)
    sar = np.stack([ds.read(i)["sar"] for i in range(3)]).transpose(1, 0, 2, 3).reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(meta["stats"]["sar"]["std"], np.nanstd(sar, 1), rtol=1e-9)


def test_integer_encoding_rounds_and_clips_resampled_values():
    layout = ShardLayout.for_source("uint8", tile=2, optical_bands=1, sar_bands=1, labels=False)
    q, valid = layout.encode_optical(np.array([[[-3.0, 254.6], [np.nan, 300.0]]], dtype=np.float32))
    np.testing.assert_array_equal(q, [[[0, 255], [0, 255]]])
    np.testing.assert_array_equal(valid, [[True, True], [False, True]])
    assert ShardLayout.for_source("float32", tile=2, optical_bands=1, sar_bands=1, labels=False).optical_mask is False
    assert ShardLayout.for_source("int32", tile=2, optical_bands=1, sar_bands=1, labels=False).optical_dtype == "float32"


def test_version_1_float32_dataset_still_loads(tmp_path):
    chips, _ = _write_dataset(tmp_path, n=4, labels=False, version=1)
    ds = PreparedDataset(tmp_path)
    assert ds.layout.optical_dtype == "float32" and ds.layout.sar_dtype == "float32"
    np.testing.assert_array_equal(ds.read(2)["sar"], chips[2][1])  # float32 SAR: exact


def test_newer_format_version_is_refused_in_one_sentence(tmp_path):
    _write_dataset(tmp_path, n=2, labels=False)
    meta = json.loads((tmp_path / "metadata.json").read_text())
    meta["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="newer than this codemae"):
        PreparedDataset(tmp_path)


def test_running_stats_skip_nodata_in_float16_and_masked_integer_chips():
    """float16 and integer chips (as some stored arrays are) sum in float64, skipping nodata."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-60, 30, (2, 16, 16)).astype(np.float16)
    x[:, :4] = np.nan
    rs = RunningStats(2)
    rs.update(x)
    ref = x.reshape(2, -1).astype(np.float64)
    np.testing.assert_allclose(rs.result()["mean"], np.nanmean(ref, 1), rtol=1e-12)
    np.testing.assert_allclose(rs.result()["std"], np.nanstd(ref, 1), rtol=1e-12)
    ints = rng.integers(0, 65535, (3, 8, 8)).astype(np.uint16)
    valid = rng.uniform(size=(8, 8)) > 0.3
    rs = RunningStats(3)
    rs.update(ints, valid)
    np.testing.assert_allclose(rs.result()["mean"], ints[:, valid].astype(np.float64).mean(1), rtol=1e-12)


def test_band_norm_one_rule_for_constant_and_unknown_bands():
    n = BandNorm.from_stats({"mean": [1.0, None, 2.0], "std": [2.0, None, 0.0]})
    np.testing.assert_array_equal(n.mean, [1, 0, 2])
    np.testing.assert_array_equal(n.std, [2, 1, 1])
    z = n.apply(np.array([[[3.0, np.nan]], [[5.0, 5.0]], [[2.0, 4.0]]], dtype=np.float32))
    np.testing.assert_array_equal(z, [[[1.0, 0.0]], [[5.0, 5.0]], [[0.0, 2.0]]])
    ident = BandNorm.from_stats(None, bands=2)
    np.testing.assert_array_equal(ident.scale, [1, 1])
