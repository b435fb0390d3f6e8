"""Synthetic, georeferenced optical/SAR scene pairs with land-cover labels, of any size.

The generator is a testbed: the same scene is "photographed" by an optical sensor and "imaged"
by a SAR sensor, so the two rasters share structure but each carries signal the other lacks.
Everything is a pure function of ground coordinates and the seed (integer hashing, no global
arrays), so any window is generated independently: memory does not depend on the scene size
and a SAR raster on another grid (CRS, resolution) sees exactly the same ground.

Scene (in optical pixel units; ``x`` grows east, ``y`` grows south):

* Structure shared by both modalities
  - field parcels: a brick-like grid of ``PARCEL`` px cells, each row shifted by a hashed offset;
    each parcel is vegetation or bare/field, or built-up where a low-frequency "urbanness"
    field is high (towns cluster);
  - water bodies: a smooth value-noise field below a threshold, with curved shorelines,
    overriding everything;
  - roads: strips along parcel edges inside towns and along every 4th parcel row outside;
  - building footprints: rectangles on a sub-grid inside built-up parcels (hashed size,
    presence and height).
* Optical-only signal: class colours (B, G, R, NIR reflectance; vegetation has high NIR, water
  very low NIR), per-parcel brightness and per-building roof colour, row texture in fields,
  pixel noise.
* SAR-only signal (sensor looks from the east, toward -x):
  - sigma0 per class and polarisation: water -24 dB (specular, dark and smooth), bare -15 dB,
    vegetation -11 dB (VH relatively strong: volume scattering), built-up ground -9 dB;
  - double bounce: a very bright line (+8 dB) at the sensor-facing (east) building walls;
  - layover: roofs appear shifted toward the sensor by ``LAYOVER`` px (bright), and a radar
    shadow (very dark) lies on the far (west) side of each building;
  - multiplicative gamma speckle with ``LOOKS`` looks (mean 1), independent per polarisation.
  Water and built-up are therefore separable from SAR backscatter alone (about 15 dB apart
  before speckle).

Classes (label raster values): 0 water, 1 vegetation, 2 bare/field, 3 built-up.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from codemae_cli.data.geo import power_to_db
from codemae_cli.errors import UserError
from codemae_cli.fsutil import (
    check_replaceable,
    check_writable,
    is_codemae_raster,
    staged_file,
    sweep_stale,
    topmost_missing,
)

CLASSES = ["water", "vegetation", "bare", "built-up"]
WATER, VEGETATION, BARE, BUILT = 0, 1, 2, 3
PARCEL = 96  # field parcel size, optical px
BUILDING_CELL = 24  # building sub-grid inside towns, px
ROAD_HALF = 3  # half width of town roads, px
LAYOVER = 4  # roof displacement toward the sensor, px
SHADOW = 5  # radar shadow length behind a building, px
LOOKS = 4  # speckle looks
WATER_SCALE = 350.0  # value-noise lattice spacing of the water field, px
URBAN_SCALE = 300.0

# Reflectance-like class signatures (B, G, R, NIR), in [0, 1].
_OPTICAL = np.array(
    [
        [0.06, 0.07, 0.04, 0.02],  # water
        [0.04, 0.09, 0.05, 0.42],  # vegetation
        [0.12, 0.15, 0.20, 0.27],  # bare/field
        [0.18, 0.19, 0.20, 0.22],  # built-up ground / roads
    ],
    dtype=np.float32,
)
# sigma0 in dB per class for (VV, VH); more polarisations reuse the pattern (co-pol, cross-pol).
_SAR_DB = np.array(
    [
        [-24.0, -31.0],  # water: specular
        [-11.0, -16.0],  # vegetation: volume scattering, strong cross-pol
        [-15.0, -23.0],  # bare/field
        [-9.0, -17.0],  # built-up ground
    ],
    dtype=np.float32,
)
_SAR_POWER = (10.0 ** (_SAR_DB / 10.0)).astype(np.float32)
_ROOF_DB = (-6.0, -13.0)
_DOUBLE_BOUNCE_DB = (8.0, -2.0)
_SHADOW_DB = (-27.0, -33.0)


# ----------------------------------------------------------------------------- hashing / noise
def _hash(seed: int, *keys: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float32 from integer keys (a splitmix64-style mixer, vectorised)."""
    with np.errstate(over="ignore"):
        h = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
        for k in keys:
            h = h ^ (np.asarray(k).astype(np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15))
            h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            h = h ^ (h >> np.uint64(31))
    return ((h >> np.uint64(40)).astype(np.float32)) * np.float32(1.0 / (1 << 24))


