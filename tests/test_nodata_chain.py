"""A nodata override given at prepare travels like the band selection: prepared metadata ->
checkpoint record -> predict, which reads the scene with it unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
rasterio = pytest.importorskip("rasterio")

from rasters import write_raster  # noqa: E402

torch.set_num_threads(1)

FILL = 0.25  # a plausible linear backscatter, so only the override makes it nodata


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """A scene whose SAR holds FILL over its top-left 24 x 24 px (no nodata tag), prepared with
    ``--nodata-sar 0.25`` and fine-tuned for one step on SAR alone."""
    from codemae_cli.config import from_dict
    from codemae_cli.data.prepare import run_prepare
    from codemae_cli.data.synth import write_scene_pair
    from codemae_cli.tasks.config import FinetuneRecipe
    from codemae_cli.tasks.finetune import run_finetune

    root = tmp_path_factory.mktemp("nodata")
    scene = write_scene_pair(root / "raw", 64, 64, seed=11, labels=True)
    with rasterio.open(scene["sar"]) as src:
        sar = src.read()
    sar[:, :24, :24] = FILL
    sar_path = write_raster(root / "raw" / "sar_filled.tif", sar, like=scene["sar"], nodata=None)
    data = root / "prepared"
    run_prepare(out=str(data), optical=[str(scene["optical"])], sar=[str(sar_path)], labels=str(scene["labels"]),
                tile=16, block=1, split="0.75,0.25,0", seed=0, quicklook=False, nodata_sar=str(FILL))
    recipe = from_dict(FinetuneRecipe, {
        "data": {"datasets": [str(data)], "num_workers": 0, "img_size": 16},
        "model": {"preset": "tiny", "img_size": 16, "patch_size": 4, "drop_path": 0.0},
        "task": {"from_scratch": True, "head": "fpn", "neck_dim": 32, "inputs": "sar"},
        "optim": {"batch_size": 4, "epochs": 1, "max_steps": 1, "warmup_epochs": 0},
        "run": {"output_dir": str(root / "run"), "device": "cpu", "tensorboard": False, "seed": 0},
    })
    return {"data": data, "run": Path(run_finetune(recipe)["run_dir"]), "sar": sar_path, "root": root}


def test_prepare_records_the_override_and_the_checkpoint_carries_it(chain):
    from codemae_cli.train.checkpoint import read_checkpoint_meta

    md = json.loads((chain["data"] / "metadata.json").read_text())
    assert md["sar"]["nodata_override"] == FILL and md["optical"]["nodata_override"] is None
    meta = read_checkpoint_meta(chain["run"])
    assert meta.nodata_override == {"optical": None, "sar": FILL}


def test_predict_reads_the_scene_with_the_override_given_at_prepare(chain, tmp_path):
    from codemae_cli.infer.run import predict_from_checkpoint

    out = tmp_path / "mask.tif"
    summary = predict_from_checkpoint(chain["run"], sar=str(chain["sar"]), out=out, device="cpu")
    with rasterio.open(out) as src:
        cls, nodata = src.read(1), src.nodata
    filled = np.zeros(cls.shape, bool)
    filled[:24, :24] = True
    assert (cls[filled] == nodata).all()  # FILL is nodata, as at prepare
    assert (cls[~filled] != nodata).all()
    assert any("--nodata-sar given at prepare" in n for n in summary["notes"])
    # The user's own value wins: "none" makes FILL data again.
    again = predict_from_checkpoint(chain["run"], sar=str(chain["sar"]), out=tmp_path / "all.tif", device="cpu",
                                    nodata_sar="none")
    assert not any("given at prepare" in n for n in again["notes"])
    with rasterio.open(tmp_path / "all.tif") as src:
        assert (src.read(1) != src.nodata).all()


def test_older_checkpoints_read_each_files_own_nodata(chain):
    from codemae_cli.infer.run import scene_nodata_rules
    from codemae_cli.train.checkpoint import CheckpointMeta

    old = CheckpointMeta.from_dict({"kind": "finetune"}, chain["run"])
    assert old.nodata_override == {"optical": None, "sar": None}
    notes: list = []
    assert scene_nodata_rules(old, {"sar": None}, notes) == {"sar": None} and notes == []
    assert scene_nodata_rules(old, {"sar": "-1"}, notes) == {"sar": -1.0}
