"""PairedChips / PairedBatchSampler contracts on tiny generated datasets in the prepare format."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from fakes import make_synthetic_dataset

from codemae_cli.data.dataset import PairedBatchSampler, PairedChips, build_loader
from codemae_cli.data.shards import PreparedDataset
from codemae_cli.errors import UserError
from codemae_cli.train.loop import left_out_note


def _set_stats(root, mean_o, std_o, mean_s, std_s):
    meta = json.loads((root / "metadata.json").read_text())
    meta["stats"] = {"optical": {"mean": mean_o, "std": std_o}, "sar": {"mean": mean_s, "std": std_s}}
    (root / "metadata.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def pattern_ds(tmp_path_factory):
    """Optical, SAR and label all carry the same 8x8-block pattern; stats are identity."""
    root = make_synthetic_dataset(tmp_path_factory.mktemp("ds") / "pattern", n_chips=6, tile=48, labels=True,
                                  optical_dtype="uint16")
    i, j = np.mgrid[0:48, 0:48]
    pattern = ((i // 8) * 13 + (j // 8) * 3 + 1).astype(np.float32)
    opt = np.load(root / "shards" / "optical_00000.npy", mmap_mode="r+")
    sar = np.load(root / "shards" / "sar_00000.npy", mmap_mode="r+")
    lab = np.load(root / "shards" / "label_00000.npy", mmap_mode="r+")
    for n in range(opt.shape[0]):
        opt[n] = pattern + 8 * n
        sar[n] = (pattern + 8 * n) * 256  # SAR shards hold counts of 1/256 dB
        lab[n] = (pattern + 8 * n).astype(np.uint8)
    opt.flush(), sar.flush(), lab.flush()
    del opt, sar, lab
    _set_stats(root, [0.0] * 3, [1.0] * 3, [0.0] * 2, [1.0] * 2)
    return root


def test_item_shapes_types(pattern_ds):
    chips = PairedChips([pattern_ds], "train", img_size=32, with_labels=True)
    item = chips[(2, 1234)]
    assert item["optical"].shape == (3, 32, 32) and item["optical"].dtype == torch.float32
    assert item["sar"].shape == (2, 32, 32) and item["valid"].shape == (32, 32) and item["valid"].dtype == torch.bool
    assert item["label"].shape == (32, 32) and item["label"].dtype == torch.int64
    assert int(item["dataset"]) == 0 and bool(item["paired"]) and int(item["index"]) == 2
    assert chips.optical_bands == 3 and chips.sar_bands == 2 and len(chips) == 6


def test_crop_and_flip_identical_for_optical_sar_and_label(pattern_ds):
    chips = PairedChips([pattern_ds], "train", img_size=32, crop_scale=(0.3, 1.0), with_labels=True)
    flips = 0
    for seed in range(12):
        it = chips[(1, seed)]
        for b in range(3):
            assert torch.equal(it["optical"][b], it["sar"][0]), "optical and SAR got different geometry"
        # Inside the 8x8 blocks bilinear and nearest agree: the label must follow the same crop/flip.
        agree = (it["optical"][0] - it["label"].float()).abs() < 1e-3
        assert agree.float().mean() > 0.5
        assert (it["label"].float().mean() - it["optical"][0].mean()).abs() < 8
        # Which way the block values increase along x tells whether the pair was flipped.
        flips += int(it["optical"][0][:, 0].mean() > it["optical"][0][:, -1].mean())
    assert 0 < flips < 12, "horizontal flips should happen about half of the time"
    # Same seed -> same sample; a different seed -> (almost surely) a different crop.
    assert torch.equal(chips[(1, 5)]["optical"], chips[(1, 5)]["optical"])
    assert not torch.equal(chips[(1, 5)]["optical"], chips[(1, 6)]["optical"])


def test_normalisation_nodata_and_validation_mode(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_chips=3, tile=32, nodata_fraction=0.25)
    _set_stats(root, [10.0, 20.0, 30.0], [2.0, 4.0, 5.0], [-10.0, -15.0], [2.0, 0.0])
    raw = PreparedDataset(root).read(1)  # decoded from the stored dtypes: dB, NaN = nodata
    raw_o, raw_s = raw["optical"], raw["sar"]
    chips = PairedChips([root], "train", img_size=32, train=False)
    it = chips[1]
    exp = (raw_o - np.array([10, 20, 30], np.float32)[:, None, None]) / np.array([2, 4, 5], np.float32)[:, None, None]
    np.testing.assert_allclose(it["optical"].numpy(), exp, rtol=1e-5, atol=1e-5)
    # std 0 is treated as 1 (no division by zero), NaN -> 0 after normalisation, masked invalid.
    exp_s = raw_s[1] + 15.0
    finite = np.isfinite(raw_s).all(0)
    np.testing.assert_allclose(it["sar"][1].numpy()[finite], exp_s[finite], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(it["sar"]).all() and (it["sar"][:, ~torch.from_numpy(finite)] == 0).all()
    assert torch.equal(it["valid"], torch.from_numpy(finite))
    assert 0.6 < it["valid"].float().mean() < 0.9
    # Validation mode is deterministic whatever the epoch.
    chips.set_epoch(5)
    assert torch.equal(chips[1]["optical"], it["optical"])
    resized = PairedChips([root], "train", img_size=16, train=False)[1]
    assert resized["optical"].shape == (3, 16, 16) and torch.isfinite(resized["sar"]).all()


def test_augmentation_is_bilinear_resize_of_the_flipped_window(tmp_path):
    """Each item is F.interpolate (bilinear, half-pixel centres; antialiased beyond 1.5x
    shrinking) of its normalised, nodata-filled crop window, flipped left-right when drawn so:
    whatever kernels the loader runs, the geometry and values are those."""
    import torch.nn.functional as F

    root = make_synthetic_dataset(tmp_path / "d", n_chips=3, tile=48, nodata_fraction=0.25,
                                  optical_nodata_fraction=0.2)
    chips = PairedChips([root], "train", img_size=24)  # crops over 36 px take the antialiased kernel
    src, raw = chips.sources[0], PreparedDataset(root)
    kinds = Counter()
    for i in range(len(chips)):
        chip = raw.read(int(src.rows[i]))
        stacked = np.concatenate([chip["optical"], chip["sar"]])                        # (C, 48, 48), NaN nodata
        for seed in range(8):
            win = chips._window(i, seed)
            top, left, h, w = win.box
            x = torch.from_numpy(src.norm.apply(stacked[:, top:top + h, left:left + w]))
            valid = torch.from_numpy(np.isfinite(stacked[:, top:top + h, left:left + w]).all(0))
            if win.flip:
                x, valid = x.flip(-1), valid.flip(-1)
            aa = h > 36 or w > 36
            kinds[(aa, win.flip)] += 1
            exp = F.interpolate(x[None], size=(24, 24), mode="bilinear", align_corners=False, antialias=aa)[0]
            exp_valid = F.interpolate(valid[None, None].float(), size=(24, 24), mode="bilinear",
                                      align_corners=False)[0, 0] > 0.5
            item = chips[(i, seed)]
            torch.testing.assert_close(item["optical"], exp[:3], rtol=0, atol=1e-5)
            torch.testing.assert_close(item["sar"], exp[3:], rtol=0, atol=1e-5)
            assert torch.equal(item["valid"], exp_valid)
    assert len(kinds) == 4, f"every kernel and flip case should occur: {kinds}"


def test_sampler_shards_ranks_epochs_and_resume(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_chips=20, tile=16)
    chips = PairedChips([root], "train", img_size=16)
    samplers = [PairedBatchSampler(chips, 3, seed=4, rank=r, world_size=2, drop_last=True) for r in range(2)]
    assert [s.left_out for s in samplers] == [2, 2]
    assert "2 chips per epoch left out" in left_out_note(samplers[0])
    per_rank = [list(s) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == 20 // 6
    seen = [i for r in per_rank for b in r for i, _ in b]
    assert len(seen) == len(set(seen)) == 18, "ranks must see disjoint chips"
    s = PairedBatchSampler(chips, 3, seed=4)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for b in e0 for i, _ in b] != [i for b in e1 for i, _ in b]
    s.set_epoch(1, start_batch=2)
    assert list(s) == e1[2:] and len(s) == len(e1) - 2
    # Sample seeds differ between epochs for the same chip (new augmentation every epoch).
    seeds0 = {i: sd for b in e0 for i, sd in b}
    seeds1 = {i: sd for b in e1 for i, sd in b}
    assert all(seeds0[i] != seeds1[i] for i in set(seeds0) & set(seeds1))
    with pytest.raises(UserError, match="fewer than one batch"):
        PairedBatchSampler(chips, 21, drop_last=True)
    assert len(PairedBatchSampler(chips, 21)) == 1  # serving every chip: one short batch


def test_weighted_mix_pairing_pure_batches_and_band_check(tmp_path):
    a = make_synthetic_dataset(tmp_path / "a", n_chips=12, tile=16, paired=True, seed=1)
    b = make_synthetic_dataset(tmp_path / "b", n_chips=12, tile=16, paired=False, seed=2)
    chips = PairedChips([a, b], "train", img_size=16)
    s = PairedBatchSampler(chips, 4, weights=[3, 1], seed=0, num_samples=48)
    counts = Counter()
    for batch in s:
        kinds = {chips.locate(i)[0] for i, _ in batch}
        assert len(kinds) == 1, "a batch mixed paired and unpaired chips"
        counts[kinds.pop()] += len(batch)
    assert counts[0] == 36 and counts[1] == 12
    loader = build_loader(chips, s, num_workers=0)
    for batch in loader:
        assert batch["paired"].all() or not batch["paired"].any()
    c = make_synthetic_dataset(tmp_path / "c", n_chips=4, tile=16, optical_bands=4)
    with pytest.raises(UserError, match="different optical band counts"):
        PairedChips([a, c], "train", img_size=16)
    with pytest.raises(UserError, match="does not exist"):
        PairedChips([tmp_path / "missing"], "train", img_size=16)
    with pytest.raises(UserError, match="not a prepared dataset"):
        PairedChips([tmp_path], "train", img_size=16)
    with pytest.raises(UserError, match="no labels"):
        PairedChips([a], "train", img_size=16, with_labels=True)


def test_worker_output_equals_main_process(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_chips=8, tile=32)
    chips = PairedChips([root], "train", img_size=24)
    s = PairedBatchSampler(chips, 4, seed=9)
    s.set_epoch(3)
    main = [b["optical"] for b in build_loader(chips, s, num_workers=0)]
    work = [b["optical"] for b in build_loader(chips, s, num_workers=1, persistent_workers=False)]
    assert len(main) == len(work) == 2
    assert all(torch.equal(x, y) for x, y in zip(main, work, strict=True))


@pytest.mark.parametrize("mode", ["loader", "device"])
def test_getitems_batch_equals_stacked_items(pattern_ds, tmp_path, mode):
    from torch.utils.data import default_collate

    from codemae_cli.data.dataset import collate_chips

    nd = make_synthetic_dataset(tmp_path / "nd", n_chips=4, tile=48, labels=True, nodata_fraction=0.25)
    for roots, train in (([pattern_ds], True), ([pattern_ds, nd], True), ([nd], False)):
        chips = PairedChips(roots, "train", img_size=40, with_labels=True, train=train, augment_on=mode)
        keys = [(i % len(chips), 50 + i) for i in range(2 * len(chips))] + [1, 3]
        got = collate_chips(chips.__getitems__(keys))
        ref = default_collate([chips[k] for k in keys])
        assert set(got) == set(ref)
        for k, v in ref.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape and got[k].is_contiguous()
            assert got[k].numpy().tobytes() == v.numpy().tobytes(), k  # bitwise (NaN in raw tiles)
        # A generic collate (e.g. a DataLoader over a Subset) still gets per-sample dicts.
        assert default_collate(chips.__getitems__(keys)).keys() == ref.keys()


@pytest.mark.parametrize("workers", [0, 1])
def test_batch_buffer_reuse_never_overwrites_held_batches(tmp_path, workers):
    """Workers (shared memory) and the main process (no workers) reuse batch buffers only once
    the consumer dropped the batch."""
    root = make_synthetic_dataset(tmp_path / "d", n_chips=40, tile=32)
    chips = PairedChips([root], "train", img_size=24)
    s = PairedBatchSampler(chips, 2, seed=1)
    ref = [chips.__getitems__(b).batch["optical"] for b in s]  # fresh buffers outside a loader
    assert len(ref) == 20
    kw = dict(num_workers=workers, prefetch_factor=1, persistent_workers=False)
    # Held whole tensors and held views: never recycled, so still intact at the end.
    held = list(build_loader(chips, s, **kw))
    views = [b["optical"][:, :1] for b in build_loader(chips, s, **kw)]
    for r, b, v in zip(ref, held, views, strict=True):
        assert torch.equal(r, b["optical"]) and torch.equal(r[:, :1], v)
        assert "_pool_slot" not in b
    # Dropped batches are released to the worker (tickets on the board) and reused correctly.
    loader = build_loader(chips, s, **kw)
    sums = [b["optical"].sum().item() for b in loader]
    assert sums == pytest.approx([r.sum().item() for r in ref], rel=0, abs=0)
    assert (loader._board != 0).sum() >= 1, "no batch buffer was ever released for reuse"


def test_device_augment_matches_loader_augmentation(pattern_ds, tmp_path):
    from codemae_cli.data.dataset import DeviceAugment

    # Upscaling crops (tile 48 -> 64 px): both paths are plain bilinear of the same window.
    kw = dict(img_size=64, crop_scale=(0.3, 0.9), with_labels=True)
    loader = PairedChips([pattern_ds], "train", **kw)
    device = PairedChips([pattern_ds], "train", augment_on="device", **kw)
    keys = [(i % 6, 100 + i) for i in range(8)]
    from torch.utils.data import default_collate

    ref = default_collate([loader[k] for k in keys])
    raw = default_collate([device[k] for k in keys])
    assert raw["optical"].shape == (8, 3, 48, 48) and raw["box"].shape == (8, 4)
    got = DeviceAugment(device, "cpu")(raw)
    assert set(got) == set(ref)
    # Away from the crop border (where roi_align may read just outside the window) they agree.
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    torch.testing.assert_close(got["optical"][inner], ref["optical"][inner], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(got["sar"][inner], ref["sar"][inner], rtol=1e-4, atol=1e-3)
    assert (got["label"] == ref["label"]).float().mean() > 0.97
    assert got["valid"].all() and torch.equal(got["paired"], ref["paired"])

    root = make_synthetic_dataset(tmp_path / "nd", n_chips=2, tile=32, nodata_fraction=0.25)
    dev = PairedChips([root], "train", img_size=32, train=False, augment_on="device")
    out = DeviceAugment(dev, "cpu")(default_collate([dev[0]]))
    ref0 = PairedChips([root], "train", img_size=32, train=False)[0]
    torch.testing.assert_close(out["sar"][0], ref0["sar"], rtol=1e-5, atol=1e-5)
    assert torch.equal(out["valid"][0], ref0["valid"])


def test_bench_loader_cli(tmp_path):
    from typer.testing import CliRunner

    from codemae_cli.cli import app

    root = make_synthetic_dataset(tmp_path / "d", n_chips=8, tile=32)
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "loader", "--dataset", str(root), "--workers", "0", "--img-size", "24",
                              "--batch-size", "4", "--batches", "2"])
    assert res.exit_code == 0, res.output
    assert "baseline" in res.output and "loader    main process" in res.output and "device  augmentation" in res.output
    assert "pairs per main-process CPU-second" in res.output
    res = runner.invoke(app, ["bench", "loader", "--dataset", str(root), "--workers", "one"])
    assert res.exit_code == 2 and "--workers" in res.output
    res = runner.invoke(app, ["bench", "loader", "--dataset", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_uint16_dataset_round_trips_to_the_same_normalised_values(tmp_path):
    """prepare keeps uint16 optical as uint16; the loader gives exactly the z-scores of the
    source values under the train split's stats, 0 and invalid at nodata (as float32 shards did)."""
    from rasters import write_raster

    from codemae_cli.data.prepare import run_prepare

    rng = np.random.default_rng(4)
    opt = rng.integers(1, 12000, (4, 64, 64)).astype(np.uint16)
    opt[:, :, :5] = 0  # nodata columns
    sar = rng.uniform(-25, 0, (2, 64, 64)).astype(np.float32)
    o = write_raster(tmp_path / "o.tif", opt, nodata=0)
    s = write_raster(tmp_path / "s.tif", sar)
    run_prepare(out=str(tmp_path / "d"), optical=[o], sar=[s], tile=32, split="1,0,0", sar_scale="db",
                quicklook=False)
    assert np.load(tmp_path / "d" / "shards" / "optical_00000.npy", mmap_mode="r").dtype == np.uint16
    chips = PairedChips([tmp_path / "d"], "train", img_size=32, train=False)
    src = chips.sources[0]
    ref = opt.astype(np.float64)
    ref[:, opt.min(0) == 0] = np.nan  # nodata pixels (every band 0)
    mean = np.nanmean(ref.reshape(4, -1), 1).astype(np.float32)
    std = np.nanstd(ref.reshape(4, -1), 1).astype(np.float32)
    np.testing.assert_allclose(src.mean[:4], mean, rtol=1e-6)
    np.testing.assert_allclose(1 / src.inv_std[:4], std, rtol=1e-5)
    index = PreparedDataset(tmp_path / "d").index
    for i in range(len(chips)):
        item = chips[i]
        r, c = int(index.iloc[int(src.rows[i])]["row"]), int(index.iloc[int(src.rows[i])]["col"])
        win = opt[:, r:r + 32, c:c + 32].astype(np.float32)
        valid = win.min(0) > 0
        z = (win - src.mean[:4, None, None]) * src.inv_std[:4, None, None]  # the float32 path of v1
        np.testing.assert_array_equal(item["optical"].numpy(), np.where(valid, z, np.float32(0)))
        np.testing.assert_array_equal(item["valid"].numpy(), valid)


@pytest.mark.parametrize("world_size,batch", [(1, 4), (2, 3), (3, 4)])
def test_loader_serves_every_chip_of_an_epoch_once(tmp_path, world_size, batch):
    """Default sampler: no chip dropped, none repeated, in every epoch and across ranks; the
    short last batch is split evenly between ranks."""
    root = make_synthetic_dataset(tmp_path / "d", n_chips=23, tile=16)
    chips = PairedChips([root], "train", img_size=16)
    samplers = [PairedBatchSampler(chips, batch, seed=2, rank=r, world_size=world_size) for r in range(world_size)]
    for epoch in range(2):
        served = []
        for s in samplers:
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(samplers[0]) == s.batches_per_epoch  # ranks stay in step
            served += [i for b in batches for i, _ in b]
        assert sorted(served) == list(range(23)), f"epoch {epoch}: every chip exactly once"
    # The same through the DataLoader (whole batches, main process).
    s = PairedBatchSampler(chips, 5, seed=0)
    got = torch.cat([b["index"] for b in build_loader(chips, s, num_workers=0, pin_memory=False)])
    assert sorted(got.tolist()) == list(range(23)) and s.left_out == 0
