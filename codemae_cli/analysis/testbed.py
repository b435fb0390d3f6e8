"""A controlled optical/SAR testbed whose physics encodes CoDe-MAE's premise.

At high resolution optical and SAR images of one place share their *layout* (parcel, building
and water outlines, roads) but little else: colour and texture exist only in the optical
image, while speckle, double bounce, layover and radar shadow exist only in the SAR image.
Rigid alignment asks an encoder to make the two look alike and so either throws away what only
one modality carries or invents it. This module renders such scenes, with labels, so the
claims can be measured on data one can inspect (docs/analysis.md).

Scene model (ground geometry, ``gsd`` metres per pixel, north up, SAR looking east from the
west, i.e. range increases with the column index):

- Ground cover: a Voronoi tessellation into agricultural parcels, each vegetated (class 0) or
  bare soil (class 1); a lake and sometimes a meandering river (class 3, water); straight
  roads (class 4); rectangular buildings with a height (class 2). Labels are the ground truth
  footprints, i.e. the optical (orthographic) geometry.
- Optical (4 bands B, G, R, NIR as surface reflectance): vegetation is dark in the visible and
  bright in the NIR, bare soil brownish; each parcel draws its own crop colour and a row
  texture (a sinusoid of random period and orientation); roofs draw their own colour
  (tiles, concrete, metal); buildings cast a sun shadow to the north-east whose length grows
  with height; water is dark and blue-green; roads are grey. A smooth illumination field and
  sensor noise finish it. None of this reaches the SAR image.
- SAR (2 bands VV, VH, rendered as linear sigma0 then converted to dB): each parcel draws a
  soil-moisture/roughness backscatter *independently* of its optical colour (so parcel
  outlines are shared but parcel values are not), with volume scattering lifting VH over
  vegetation; water and roads are specular and dark; buildings produce (a) layover: the roof
  return is displaced toward the sensor (west) by ``h / tan(incidence)`` and adds to the
  ground return there, (b) double bounce: a very bright line at the base of the wall facing
  the sensor, and (c) radar shadow: no return behind the building over
  ``h * tan(incidence)``. Fully developed multiplicative speckle (Gamma with ``looks``
  looks) is applied per band, then values are converted to dB with a -35 dB noise floor.

The same seed always gives the same scene. ``write_testbed`` renders several scenes into one
prepared chip dataset (the format ``codemae prepare`` writes), keeping the scenes as
georeferenced GeoTIFF triplets (optical, SAR, labels) for inspection.

Why not ``codemae_cli.data.synth``: that generator is built for large scenes (parcels of 96 px,
towns and lakes on a scale of hundreds of pixels, a fixed layover of a few pixels), so 32-64 px
chips would mostly hold a single class. The testbed packs every class into each small scene,
makes layover and radar shadow grow with building height and incidence angle, adds optical-only
sun shadows, and draws each parcel's SAR backscatter independently of its optical colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from codemae_cli.fsutil import staged_directory

CLASSES = {0: "vegetation", 1: "bare_soil", 2: "building", 3: "water", 4: "road"}
OPTICAL_BANDS = ["blue", "green", "red", "nir"]
SAR_BANDS = ["VV", "VH"]
_NOISE_FLOOR_DB = -35.0


@dataclass
class TestbedScene:
    optical: np.ndarray  # (4, H, W) float32 reflectance in [0, 1]
    sar: np.ndarray  # (2, H, W) float32 sigma0 in dB
    labels: np.ndarray  # (H, W) uint8 class ids of CLASSES
    layers: dict  # name -> (H, W) bool masks of the physical effects (for inspection)

    __test__ = False  # not a pytest test class despite its name


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: bilinear upsampling of a coarse noise grid."""
    gh, gw = max(2, height // cells + 2), max(2, width // cells + 2)
    coarse = rng.normal(size=(gh, gw))
    ys = np.linspace(0, gh - 1.001, height)
    xs = np.linspace(0, gw - 1.001, width)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    c00 = coarse[y0][:, x0]
    c01 = coarse[y0][:, x0 + 1]
    c10 = coarse[y0 + 1][:, x0]
    c11 = coarse[y0 + 1][:, x0 + 1]
    return (c00 * (1 - fy) * (1 - fx) + c01 * (1 - fy) * fx + c10 * fy * (1 - fx) + c11 * fy * fx)


@dataclass(frozen=True)
class _Building:
    """A rectangular building: top-left pixel, size in pixels, height in metres."""

    r0: int
    c0: int
    bh: int
    bw: int
    h_m: float

    @property
    def rows(self) -> slice:
        return slice(self.r0, self.r0 + self.bh)


@dataclass
class _Ground:
    """The ground geometry both modalities image; ``labels`` are its footprints."""

    yy: np.ndarray  # (H, W) float32 row coordinate
    xx: np.ndarray  # (H, W) float32 column coordinate
    parcel: np.ndarray  # (H, W) int32 parcel id (Voronoi cell)
    parcel_bare: np.ndarray  # (n_parcels,) bool: bare soil, else vegetation
    water: np.ndarray  # (H, W) bool
    road: np.ndarray  # (H, W) bool
    footprint: np.ndarray  # (H, W) bool building footprints
    buildings: list[_Building]
    labels: np.ndarray  # (H, W) uint8 class ids of CLASSES

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape


def render_testbed_scene(
    height: int = 256,
    width: int = 256,
    *,
    seed: int = 0,
    gsd: float = 1.0,
    looks: float = 2.0,
    incidence_deg: float = 35.0,
    parcels: int | None = None,
    buildings: int | None = None,
    building_height: tuple[float, float] = (6.0, 30.0),
) -> TestbedScene:
    """Render one co-registered optical/SAR scene with labels (see the module docstring).

    Stages, in the order they draw from the one random generator (so a seed is one scene):
    ground geometry -> optical rendering -> SAR rendering.
    """
    if height < 16 or width < 16:
        raise ValueError("a testbed scene needs at least 16 x 16 pixels")
    rng = np.random.default_rng(seed)
    area = height * width
    n_parcels = parcels if parcels is not None else max(4, area // 3000)
    n_buildings = buildings if buildings is not None else max(2, area // 2500)
    ground = _ground(rng, height, width, gsd, n_parcels, n_buildings, building_height)
    optical, sun_shadow = _render_optical(rng, ground, gsd)
    sar, sar_layers = _render_sar(rng, ground, gsd, looks, incidence_deg)
    layers = {"water": ground.water, "road": ground.road, "building": ground.footprint, "sun_shadow": sun_shadow,
              **sar_layers}
    return TestbedScene(optical=optical.astype(np.float32), sar=sar, labels=ground.labels, layers=layers)


# --- ground geometry (shared by both modalities) ----------------------------------------------
def _ground(rng: np.random.Generator, height: int, width: int, gsd: float, n_parcels: int, n_buildings: int,
            building_height: tuple[float, float]) -> _Ground:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    parcel, parcel_bare = _draw_parcels(rng, yy, xx, n_parcels)
    labels = np.where(parcel_bare[parcel], 1, 0).astype(np.uint8)
    water = _draw_water(rng, yy, xx, gsd)
    labels[water] = 3
    road = _draw_roads(rng, yy, xx, gsd)
    labels[road] = 4
    footprint, boxes = _draw_buildings(rng, water, road, gsd, n_buildings, building_height)
    labels[footprint] = 2
    return _Ground(yy=yy, xx=xx, parcel=parcel, parcel_bare=parcel_bare, water=water, road=road,
                   footprint=footprint, buildings=boxes, labels=labels)


def _draw_parcels(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, n_parcels: int):
    """Parcels: nearest of n seeds (Voronoi), computed in row bands to keep memory small.

    Returns the (H, W) parcel ids and which parcels are bare soil."""
    height, width = yy.shape
    seeds = rng.uniform([0, 0], [height, width], size=(n_parcels, 2)).astype(np.float32)
    parcel = np.empty((height, width), dtype=np.int32)
    for r0 in range(0, height, 64):
        dy = yy[r0 : r0 + 64, :, None] - seeds[None, None, :, 0]
        dx = xx[r0 : r0 + 64, :, None] - seeds[None, None, :, 1]
        parcel[r0 : r0 + 64] = np.argmin(dy * dy + dx * dx, axis=-1)
    parcel_bare = rng.uniform(size=n_parcels) < 0.35
    return parcel, parcel_bare


def _draw_water(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, gsd: float) -> np.ndarray:
    """Water: a lobed lake and, half of the time, a meandering river."""
    height, width = yy.shape
    water = np.zeros((height, width), dtype=bool)
    cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
    radius = rng.uniform(0.08, 0.18) * min(height, width)
    theta = np.arctan2(yy - cy, xx - cx)
    lobes = 1 + 0.25 * np.sin(rng.integers(2, 5) * theta + rng.uniform(0, 2 * np.pi))
    water |= np.hypot(yy - cy, xx - cx) < radius * lobes
    if rng.uniform() < 0.5:
        centre = rng.uniform(0.2, 0.8) * width + 0.08 * width * np.sin(
            2 * np.pi * yy[:, 0] / rng.uniform(0.5, 1.5) / height + rng.uniform(0, 2 * np.pi)
        )
        half = rng.uniform(2.0, 5.0) / gsd
        water |= np.abs(xx - centre[:, None]) < half
    return water


def _draw_roads(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, gsd: float) -> np.ndarray:
    """Roads: straight lines of 3-6 m width at random angles."""
    height, width = yy.shape
    road = np.zeros((height, width), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        angle = rng.uniform(0, np.pi)
        py, px = rng.uniform(0, height), rng.uniform(0, width)
        dist = np.abs((yy - py) * np.cos(angle) - (xx - px) * np.sin(angle))
        road |= dist < rng.uniform(1.5, 3.0) / gsd
    return road


def _draw_buildings(rng: np.random.Generator, water: np.ndarray, road: np.ndarray, gsd: float, n_buildings: int,
                    building_height: tuple[float, float]) -> tuple[np.ndarray, list[_Building]]:
    """Buildings: rectangles on dry land off the roads, each with a height in metres."""
    height, width = water.shape
    footprint = np.zeros((height, width), dtype=bool)
    boxes: list[_Building] = []
    for _ in range(n_buildings * 4):  # rejection sampling, bounded
        if len(boxes) >= n_buildings:
            break
        bh = int(rng.uniform(8, 24) / gsd)
        bw = int(rng.uniform(8, 24) / gsd)
        r0 = int(rng.integers(0, max(1, height - bh)))
        c0 = int(rng.integers(0, max(1, width - bw)))
        box = (slice(r0, r0 + bh), slice(c0, c0 + bw))
        if water[box].any() or road[box].any() or footprint[box].any():
            continue
        h_m = float(rng.uniform(*building_height))
        footprint[box] = True
        boxes.append(_Building(r0, c0, bh, bw, h_m))
    return footprint, boxes


# --- optical rendering (colour, texture, sun shadows: optical-only signals) -------------------
def _render_optical(rng: np.random.Generator, ground: _Ground, gsd: float) -> tuple[np.ndarray, np.ndarray]:
    """(4, H, W) reflectance in [0, 1] and the (H, W) sun-shadow mask."""
    height, width = ground.shape
    optical = _parcel_colours(rng, ground, gsd)
    optical[:, ground.water] = np.array([0.06, 0.06, 0.03, 0.015], dtype=np.float32)[:, None]
    optical[:, ground.road] = (rng.uniform(0.12, 0.18) * np.ones(4, dtype=np.float32))[:, None]
    sun_shadow = _roofs_and_sun_shadows(rng, optical, ground, gsd)
    optical[:, sun_shadow] *= 0.35
    illumination = 1 + 0.08 * _smooth_field(rng, height, width, 64)
    optical *= illumination[None].astype(np.float32)
    optical += rng.normal(0, 0.004, size=optical.shape).astype(np.float32)
    return np.clip(optical, 0.0, 1.0), sun_shadow


def _parcel_colours(rng: np.random.Generator, ground: _Ground, gsd: float) -> np.ndarray:
    """Each parcel's crop or soil colour with its own row texture, (4, H, W)."""
    yy, xx = ground.yy, ground.xx
    optical = np.zeros((4, *ground.shape), dtype=np.float32)
    veg_base = np.array([0.04, 0.08, 0.05, 0.40], dtype=np.float32)
    soil_base = np.array([0.09, 0.14, 0.19, 0.26], dtype=np.float32)
    for k in range(ground.parcel_bare.size):
        mask = ground.parcel == k
        base = soil_base if ground.parcel_bare[k] else veg_base
        colour = base * rng.uniform(0.7, 1.3, size=4).astype(np.float32)
        # Row texture: crops are sown in rows; period and direction vary per parcel.
        angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 9.0) / gsd
        rows = np.sin(2 * np.pi * (yy * np.cos(angle) + xx * np.sin(angle)) / period)
        texture = 1 + rng.uniform(0.05, 0.25) * rows
        optical[:, mask] = colour[:, None] * texture[mask][None]
    return optical


_ROOF_PALETTE = np.array(
    [[0.10, 0.12, 0.30, 0.32], [0.25, 0.25, 0.25, 0.28], [0.45, 0.47, 0.48, 0.50], [0.15, 0.18, 0.20, 0.22]],
    dtype=np.float32,
)


def _roofs_and_sun_shadows(rng: np.random.Generator, optical: np.ndarray, ground: _Ground, gsd: float) -> np.ndarray:
    """Paint each roof's colour into ``optical``; return the sun-shadow mask off the footprints.

    Sun in the south-west at 45 degrees elevation: shadow length = height, toward north-east.
    """
    height, width = ground.shape
    sun_shadow = np.zeros((height, width), dtype=bool)
    for b in ground.buildings:
        roof = _ROOF_PALETTE[rng.integers(len(_ROOF_PALETTE))] * rng.uniform(0.85, 1.15)
        optical[:, b.rows, b.c0 : b.c0 + b.bw] = roof[:, None, None]
        length = int(b.h_m / gsd / math.sqrt(2))
        for step in range(1, length + 1):
            rs, cs = b.r0 - step, b.c0 + step
            rr = slice(max(0, rs), max(0, min(height, rs + b.bh)))
            cc = slice(max(0, cs), max(0, min(width, cs + b.bw)))
            sun_shadow[rr, cc] = True
    sun_shadow &= ~ground.footprint
    return sun_shadow


# --- SAR rendering (speckle, layover, double bounce, shadow: SAR-only signals) ----------------
def _power(db: Any) -> np.ndarray:
    """dB -> linear power, float32."""
    return 10 ** (np.asarray(db, dtype=np.float32) / 10)


def _render_sar(rng: np.random.Generator, ground: _Ground, gsd: float, looks: float,
                incidence_deg: float) -> tuple[np.ndarray, dict]:
    """(2, H, W) VV/VH sigma0 in dB with the noise floor, and the SAR effect masks by name."""
    vv, vh = _ground_backscatter(rng, ground)
    layers = _building_echoes(rng, vv, vh, ground, gsd, math.tan(math.radians(incidence_deg)))
    vv[layers["radar_shadow"]], vh[layers["radar_shadow"]] = _power(_NOISE_FLOOR_DB), _power(_NOISE_FLOOR_DB)
    # Fully developed speckle: unit-mean Gamma(L, 1/L) intensity, independent per polarisation.
    vv *= rng.gamma(looks, 1.0 / looks, size=vv.shape).astype(np.float32)
    vh *= rng.gamma(looks, 1.0 / looks, size=vh.shape).astype(np.float32)
    sar = np.stack([vv, vh])
    sar = np.maximum(10 * np.log10(np.maximum(sar, 1e-12)), _NOISE_FLOOR_DB).astype(np.float32)
    return sar, layers


def _ground_backscatter(rng: np.random.Generator, ground: _Ground) -> tuple[np.ndarray, np.ndarray]:
    """Linear VV and VH power of parcels, water and roads, before buildings and speckle."""
    height, width = ground.shape
    vv = np.zeros((height, width), dtype=np.float32)
    vh = np.zeros((height, width), dtype=np.float32)
    for k in range(ground.parcel_bare.size):
        mask = ground.parcel == k
        # Moisture/roughness: drawn independently of the optical colour on purpose.
        if ground.parcel_bare[k]:
            s_vv = rng.uniform(-16, -7)
            s_vh = s_vv - rng.uniform(9, 13)  # little volume scattering
        else:
            s_vv = rng.uniform(-12, -7)
            s_vh = s_vv - rng.uniform(4, 7)  # canopy volume scattering lifts cross-pol
        vv[mask], vh[mask] = _power(s_vv), _power(s_vh)
    vv *= _power(1.5 * _smooth_field(rng, height, width, 48))  # soil moisture varies smoothly
    vv[ground.water], vh[ground.water] = _power(-23), _power(-30)
    vv[ground.road], vh[ground.road] = _power(-18), _power(-26)
    return vv, vh


def _building_echoes(rng: np.random.Generator, vv: np.ndarray, vh: np.ndarray, ground: _Ground, gsd: float,
                     tan_inc: float) -> dict:
    """Add layover and double bounce of every building to ``vv``/``vh``; return the effect masks.

    The radar shadow is returned, not applied: it is set to the noise floor after all buildings.
    """
    height, width = ground.shape
    layover = np.zeros((height, width), dtype=bool)
    double_bounce = np.zeros((height, width), dtype=bool)
    radar_shadow = np.zeros((height, width), dtype=bool)
    for b in ground.buildings:
        rows, c0, bw = b.rows, b.c0, b.bw
        roof_vv, roof_vh = _power(rng.uniform(-9, -5)), _power(rng.uniform(-17, -13))
        # Radar shadow behind the building (east, away from the sensor): no return.
        shadow_len = int(round(b.h_m * tan_inc / gsd))
        s0, s1 = c0 + bw, min(width, c0 + bw + shadow_len)
        radar_shadow[rows, s0:s1] = True
        # Roof: the building top is imaged closer to the sensor by h / tan(incidence).
        shift = int(round(b.h_m / tan_inc / gsd))
        l0, l1 = max(0, c0 - shift), max(0, c0 + bw - shift)
        # True footprint: wall/ground seen under roof clutter.
        vv[rows, c0 : c0 + bw], vh[rows, c0 : c0 + bw] = _power(-20), _power(-28)
        if l1 > l0:
            vv[rows, l0:l1] += roof_vv
            vh[rows, l0:l1] += roof_vh
            layover[rows, l0:l1] = True
        # Facade between the roof and its base also lays over onto the ground in front of it.
        f0, f1 = max(0, c0 - shift), c0
        if f1 > f0:
            vv[rows, f0:f1] += 0.5 * roof_vv
            vh[rows, f0:f1] += 0.5 * roof_vh
            layover[rows, f0:f1] = True
        # Double bounce ground-wall dihedral at the base of the wall facing the sensor.
        if 0 <= c0 < width:
            w_db = max(1, int(round(1.0 / gsd)))
            vv[rows, c0 : c0 + w_db] = _power(rng.uniform(8, 14))
            vh[rows, c0 : c0 + w_db] = _power(rng.uniform(-4, 0))
            double_bounce[rows, c0 : c0 + w_db] = True
    return {"layover": layover, "double_bounce": double_bounce, "radar_shadow": radar_shadow}


def write_scene_tifs(scene: TestbedScene, out_dir: str | Path, name: str, *, gsd: float = 1.0,
                     origin: tuple[float, float] = (500000.0, 5750000.0), crs: str = "EPSG:32631") -> dict:
    """Write one scene as three co-registered GeoTIFFs; returns their paths."""
    import rasterio
    from rasterio.transform import from_origin

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, height, width = scene.optical.shape
    transform = from_origin(origin[0], origin[1], gsd, gsd)
    common = dict(driver="GTiff", height=height, width=width, crs=crs, transform=transform)
    paths = {"optical": out / f"{name}_optical.tif", "sar": out / f"{name}_sar.tif", "labels": out / f"{name}_labels.tif"}
    # Optical as uint16 reflectance x 10000 with 0 = nodata, like most L2A products.
    opt = np.clip(np.round(scene.optical * 10000), 1, 10000).astype(np.uint16)
    with rasterio.open(paths["optical"], "w", count=4, dtype="uint16", nodata=0, **common) as dst:
        dst.write(opt)
        dst.descriptions = tuple(OPTICAL_BANDS)
    with rasterio.open(paths["sar"], "w", count=2, dtype="float32", nodata=float("nan"), **common) as dst:
        dst.write(scene.sar)
        dst.descriptions = tuple(SAR_BANDS)
    with rasterio.open(paths["labels"], "w", count=1, dtype="uint8", nodata=255, **common) as dst:
        dst.write(scene.labels[None])
    return {k: str(v) for k, v in paths.items()}


def write_testbed(
    out_dir: str | Path,
    *,
    scenes: int = 4,
    size: int = 256,
    tile: int = 64,
    seed: int = 0,
    gsd: float = 1.0,
    looks: float = 2.0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    write_tifs: bool = True,
) -> Path:
    """Render ``scenes`` scenes and write them as one prepared chip dataset at ``out_dir``.

    The dataset follows the prepared-dataset contract (metadata.json, index.gpkg, shards;
    docs/architecture.md s.1), so pretraining, fine-tuning and ``analyze`` read it like any
    output of ``codemae prepare``. With ``write_tifs`` the scenes are also kept as GeoTIFF
    triplets in ``out_dir/scenes`` for inspection (``codemae prepare`` accepts them too).
    Scene ``k`` uses seed ``seed * 1000 + k``; scene origins are spread apart so footprints
    never overlap. Written to a temporary sibling and renamed at the end.
    """
    from codemae_cli.data.shards import ShardLayout, ShardWriter, finish_dataset

    if size < tile:
        raise ValueError(f"scenes of {size} px are smaller than one {tile}-px chip")
    out = Path(out_dir)
    layout = ShardLayout.for_source("float32", tile=tile, optical_bands=len(OPTICAL_BANDS),
                                    sar_bands=len(SAR_BANDS), labels=True)
    splits = _ColumnSplit(size // tile, val_fraction, test_fraction)
    with staged_directory(out) as tmp:
        writer = ShardWriter(tmp / "shards", layout, shard_size=4096, prefix="part")
        index = _ChipIndex()
        manifest = []
        for k in range(scenes):
            scene = render_testbed_scene(size, size, seed=seed * 1000 + k, gsd=gsd, looks=looks)
            origin = (500000.0 + k * (size * gsd + 1000.0), 5750000.0)
            scene_id = f"scene{k:03d}"
            if write_tifs:
                paths = write_scene_tifs(scene, tmp / "scenes", scene_id, gsd=gsd, origin=origin)
                manifest.append({"scene_id": scene_id, **{m: str(out / "scenes" / Path(p).name) for m, p in paths.items()}})
            _write_chips(writer, index, scene, scene_id, origin, tile, gsd, splits)
        parts = writer.close()
        from pyproj import CRS

        crs = CRS.from_user_input("EPSG:32631").to_wkt()
        finish_dataset(tmp, layout, parts, index.rows, index.geoms, crs, writer.stats, {
            "stride": tile, "crs": crs, "res": [gsd, gsd], "ref": "optical", "paired": True,
            "optical": {"bands": list(OPTICAL_BANDS), "source_dtype": "float32", "nodata": None},
            "sar": {"bands": list(SAR_BANDS), "scale": "db", "input_scale": "db"},
            "labels": {"source": "codemae testbed", "classes": {str(k): v for k, v in CLASSES.items()},
                       "ignore_index": 255},
            "scenes": manifest or [{"scene_id": f"scene{k:03d}"} for k in range(scenes)],
            "dropped": {},
            "testbed": {"scenes": scenes, "size": size, "seed": seed, "gsd": gsd, "looks": looks,
                        "generator": "codemae_cli.analysis.testbed.render_testbed_scene"},
        })
    return out


@dataclass(frozen=True)
class _ColumnSplit:
    """Spatial split by bands of chip columns: west train, then val, then test (east).

    Whole column bands keep neighbouring chips in one split, so the probes are not scored on
    chips that overlap what they were trained on; every scene contributes to every split, and
    val and test get at least one column each when the scene has three or more.
    """

    n_cols: int
    val_fraction: float
    test_fraction: float

    def of(self, col: int) -> str:
        n_cols = self.n_cols
        n_test = max(1, round(n_cols * self.test_fraction)) if n_cols >= 3 and self.test_fraction > 0 else 0
        n_val = max(1, round(n_cols * self.val_fraction)) if n_cols >= 3 and self.val_fraction > 0 else 0
        if col >= n_cols - n_test:
            return "test"
        if col >= n_cols - n_test - n_val:
            return "val"
        return "train"


@dataclass
class _ChipIndex:
    """The rows and footprints of index.gpkg, in the order the chips were written."""

    rows: list = field(default_factory=list)
    geoms: list = field(default_factory=list)


def _write_chips(writer, index: _ChipIndex, scene: TestbedScene, scene_id: str, origin: tuple[float, float],
                 tile: int, gsd: float, splits: _ColumnSplit) -> None:
    """Cut one scene into ``tile`` chips, row by row; write them and index them."""
    from shapely.geometry import box

    for r in range(splits.n_cols):
        for c in range(splits.n_cols):
            win = (slice(r * tile, (r + 1) * tile), slice(c * tile, (c + 1) * tile))
            split = splits.of(c)
            part, offset = writer.write(scene.optical[(slice(None),) + win], scene.sar[(slice(None),) + win],
                                        scene.labels[win], train=split == "train")
            x0, y0 = origin[0] + c * tile * gsd, origin[1] - r * tile * gsd
            index.rows.append({
                "chip_id": f"{scene_id}_r{r * tile:05d}_c{c * tile:05d}",
                "scene_id": scene_id, "optical_src": f"{scene_id}_optical.tif", "sar_src": f"{scene_id}_sar.tif",
                "row": r * tile, "col": c * tile, "valid_optical": 1.0, "valid_sar": 1.0, "valid_joint": 1.0,
                "split": split, "shard": part, "offset": offset,
            })
            index.geoms.append(box(x0, y0 - tile * gsd, x0 + tile * gsd, y0))


__all__ = ["CLASSES", "OPTICAL_BANDS", "SAR_BANDS", "TestbedScene", "render_testbed_scene", "write_scene_tifs",
           "write_testbed"]