def _value_noise(x: np.ndarray, y: np.ndarray, scale: float, seed: int) -> np.ndarray:
    """Smooth noise in [0, 1): hashed lattice values, smoothstep-interpolated."""
    gx, gy = x / scale, y / scale
    ix, iy = np.floor(gx), np.floor(gy)
    fx, fy = (gx - ix).astype(np.float32), (gy - iy).astype(np.float32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    ix, iy = ix.astype(np.int64), iy.astype(np.int64)
    v00, v10 = _hash(seed, ix, iy), _hash(seed, ix + 1, iy)
    v01, v11 = _hash(seed, ix, iy + 1), _hash(seed, ix + 1, iy + 1)
    top = v00 + (v10 - v00) * fx
    bottom = v01 + (v11 - v01) * fx
    return top + (bottom - top) * fy


def _fbm(x, y, scale, seed):
    # Two octaves: large blobs with wiggly shorelines.
    return 0.7 * _value_noise(x, y, scale, seed) + 0.3 * _value_noise(x, y, scale / 3.1, seed + 1)


# ----------------------------------------------------------------------------- the scene
def _key_tables(a: np.ndarray, b: np.ndarray):
    """Flat lookup index of integer key pairs over the window's key range, and the range grid.

    Keys (parcel or building-cell indices) take few distinct values per window, so computing
    per-key quantities on the small grid and gathering is much cheaper than per pixel.
    """
    a0, b0 = int(a.min()), int(b.min())
    na, nb = int(a.max()) - a0 + 1, int(b.max()) - b0 + 1
    ta, tb = np.meshgrid(np.arange(a0, a0 + na), np.arange(b0, b0 + nb))
    idx = (b - b0).astype(np.int32) * np.int32(na) + (a - a0).astype(np.int32)
    return idx, ta.ravel(), tb.ravel()


def _table_hash(seed: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``_hash(seed, a, b)`` through a lookup table over the window's key range."""
    idx, ta, tb = _key_tables(a, b)
    if ta.size > a.size:  # degenerate (tiny window): hash directly
        return _hash(seed, a, b)
    return np.take(_hash(seed, ta, tb), idx)


def _coarse(fn, x: np.ndarray, y: np.ndarray, step: int = 8) -> np.ndarray:
    """Evaluate a smooth field on every ``step``-th pixel of a 2-D window and interpolate."""
    h, w = x.shape
    if h <= 2 * step or w <= 2 * step:
        return fn(x, y)
    ri = np.unique(np.r_[np.arange(0, h, step), h - 1])
    ci = np.unique(np.r_[np.arange(0, w, step), w - 1])
    grid = fn(x[np.ix_(ri, ci)], y[np.ix_(ri, ci)])
    # Fractional coarse-grid coordinates of every row/col (last cell may be shorter).
    fr = np.interp(np.arange(h), ri, np.arange(len(ri))).astype(np.float32)
    fc = np.interp(np.arange(w), ci, np.arange(len(ci))).astype(np.float32)
    return _bilinear_grid(grid.astype(np.float32), fr, fc)


def _parcels(x: np.ndarray, y: np.ndarray, seed: int):
    """Parcel indices and local coordinates for float pixel coordinates (x east, y south)."""
    j = np.floor(y / PARCEL).astype(np.int64)
    shift = _table_hash(seed + 11, j, np.zeros_like(j)) * PARCEL  # brick layout: rows shifted
    xs = x + shift
    i = np.floor(xs / PARCEL).astype(np.int64)
    u = xs - i * PARCEL  # local coords in [0, PARCEL)
    v = y - j * PARCEL
    return i, j, u, v


def _is_urban(i: np.ndarray, j: np.ndarray, seed: int) -> np.ndarray:
    i0, j0 = int(i.min()), int(j.min())
    ti, tj = np.meshgrid(np.arange(i0, int(i.max()) + 1), np.arange(j0, int(j.max()) + 1))
    cx, cy = (ti + 0.5) * PARCEL, (tj + 0.5) * PARCEL
    table = _value_noise(cx, cy, URBAN_SCALE, seed + 31) > 0.66
    return table[j - j0, i - i0]


@dataclass(frozen=True)
class BuildingSar:
    """SAR geometry of the buildings, derived in each building's own cell (2-D bool masks)."""

    wall: np.ndarray  # east edge of a footprint: double bounce
    layover: np.ndarray  # the footprint shifted LAYOVER px east, toward the sensor
    shadow: np.ndarray  # SHADOW px west of the footprint


@dataclass(frozen=True)
class Buildings:
    """Building footprints of a window, a per-building hash (roof colour) and their SAR geometry."""

    mask: np.ndarray
    hash: np.ndarray
    sar: BuildingSar


@dataclass(frozen=True)
class SceneSample:
    """The ground of one window of coordinates, as both sensors see it (2-D arrays)."""

    cls: np.ndarray  # uint8 class of CLASSES
    building: np.ndarray  # bool footprints (not on water)
    building_hash: np.ndarray  # per-building draw in [0, 1): roof colour
    parcel_hash: np.ndarray  # per-parcel draw in [0, 1): brightness, row texture
    water: np.ndarray  # bool
    road: np.ndarray  # bool
    u: np.ndarray  # local parcel coordinates, px
    v: np.ndarray
    sar: BuildingSar


def _buildings(x: np.ndarray, y: np.ndarray, seed: int, parcels=None, urban: Optional[np.ndarray] = None) -> Buildings:
    """Building footprints at float pixel coordinates, with a per-building hash (roof colour) and
    the SAR geometry derived in the building's own cell (so no second evaluation at shifted
    coordinates is needed)."""
    i, j, u, v = parcels if parcels is not None else _parcels(x, y, seed)
    if urban is None:
        urban = _is_urban(i, j, seed)
    # Sub-grid cells inside the road margin.
    inner_u, inner_v = u - ROAD_HALF, v - ROAD_HALF
    ci = np.floor(inner_u * (1.0 / BUILDING_CELL)).astype(np.int32)
    cj = np.floor(inner_v * (1.0 / BUILDING_CELL)).astype(np.int32)
    lu, lv = inner_u - ci * BUILDING_CELL, inner_v - cj * BUILDING_CELL
    idx, ta, tb = _key_tables(i * 8 + ci, j * 8 + cj)
    # Per building cell: footprint 9..18 x 8..17 px centred in the 24 px cell, height hash,
    # and presence (some cells stay empty).
    h1, h2 = _hash(seed + 21, ta, tb), _hash(seed + 22, ta, tb)
    w, hgt = 9 + h1 * 9, 8 + h2 * 9
    lo_u, lo_v = (BUILDING_CELL - w) * 0.5, (BUILDING_CELL - hgt) * 0.5
    present = (h1 * 7.3) % 1.0 < 0.85
    lo_u = np.where(present, lo_u, np.float32(1e9)).astype(np.float32)  # absent: never inside
    # Only full sub-cells inside the road margin: the road strip lives at the parcel edge.
    limit = (PARCEL - 2 * ROAD_HALF) // BUILDING_CELL
    cell = urban & (ci >= 0) & (cj >= 0) & (ci < limit) & (cj < limit)
    cell &= lv >= np.take(lo_v.astype(np.float32), idx)
    cell &= lv < np.take((lo_v + hgt).astype(np.float32), idx)
    du = lu - np.take(lo_u, idx)  # position east of the footprint's west edge
    width = np.take(w.astype(np.float32), idx)
    mask = cell & (du >= 0) & (du < width)
    sar = BuildingSar(
        wall=mask & (du >= width - 1.5),
        layover=cell & (du >= LAYOVER) & (du < width + LAYOVER),
        shadow=cell & (du < 0) & (du >= -SHADOW),
    )
    return Buildings(mask=mask, hash=np.take(h2, idx), sar=sar)


def scene_at(x: np.ndarray, y: np.ndarray, seed: int) -> SceneSample:
    """Evaluate the scene at float optical-pixel coordinates (pixel centres are ``k + 0.5``).

    ``x`` and ``y`` are 2-D windows of coordinates (smooth fields are sampled on a coarse grid
    of the window and interpolated).
    """
    parcels = _parcels(x, y, seed)
    i, j, u, v = parcels
    urban = _is_urban(i, j, seed)
    ph = _table_hash(seed + 41, i, j)  # per-parcel draw
    cls = np.where(ph < 0.5, VEGETATION, BARE).astype(np.uint8)
    edge = np.minimum(np.minimum(u, PARCEL - u), np.minimum(v, PARCEL - v))
    town_road = urban & (edge < ROAD_HALF)
    rural_road = (~urban) & (j % 4 == 0) & (v < 2)
    cls[urban | rural_road] = BUILT
    water = _coarse(lambda a, b: _fbm(a, b, WATER_SCALE, seed + 51), x, y) < 0.29
    cls[water] = WATER
    b = _buildings(x, y, seed, parcels, urban)
    return SceneSample(cls=cls, building=b.mask & ~water, building_hash=b.hash, parcel_hash=ph, water=water,
                       road=town_road | rural_road, u=u, v=v, sar=b.sar)


def _optical_window(x, y, seed, bands: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = scene_at(x, y, seed)
    cls = s.cls
    sig = _OPTICAL[cls]  # (h, w, 4)
    # Per-parcel brightness and field rows (texture the SAR does not see at this scale).
    bright = 0.8 + 0.4 * s.parcel_hash
    rows = np.where(cls == BARE, 1.0 + 0.12 * np.sin((s.u + s.v * (s.parcel_hash - 0.5)) * 1.3), 1.0)
    factor = (bright * rows).astype(np.float32)[..., None]
    roof = 0.15 + 0.25 * s.building_hash
    sig = sig * factor
    b = s.building
    sig[b] = np.stack([roof[b] * 0.9, roof[b] * 0.85, roof[b] * 1.1, roof[b] * 0.9], axis=-1)
    # Band mapping: 4 -> B,G,R,NIR; 3 -> R,G,B; other counts interpolate across the signature.
    if bands == 4:
        out = sig
    elif bands == 3:
        out = sig[..., [2, 1, 0]]
    else:
        pos = np.linspace(0, 3, bands)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, 3)
        f = (pos - lo).astype(np.float32)
        out = sig[..., lo] * (1 - f) + sig[..., hi] * f
    noise = rng.standard_normal(out.shape, dtype=np.float32) * 0.008
    out = np.clip(out + noise, 0.001, 1.0)
    return np.moveaxis(out, -1, 0), cls


def _sar_window(x, y, seed, bands: int, rng: np.random.Generator) -> np.ndarray:
    """Linear sigma0 power (bands, h, w) at float optical-pixel coordinates."""
    s = scene_at(x, y, seed)
    cls = s.cls
    water = s.water
    # Sensor to the east: a roof at ground x appears at x + LAYOVER in the image, the wall
    # facing the sensor is the east edge, the shadow falls west of the footprint.
    foot = s.building
    wall = s.sar.wall & ~water
    roof_img = s.sar.layover & ~water
    shadow = s.sar.shadow & ~foot & ~roof_img & ~water
    out = np.empty((bands, *cls.shape), dtype=np.float32)
    for b in range(bands):
        p = b % 2  # co-pol / cross-pol pattern
        power = _SAR_POWER[cls, p]
        power[shadow] = 10 ** (_SHADOW_DB[p] / 10)
        power[roof_img] = 10 ** (_ROOF_DB[p] / 10)
        power[wall] = 10 ** (_DOUBLE_BOUNCE_DB[p] / 10)
        # Multiplicative speckle: Gamma(L, 1/L) has mean 1 and variance 1/L.
        speckle = rng.standard_gamma(LOOKS, size=cls.shape, dtype=np.float32)
        np.multiply(power, speckle * np.float32(1.0 / LOOKS), out=out[b])
    return out


# ----------------------------------------------------------------------------- writing
def _windows(height: int, width: int, block: int):
    # Strips of at most 128 rows: the many elementwise passes then stay in the CPU cache
    # (about 1.5x faster than 1024 x 1024 windows); ``block`` bounds the width.
    rows = max(1, min(block, 128))
    for r in range(0, height, rows):
        for c in range(0, width, block):
            yield r, c, min(rows, height - r), min(block, width - c)


def _optical_to_float_pixels(xs, ys, opt_transform):
    inv = ~opt_transform
    return inv.a * xs + inv.b * ys + inv.c, inv.d * xs + inv.e * ys + inv.f


@dataclass(frozen=True)
class SceneGrids:
    """Where the pair lies: the optical (and label) grid and the SAR grid over the same ground."""

    optical_crs: Any  # rasterio CRS
    optical_transform: Any  # affine.Affine
    height: int
    width: int
    sar_crs: Any
    sar_transform: Any
    sar_height: int
    sar_width: int

    @property
    def reprojected(self) -> bool:
        return self.sar_crs != self.optical_crs


@dataclass(frozen=True)
class OpticalEncoding:
    """Reflectance in [0, 1] -> stored optical values: scaled to the dtype, never the nodata value."""

    dtype: str
    scale: float  # uint16: x10000, uint8: x255, float32: as is
    floor: Optional[float]  # lowest stored value when nodata lies below the data range, else None
    nodata: Optional[float]

    @classmethod
    def for_dtype(cls, dtype: str, nodata: Optional[float]) -> OpticalEncoding:
        floor: Optional[float] = 1.0 if dtype != "float32" else 1e-4
        if nodata is not None and float(nodata) >= floor:
            floor = None  # a nodata value inside the data range: values are moved off it instead
        return cls(dtype, {"uint16": 10000.0, "uint8": 255.0, "float32": 1.0}[dtype], floor, nodata)

    def encode(self, reflectance: np.ndarray) -> np.ndarray:
        vals = reflectance * np.float32(self.scale)
        if self.dtype != "float32":
            vals = np.rint(vals)
        if self.floor is not None:
            vals = np.maximum(vals, self.floor)
        elif self.nodata is not None:
            vals[vals == np.float32(self.nodata)] += 1
        return vals.astype(self.dtype)


@dataclass(frozen=True)
class ScenePaths:
    """The files of one scene pair (``labels`` None when no label raster is written)."""

    optical: Path
    sar: Path
    labels: Optional[Path]

    @classmethod
    def in_folder(cls, out: Path, name: str, labels: bool) -> ScenePaths:
        return cls(out / f"{name}_optical.tif", out / f"{name}_sar.tif", out / f"{name}_labels.tif" if labels else None)

    def files(self) -> list[Path]:
        return [p for p in (self.optical, self.sar, self.labels) if p is not None]


def write_scene_pair(
    out_dir: str | Path,
    height: int,
    width: int,
    *,
    seed: int = 0,
    optical_bands: int = 4,
    optical_dtype: str = "uint16",
    sar_bands: int = 2,
    sar_scale: str = "linear",
    sar_crs: Optional[str] = None,
    sar_res: Optional[float] = None,
    nodata_optical: Optional[float] = 0,
    block: int = 1024,
    labels: bool = True,
    crs: str = "EPSG:32631",
    res: float = 1.0,
    origin: tuple[float, float] = (590000.0, 5760000.0),
    name: str = "scene",
    overwrite: bool = False,
) -> dict:
    """Write ``<name>_optical.tif``, ``<name>_sar.tif`` (and ``<name>_labels.tif``) into ``out_dir``.

    The optical raster is ``height x width`` at ``res`` in ``crs`` with its top-left corner at
    ``origin``. The SAR raster covers the same ground on its own grid: ``sar_crs`` (default the
    optical CRS) and ``sar_res`` (default ``res``, in ``sar_crs`` units). Optical values are
    reflectance scaled to the dtype (uint16: x10000, uint8: x255, float32: as is) and never
    equal ``nodata_optical``; SAR is sigma0 in ``sar_scale`` (linear power, amplitude or dB).
    Returns ``dict(optical=Path, sar=Path, labels=Path | None, classes=list[str])``.

    A folder that is not empty is written into only with ``overwrite``, and then only the
    scenes synth wrote there before are replaced. The rasters are written beside their final
    names and renamed at the end, so a failure leaves the folder as it was.
    """
    import rasterio

    _check_request(height, width, sar_scale, optical_dtype, optical_bands, sar_bands, res, sar_res)
    grids = _scene_grids(height, width, crs, sar_crs, res, sar_res, origin)
    out = check_writable(out_dir, "the output folder", folder=True)
    encoding = OpticalEncoding.for_dtype(optical_dtype, nodata_optical)
    final = ScenePaths.in_folder(out, name, labels)
    created = _prepare_folder(out, final.files(), overwrite)
    with _written_beside(final, created) as tmp:
        # GDAL keeps dirty blocks of the written rasters in its cache (5 % of RAM by default):
        # a small cache keeps the generator's memory independent of the scene size.
        with rasterio.Env(GDAL_CACHEMAX=64):
            _write_optical_and_labels(tmp, grids, encoding, optical_bands, seed, block)
            _write_sar(tmp.sar, grids, sar_bands, sar_scale, seed, block)
    return {"optical": final.optical, "sar": final.sar, "labels": final.labels, "classes": list(CLASSES)}


def _check_request(height, width, sar_scale, optical_dtype, optical_bands, sar_bands, res, sar_res) -> None:
    if height < 1 or width < 1:
        raise UserError("the synthetic scene needs a height and width of at least 1 pixel")
    if sar_scale not in ("linear", "db", "amplitude"):
        raise UserError(f"sar_scale must be linear, db or amplitude, not '{sar_scale}'")
    if optical_dtype not in ("uint8", "uint16", "float32"):
        raise UserError(f"optical dtype must be uint8, uint16 or float32, not '{optical_dtype}'")
    if optical_bands < 1 or sar_bands < 1:
        raise UserError("the synthetic scene needs at least one optical and one SAR band")
    if not res > 0 or (sar_res is not None and not sar_res > 0):
        raise UserError("the pixel sizes --res and --sar-res must be positive numbers")


def _scene_grids(height: int, width: int, crs: str, sar_crs: Optional[str], res: float,
                 sar_res: Optional[float], origin: tuple[float, float]) -> SceneGrids:
    """The optical grid from its origin and pixel size; the SAR grid covering its bounds."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.errors import CRSError
    from rasterio.transform import from_origin
    from rasterio.warp import transform_bounds

    try:
        with rasterio.Env():  # GDAL's messages go to logging, not straight to stderr
            opt_crs = CRS.from_user_input(crs)
            s_crs = CRS.from_user_input(sar_crs) if sar_crs else opt_crs
    except CRSError:
        raise UserError(f"'{sar_crs if sar_crs else crs}' is not a CRS that PROJ knows (try e.g. EPSG:32632)") from None
    left, top = origin
    right, bottom = left + width * res, top - height * res
    if s_crs == opt_crs:
        sb = (left, bottom, right, top)
    else:
        sb = transform_bounds(opt_crs, s_crs, left, bottom, right, top, densify_pts=51)
    s_res = float(sar_res) if sar_res else float(res)
    if s_crs != opt_crs and not sar_res:
        # Keep about the same number of pixels across the scene in the other CRS.
        s_res = (sb[2] - sb[0]) / width
    return SceneGrids(
        optical_crs=opt_crs, optical_transform=from_origin(left, top, res, res), height=height, width=width,
        sar_crs=s_crs, sar_transform=from_origin(sb[0], sb[3], s_res, s_res),
        sar_height=max(1, int(math.ceil((sb[3] - sb[1]) / s_res))),
        sar_width=max(1, int(math.ceil((sb[2] - sb[0]) / s_res))),
    )


@contextlib.contextmanager
def _written_beside(final: ScenePaths, created: Optional[Path]) -> Iterator[ScenePaths]:
    """Yield temporary siblings of ``final`` (:func:`staged_file` each); rename them onto it on
    success, else remove them (and the folder this run created)."""
    try:
        with contextlib.ExitStack() as stack:
            def staged(p: Optional[Path]) -> Optional[Path]:
                return stack.enter_context(staged_file(p)) if p is not None else None

            yield ScenePaths(staged(final.optical), staged(final.sar), staged(final.labels))
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _tiling(height: int, width: int) -> dict:
    return dict(tiled=True, blockxsize=256, blockysize=256) if min(height, width) >= 256 else {}


def _optical_band_names(count: int) -> list[str]:
    return {4: ["blue", "green", "red", "nir"], 3: ["red", "green", "blue"]}.get(
        count, [f"B{k + 1}" for k in range(count)])


def _sar_band_names(count: int) -> list[str]:
    return {1: ["VV"], 2: ["VV", "VH"], 4: ["HH", "HV", "VH", "VV"]}.get(count, [f"P{k + 1}" for k in range(count)])


def _write_optical_and_labels(paths: ScenePaths, grids: SceneGrids, encoding: OpticalEncoding, bands: int,
                              seed: int, block: int) -> None:
    """Optical reflectance (and the class of every pixel) window by window on the optical grid."""
    import rasterio
    from rasterio.windows import Window

    common = dict(driver="GTiff", width=grids.width, height=grids.height, crs=grids.optical_crs,
                  transform=grids.optical_transform)
    tiled = _tiling(grids.height, grids.width)
    opt_profile = dict(common, count=bands, dtype=encoding.dtype, nodata=encoding.nodata, interleave="pixel", **tiled)
    lab_profile = dict(common, count=1, dtype="uint8", nodata=255, **tiled)
    with contextlib.ExitStack() as stack:
        dst_o = stack.enter_context(rasterio.open(paths.optical, "w", **opt_profile))
        dst_l = stack.enter_context(rasterio.open(paths.labels, "w", **lab_profile)) if paths.labels else None
        for k, nm in enumerate(_optical_band_names(bands)):
            dst_o.set_band_description(k + 1, nm)
        for r, c, h, w in _windows(grids.height, grids.width, block):
            rng = np.random.default_rng([seed, 1, r, c])
            yy, xx = np.mgrid[r:r + h, c:c + w].astype(np.float32) + np.float32(0.5)
            refl, cls = _optical_window(xx, yy, seed, bands, rng)
            dst_o.write(encoding.encode(refl), window=Window(c, r, w, h))
            if dst_l is not None:
                dst_l.write(cls[None], window=Window(c, r, w, h))
        dst_o.update_tags(codemae_product="synthetic_optical")
        if dst_l is not None:
            dst_l.update_tags(CLASSES=",".join(CLASSES), codemae_product="synthetic_labels")


def _write_sar(path: Path, grids: SceneGrids, bands: int, scale: str, seed: int, block: int) -> None:
    """SAR sigma0 in ``scale``, window by window on the SAR grid."""
    import rasterio
    from rasterio.windows import Window

    profile = dict(driver="GTiff", width=grids.sar_width, height=grids.sar_height, count=bands, dtype="float32",
                   crs=grids.sar_crs, transform=grids.sar_transform, nodata=float("nan"), interleave="pixel",
                   **_tiling(grids.sar_height, grids.sar_width))
    with rasterio.open(path, "w", **profile) as dst:
        for k, nm in enumerate(_sar_band_names(bands)):
            dst.set_band_description(k + 1, nm)
        dst.update_tags(SAR_SCALE=scale, codemae_product="synthetic_sar")
        for r, c, h, w in _windows(grids.sar_height, grids.sar_width, block):
            rng = np.random.default_rng([seed, 2, r, c])
            xx, yy = _sar_window_in_optical_pixels(grids, r, c, h, w)
            power = _sar_window(xx, yy, seed, bands, rng)
            dst.write(_power_in_scale(power, scale), window=Window(c, r, w, h))


def _sar_window_in_optical_pixels(grids: SceneGrids, r: int, c: int, h: int, w: int):
    """Optical-pixel coordinates (x, y) of the centres of a SAR window's pixels.

    SAR pixel centres -> ground -> optical pixel coordinates. A coarse grid is transformed
    exactly and interpolated: projections are smooth at this scale.
    """
    from rasterio.warp import transform as warp_transform

    step = 32
    gr = np.arange(0, h + step, step, dtype=np.float64)
    gc = np.arange(0, w + step, step, dtype=np.float64)
    GC, GR = np.meshgrid(c + gc + 0.5, r + gr + 0.5)
    X = grids.sar_transform.a * GC + grids.sar_transform.c
    Y = grids.sar_transform.e * GR + grids.sar_transform.f
    if grids.reprojected:
        X, Y = (np.asarray(a).reshape(GC.shape)
                for a in warp_transform(grids.sar_crs, grids.optical_crs, X.ravel(), Y.ravel()))
    px, py = _optical_to_float_pixels(X, Y, grids.optical_transform)
    fr = (np.arange(h, dtype=np.float32)) / step
    fc = (np.arange(w, dtype=np.float32)) / step
    return _bilinear_grid(px.astype(np.float32), fr, fc), _bilinear_grid(py.astype(np.float32), fr, fc)


def _power_in_scale(power: np.ndarray, scale: str) -> np.ndarray:
    """Linear sigma0 power (always > 0 here) -> float32 values in the written ``scale``."""
    if scale == "db":
        return power_to_db(power)
    if scale == "amplitude":
        return np.sqrt(power).astype(np.float32)
    return power.astype(np.float32)


def _prepare_folder(out: Path, targets: list[Path], overwrite: bool) -> Optional[Path]:
    """Refuse a non-empty folder without ``overwrite`` and, with it, any target file that synth
    did not write; remove killed runs' temporaries; create the folder. Returns the top-most folder
    created (removed again if the run fails), or None."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"the output folder '{out}' is not empty; pass --overwrite to replace the scenes "
                            "synth wrote there, or choose an empty folder")
        for p in targets:
            check_replaceable(p, "the file", is_codemae_raster, maker="codemae synth")
    for p in targets:
        sweep_stale(p)
    created = topmost_missing(out)
    out.mkdir(parents=True, exist_ok=True)
    return created


def _bilinear_grid(grid: np.ndarray, fr: np.ndarray, fc: np.ndarray) -> np.ndarray:
    """Interpolate a coarse (R, C) grid at fractional row/col positions (outer product)."""
    r0 = np.minimum(np.floor(fr).astype(np.int64), grid.shape[0] - 2)
    c0 = np.minimum(np.floor(fc).astype(np.int64), grid.shape[1] - 2)
    tr = (fr - r0)[:, None]
    tc = (fc - c0)[None, :]
    g00 = grid[r0][:, c0]
    g01 = grid[r0][:, c0 + 1]
    g10 = grid[r0 + 1][:, c0]
    g11 = grid[r0 + 1][:, c0 + 1]
    top = g00 + (g01 - g00) * tc
    bot = g10 + (g11 - g10) * tc
    return (top + (bot - top) * tr).astype(np.float32)
