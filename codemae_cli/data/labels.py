"""Labels on the chip grid: vector files rasterised, or a label raster warped with nearest.

Vector labels (:class:`VectorLabels`, the one reader: prepare's labels and evaluate's reference):
every feature is burnt with the integer code of its class column value (``geo.rasterize_shapes``,
pixel centres inside the polygon); pixels covered by no feature are class 0 ("background");
later features win where features overlap. The class column is ``--label-column``, by default
``class``; a file without that default column holds footprints (inside = class 1).

* numeric column: values are the codes (0..254); names from ``--classes`` (one per code)
  or ``class_<code>``;
* text column: with ``--classes``, each value must be one of the names and takes its position
  as code (or, when no value is a name and ``--classes`` is background plus one name per
  distinct value, e.g. ``building=yes`` with ``background,building``, the sorted values take
  codes 1..n); without, the sorted distinct values get codes 1..n after "background".

Label rasters: values are the codes; the file's nodata, or ``--label-nodata`` (e.g. -1 in int16
flood masks), and pixels outside the file become 255 (ignore). Class names from ``--classes``, else the raster's ``CLASSES`` tag (comma
separated, as written by ``codemae synth``), else ``class_<code>`` for the codes seen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from codemae_cli.data.geo import Grid, rasterize_shapes
from codemae_cli.errors import UserError

IGNORE = 255
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb", ".parquet", ".geoparquet", ".kml", ".gml")


def parse_classes(text: Optional[str]) -> Optional[list[str]]:
    if text is None:
        return None
    names = [c.strip() for c in str(text).split(",")]
    if not names or any(not n for n in names):
        raise UserError(f"--classes '{text}' must be comma-separated names like background,building")
    if len(set(names)) != len(names):
        raise UserError(f"--classes '{text}' names a class twice")
    if len(names) > IGNORE:
        raise UserError("--classes can name at most 255 classes (255 is the ignore value)")
    return names


def is_vector(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


DEFAULT_COLUMN = "class"


class VectorLabels:
    """A vector label file, re-projected to the grid CRS, with integer class codes.

    The one reader of vector labels: prepare's ``--labels`` and evaluate's ``--ref`` both read
    through it, so a file means the same pixels to both. ``column``: the class column; None
    takes ``class`` when the file has one, else the features are footprints (inside = class 1,
    named by ``classes[1]`` or "foreground"). ``what`` names the file in messages.
    """

    def __init__(self, path: str | Path, column: Optional[str], classes: Optional[list[str]], crs_wkt: str,
                 what: str = "label file"):
        self.path = Path(path)
        gdf = _read_features(self.path, what)
        if column is None and DEFAULT_COLUMN in gdf.columns:
            column = DEFAULT_COLUMN
        self.column = column
        if column is None:  # footprints (buildings, water bodies ...)
            codes, names = np.ones(len(gdf), dtype=np.int64), _footprint_classes(classes)
        else:
            gdf = _with_values(gdf, self.path, column, what)
            codes, names = _class_codes(gdf[column], column, classes)
        self.classes = {str(k): n for k, n in enumerate(names)}
        gdf = gdf.assign(_code=codes)[["_code", "geometry"]].to_crs(crs_wkt)
        self.gdf = gdf.reset_index(drop=True)

    @property
    def names(self) -> list[str]:
        return list(self.classes.values())

    def rasterize(self, grid: Grid, row: int, col: int, height: int, width: int) -> np.ndarray:
        """uint8 codes on the grid window; 0 where no feature."""
        left, bottom, right, top = grid.window_bounds(row, col, height, width)
        hits = self.gdf.sindex.query(_box(left, bottom, right, top), predicate="intersects")
        sub = self.gdf.iloc[np.sort(hits)]
        shapes = ((geom, int(code)) for geom, code in zip(sub.geometry, sub["_code"], strict=True))
        return rasterize_shapes(shapes, grid, row, col, height, width, fill=0, dtype=np.uint8)


def _read_features(path: Path, what: str):
    """The features of a vector file that have a geometry (a CRS is required)."""
    import geopandas as gpd

    if not path.exists():
        raise UserError(f"{what} '{path}' does not exist")
    try:
        gdf = gpd.read_file(path)
    except Exception:  # pyogrio raises several types for unreadable files
        raise UserError(f"{what} '{path}' is not a readable vector file") from None
    if len(gdf) == 0:
        raise UserError(f"{what} '{path}' has no features")
    if gdf.crs is None:
        raise UserError(f"{what} '{path}' has no CRS")
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if len(gdf) == 0:
        raise UserError(f"{what} '{path}' has no features with a geometry")
    return gdf


def _with_values(gdf, path: Path, column: str, what: str):
    """The features that have a ``column`` value."""
    if column not in gdf.columns:
        cols = ", ".join(c for c in gdf.columns if c != "geometry")
        raise UserError(f"{what} '{path}' has no column '{column}' (choose one with --label-column: {cols})")
    gdf = gdf[gdf[column].notna()]
    if len(gdf) == 0:
        raise UserError(f"{what} '{path}' has no features with a geometry and a '{column}' value")
    return gdf


def _footprint_classes(classes: Optional[list[str]]) -> list[str]:
    """Class names of footprints: code 0 outside, code 1 inside."""
    if classes is None:
        return ["background", "foreground"]
    if len(classes) < 2:
        raise UserError("footprints (a vector file without a class column) need two class names: "
                        "the background and the footprints' class")
    return list(classes)


def _class_codes(values, column: str, classes: Optional[list[str]]) -> tuple[np.ndarray, list[str]]:
    """Integer codes of a label column and the class names (see the module docstring)."""
    from pandas.api.types import is_bool_dtype, is_numeric_dtype

    if is_numeric_dtype(values.dtype) and not is_bool_dtype(values.dtype):
        v = values.to_numpy(dtype=np.float64)
        if (v != np.round(v)).any() or v.min() < 0 or v.max() >= IGNORE:
            raise UserError(f"label column '{column}' must hold whole class codes 0..254")
        codes = v.astype(np.int64)
        if classes is None:
            return codes, ["background"] + [f"class_{k}" for k in range(1, int(codes.max()) + 1)]
        if codes.max() >= len(classes):
            raise UserError(
                f"label column '{column}' has code {codes.max()} but --classes names only {len(classes)} classes"
            )
        return codes, classes
    text = values.astype(str)
    distinct = sorted(set(text))
    if classes is not None and not set(distinct) & set(classes) and len(classes) == len(distinct) + 1:
        # e.g. building=yes with --classes background,building: rename in sorted order.
        lookup, names = {n: k + 1 for k, n in enumerate(distinct)}, classes
    elif classes is not None:
        unknown = sorted(set(text) - set(classes))
        if unknown:
            raise UserError(f"label value '{unknown[0]}' of column '{column}' is not one of --classes")
        lookup, names = {n: k for k, n in enumerate(classes)}, classes
    else:
        names = ["background"] + distinct
        lookup = {n: k + 1 for k, n in enumerate(distinct)}
        if len(names) > IGNORE:
            raise UserError(f"label column '{column}' has more than 254 distinct values")
    return text.map(lookup).to_numpy(dtype=np.int64), names


def _box(*b):
    from shapely.geometry import box

    return box(*b)


def raster_label_prepare(nodata: Optional[float], source: str = "the label raster"):
    """Turn a raw label block into uint8 codes with 255 (ignore) at nodata.

    The nodata mask comes first, so only labelled pixels must hold class codes 0..255; a value
    outside that range is named in the error with the option that declares it nodata."""

    def prepare(block: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(block) if np.issubdtype(block.dtype, np.floating) else np.zeros(block.shape, dtype=bool)
        if nodata is not None and not math.isnan(nodata):
            bad |= block == nodata
        labelled = block[~bad]
        if labelled.size and (labelled.min() < 0 or labelled.max() > IGNORE):
            value = labelled.min() if labelled.min() < 0 else labelled.max()
            raise UserError(
                f"label raster '{source}' holds the value {value:g}, outside the class codes 0..255; if {value:g} "
                f"marks unlabelled pixels, pass --label-nodata {value:g} (they are then ignored, as code {IGNORE})")
        out = np.where(bad, IGNORE, block).astype(np.uint8)
        return out

    return prepare


def raster_classes(tags: dict, classes: Optional[list[str]]) -> Optional[list[str]]:
    if classes is not None:
        return classes
    tag = tags.get("CLASSES") or tags.get("classes")
    if tag:
        return [c.strip() for c in tag.split(",")]
    return None
