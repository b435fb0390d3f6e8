"""Default folders that chain the commands, the recipes shipped with the package, and finding
the latest run.

    codemae prepare --optical a.tif --sar b.tif     # writes data/
    codemae pretrain hr                            # reads data/, writes runs/pretrain
    codemae finetune seg                           # reads data/ + runs/pretrain, writes runs/seg
    codemae predict scene.tif -o mask.tif          # reads the latest fine-tuned run under runs/

Recipes are found by path first; a path that does not exist (``recipes/hr.yaml`` in a folder
without a ``recipes/``) or a bare name (``hr``, ``baselines/mae``) falls back to the recipes
installed with the package. Pure Python: nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from codemae_cli.errors import UserError
from codemae_cli.fsutil import staged_file

DATA_DIR = "data"  # prepare's default output; every recipe's data.datasets default
PRETRAIN_DIR = "runs/pretrain"  # pretraining recipes' run.output_dir; seg/cls/linprobe's task.pretrained
RUNS_DIR = "runs"  # where predict looks for the latest fine-tuned run


def packaged_recipes_dir() -> Path:
    """The recipes installed with the package (``codemae_cli/recipes``)."""
    return Path(__file__).resolve().parent / "recipes"


def list_recipes() -> list[str]:
    """Names of the packaged recipes, e.g. ``hr``, ``seg``, ``baselines/mae``."""
    root = packaged_recipes_dir()
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.yaml"))


def recipe_summary(path: Path) -> str:
    """The first sentence of a recipe's header comment (what ``codemae recipes`` prints)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text:
            break
        lines.append(text)
    text = " ".join(lines)
    for stop in (": ", "; ", " (", ". "):  # the head of the first sentence
        if stop in text[20:]:
            text = text[:20 + text[20:].index(stop)]
    return text if len(text) <= 90 else text[:87] + "..."


def _packaged_name(arg: str) -> str:
    name = arg.replace("\\", "/")
    if name.startswith("./"):
        name = name[2:]
    if name.startswith("recipes/"):
        name = name[len("recipes/"):]
    return name[:-5] if name.endswith(".yaml") else name


def resolve_recipe(arg: str | Path, echo=None) -> Path:
    """A recipe file: ``arg`` itself when it exists, else the packaged recipe of that name."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"recipe '{arg}' is a folder, not a recipe file; give a YAML file in it "
                        "(or the name of an installed recipe: `codemae recipes` lists them)")
    name = _packaged_name(str(arg))
    packaged = packaged_recipes_dir() / f"{name}.yaml"
    if packaged.is_file():
        if echo is not None and str(arg) != name:
            echo(f"'{arg}' is not here; using the recipe installed with codemae ({packaged})")
        return packaged
    known = ", ".join(list_recipes()) or "none installed"
    raise UserError(f"recipe '{arg}' does not exist and is not a recipe installed with codemae ({known}); "
                    "`codemae recipes` lists and copies them")


def copy_recipes(names: list[str], out: Path) -> list[Path]:
    """Copy packaged recipes into ``out`` (refusing to replace an existing file)."""
    chosen = [_packaged_name(n) for n in names] or list_recipes()
    sources = [packaged_recipes_dir() / f"{n}.yaml" for n in chosen]
    for n, src in zip(chosen, sources, strict=True):
        if not src.is_file():
            raise UserError(f"'{n}' is not a recipe installed with codemae ({', '.join(list_recipes())})")
    targets = [out / f"{n}.yaml" for n in chosen]
    for t in targets:
        if t.exists():
            raise UserError(f"'{t}' already exists; remove it or copy into another folder with -o")
    written = []
    for src, dst in zip(sources, targets, strict=True):
        with staged_file(dst) as tmp:
            tmp.write_text(src.read_text())
        written.append(dst)
    return written


@dataclass
class FoundRun:
    """A fine-tuned run found under ``runs/``: its directory and the checkpoint that will be used."""

    run_dir: Path
    checkpoint: Path
    when: float  # modification time of the checkpoint's meta.json


def latest_finetuned_run(root: str | Path = RUNS_DIR, task: Optional[str] = "segmentation") -> FoundRun:
    """The most recently written fine-tuned run (checkpoints/best, else last) under ``root``."""
    from codemae_cli.train.checkpoint import is_checkpoint_dir, read_checkpoint_meta

    root = Path(root)
    found: list[FoundRun] = []
    if root.is_dir():
        for run_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            for name in ("best", "last"):
                ckpt = run_dir / "checkpoints" / name
                if not is_checkpoint_dir(ckpt):
                    continue
                try:
                    meta = read_checkpoint_meta(ckpt)
                except UserError:  # a corrupt or foreign meta.json: not a run to predict with
                    continue
                if meta.kind != "finetune" or (task and meta.task != task):
                    continue
                found.append(FoundRun(run_dir, ckpt, (ckpt / "meta.json").stat().st_mtime))
                break
    if not found:
        raise UserError(f"no fine-tuned {task or ''} run under '{root}/' to predict with; pass --checkpoint "
                        "(-c) RUN_DIR, or fine-tune one first with `codemae finetune seg`")
    return max(found, key=lambda r: r.when)


__all__ = [
    "DATA_DIR",
    "FoundRun",
    "PRETRAIN_DIR",
    "RUNS_DIR",
    "copy_recipes",
    "latest_finetuned_run",
    "list_recipes",
    "packaged_recipes_dir",
    "recipe_summary",
    "resolve_recipe",
]
