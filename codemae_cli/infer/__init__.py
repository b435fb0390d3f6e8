"""Whole-scene inference: sliding windows, blending, COG writing, vectorising, checkpoint wiring."""

from codemae_cli.infer.predict import PredictStats, predict_scene
from codemae_cli.infer.windows import WindowGrid, ramp, resolve_overlap, window_starts

__all__ = ["PredictStats", "WindowGrid", "predict_scene", "ramp", "resolve_overlap", "window_starts"]
