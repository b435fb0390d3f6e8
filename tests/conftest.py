"""Shared test fixtures: paths to the real samples and a GPU skip marker.

The other test support, one of each: ``rasters.write_raster`` writes every GeoTIFF a test needs
(fresh or copied from another raster's profile); ``fakes`` holds the random prepared dataset,
a pretraining checkpoint, the tiny model configuration and a random input pair.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "real"
SAMPLE = ROOT / "codemae_cli" / "sample_data" / "spacenet6_rotterdam"

# Tests run on 2 cores next to other work: keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def real_dir() -> Path:
    return REAL


@pytest.fixture(scope="session")
def sample_pair() -> tuple[Path, Path]:
    """The built-in SpaceNet 6 Rotterdam optical/SAR pair (same 200 x 200 grid, 4.5 m)."""
    return SAMPLE / "rgb_unmasked.tif", SAMPLE / "sar_masked.tif"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # torch missing or broken: GPU tests cannot run either
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
