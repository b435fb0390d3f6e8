"""The lines the toolkit was specified by, typed verbatim in an empty folder:

    codemae prepare --optical a.tif --sar b.tif
    codemae pretrain recipes/hr.yaml
    codemae predict scene.tif -o mask.tif

with only size-shrinking ``--set`` overrides, and the default folders chaining prepare ->
pretrain -> finetune -> predict with no path typed. Also: recipes installed with the package,
named or copied out; missing weights files refused before any work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
rasterio = pytest.importorskip("rasterio")

from typer.testing import CliRunner  # noqa: E402

from codemae_cli.cli import app  # noqa: E402

runner = CliRunner()

# Shrinks the reference recipes to seconds on a CPU; none of them changes what is trained.
TINY_MODEL = ["model.preset=tiny", "model.img_size=32", "data.img_size=32", "model.patch_size=8",
              "model.ccl.num_heads=4"]
TINY_PRETRAIN = [*TINY_MODEL, "data.num_workers=0", "data.pin_memory=false", "data.augment_on=loader",
                 "optim.batch_size=2", "optim.max_steps=2", "run.device=cpu", "run.precision=fp32",
                 "run.compile=false", "run.tensorboard=false", "run.progress=false"]
TINY_FINETUNE = ["model.img_size=32", "data.img_size=32", "data.num_workers=0", "data.pin_memory=false",
                 "task.neck_dim=32", "optim.batch_size=2", "optim.epochs=1", "optim.max_steps=2",
                 "run.device=cpu", "run.precision=fp32", "run.tensorboard=false"]


def _sets(pairs: list[str]) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def _ok(args: list[str]):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, f"codemae {' '.join(args)}\n{res.output}"
    return res


@pytest.fixture()
def empty_folder(tmp_path, monkeypatch):
    from codemae_cli.data.synth import write_scene_pair

    scene = write_scene_pair(tmp_path / "raw", 256, 256, seed=3, labels=True)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(scene["optical"], work / "a.tif")
    shutil.copy(scene["sar"], work / "b.tif")
    shutil.copy(scene["labels"], work / "labels.tif")
    monkeypatch.chdir(work)
    return work


def test_three_mission_lines_chain_from_an_empty_folder(empty_folder):
    # 1. prepare, verbatim: the default output folder is the one every recipe reads.
    res = _ok(["prepare", "--optical", "a.tif", "--sar", "b.tif", "--no-quicklook"])
    assert json.loads(Path("data/metadata.json").read_text())["labels"] is None
    assert "none (chips for pretraining" in " ".join(res.output.split())  # the summary says so
    # (the chain goes on to fine-tuning, so prepare again with labels and 32 px chips)
    _ok(["prepare", "--optical", "a.tif", "--sar", "b.tif", "--labels", "labels.tif", "--tile", "32",
         "--block", "1", "--overwrite", "-q"])

    # 2. pretrain recipes/hr.yaml: no recipes/ folder here, so the installed recipe is used. Without
    # the teacher's weights file it stops before any work, naming the file and the way around it.
    assert not Path("recipes").exists()
    res = runner.invoke(app, ["pretrain", "recipes/hr.yaml", *_sets(TINY_PRETRAIN)])
    assert res.exit_code == 2, res.output
    assert "weights/vit_large_patch16_dinov3_sat493m.safetensors" in res.output
    assert "--set model.okd.teacher=ema" in res.output
    assert "Traceback" not in res.output and not Path("runs").exists()
    # ... and the --set it names runs, into the folder finetune's default recipe reads.
    res = _ok(["pretrain", "recipes/hr.yaml", *_sets(TINY_PRETRAIN), "--set", "model.okd.teacher=ema"])
    assert "installed with codemae" in res.output
    assert (Path("runs/pretrain/checkpoints/last/model.safetensors")).is_file()

    # With the weights file in place the reference line runs as written (a small timm ViT stands
    # in for the DINOv3 ViT-L, whose weights no test can hold).
    import timm
    from safetensors.torch import save_file

    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    Path("weights").mkdir()
    save_file(teacher.state_dict(), "weights/vit_large_patch16_dinov3_sat493m.safetensors")
    _ok(["pretrain", "recipes/hr.yaml", *_sets(TINY_PRETRAIN), "--set", "model.okd.teacher_model=vit_tiny_patch16_224",
         "-o", "runs/with_teacher"])
    assert Path("runs/with_teacher/checkpoints/last/model.safetensors").is_file()

    # 3. finetune seg: reads data/ and runs/pretrain, writes runs/seg; no path typed.
    _ok(["finetune", "seg", *_sets(TINY_FINETUNE)])
    assert Path("runs/seg/checkpoints/last/meta.json").is_file()

    # 4. predict scene.tif -o mask.tif: the latest fine-tuned run, named.
    shutil.copy("a.tif", "scene.tif")
    res = _ok(["predict", "scene.tif", "-o", "mask.tif", "-q"])
    assert "latest fine-tuned run runs/seg" in res.output
    assert "window 32 px" in res.output  # the chip size the model learnt on
    with rasterio.open("mask.tif") as src:
        assert src.shape == (256, 256)


def test_recipes_are_installed_named_and_copied(tmp_path, monkeypatch):
    from codemae_cli.defaults import list_recipes, packaged_recipes_dir, resolve_recipe

    names = list_recipes()
    assert {"hr", "seg", "smoke", "cls", "linprobe", "baselines/mae"} <= set(names)
    assert resolve_recipe("hr") == packaged_recipes_dir() / "hr.yaml"
    assert resolve_recipe("baselines/mae.yaml") == packaged_recipes_dir() / "baselines" / "mae.yaml"
    monkeypatch.chdir(tmp_path)
    res = _ok(["recipes"])
    assert "hr" in res.output and "baselines/mae" in res.output
    _ok(["recipes", "hr", "baselines/mae"])
    assert Path("recipes/hr.yaml").read_text() == (packaged_recipes_dir() / "hr.yaml").read_text()
    assert Path("recipes/baselines/mae.yaml").is_file()
    # a local copy wins over the installed one; copying again never replaces it
    Path("recipes/hr.yaml").write_text(Path("recipes/hr.yaml").read_text().replace("epochs: 800", "epochs: 7"))
    res = _ok(["pretrain", "recipes/hr.yaml", "--print-recipe"])
    assert "epochs: 7" in res.output
    res = runner.invoke(app, ["recipes", "hr"])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["pretrain", "nosuch"])
    assert res.exit_code == 2 and "codemae recipes" in res.output


def test_every_weights_file_is_checked_before_work(tmp_path):
    """Generic: any *weights path of a recipe, not only the teacher's."""
    from codemae_cli.errors import UserError
    from codemae_cli.preflight import check_weight_files
    from codemae_cli.train.recipe import load_pretrain_recipe

    hr = load_pretrain_recipe(resolve("hr"), ["model.okd.teacher=ema"])
    check_weight_files(hr)  # teacher weights are only read with teacher: file
    cfg = load_pretrain_recipe(resolve("hr"), ["model.okd.enabled=false"])
    check_weight_files(cfg)

    import dataclasses

    @dataclasses.dataclass
    class Rec:  # a recipe naming another weights file, e.g. a backbone's initialisation
        model: dict

    with pytest.raises(UserError, match=r"'w/init.safetensors' \(model.init_weights\).*--set model.init_weights=null"):
        check_weight_files(Rec({"init_weights": "w/init.safetensors"}))
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros(1, np.float32)}, str(tmp_path / "init.safetensors"))
    check_weight_files(Rec({"init_weights": str(tmp_path / "init.safetensors")}))


