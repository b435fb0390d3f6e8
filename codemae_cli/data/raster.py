"""Opening and validating input rasters, nodata handling and SAR scale conversions.

Conventions used throughout ``codemae prepare``:

* Nodata comes from the file and can be overridden per modality; 0 is a legitimate nodata
  value (never tested for truthiness) and NaN is always nodata.
* An optical pixel of one file is invalid when *all* its bands equal the nodata value (a black
  pixel of a legitimate band is not nodata) or any band is not finite.
* SAR is resampled in linear power and converted to dB once (``codemae_cli.data.geo``:
  ``sar_to_power`` / ``power_to_db``). Values <= 0 in linear power or amplitude are nodata.
  Complex single-look-complex (SLC) input is converted to intensity ``|z|^2`` (uncalibrated:
  any product-specific scale factor is not applied), which is the linear power the rest of
  the pipeline expects.
* Inputs are read as float32 with NaN marking invalid pixels, so later stages only test NaN.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from codemae_cli.data import geo
from codemae_cli.data.geo import Grid
from codemae_cli.errors import UserError

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
SAR_SCALES = ("auto", *geo.SAR_SCALES)


@dataclass
class RasterSource:
    """What prepare needs to know about one input raster (no open handle: picklable)."""

    path: str
    crs_wkt: str
    transform: tuple  # affine coefficients (a, b, c, d, e, f)
    width: int
    height: int
    count: int
    dtype: str
    nodata: Optional[float]
    descriptions: list
    tags: dict = field(default_factory=dict)

    @cached_property
    def grid(self) -> Grid:
        return Grid(self.crs_wkt, self.transform, self.width, self.height)

    @property
    def crs(self):
        return self.grid.crs

    @property
    def is_complex(self) -> bool:
        return np.dtype(self.dtype).kind == "c"

    @property
    def pixel_size(self) -> float:
        """Geometric mean pixel size in CRS units (works for rotated transforms)."""
        return self.grid.pixel_size


def expand_inputs(values: list[str] | str | None, role: str) -> list[Path]:
    """Paths from files, directories (their rasters, sorted) or glob patterns."""
    if values is None:
        return []
    if isinstance(values, (str, Path)):
        values = [values]
    out: list[Path] = []
    for v in values:
        v = str(v)
        p = Path(v).expanduser()
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in RASTER_SUFFIXES)
            if not found:
                raise UserError(f"{role} directory '{p}' holds no raster files (.tif, .tiff, .vrt, .jp2)")
            out.extend(found)
        elif any(ch in v for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(os.path.expanduser(v)))
            found = [q for q in found if q.is_file()]
            if not found:
                raise UserError(f"{role} pattern '{v}' matches no file")
            out.extend(found)
        else:
            if not p.exists():
                raise UserError(f"{role} file '{p}' does not exist")
            out.append(p)
    return out


def open_raster(path: str | Path, role: str):
    """An open rasterio dataset; a missing or unreadable file is one sentence naming ``role``.

    The one place every command opens a user's raster (prepare, predict, evaluate)."""
    import rasterio
    from rasterio.errors import RasterioIOError

    p = Path(path)
    if not p.exists():
        raise UserError(f"{role} file '{p}' does not exist")
    try:
        return rasterio.open(p)
    except RasterioIOError:
        raise UserError(f"{role} file '{p}' is not a readable raster") from None


def open_source(path: str | Path, role: str) -> RasterSource:
    """Open ``path`` and check that prepare can use it; errors are one sentence."""
    p = Path(path)
    with open_raster(p, role) as src:
        if src.crs is None:
            if src.gcps[0]:
                raise UserError(
                    f"{role} raster '{p}' is georeferenced only by ground control points; "
                    "orthorectify it first (e.g. gdalwarp -tps)"
                )
            raise UserError(f"{role} raster '{p}' has no CRS (coordinate reference system)")
        if src.transform.is_identity:
            raise UserError(f"{role} raster '{p}' has no geotransform")
        return RasterSource(
            path=str(p),
            crs_wkt=src.crs.to_wkt(),
            transform=tuple(src.transform)[:6],
            width=src.width,
            height=src.height,
            count=src.count,
            dtype=src.dtypes[0],
            nodata=src.nodata,
            descriptions=list(src.descriptions),
            tags=dict(src.tags()),
        )


