"""Checkpoint contract: safetensors + JSON directory, atomic writes, exact optimizer/RNG resume,
clear refusals for missing, corrupt or foreign checkpoints."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from rasters import write_raster

from codemae_cli.errors import UserError
from codemae_cli.train.checkpoint import (
    capture_rng,
    load_checkpoint,
    load_resume,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from codemae_cli.train.config import OptimConfig
from codemae_cli.train.optim import build_optimizer


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    return m


def _step(model, opt):
    x = torch.randn(5, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_roundtrip_weights_meta_optimizer_and_extra(tmp_path):
    model = _model()
    opt = build_optimizer(model, OptimConfig(), lr=1e-2)
    for _ in range(3):
        _step(model, opt)
    teacher = {"w": torch.randn(3, 3)}
    ck = save_checkpoint(tmp_path / "run" / "checkpoints" / "last", model, {"kind": "pretrain", "step": 3, "bands": {"optical": ["R"]}},
                         optimizer=opt, resume_extra={"step": 3, "epoch": 1, "teacher": teacher, "pos": (2, 5)})
    assert sorted(p.name for p in ck.iterdir()) == ["meta.json", "model.safetensors", "resume.json", "resume.safetensors"]
    assert not any(p.name.startswith(".") for p in ck.parent.iterdir()), "temporary directories left behind"

    state, meta = load_checkpoint(tmp_path / "run")  # a run directory resolves to checkpoints/last
    assert meta["step"] == 3 and meta["kind"] == "pretrain" and meta["codemae_version"]
    assert meta["torch_version"] == torch.__version__
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)

    # A fresh optimizer loaded from the resume state takes the same next step as the original.
    model2 = _model()
    model2.load_state_dict(state)
    opt2 = build_optimizer(model2, OptimConfig(), lr=1e-2)
    res = load_resume(ck, optimizer=opt2)
    assert res["extra"]["step"] == 3 and res["extra"]["epoch"] == 1 and res["extra"]["pos"] == (2, 5)
    assert torch.equal(res["extra"]["teacher"]["w"], teacher["w"])
    torch.manual_seed(1)
    _step(model, opt)
    torch.manual_seed(1)
    _step(model2, opt2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_overwrite_is_atomic_and_failed_save_keeps_previous(tmp_path):
    model = _model()
    target = tmp_path / "checkpoints" / "last"
    save_checkpoint(target, model, {"kind": "pretrain", "step": 1})
    save_checkpoint(target, model, {"kind": "pretrain", "step": 2})
    assert json.loads((target / "meta.json").read_text())["step"] == 2

    class Unsaveable:
        pass

    with pytest.raises(TypeError):
        save_checkpoint(target, model, {"kind": "pretrain", "step": 3}, resume_extra={"bad": Unsaveable()})
    assert json.loads((target / "meta.json").read_text())["step"] == 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]


def test_rng_states_roundtrip():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_resolve_prefers_best_and_refuses_bad_paths(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last", model, {"kind": "finetune", "step": 1})
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best", model, {"kind": "finetune", "step": 1})
    assert resolve_checkpoint(tmp_path / "run").name == "best"
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints" / "last").name == "last"
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors").name == "last"

    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a codemae checkpoint"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(UserError, match="no resume state"):
        load_resume(tmp_path / "run" / "checkpoints" / "best")

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt meta.json"):
        load_checkpoint(bad)
    (bad / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a codemae checkpoint"):
        load_checkpoint(bad)
    (bad / "meta.json").write_text(json.dumps({"codemae_version": "0.1.0"}))
    with pytest.raises(UserError, match="corrupt model.safetensors"):
        load_checkpoint(bad)


def test_recovers_checkpoint_moved_aside_by_a_killed_save(tmp_path):
    model = _model()
    target = tmp_path / "run" / "checkpoints" / "last"
    save_checkpoint(target, model, {"kind": "pretrain", "step": 7})
    # A save killed between its two renames leaves only the moved-aside copy.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target.rename(target.with_name(f".last.old-{dead.pid}"))
    ck = resolve_checkpoint(tmp_path / "run")
    assert ck.name == f".last.old-{dead.pid}"
    assert load_checkpoint(tmp_path / "run")[1]["step"] == 7
    # The next save of the same name puts it back, then replaces it.
    save_checkpoint(target, model, {"kind": "pretrain", "step": 8})
    assert sorted(p.name for p in target.parent.iterdir()) == ["last"]
    assert load_checkpoint(target)[1]["step"] == 8


def test_metadata_record_reads_old_checkpoints_with_documented_defaults(tmp_path):
    from codemae_cli.train.checkpoint import read_checkpoint_meta

    # a fine-tuned checkpoint as codemae 0.1 wrote it: no sar_scale, band_selection, backbone
    old = {"kind": "finetune", "classes": [{"name": "water", "color": [0, 0, 255]}, {"name": "land"}],
           "bands": {"optical": ["B1"], "sar": ["VV"]}, "inputs": "sar", "img_size": 64,
           "encoder_config": {"preset": "tiny", "patch_size": 8},
           "recipe": {"model": {"img_size": 32, "patch_size": 4}, "task": {"kind": "classification"}}}
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best", _model(), old)
    meta = read_checkpoint_meta(tmp_path / "run")
    assert meta.path == tmp_path / "run" / "checkpoints" / "best" and meta.kind == "finetune"
    assert meta.sar_scale == "unknown" and meta.band_selection == {"optical": None, "sar": None}
    assert meta.nodata_override == {"optical": None, "sar": None}  # predict reads each file's own nodata
    assert meta.backbone == "vit" and meta.preset == "tiny" and meta.patch_size == 8 and meta.img_size == 64
    assert meta.task == "classification" and meta.inputs == "sar" and meta.class_names == ["water", "land"]
    assert meta.stats == {} and meta.raw["bands"] == old["bands"]
    assert meta.source_ranges == [] and meta.source_range is None  # readers fall back to the dataset's own
    scale, warning = meta.sar_scale_for("auto")
    assert scale == "db" and "does not record" in warning  # what predict assumed before the record existed
    assert meta.sar_scale_for("linear") == ("linear", None)


def test_metadata_record_sar_scale_follows_the_training_data(tmp_path):
    from codemae_cli.train.checkpoint import data_provenance, read_checkpoint_meta

    prov = data_provenance([{"sar": {"input_scale": "linear", "selected": [2, 1]}, "optical": {}}])
    assert prov == {"sar_scale": "linear", "band_selection": {"optical": None, "sar": [2, 1]},
                    "nodata_override": {"optical": None, "sar": None}}
    assert data_provenance([{"sar": {"input_scale": "db"}}, {"sar": {"input_scale": "linear"}}])["sar_scale"] == "mixed"
    save_checkpoint(tmp_path / "ck", _model(), {"kind": "finetune", "backbone": "itpn", **prov})
    meta = read_checkpoint_meta(tmp_path / "ck")
    assert meta.backbone == "itpn" and meta.band_selection["sar"] == [2, 1]
    assert meta.sar_scale_for("auto") == ("linear", None)
    scale, warning = meta.sar_scale_for("db")
    assert scale == "db" and "trained on SAR prepared from linear" in warning
    with pytest.raises(UserError, match="--sar-scale must be"):
        meta.sar_scale_for("decibel")
    slc = read_checkpoint_meta(save_checkpoint(tmp_path / "slc", _model(), {"kind": "finetune", "sar_scale": "slc"}))
    assert slc.sar_scale_for("auto") == ("linear", None)


def test_metadata_record_source_ranges_per_dataset(tmp_path):
    from codemae_cli.train.checkpoint import read_checkpoint_meta

    a, b = {"optical": [0, 255], "sar": [-30, 0]}, {"optical": [0, 65535], "sar": [-25.5, 2.0]}
    meta = read_checkpoint_meta(save_checkpoint(tmp_path / "ck", _model(), {
        "kind": "pretrain", "datasets": ["data/a", "data/b"], "source_ranges": [a, b]}))
    assert meta.source_range == {"optical": [0.0, 255.0], "sar": [-30.0, 0.0]}  # goes with stats: the first
    assert meta.recorded_source_range("data/b") == b and meta.recorded_source_range("data/c") is None
    bad = save_checkpoint(tmp_path / "bad", _model(), {"kind": "pretrain", "source_ranges": [{"optical": [1, 1]}]})
    with pytest.raises(UserError, match="invalid source_ranges"):
        read_checkpoint_meta(bad)


def test_a_pretraining_checkpoint_is_refused_in_one_sentence_everywhere(tmp_path):
    """predict, evaluate and the task-model builder ask the record the same question."""
    from fakes import pretrain_checkpoint

    from codemae_cli.infer.run import predict_from_checkpoint
    from codemae_cli.tasks import build_task_model_from_checkpoint
    from codemae_cli.tasks.evaluate import evaluate_checkpoint
    from codemae_cli.train.checkpoint import read_checkpoint_meta

    ck = pretrain_checkpoint(tmp_path / "run" / "checkpoints" / "last")
    with pytest.raises(UserError) as own:
        read_checkpoint_meta(tmp_path / "run").require_finetuned()
    sentence = str(own.value)
    assert "pretrain checkpoint, not a fine-tuned model" in sentence and str(ck) in sentence
    scene = tmp_path / "scene.tif"  # never read: the checkpoint is refused first
    calls = [lambda: predict_from_checkpoint(tmp_path / "run", str(scene), out=tmp_path / "m.tif"),
             lambda: build_task_model_from_checkpoint(tmp_path / "run"),
             lambda: evaluate_checkpoint(tmp_path / "run", [str(tmp_path / "data")], device="cpu")]
    for call in calls:
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == sentence
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_datasets_that_disagree_are_recorded_as_mixed_never_as_the_first(tmp_path):
    from typer.testing import CliRunner

    from codemae_cli.cli import app
    from codemae_cli.infer.run import scene_nodata_rules
    from codemae_cli.train.checkpoint import MIXED, data_provenance, read_checkpoint_meta

    def ds(selected=None, count=3, nodata=None):
        return {"input_scale": "db", "selected": selected, "count": count, "nodata_override": nodata}

    # every band in order is "all bands": datasets that agree record one value, as before
    same = data_provenance([{"optical": ds([1, 2, 3]), "sar": ds(count=2, nodata=0)},
                            {"optical": ds(None), "sar": ds(count=2, nodata=0.0)}])
    assert same["band_selection"] == {"optical": [1, 2, 3], "sar": None}
    assert same["nodata_override"] == {"optical": None, "sar": 0}
    # different bands, or a few bands of one against all of another, or different nodata: mixed
    prov = data_provenance([{"optical": ds([4, 3, 2]), "sar": ds(count=2, nodata=0)},
                            {"optical": ds(None), "sar": ds(count=2)}])
    assert prov["band_selection"]["optical"] == MIXED and prov["nodata_override"]["sar"] == MIXED
    assert data_provenance([{"optical": ds([1, 2, 3])}, {"optical": ds(None, count=4)}])[
        "band_selection"]["optical"] == MIXED
    assert prov["inputs_per_dataset"][0]["optical"]["band_selection"] == [4, 3, 2]
    assert prov["inputs_per_dataset"][1]["sar"]["nodata_override"] is None
    ck = save_checkpoint(tmp_path / "ck", _model(), {"kind": "finetune", "task": "segmentation", "inputs": "both",
                                                    **prov})
    meta = read_checkpoint_meta(ck)
    # nodata: the scene's own (the first dataset's 0 would be a guess), said in a note
    notes: list = []
    assert scene_nodata_rules(meta, {"sar": None}, notes) == {"sar": None}
    assert len(notes) == 1 and "different --nodata-sar" in notes[0]
    assert scene_nodata_rules(meta, {"sar": "-1"}, []) == {"sar": -1.0}  # the user's choice wins
    # bands: no single answer, so predict refuses in one sentence before anything is written
    scene = write_raster(tmp_path / "scene.tif", np.zeros((3, 8, 8), np.uint8))
    sar = write_raster(tmp_path / "sar.tif", np.zeros((2, 8, 8), np.float32))
    res = CliRunner().invoke(app, ["predict", scene, "--sar", sar, "-o", str(tmp_path / "m.tif"), "-c", str(ck)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = " ".join(res.output.split())
    assert "trained on datasets that kept different optical bands" in line and "--optical-bands" in line
    assert not (tmp_path / "m.tif").exists()


def test_metadata_record_types_the_best_validation_and_the_load_report(tmp_path):
    """Fine-tuning's resume reads the best validation and the encoder's load report from the
    record; checkpoints without them (pretraining, older runs) read as None."""
    from codemae_cli.train.checkpoint import BestRecord, read_checkpoint_meta

    report = {"source": "runs/pretrain", "loaded": 12, "missing": [], "unexpected": ["mask_token"], "skipped": []}
    best = {"metric": "miou", "value": 0.75, "epoch": 2, "metrics": {"miou": 0.75, "oa": 0.9}}
    save_checkpoint(tmp_path / "ft", _model(), {"kind": "finetune", "best": best, "load_report": report})
    meta = read_checkpoint_meta(tmp_path / "ft")
    assert meta.best == BestRecord("miou", 0.75, 2, {"miou": 0.75, "oa": 0.9}) and meta.load_report == report
    # before the first validation, and a run from scratch
    save_checkpoint(tmp_path / "early", _model(), {"kind": "finetune", "load_report": None,
                                                   "best": {"metric": "miou", "value": None, "epoch": None,
                                                            "metrics": None}})
    early = read_checkpoint_meta(tmp_path / "early")
    assert early.best == BestRecord(metric="miou") and early.load_report is None
    save_checkpoint(tmp_path / "pre", _model(), {"kind": "pretrain", "step": 3})
    assert read_checkpoint_meta(tmp_path / "pre").best == BestRecord() and read_checkpoint_meta(tmp_path / "pre").load_report is None
    for field, value in (("best", {"value": "high"}), ("best", [0.7]), ("best", {"metrics": [1]}), ("load_report", "ok")):
        save_checkpoint(tmp_path / "bad", _model(), {"kind": "finetune", field: value})
        with pytest.raises(UserError, match=f"invalid {field}"):
            read_checkpoint_meta(tmp_path / "bad")