def test_init_weights_may_be_a_torch_file_the_teacher_only_safetensors(tmp_path):
    """model.init_weights is read with torch's weights-only loader too (.pth releases); the
    teacher's weights are safetensors only, so a pickle renamed .safetensors stays refused."""
    import torch

    from codemae_cli.errors import UserError
    from codemae_cli.preflight import check_weight_files
    from codemae_cli.train.recipe import load_pretrain_recipe

    pth = tmp_path / "itpn_base.pth"
    torch.save({"model": {"w": torch.zeros(2)}}, pth)
    check_weight_files(load_pretrain_recipe(resolve("hr"), [f"model.init_weights={pth}", "model.okd.teacher=ema"]))
    odd = tmp_path / "itpn_base.npz"
    odd.write_bytes(b"x")
    with pytest.raises(UserError, match=r"\(model.init_weights\).*neither a .safetensors file nor a torch"):
        check_weight_files(load_pretrain_recipe(resolve("hr"), [f"model.init_weights={odd}", "model.okd.teacher=ema"]))
    pickle = tmp_path / "teacher.safetensors"
    torch.save({"w": torch.zeros(2)}, pickle)
    teacher = [f"model.init_weights={pth}", "model.okd.enabled=true", "model.okd.teacher=file",
               f"model.okd.teacher_weights={pickle}"]
    with pytest.raises(UserError, match=r"\(model.okd.teacher_weights\).*is not a safetensors file"):
        check_weight_files(load_pretrain_recipe(resolve("hr"), teacher))
    renamed = tmp_path / "teacher.pth"
    renamed.write_bytes(pickle.read_bytes())
    with pytest.raises(UserError, match="is not a safetensors file"):  # a torch suffix does not help it
        check_weight_files(load_pretrain_recipe(resolve("hr"), teacher[:-1] + [f"model.okd.teacher_weights={renamed}"]))


def resolve(name: str) -> Path:
    from codemae_cli.defaults import resolve_recipe

    return resolve_recipe(name)


def test_predict_without_runs_says_how(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["predict", "scene.tif", "-o", "mask.tif"])
    assert res.exit_code == 2
    assert "no fine-tuned" in res.output and "--checkpoint" in res.output


def test_smoke_recipe_runs_on_a_fresh_checkout(tmp_path, monkeypatch):
    """`codemae pretrain recipes/smoke.yaml` prepares the built-in sample on first use."""
    monkeypatch.setenv("CODEMAE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    res = _ok(["pretrain", "recipes/smoke.yaml", "--set", "optim.max_steps=2", "--set", "run.tensorboard=false",
               "--set", "run.progress=false"])
    assert "preparing the built-in sample" in res.output
    assert (tmp_path / "cache/samples/spacenet6_rotterdam/metadata.json").is_file()
    assert (tmp_path / "runs/smoke/checkpoints/last/model.safetensors").is_file()
    res = _ok(["pretrain", "smoke", "--set", "optim.max_steps=1", "--set", "run.tensorboard=false",
               "--set", "run.progress=false", "-o", "runs/smoke2"])
    assert "preparing" not in res.output  # the prepared copy is reused


def test_missing_input_folders_name_the_command_that_writes_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["pretrain", "hr", "--set", "model.okd.teacher=ema"])
    assert res.exit_code == 2 and "'data/' does not exist" in res.output and "codemae prepare" in res.output
    Path("data").mkdir()
    res = runner.invoke(app, ["finetune", "seg"])
    assert res.exit_code == 2 and "runs/pretrain" in res.output and "codemae pretrain hr" in res.output
    assert "task.from_scratch=true" in res.output and not Path("runs").exists()
