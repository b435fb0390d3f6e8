"""The Sentinel-1/Sentinel-2 flood-mapping example of docs/datasets.md, end to end, on generated
data shaped like Sen1Floods11's hand-labelled chips: EPSG:4326 at 10 m (9e-5 degrees), 13
uint16 Sentinel-2 bands, 2 float32 Sentinel-1 bands (VV, VH in dB, NaN nodata), int16 labels
with -1 where nobody labelled (0 dry, 1 water), several chips listed in a manifest.

No workaround: the commands are the ones the guide shows, shrunk only by --set size overrides.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
rasterio = pytest.importorskip("rasterio")

from rasters import write_raster  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from codemae_cli.cli import app  # noqa: E402

runner = CliRunner()
RES = 9e-5  # degrees: about 10 m at the equator
S2_BANDS = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B10", "B11", "B12"]


def _ok(args: list[str]):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, f"codemae {' '.join(args)}\n{res.output}"
    return res


def _write(path: Path, arr: np.ndarray, origin: tuple[float, float], **kw) -> Path:
    """A Sen1Floods11-like file: EPSG:4326 at ``RES`` degrees, top-left corner at ``origin``."""
    return Path(write_raster(path, arr, crs="EPSG:4326", res=RES, origin=origin, **kw))


def flood_chip(root: Path, chip_id: str, size: int, seed: int, declare_label_nodata: bool = True) -> dict:
    """One Sen1Floods11-like chip: S1Hand, S2Hand and LabelHand files of one event."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    river = np.abs(yy - (size / 2 + size / 6 * np.sin(xx / size * 2 * np.pi + seed))) < size / 7
    lake = (yy - size * 0.2) ** 2 + (xx - size * 0.75) ** 2 < (size * 0.15) ** 2
    water = river | lake
    # Sentinel-2 L1C reflectance x 10000: water is dark in NIR and SWIR, land bright there.
    land_refl = np.array([1200, 1000, 900, 800, 1300, 2200, 2600, 2800, 2900, 900, 20, 2400, 1600], np.float32)
    water_refl = np.array([1100, 900, 700, 500, 400, 300, 250, 200, 180, 80, 10, 100, 60], np.float32)
    s2 = np.where(water[None], water_refl[:, None, None], land_refl[:, None, None])
    s2 = (s2 * rng.uniform(0.85, 1.15, s2.shape)).astype(np.uint16)
    # Sentinel-1 GRD sigma0 in dB: open water is a specular reflector (about -22 dB in VV).
    vv = np.where(water, -22.0, -9.0) + rng.normal(0, 1.5, water.shape)
    vh = np.where(water, -28.0, -16.0) + rng.normal(0, 1.5, water.shape)
    s1 = np.stack([vv, vh]).astype(np.float32)
    s1[:, :3, :] = np.nan  # a strip outside the swath
    label = water.astype(np.int16)
    label[int(size * 0.6):int(size * 0.8), : size // 3] = -1  # a cloud nobody could label
    origin = (90.0 + seed * size * RES, 24.0)  # Bangladesh, where many Sen1Floods11 events lie
    d = root / "v1.1" / "data" / "flood_events" / "HandLabeled"
    for sub in ("S1Hand", "S2Hand", "LabelHand"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    return {
        "scene_id": chip_id,
        "optical": _write(d / "S2Hand" / f"{chip_id}_S2Hand.tif", s2, origin, descriptions=S2_BANDS),
        "sar": _write(d / "S1Hand" / f"{chip_id}_S1Hand.tif", s1, origin, descriptions=["VV", "VH"]),
        "labels": _write(d / "LabelHand" / f"{chip_id}_LabelHand.tif", label[None], origin,
                         nodata=-1 if declare_label_nodata else None),
        "water_fraction": float(water.mean()),
    }


@pytest.fixture(scope="module")
def flood(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sen1floods11")
    chips = [flood_chip(root, f"Bangladesh_{k:06d}", 128, seed=k, declare_label_nodata=False) for k in range(3)]
    manifest = root / "flood_manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["scene_id", "optical", "sar", "labels"])
        w.writeheader()
        for c in chips:
            w.writerow({k: str(c[k]) for k in ("scene_id", "optical", "sar", "labels")})
    return {"root": root, "chips": chips, "manifest": manifest}


TINY = ["model.img_size=32", "data.img_size=32", "data.num_workers=0", "data.pin_memory=false",
        "run.device=cpu", "run.precision=fp32", "run.tensorboard=false"]


def test_flood_example_end_to_end(flood, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prepare = ["prepare", "--manifest", str(flood["manifest"]), "--optical-bands", "4,3,2,8,12",
               "--classes", "dry,water", "--sar-scale", "db", "--tile", "32", "--block", "1", "--split", "0.7,0.3,0"]
    # The labels declare no nodata: the -1 is refused with the value and the fix in one sentence.
    res = runner.invoke(app, prepare)
    assert res.exit_code == 2
    assert "-1" in res.output and "--label-nodata -1" in res.output and "Traceback" not in res.output
    assert "chips" not in res.output  # found while planning, before any chip was cut
    assert not Path("data").exists()
    _ok([*prepare, "--label-nodata", "-1"])

    meta = json.loads(Path("data/metadata.json").read_text())
    assert meta["optical"]["bands"] == ["B4", "B3", "B2", "B8", "B11"]
    assert meta["optical"]["selected"] == [4, 3, 2, 8, 12] and meta["optical"]["input_count"] == 13
    assert meta["sar"]["bands"] == ["VV", "VH"] and meta["sar"]["selected"] is None
    assert meta["labels"]["nodata"] == -1 and meta["labels"]["classes"] == {"0": "dry", "1": "water"}
    # 3 chips of 128 x 128 px; at 24 N a 9e-5 degree pixel is 10.0 m x 9.15 m = 91.5 m^2
    area = sum(s["overlap_area_m2"] for s in meta["scenes"])
    assert 3 * 128 * 128 * 90 < area < 3 * 128 * 128 * 93
    labels = np.concatenate([np.load(p) for p in sorted(Path("data/shards").glob("label_*.npy"))])
    assert set(np.unique(labels)) <= {0, 1, 255} and (labels == 255).any() and (labels == 1).any()

    # Pretrain, fine-tune on water vs dry (the guide's lines, sizes shrunk), through the default folders.
    tiny_pretrain = [*TINY, "model.preset=tiny", "model.patch_size=8", "model.ccl.num_heads=4", "optim.batch_size=4",
                     "optim.max_steps=3", "data.augment_on=loader", "run.compile=false"]
    _ok(["pretrain", "hr", "--set", "model.okd.teacher=ema", "--set", "model.cdr.rgb_bands=[0,1,2]",
         *[a for s in tiny_pretrain for a in ("--set", s)]])
    _ok(["finetune", "seg", *[a for s in TINY for a in ("--set", s)], "--set", "task.neck_dim=32",
         "--set", "optim.batch_size=4", "--set", "optim.epochs=1", "--set", "optim.max_steps=4"])

    # Predict the full 13-band scene: the checkpoint selects the bands it was trained on.
    chip = flood["chips"][0]
    res = _ok(["predict", str(chip["optical"]), "--sar", str(chip["sar"]), "-o", "water.tif",
               "--vectorize", "water.gpkg", "--min-area", "500", "-q"])
    with rasterio.open("water.tif") as src:
        assert src.crs.to_epsg() == 4326 and src.count == 1 and src.shape == (128, 128)
        pred = src.read(1)
    import geopandas as gpd

    polys = gpd.read_file("water.gpkg")
    # areas in m^2 although the CRS is in degrees; --min-area 500 m^2 keeps polygons of 5+ px
    assert len(polys) > 0 and (polys["area"] >= 500).all()
    per_px = polys["area"].sum() / max(int(np.isin(pred, polys["class_id"].unique()).sum()), 1)
    assert 90 < per_px < 93  # m^2 per pixel, not degrees^2

    # Score against the hand labels (their -1 is not scored).
    _ok(["evaluate", "--pred", "water.tif", "--ref", str(chip["labels"]), "--json", "metrics.json"])
    assert json.loads(Path("metrics.json").read_text())["classes"]


def test_declared_label_nodata_needs_no_flag_and_wrong_bands_are_named(tmp_path, monkeypatch):
    chip = flood_chip(tmp_path / "raw", "Ghana_000001", 64, seed=5, declare_label_nodata=True)
    monkeypatch.chdir(tmp_path)
    _ok(["prepare", "--optical", str(chip["optical"]), "--sar", str(chip["sar"]), "--labels", str(chip["labels"]),
         "--tile", "32", "--block", "1", "-q"])
    res = runner.invoke(app, ["prepare", "--optical", str(chip["optical"]), "--sar", str(chip["sar"]),
                              "--optical-bands", "2,14", "-o", "other", "-q"])
    assert res.exit_code == 2 and "band 14" in res.output and "13 band" in res.output