def parse_nodata(value: Optional[str | float]) -> tuple[bool, Optional[float]]:
    """``--nodata-*`` value -> (override given, value). 'none' removes the file's nodata."""
    if value is None:
        return False, None
    if isinstance(value, (int, float)):
        return True, float(value)
    s = str(value).strip().lower()
    if s in ("none", "null", ""):
        return True, None
    try:
        return True, float(s)
    except ValueError:
        raise UserError(f"nodata value '{value}' is not a number, 'nan' or 'none'") from None


def nodata_override_meta(value: Optional[str | float]) -> Optional[float | str]:
    """A ``--nodata-*`` value as metadata and checkpoints record it, and :func:`parse_nodata`
    reads back: None (not given: each file's own nodata), "none" (the files' nodata ignored),
    "nan", or the number."""
    given, v = parse_nodata(value)
    if not given:
        return None
    if v is None:
        return "none"
    return "nan" if math.isnan(v) else v


def effective_nodata(src, override: tuple[bool, Optional[float]]) -> Optional[float]:
    """The nodata value to read ``src`` (anything with a ``.nodata``) with: the override when given."""
    given, value = override
    return value if given else src.nodata


def band_names(sources: list[RasterSource], default_prefix: str) -> list[str]:
    """Band names: file band descriptions, else what distinguishes the file names, else B1.."""
    if len(sources) == 1:
        s = sources[0]
        return [d if d else f for d, f in zip(s.descriptions, fallback_band_names(s.count, prefix=default_prefix),
                                               strict=True)]
    stems = [Path(s.path).stem for s in sources]
    # What the file names share, cut at a separator so "x_B02", "x_B8A" give "B02", "B8A".
    seps = "_-. "
    prefix = os.path.commonprefix(stems)
    prefix = prefix[: max((prefix.rfind(c) for c in seps), default=-1) + 1]
    suffix = os.path.commonprefix([t[::-1] for t in stems])[::-1]
    cut = [suffix.find(c) for c in seps if c in suffix]
    suffix = suffix[min(cut):] if cut else ""
    names = []
    for s, stem in zip(sources, stems, strict=True):
        core = stem[len(prefix): len(stem) - len(suffix) if suffix else None] or stem
        for k, d in enumerate(s.descriptions):
            if d:
                names.append(d)
            else:
                names.append(core if s.count == 1 else f"{core}_{k + 1}")
    return names


_RGB_ALIASES = {"red": ("red", "r", "b04"), "green": ("green", "g", "b03"), "blue": ("blue", "b", "b02")}
# Short Sentinel-2 names. Alone they are ambiguous: Landsat 5/7 call red B3 and NIR B4, and a
# file without band descriptions gets B1, B2, ... from band_names.
_S2_SHORT = {"red": "b4", "green": "b3", "blue": "b2"}
_S2_ONLY = ("b8a", "b11", "b12")  # bands no 4-band or Landsat 5/7 naming has


def _plain_band_name(name) -> str:
    """Lower case, without a Sentinel-2 resolution suffix: "B02_10m" -> "b02"."""
    n = str(name).strip().lower()
    head, sep, tail = n.rpartition("_")
    return head if sep and tail.endswith("m") and tail[:-1].isdigit() else n


def fallback_band_names(count: int, input_bands: Optional[Sequence[int]] = None, prefix: str = "B") -> list[str]:
    """The names :func:`band_names` gives the bands of one file without band descriptions:
    B<k> for input band k (1-based; ``input_bands``: the bands kept, default all ``count``;
    ``prefix``: "P" for SAR)."""
    return [f"{prefix}{k}" for k in (input_bands or range(1, count + 1))]


