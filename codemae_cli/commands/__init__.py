"""One module per command group; each defines ``register(app, bench)``.

Keep these modules light: import torch/rasterio/geopandas inside the command functions.
"""
