"""codemae: pair optical and SAR rasters, pretrain CoDe-MAE, fine-tune, predict whole scenes."""

__version__ = "0.1.0"
