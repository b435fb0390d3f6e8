"""Writing predictions: windowed writes into a tiled temporary GeoTIFF, then a Cloud-Optimised copy.

Rows of the prediction are written as they are finished (windowed writes), into an
uncompressed tiled GeoTIFF beside the output: uncompressed because GDAL rewrites a partially
written tile in place, while a compressed tile would be appended again and again. At the end
GDAL's COG driver copies it into a compressed COG with internal overviews (``mode`` or
``nearest`` for class maps, so no overview invents a class), and the copy is renamed onto the
output path. Nothing ever appears at the output path before it is complete.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from codemae_cli.fsutil import temp_sibling


def remove_quietly(*paths: Path | None) -> None:
    for p in paths:
        if p is None:
            continue
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        # GDAL may leave an auxiliary file next to a temporary raster
        aux = Path(str(p) + ".aux.xml")
        if aux.exists():
            aux.unlink()


class TiledWriter:
    """A tiled, uncompressed GeoTIFF open for windowed writes of finished rows."""

    def __init__(
        self,
        path: Path,
        grid,
        count: int,
        dtype: str,
        nodata: float | int | None,
        *,
        tags: dict | None = None,
        descriptions: list[str] | None = None,
        colormap: dict[int, tuple[int, int, int, int]] | None = None,
        scales: list[float] | None = None,
        blocksize: int = 256,
    ):
        import rasterio

        self.path = Path(path)
        profile = dict(
            driver="GTiff",
            width=grid.width,
            height=grid.height,
            count=count,
            dtype=dtype,
            crs=grid.crs,
            transform=grid.transform,
            nodata=nodata,
            tiled=True,
            blockxsize=blocksize,
            blockysize=blocksize,
            interleave="band" if count > 1 else "pixel",
            BIGTIFF="IF_SAFER",
        )
        self.ds = rasterio.open(self.path, "w", **profile)
        if tags:
            self.ds.update_tags(**{k: str(v) for k, v in tags.items()})
        for i, desc in enumerate(descriptions or [], start=1):
            self.ds.set_band_description(i, desc)
        if colormap:
            self.ds.write_colormap(1, colormap)
        if scales:
            self.ds.scales = tuple(scales)
            self.ds.offsets = tuple(0.0 for _ in scales)
        self.width = grid.width

    def write_rows(self, row: int, data: np.ndarray, col: int = 0) -> None:
        """Write ``data`` of shape (count, nrows, ncols) or (nrows, ncols) at (``row``, ``col``).

        Full rows by default (``ncols`` = the width); a panel of columns may be written in any order.
        """
        from rasterio.windows import Window

        if data.ndim == 2:
            data = data[None]
        if col < 0 or col + data.shape[2] > self.width:
            raise ValueError(f"columns [{col}, {col + data.shape[2]}) lie outside the raster's {self.width} columns")
        self.ds.write(data, window=Window(col, row, data.shape[2], data.shape[1]))

    def close(self) -> None:
        if not self.ds.closed:
            self.ds.close()


def write_cog(
    src: Path,
    dst: Path,
    *,
    overview_resampling: str = "mode",
    compress: str = "deflate",
    blocksize: int = 512,
) -> None:
    """Copy the tiled GeoTIFF ``src`` into a Cloud-Optimised GeoTIFF at ``dst`` (internal overviews)."""
    from rasterio.shutil import copy as rio_copy

    rio_copy(
        str(src),
        str(dst),
        driver="COG",
        COMPRESS=compress.upper(),
        BLOCKSIZE=blocksize,
        OVERVIEW_RESAMPLING=overview_resampling.upper(),
        NUM_THREADS="ALL_CPUS",
        BIGTIFF="IF_SAFER",
    )


def is_cog(path: str | Path) -> bool:
    """True when GDAL reports the file as a COG layout (tiled, overviews/IFDs ordered for HTTP reads)."""
    import rasterio

    with rasterio.open(path) as ds:
        layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT", "")
        return layout.upper() == "COG" and ds.profile.get("tiled", False)


__all__ = ["TiledWriter", "is_cog", "remove_quietly", "temp_sibling", "write_cog"]