def rgb_band_indices(names: Sequence[str], input_bands: Optional[Sequence[int]] = None
                     ) -> Optional[tuple[int, int, int]]:
    """Indices of the red, green and blue bands when the band names say which they are, else None.

    Understood (any case): red/green/blue, R/G/B, Sentinel-2 B04/B03/B02 (also "B04_10m"), and
    the short B4/B3/B2 only where the names are clearly Sentinel-2 (zero-padded names, or B8A,
    B11 or B12 among them). Names that are exactly what prepare gives a file without band
    descriptions (B1, B2, ... in input order; ``input_bands``: the 1-based input bands kept,
    as metadata.json's ``selected`` records them) say nothing.
    """
    lower = [_plain_band_name(n) for n in names]
    if lower == [n.lower() for n in fallback_band_names(len(lower), input_bands)]:
        return None
    sentinel2 = any(n in _S2_ONLY or (len(n) == 3 and n.startswith("b0") and n[2].isdigit()) for n in lower)
    found = []
    for colour, aliases in _RGB_ALIASES.items():
        aliases = aliases + ((_S2_SHORT[colour],) if sentinel2 else ())
        found.append(next((i for i, n in enumerate(lower) if n in aliases), None))
    if any(i is None for i in found):
        return None
    return found[0], found[1], found[2]


RGB_SOURCES = ("names", "order", "first", "none", "run")


@dataclass(frozen=True)
class RGBChoice:
    """Which optical bands are red, green and blue, and the rule that chose them: the one
    decision the OKD teacher's input, CDR's luminance, the quick-look and analyze read
    (:func:`choose_rgb`). Each user applies its own explicit override and its own policy for
    a guess (``source == "first"``)."""

    names: tuple[str, ...]  # the optical band names, in the model's band order
    bands: Optional[tuple[int, int, int]]  # 0-based positions of R, G, B; None: fewer than 3 bands
    rule: str  # why ``bands``, as the start-up line says it
    # names: the band names say; order: exactly 3 bands, in their order; first: more than 3
    # bands whose names do not say, the first three (a guess); none: fewer than 3 bands;
    # run: as recorded by the run being resumed.
    source: str = "names"
    conflict: Optional[str] = None  # the refusal when datasets' names disagree (raised by the users)

    def band_names(self, bands: Sequence[int]) -> tuple[str, ...]:
        """The names of ``bands`` ("band k" where the names are not known)."""
        return tuple(self.names[b] if b < len(self.names) else f"band {b + 1}" for b in bands)

    def to_meta(self) -> dict:
        return {"bands": list(self.bands) if self.bands else None, "names": list(self.names),
                "rule": self.rule, "source": self.source}


def choose_rgb(datasets: Sequence[tuple[str, dict]], count: Optional[int] = None) -> RGBChoice:
    """Where red, green and blue are among the optical bands of prepared datasets
    (``(label, metadata.json)`` pairs; ``count``: the optical band count, default the first
    dataset's number of band names).

    The band names decide where they say (:func:`rgb_band_indices`; every dataset whose names
    say must say the same positions, the others are read the same way, and datasets that
    disagree leave a one-sentence refusal in ``conflict``); else exactly three bands are red,
    green, blue in their order; else, with more, the first three are a guess; fewer than three
    bands have no colours.
    """
    said = []
    for label, meta in datasets:
        opt = meta.get("optical") or {}
        rgb = rgb_band_indices(opt.get("bands") or [], opt.get("selected"))
        if rgb is not None:
            said.append((label, tuple(opt.get("bands")), rgb))
    first = tuple((datasets[0][1].get("optical") or {}).get("bands") or []) if datasets else ()
    count = len(first) if count is None else int(count)
    if said:
        rule = "red, green, blue as the band names say"
        if len(said) < len(datasets):
            rule = (f"red, green, blue as the band names of {', '.join(repr(d[0]) for d in said)} say (the other "
                    "datasets' names do not say: read the same way)")
        conflict = None
        other = next((d for d in said if d[2] != said[0][2]), None)
        if other is not None:
            (ra, na, a), (rb, nb, b) = said[0], other
            conflict = (f"the band names put red, green, blue at different optical bands: {list(a)} in '{ra}' "
                        f"({', '.join(na)}) and {list(b)} in '{rb}' ({', '.join(nb)}); prepare the datasets with the "
                        "same band order (prepare --optical-bands) or set the bands by hand (model.okd.teacher_bands, "
                        "model.cdr.rgb_bands)")
        if max(said[0][2]) < count:
            return RGBChoice(said[0][1], said[0][2], rule, "names", conflict)
    names = first if len(first) == count else tuple(f"band {k + 1}" for k in range(count))
    if count == 3:
        return RGBChoice(names, (0, 1, 2), "the optical bands in their order", "order")
    if count > 3:
        told = f"the band names ({', '.join(names)}) do not say" if len(first) == count else "no band names say"
        return RGBChoice(names, (0, 1, 2), f"the first 3: {told} which are red, green and blue", "first")
    return RGBChoice(names, None, "fewer than 3 optical bands: no red, green, blue", "none")


