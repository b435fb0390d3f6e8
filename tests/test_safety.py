"""Never destroy what the user has: every command that writes refuses an output that is, contains
or lies inside one of its inputs, replaces only what codemae wrote, and cleans what killed runs
left. Each case is typed as a user would: exit code 2, one sentence, no traceback, the inputs
byte for byte as they were, nothing left behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from codemae_cli.cli import app

runner = CliRunner()


def snapshot(*roots) -> dict:
    """Every file under ``roots`` (or the file itself) -> its bytes."""
    out = {}
    for root in roots:
        root = Path(root)
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = p.read_bytes()
    return out


def refused(args, match: str) -> str:
    res = runner.invoke(app, [str(a) for a in args])
    msg = res.output
    assert res.exit_code == 2, msg
    assert "Traceback" not in msg and "Error: " in msg, msg
    msg = msg[msg.index("Error: "):]  # (a run may have printed its plan before it found the fault)
    assert msg.strip().count("\n") <= 1, msg  # one sentence (rich may wrap it once)
    flat = " ".join(msg.split())
    assert match in flat, flat
    return flat


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic scene pair, a tiny testbed dataset, a pretraining run and a fine-tuned run."""
    from fakes import pretrain_checkpoint
    from test_predict_cli import _checkpoint as finetuned

    from codemae_cli.analysis.testbed import OPTICAL_BANDS, SAR_BANDS, write_testbed
    from codemae_cli.data.synth import write_scene_pair

    d = tmp_path_factory.mktemp("safety")
    pair = write_scene_pair(d / "scene", 64, 64, seed=3, labels=False, sar_scale="db")
    data = write_testbed(d / "data", scenes=1, size=64, tile=32, seed=1, write_tifs=False)
    pre = pretrain_checkpoint(d / "pre" / "checkpoints" / "last", optical_bands=OPTICAL_BANDS, sar_bands=SAR_BANDS)
    fin = finetuned(d, "both")
    return {"dir": d, "pair": pair, "data": Path(data), "pre_run": d / "pre", "pre": pre,
            "fin_run": fin.parent.parent, "fin": fin}


def predict_args(world, out, *extra):
    p = world["pair"]
    return ["predict", p["optical"], "--sar", p["sar"], "-c", world["fin_run"], "-o", out, "--window", "32",
            "--device", "cpu", "-q", *extra]


# ----------------------------------------------------------------------------- predict
def test_predict_never_writes_onto_its_checkpoint_or_a_foreign_file(world, tmp_path):
    before = snapshot(world["fin_run"], world["dir"] / "scene")
    refused(predict_args(world, world["fin"] / "model.safetensors"), "lies inside the checkpoint")
    refused(predict_args(world, tmp_path / "m.tif", "--vectorize", world["fin"] / "meta.json"),
            "lies inside the checkpoint")
    refused(predict_args(world, world["pair"]["sar"]), "is the same file as the SAR scene")
    link = tmp_path / "link.tif"
    link.symlink_to(world["pair"]["optical"])
    refused(predict_args(world, link), "is the same file as the optical scene")
    foreign = tmp_path / "notes.tif"
    foreign.write_bytes(b"my own file")
    refused(predict_args(world, foreign), "was not written by codemae predict")
    assert foreign.read_bytes() == b"my own file"
    assert snapshot(world["fin_run"], world["dir"] / "scene") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.tif", "notes.tif"]


def test_predict_replaces_its_own_output_and_refuses_an_unwritable_one(world, tmp_path):
    out = tmp_path / "m.tif"
    for _ in range(2):  # the second run replaces the first run's map: it is codemae's own
        res = runner.invoke(app, [str(a) for a in predict_args(world, out)])
        assert res.exit_code == 0, res.output
    (tmp_path / "file").write_text("x")
    refused(predict_args(world, tmp_path / "file" / "m.tif"), "is a file, not a folder")


