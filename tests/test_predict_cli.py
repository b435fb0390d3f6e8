"""`codemae predict` end to end with a fine-tuned-format tiny checkpoint, its bad input, and `bench predict`."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import rasterio
from rasters import write_raster
from typer.testing import CliRunner

from codemae_cli.cli import app

runner = CliRunner()

OPT_STATS = {"mean": [1500.0, 1500.0, 1500.0, 2500.0], "std": [800.0, 800.0, 800.0, 1500.0]}
SAR_STATS = {"mean": [-10.0, -16.0], "std": [4.0, 4.0]}
CLASSES = [{"name": "water", "color": [0, 0, 255]}, {"name": "land", "color": [0, 200, 0]},
           {"name": "built-up", "color": [200, 0, 0]}]


def _checkpoint(root, inputs: str):
    """A checkpoint exactly as `codemae finetune` writes it (tiny preset, random weights)."""
    import torch

    from codemae_cli.config import to_dict
    from codemae_cli.tasks import build_task_model
    from codemae_cli.tasks.config import ClassSpec, EncoderSection, FinetuneRecipe, TaskConfig
    from codemae_cli.train.checkpoint import save_checkpoint
    from codemae_cli.train.config import DataConfig, RunConfig

    torch.manual_seed(0)
    recipe = FinetuneRecipe(
        data=DataConfig(datasets=["prepared"], img_size=32),
        model=EncoderSection(preset="tiny", img_size=32, drop_path=0.0),
        task=TaskConfig(kind="segmentation", inputs=inputs, head="linear", from_scratch=True,
                        classes=[ClassSpec(c["name"], c["color"]) for c in CLASSES]),
        run=RunConfig(output_dir=str(root / f"run_{inputs}"), ckpt_every=100),
    )
    model, enc_cfg = build_task_model(recipe, optical_bands=4, sar_bands=2, num_classes=3)
    meta = {
        "kind": "finetune", "task": "segmentation", "multilabel": False, "inputs": inputs, "classes": CLASSES,
        "ignore_index": 255, "bands": {"optical": ["blue", "green", "red", "nir"], "sar": ["VV", "VH"]},
        "stats": {"optical": OPT_STATS, "sar": SAR_STATS}, "img_size": 32, "patch_size": enc_cfg.patch_size,
        "preset": enc_cfg.preset, "encoder_config": to_dict(enc_cfg), "recipe": to_dict(recipe),
        "step": 1, "epoch": 1, "metrics": {},
    }
    return save_checkpoint(root / f"run_{inputs}" / "checkpoints" / "best", model, meta)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from codemae_cli.data.synth import write_scene_pair

    d = tmp_path_factory.mktemp("cli")
    pair = write_scene_pair(d / "scene", 96, 80, seed=11, labels=False, sar_scale="linear", sar_crs="EPSG:32632")
    return {"dir": d, "pair": pair, "both": _checkpoint(d, "both"), "optical": _checkpoint(d, "optical")}


def test_predict_cli_bimodal_end_to_end(setup, tmp_path):
    pair, ckpt = setup["pair"], setup["both"]
    out, prob, vec = tmp_path / "mask.tif", tmp_path / "prob.tif", tmp_path / "poly.gpkg"
    res = runner.invoke(app, [
        "predict", str(pair["optical"]), "--sar", str(pair["sar"]), "--sar-scale", "linear", "-o", str(out),
        "-c", str(ckpt.parent.parent), "--window", "32", "--overlap", "8", "--batch-size", "4", "--device", "cpu",
        "--tta", "--probabilities", str(prob), "--vectorize", str(vec), "--min-area", "2", "-q",
    ])
    assert res.exit_code == 0, res.output
    assert str(out) in res.output.replace("\n", "") and "built-up" in res.output and "Mpx/s" in res.output
    with rasterio.open(pair["optical"]) as src, rasterio.open(out) as ds:
        assert ds.crs == src.crs and ds.transform == src.transform and ds.shape == src.shape
        tags = ds.tags()
        assert ds.colormap(1)[2][:3] == (200, 0, 0)
        cls = ds.read(1)
    sha = hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert tags["codemae_checkpoint_sha256"] == sha
    assert tags["codemae_model"] == "tiny" and tags["codemae_inputs"] == "both"
    assert json.loads(tags["class_names"]) == ["water", "land", "built-up"]
    assert json.loads(tags["codemae_recipe"])["task"]["inputs"] == "both"
    assert set(np.unique(cls)) <= {0, 1, 2, 255}
    with rasterio.open(prob) as ds:
        assert ds.count == 3 and ds.descriptions[2] == "p_built-up"
    assert vec.exists()


def test_predict_cli_optical_checkpoint_matches_python_api(setup, tmp_path):
    from codemae_cli.infer.run import predict_from_checkpoint

    pair, ckpt = setup["pair"], setup["optical"]
    out = tmp_path / "a.tif"
    res = runner.invoke(app, ["predict", str(pair["optical"]), "-o", str(out), "-c", str(ckpt), "--window", "48",
                              "--overlap", "0.25", "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    s = predict_from_checkpoint(ckpt, str(pair["optical"]), out=tmp_path / "b.tif", window=48, overlap=12,
                                device="cpu")
    a, b = rasterio.open(out).read(1), rasterio.open(tmp_path / "b.tif").read(1)
    assert np.array_equal(a, b)
    assert s["checkpoint_sha256"] == rasterio.open(out).tags()["codemae_checkpoint_sha256"]


def _fails(args, match):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    msg = " ".join(res.output.split())
    assert "Error:" in msg and match in msg, msg


def test_predict_cli_bad_input(setup, tmp_path):
    pair, both, opt = setup["pair"], str(setup["both"]), str(setup["optical"])
    out = str(tmp_path / "m.tif")
    _fails(["predict", str(tmp_path / "nope.tif"), "-o", out, "-c", opt], "does not exist")
    _fails(["predict", str(pair["optical"]), "-o", str(tmp_path / "no" / "m.tif"), "-c", opt], "does not exist")
    _fails(["predict", str(pair["optical"]), "-o", out, "-c", str(tmp_path / "nockpt")], "does not exist")
    _fails(["predict", str(pair["optical"]), "-o", out, "-c", both], "--sar")
    _fails(["predict", str(pair["optical"]), "--sar", str(pair["sar"]), "-o", out, "-c", opt], "drop --sar")
    _fails(["predict", str(pair["optical"]), "-o", out, "-c", opt, "--window", "40"], "multiple of")
    # a pretraining checkpoint is not a fine-tuned model
    pre = tmp_path / "pre"
    shutil.copytree(opt, pre)
    meta = json.loads((pre / "meta.json").read_text())
    meta["kind"] = "pretrain"
    (pre / "meta.json").write_text(json.dumps(meta))
    _fails(["predict", str(pair["optical"]), "-o", out, "-c", str(pre)], "not a fine-tuned model")
    # wrong band count: a 3-band scene for a 4-band checkpoint
    three = tmp_path / "three.tif"
    with rasterio.open(pair["optical"]) as ds:
        data = ds.read()[:3]
    write_raster(three, data, like=pair["optical"])
    _fails(["predict", str(three), "-o", out, "-c", opt, "--window", "32", "--device", "cpu", "-q"],
           "has 3 band(s) but the model expects 4")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["pre", "three.tif"]


def test_bench_predict_cli_runs(tmp_path):
    res = runner.invoke(app, ["bench", "predict", "--size", "64", "--window", "32", "--batch-size", "4",
                              "--device", "cpu", "--workdir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())  # the console wraps long lines
    assert "% of model-only" in out and "x the hand-written loop" in out and "peak RSS" in out
    assert list(tmp_path.iterdir()) == []  # scenes and outputs removed
    _fails(["bench", "predict", "--size", "a,b"], "comma-separated")


def test_resolve_scenes_per_checkpoint_inputs():
    from codemae_cli.errors import UserError
    from codemae_cli.infer.run import resolve_scenes

    assert resolve_scenes("optical", "o.tif", None, None) == ("o.tif", None, "optical")
    assert resolve_scenes("sar", "s.tif", None, None) == (None, "s.tif", "sar")
    assert resolve_scenes("sar", None, "s.tif", None) == (None, "s.tif", "sar")
    assert resolve_scenes("both", "o.tif", "s.tif", None) == ("o.tif", "s.tif", "both")
    assert resolve_scenes("both", "o.tif", None, "optical") == ("o.tif", None, "optical")
    for args in [("optical", "o.tif", None, "sar"), ("sar", "o.tif", "s.tif", None), ("both", None, "s.tif", None),
                 ("both", "o.tif", None, None), ("optical", None, None, None)]:
        with pytest.raises(UserError):
            resolve_scenes(*args)


def test_predict_cli_refuses_to_overwrite_its_inputs_and_bad_device(setup, tmp_path):
    """-o (or --probabilities / --vectorize) naming an input scene or another output is refused
    before anything is written: the input is left byte for byte; an unknown --device is one sentence."""
    pair, both, opt = setup["pair"], str(setup["both"]), str(setup["optical"])
    scene = tmp_path / "scene.tif"
    shutil.copy(pair["optical"], scene)
    before = scene.read_bytes()
    _fails(["predict", str(scene), "-o", str(scene), "-c", opt, "--device", "cpu", "-q"], "same file as the optical")
    _fails(["predict", str(pair["optical"]), "--sar", str(pair["sar"]), "-o", str(tmp_path / "m.tif"),
            "--probabilities", str(pair["sar"]), "-c", both, "--device", "cpu", "-q"], "same file as the SAR scene")
    _fails(["predict", str(scene), "-o", str(tmp_path / "m.tif"), "--probabilities", str(tmp_path / "m.tif"),
            "-c", opt, "--device", "cpu", "-q"], "same file as the output")
    _fails(["predict", str(scene), "-o", str(tmp_path / "m.tif"), "-c", opt, "--device", "gpu", "-q"],
           "unknown device 'gpu'")
    assert scene.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["scene.tif"]


def test_sar_scale_auto_reads_the_scene_in_the_training_data_units(setup, tmp_path):
    from codemae_cli.infer.run import predict_from_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["both"], ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    (ckpt / "meta.json").write_text(json.dumps({**meta, "sar_scale": "linear"}))  # trained on linear-power SAR
    pair = setup["pair"]  # its SAR is linear power too
    kw = dict(sar=str(pair["sar"]), window=32, overlap=8, device="cpu")
    auto = predict_from_checkpoint(ckpt, str(pair["optical"]), out=tmp_path / "auto.tif", **kw)
    said = predict_from_checkpoint(ckpt, str(pair["optical"]), out=tmp_path / "linear.tif", sar_scale="linear", **kw)
    from codemae_cli.errors import UserError

    with pytest.raises(UserError, match="looks like linear power"):  # declared dB, holds linear power
        predict_from_checkpoint(ckpt, str(pair["optical"]), out=tmp_path / "db.tif", sar_scale="db", **kw)
    with rasterio.open(pair["sar"]) as src:  # the same scene in dB: the scale fits, but not the training data
        db = 10 * np.log10(src.read())
    write_raster(tmp_path / "sar_db.tif", db.astype(np.float32), like=pair["sar"])
    wrong = predict_from_checkpoint(ckpt, str(pair["optical"]), out=tmp_path / "db.tif", sar_scale="db",
                                    **{**kw, "sar": str(tmp_path / "sar_db.tif")})
    read = [rasterio.open(tmp_path / f"{n}.tif").read(1) for n in ("auto", "linear", "db")]
    assert np.array_equal(read[0], read[1]) and not any("SAR" in n for n in auto["notes"] + said["notes"])
    assert any("trained on SAR prepared from linear" in n for n in wrong["notes"])