NO_OVERRIDE = (False, None)  # parse_nodata(None): no --nodata-* given, each file's own nodata


def detect_sar_scale(src: RasterSource, requested: str, nodata: tuple = NO_OVERRIDE) -> str:
    """The input scale of a SAR file: 'slc', 'linear', 'amplitude' or 'db'.

    ``auto`` (documented in the summary): complex -> slc; integers -> amplitude (digital
    numbers of GRD products); floats with negative values -> dB; other floats -> linear power.
    ``nodata``: the ``--nodata-sar`` override as :func:`parse_nodata` returns it (its pixels are
    not values).
    """
    if src.is_complex:
        return "slc"
    if requested != "auto":
        return requested
    if np.dtype(src.dtype).kind in "iu":
        return "amplitude"
    return "db" if (_valid_sample(src, nodata) < 0).any() else "linear"


def _valid_sample(src: RasterSource, override: tuple = NO_OVERRIDE) -> np.ndarray:
    """The valid values of a decimated read of band 1 (about 256 x 256): enough to see their sign.
    Nodata is the file's, or the ``--nodata-*`` override (``override`` from :func:`parse_nodata`)."""
    import rasterio

    with rasterio.open(src.path) as ds:
        step = max(1, max(ds.width, ds.height) // 256)
        sample = ds.read(1, out_shape=(max(1, ds.height // step), max(1, ds.width // step))).astype(np.float64)
    nodata = effective_nodata(src, override)
    ok = np.isfinite(sample)
    if nodata is not None and not math.isnan(nodata):
        ok &= sample != nodata
    return sample[ok]


def check_sar_scale(src: RasterSource, scale: str, option: str = "--sar-scale", nodata: tuple = NO_OVERRIDE) -> None:
    """Refuse SAR values that cannot be in the declared scale, before any work: linear power and
    amplitude are never negative (a negative share means dB), and backscatter in dB is mostly
    negative (a large sample without one negative value is power, amplitude or digital numbers).
    ``nodata``: the ``--nodata-sar`` override as :func:`parse_nodata` returns it: its pixels are
    not looked at (a -9999 fill the file does not declare is not a dB value)."""
    if src.is_complex or scale not in ("linear", "amplitude", "db"):
        return
    values = _valid_sample(src, nodata)
    if values.size == 0:
        return
    negative = float((values < 0).mean())
    if scale in ("linear", "amplitude") and negative > 0.01:
        raise UserError(f"SAR raster '{src.path}' holds negative values ({100 * negative:.0f} % of a sample), which "
                        f"{'linear power' if scale == 'linear' else 'amplitude'} cannot: it looks like dB; "
                        f"pass {option} db")
    if scale == "db" and negative == 0 and values.size >= 100:
        raise UserError(f"SAR raster '{src.path}' holds no negative value (median {float(np.median(values)):.3g}), "
                        f"but backscatter in dB is mostly negative: it looks like linear power or amplitude; "
                        f"pass {option} linear or amplitude")


def optical_to_float(arr: np.ndarray, nodata: Optional[float]) -> np.ndarray:
    """(bands, h, w) optical -> float32 with every band NaN at invalid pixels."""
    a = arr.astype(np.float32, copy=True)
    bad = ~np.isfinite(a).all(axis=0)
    if nodata is not None and not math.isnan(nodata):
        bad |= (arr == nodata).all(axis=0)
    a[:, bad] = np.nan
    return a


def invalidate_pixels(arr: np.ndarray) -> np.ndarray:
    """Set all bands to NaN where any band is NaN (pixel-level validity); in place."""
    bad = np.isnan(arr).any(axis=0)
    if bad.any():
        arr[:, bad] = np.nan
    return arr