# ----------------------------------------------------------------------------- evaluate
def test_evaluate_json_never_overwrites_an_input(world, tmp_path):
    pred = tmp_path / "pred.tif"
    res = runner.invoke(app, [str(a) for a in predict_args(world, pred)])
    assert res.exit_code == 0, res.output
    ref = tmp_path / "ref.tif"
    shutil.copy(pred, ref)
    before = snapshot(tmp_path, world["fin_run"])
    base = ["evaluate", "--pred", pred, "--ref", ref, "--json"]
    refused(base + [pred], "is the same file as the predicted raster")
    refused(base + [ref], "is the same file as the reference")
    refused(["evaluate", "-c", world["fin_run"], "-d", world["data"], "--json", world["fin"] / "meta.json"],
            "lies inside the checkpoint")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    refused(base + [notes], "was not written by codemae evaluate")
    assert snapshot(tmp_path, world["fin_run"]) == {**before, str(notes): b'{"mine": 1}'}
    out = tmp_path / "m.json"
    for _ in range(2):  # its own metrics file is replaced
        res = runner.invoke(app, [str(a) for a in base + [out]])
        assert res.exit_code == 0, res.output


def test_evaluate_classes_must_match_the_maps_classes(world, tmp_path):
    pred = tmp_path / "pred.tif"
    assert runner.invoke(app, [str(a) for a in predict_args(world, pred)]).exit_code == 0
    before = snapshot(tmp_path)
    refused(["evaluate", "--pred", pred, "--ref", pred, "--classes", "a,b,c"],
            "--classes names 3 classes (a, b, c) but")
    refused(["evaluate", "--pred", pred, "--ref", pred, "--classes", "land,water"], "was made for 3")
    assert snapshot(tmp_path) == before
    res = runner.invoke(app, ["evaluate", "--pred", str(pred), "--ref", str(pred), "--classes", "water,land,built-up"])
    assert res.exit_code == 0, res.output


# ----------------------------------------------------------------------------- analyze
def test_analyze_never_deletes_its_run_or_dataset(world, tmp_path):
    before = snapshot(world["pre_run"], world["data"])
    base = ["analyze", world["pre_run"], "--data", world["data"], "--device", "cpu", "--overwrite", "-o"]
    refused(base + [world["pre_run"]], "contains the checkpoint")
    refused(base + [world["data"]], "is the same file as the dataset")
    refused(base + [world["data"] / "shards"], "lies inside the dataset")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(base + [mine], "was not written by codemae analyze")
    refused(base[:-2] + ["-o", mine], "pass --overwrite")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert snapshot(world["pre_run"], world["data"]) == before


