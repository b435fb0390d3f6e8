"""Shard writer/reader contracts: .npy streaming, part numbering, PreparedDataset reads."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from codemae_cli.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    NpyStreamWriter,
    PreparedDataset,
    ShardWriter,
    shard_name,
)
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


def _write_dataset(root, n=7, tile=8, shard_size=3, labels=True):
    shards = root / "shards"
    writer = ShardWriter(shards, tile=tile, optical_bands=3, sar_bands=2, labels=labels, shard_size=shard_size)
    rng = np.random.default_rng(1)
    chips = []
    rows = []
    for _ in range(n):
        o = rng.standard_normal((3, tile, tile)).astype(np.float32)
        s = rng.standard_normal((2, tile, tile)).astype(np.float32)
        lab = rng.integers(0, 3, (tile, tile)).astype(np.uint8) if labels else None
        part, off = writer.write(o, s, lab)
        chips.append((o, s, lab))
        rows.append((part, off))
    parts = writer.close()
    for k, part in enumerate(parts):
        for m, p in part["files"].items():
            os.rename(p, shards / shard_name(m, k))
    import geopandas as gpd
    from shapely.geometry import box

    gdf = gpd.GeoDataFrame(
        {"chip_id": [f"c{i}" for i in range(n)], "split": ["train" if i % 3 else "val" for i in range(n)],
         "shard": [p for p, _ in rows], "offset": [o for _, o in rows]},
        geometry=[box(i, 0, i + 1, 1) for i in range(n)], crs="EPSG:32631")
    gdf.to_file(root / "index.gpkg", layer="chips")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "tile": tile,
            "labels": {"classes": {"0": "a", "1": "b", "2": "c"}, "ignore_index": 255} if labels else None,
            "stats": {"optical": {"mean": [0, 0, 0], "std": [1, 1, 1]}, "sar": {"mean": [0, 0], "std": [1, 1]}}}
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
        np.testing.assert_array_equal(item["sar"], chips[i][1])
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
    np.testing.assert_array_equal(ds2.read(5)["sar"], chips[5][1])


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
