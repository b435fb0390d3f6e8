"""Derive the weak water/land labels shipped with the built-in SpaceNet 6 sample.

The sample has no reference labels, so the demo fine-tunes on a *weak* label made by a fixed,
documented rule from the optical image alone (not from the SAR, so a SAR-only model has to learn
the mapping rather than copy its input):

    water = smoothed(brightness) < 95  and  smoothed(G - R) > 3     (uint8 RGB, 7 x 7 box mean)

followed by removing connected water regions under 400 px (about 0.8 ha). The result is
vectorised into polygons (class 1 = water; everything else inside the image is class 0 = land)
so that `codemae prepare --labels` exercises the vector rasterisation path.

Run from the repository root:  python scripts/make_demo_labels.py
"""

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import rasterio
import rasterio.features
import torch
import torch.nn.functional as F
from shapely.geometry import box, shape
from shapely.ops import unary_union

HERE = Path(__file__).resolve().parents[1] / "codemae_cli" / "sample_data" / "spacenet6_rotterdam"


def box_mean(a: np.ndarray, k: int = 7) -> np.ndarray:
    t = torch.from_numpy(a.astype(np.float32))[None, None]
    return F.avg_pool2d(F.pad(t, (k // 2,) * 4, mode="replicate"), k, stride=1)[0, 0].numpy()


def main() -> None:
    with rasterio.open(HERE / "rgb_unmasked.tif") as ds:
        rgb = ds.read().astype(np.float32)
        transform, crs, bounds = ds.transform, ds.crs, ds.bounds
    r, g, b = rgb
    water = (box_mean((r + g + b) / 3) < 95) & (box_mean(g - r) > 3)
    polys = []
    for geom, val in rasterio.features.shapes(water.astype(np.uint8), mask=water, transform=transform):
        poly = shape(geom)
        if val == 1 and poly.area >= 400 * abs(transform.a * transform.e):
            polys.append(poly)
    gdf = gpd.GeoDataFrame({"class": [1] * len(polys), "name": ["water"] * len(polys)}, geometry=polys, crs=crs)
    # Land is everything else inside the image, so the polygons do not overlap.
    land_geom = box(*bounds).difference(unary_union(polys)) if polys else box(*bounds)
    land = gpd.GeoDataFrame({"class": [0], "name": ["land"]}, geometry=[land_geom], crs=crs)
    out = HERE / "water_labels.gpkg"
    out.unlink(missing_ok=True)
    gpd.GeoDataFrame(pd.concat([land, gdf], ignore_index=True), crs=crs).to_file(
        out, layer="labels", driver="GPKG"
    )
    print(f"{out}: {len(polys)} water polygons, water fraction {water.mean():.2f}")


if __name__ == "__main__":
    main()