# ----------------------------------------------------------------------------- synth
def test_synth_refuses_a_non_empty_folder_and_replaces_only_its_own_scenes(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "scene_optical.tif").write_bytes(b"my survey")
    refused(["synth", "-o", out, "--size", "16"], "is not empty; pass --overwrite")
    refused(["synth", "-o", out, "--size", "16", "--overwrite"], "was not written by codemae synth")
    assert [p.name for p in out.iterdir()] == ["scene_optical.tif"]
    assert (out / "scene_optical.tif").read_bytes() == b"my survey"
    new = tmp_path / "t"
    assert runner.invoke(app, ["synth", "-o", str(new), "--size", "16"]).exit_code == 0
    (new / "readme.txt").write_text("keep me")
    first = snapshot(new)
    res = runner.invoke(app, ["synth", "-o", str(new), "--size", "16", "--seed", "4", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (new / "readme.txt").read_text() == "keep me"
    assert snapshot(new)[str(new / "scene_optical.tif")] != first[str(new / "scene_optical.tif")]
    assert sorted(p.name for p in new.iterdir()) == sorted(Path(k).name for k in first)


def test_synth_bad_resolution_leaves_no_folder(tmp_path):
    refused(["synth", "-o", tmp_path / "a" / "b", "--size", "16", "--res", "0"], "must be positive")
    refused(["synth", "-o", tmp_path / "c", "--size", "16", "--sar-res", "-1"], "must be positive")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the guard itself
def test_guard_compares_after_resolving_links_and_refuses_unwritable_places(tmp_path):
    from codemae_cli.errors import UserError
    from codemae_cli.fsutil import check_distinct, check_writable

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(run)
    with pytest.raises(UserError, match="contains the run"):
        check_distinct([(alias, "the output")], [(run / "checkpoints", "the run")])
    with pytest.raises(UserError, match="lies inside the run"):
        check_distinct([(alias / "checkpoints" / "x.tif", "the output")], [(run, "the run")])
    check_distinct([(tmp_path / "other", "the output")], [(run, "the run")])
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_writable(tmp_path / "f" / "deeper" / "out", "the output", folder=True)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(UserError, match="is not writable"):
            check_writable(ro / "m.tif", "the output")


def test_sweep_removes_only_dead_processes_temporaries(tmp_path):
    import subprocess
    import sys

    from codemae_cli.fsutil import sweep_stale, temp_sibling

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "m.tif"
    stale = tmp_path / f".m.tif.tmp-{dead.pid}-abcdef.part.tif"
    stale.write_bytes(b"x")
    stale_dir = tmp_path / f"m.tif.tmp-{dead.pid}"
    stale_dir.mkdir()
    live = temp_sibling(out, ".part.tif")
    live.write_bytes(b"x")
    other = tmp_path / ".m.tif.mine"
    other.write_bytes(b"x")
    lines = []
    removed = sweep_stale(out, log=lines.append)
    assert sorted(removed) == sorted([stale, stale_dir])
    assert len(lines) == 2 and all("a temporary left by a stopped run" in line for line in lines)
    assert live.exists() and other.exists()
    assert len(list(tmp_path.iterdir())) == 2


# ----------------------------------------------------------------------------- killed runs
def _kill_when(cmd: list[str], appears, timeout: float = 120.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``appears()`` finds its temporary output."""
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "codemae_cli", *cmd], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while not appears():
            assert proc.poll() is None, "the command ended before it wrote anything temporary"
            assert time.monotonic() - t0 < timeout
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_killed_predict_and_prepare_leave_nothing_after_the_next_run(world, tmp_path):
    from codemae_cli.data.synth import write_scene_pair

    big = write_scene_pair(tmp_path / "big", 256, 256, seed=5, labels=False, sar_scale="db")
    out = tmp_path / "maps" / "m.tif"
    out.parent.mkdir()
    cmd = ["predict", str(big["optical"]), "--sar", str(big["sar"]), "-c", str(world["fin_run"]), "-o", str(out),
           "--window", "32", "--overlap", "16", "--batch-size", "1", "--device", "cpu", "-q"]
    _kill_when(cmd, lambda: any(".part" in p.name for p in out.parent.iterdir()))
    assert [p for p in out.parent.iterdir() if ".tmp-" in p.name], "the kill left no temporary to clean"
    cmd[cmd.index("--overlap") + 1] = "0"
    res = runner.invoke(app, cmd)
    assert res.exit_code == 0, res.output
    assert "a temporary left by a stopped run" in res.output
    assert [p.name for p in out.parent.iterdir()] == ["m.tif"]

    data = tmp_path / "prepared"
    cmd = ["prepare", "--optical", str(big["optical"]), "--sar", str(big["sar"]), "--sar-scale", "db",
           "--tile", "8", "--shard-size", "64", "-o", str(data), "-q"]
    _kill_when(cmd, lambda: any(".tmp-" in p.name for p in tmp_path.iterdir()))
    assert [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    res = runner.invoke(app, cmd + ["--no-quicklook"])
    assert res.exit_code == 0, res.output
    assert "a temporary left by a stopped run" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "maps", "prepared"]


# ----------------------------------------------------------------------------- pretrain / finetune
def test_run_folders_never_swallow_inputs_or_foreign_folders(world, tmp_path):
    import torch

    before = snapshot(world["data"], world["pre_run"])
    base = ["pretrain", "smoke", "--set", f"data.datasets=[{world['data']}]", "-o"]
    (tmp_path / "file").write_text("x")
    refused(base + [tmp_path / "file"], "the run folder")
    refused(base + [tmp_path / "file"], "is a file, not a folder")
    refused(base + [world["data"]], "is the same file as the dataset")
    refused(base + [world["data"] / "runs"], "lies inside the dataset")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(base + [mine], "holds no codemae run")
    pickle = tmp_path / "teacher.safetensors"
    torch.save({"w": torch.zeros(2)}, pickle)
    refused(base + [tmp_path / "run", "--set", "model.okd.teacher=file", "--set",
                    f"model.okd.teacher_weights={pickle}"], "is not a safetensors file")
    refused(["finetune", "seg", "--set", f"data.datasets=[{world['data']}]", "--set",
             f"task.pretrained={world['pre_run']}", "--set", f"run.output_dir={world['pre_run']}"],
            "contains the pretrained checkpoint")
    assert snapshot(world["data"], world["pre_run"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "teacher.safetensors"]


def test_a_refused_run_leaves_no_run_folder(world, tmp_path):
    """A truncated shard is found after the run folder was opened: the refusal removes it again."""
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    shard = data / "shards" / "optical_00000.npy"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    refused(["pretrain", "smoke", "--set", f"data.datasets=[{data}]", "-o", tmp_path / "runs" / "a"],
            "is missing or corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_recipe_folder_and_subpixel_overlap_are_named_as_they_are(tmp_path):
    from rasters import write_raster

    refused(["pretrain", tmp_path], "is a folder, not a recipe file")
    a = write_raster(tmp_path / "a.tif", np.ones((1, 1, 1), np.float32))
    b = write_raster(tmp_path / "b.tif", np.ones((1, 1, 1), np.float32), res=0.5)
    refused(["prepare", "--optical", a, "--sar", b, "--sar-scale", "db", "-o", tmp_path / "out", "-q"],
            "overlap by less than one whole pixel")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.tif"]


def test_declared_sar_scale_must_fit_the_values(world, tmp_path):
    """dB SAR declared linear (or linear declared dB) would map nodata only: refused before work."""
    pair = world["pair"]  # its SAR is in dB
    before = snapshot(world["dir"] / "scene")
    refused(predict_args(world, tmp_path / "m.tif", "--sar-scale", "linear"), "it looks like dB; pass --sar-scale db")
    refused(["prepare", "--optical", pair["optical"], "--sar", pair["sar"], "--sar-scale", "amplitude", "--tile", "16", "-o",
             tmp_path / "data", "-q"], "it looks like dB")
    from codemae_cli.data.synth import write_scene_pair

    lin = write_scene_pair(tmp_path / "lin", 32, 32, seed=2, labels=False, sar_scale="linear")
    refused(["predict", lin["optical"], "--sar", lin["sar"], "--sar-scale", "db", "-c", world["fin_run"], "-o",
             tmp_path / "m.tif", "--device", "cpu", "-q"], "looks like linear power or amplitude")
    assert snapshot(world["dir"] / "scene") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lin"]


def test_ablate_demo_and_model_import_keep_their_inputs_and_foreign_folders(tmp_path):
    import torch

    from codemae_cli.data.samples import sample_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    refused(["ablate", "-o", mine, "--seeds", "1", "--pretrain-steps", "1"], "holds no ablation")
    refused(["demo", "-o", sample_dir() / "out"], "lies inside the built-in sample")
    from codemae_cli.defaults import packaged_recipes_dir

    refused(["recipes", "hr", "-o", packaged_recipes_dir()], "is the same file as the installed recipes")
    refused(["bench", "prepare", "--size", "64", "--tile", "32", "--workdir", mine], "holds files the bench did not write")
    (mine / "scene_64.tif").write_text("keep")
    refused(["bench", "predict", "--size", "64", "--window", "32", "--workdir", mine], "would replace and delete it")
    pickle = tmp_path / "w.safetensors"
    torch.save({"w": torch.zeros(2)}, pickle)
    refused(["model", "import-weights", pickle, "-o", tmp_path / "run"], "is not a safetensors file")
    refused(["model", "import-weights", pickle, "-o", tmp_path], "contains the weights file")
    refused(["model", "import-weights", pickle, "-o", mine], "holds no codemae run")
    refused(["model", "convert", pickle, "-o", pickle], "is the same file as the weights file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "w.safetensors"]
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "scene_64.tif"]
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "scene_64.tif").read_text() == "keep"


def test_filesystem_faults_are_one_sentence(tmp_path, capsys):
    """A permission error that no guard foresaw (root passes every access test) is still one sentence."""
    import errno

    import typer

    from codemae_cli.commands._common import cli_command

    @cli_command
    def writes():
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x.tif"))

    with pytest.raises(typer.Exit) as exit_info:
        writes()
    assert exit_info.value.exit_code == 2
    err = capsys.readouterr().err
    assert err == f"Error: cannot use '{tmp_path / 'x.tif'}': permission denied.\n"
