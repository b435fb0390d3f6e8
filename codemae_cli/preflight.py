"""Checks that can fail early, run on the resolved recipe before any data is read or worker
started: every weights file a recipe names exists (else one sentence naming the file and the
one ``--set`` that runs without it), built-in sample datasets are resolved, and the folders
the run reads (datasets, the pretrained run) exist.

    preflight(recipe, echo=print)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

from codemae_cli.errors import UserError

# Weights keys whose file is only read in some set-ups, and the override that runs without the
# file. Any other string key ending in "weights" is a file read whenever it is set, and
# `--set KEY=null` runs without it.
_CONDITIONAL = {
    "model.okd.teacher_weights": (
        lambda r: bool(_get(r, "model.okd.enabled")) and _get(r, "model.okd.teacher") == "file",
        "model.okd.teacher=ema",
    ),
}
# Weights keys read with model.weights.read_weights_file, which takes a torch weights file
# (.pth, .pt, ...) as well and reads it with torch's weights-only loader (that loader refuses
# pickled objects itself). Every other weights key is read as safetensors only.
_TORCH_READABLE = {"model.init_weights"}


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _weight_keys(tree: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, path) of every string value whose key ends in 'weights'."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _weight_keys(value, dotted + ".")
        elif str(key).endswith("weights") and isinstance(value, str) and value.strip():
            yield dotted, value


def check_weight_files(recipe) -> None:
    """Refuse a recipe whose weights files are missing, naming the file and the way around it."""
    from codemae_cli.config import to_dict

    tree = to_dict(recipe)
    for key, value in _weight_keys(tree):
        used, without = _CONDITIONAL.get(key, (lambda r: True, f"{key}=null"))
        if not used(tree):
            continue
        path = Path(value).expanduser()
        if not path.is_file():
            raise UserError(f"the weights file '{value}' ({key}) does not exist: put it there (or point "
                            f"--set {key}=PATH at it), or run without it with --set {without}")
        _check_format(key, path)


def _check_format(key: str, path: Path) -> None:
    """The file is in a format the reader of ``key`` takes: safetensors (its header checked),
    or, for keys read with torch's weights-only loader, a torch weights file (that loader checks
    the contents when the model is built)."""
    from codemae_cli.fsutil import check_safetensors

    what = f"the weights file ({key})"
    if key in _TORCH_READABLE and path.suffix != ".safetensors":
        from codemae_cli.model.weights import TORCH_SUFFIXES

        if path.suffix not in TORCH_SUFFIXES:
            raise UserError(f"{what} '{path}' is neither a .safetensors file nor a torch weights file "
                            f"({', '.join(TORCH_SUFFIXES)})")
        return
    check_safetensors(path, what)


def check_input_folders(recipe) -> None:
    """The folders a run reads exist, else one sentence naming the command that writes them."""
    from codemae_cli.defaults import DATA_DIR, PRETRAIN_DIR

    for d in getattr(getattr(recipe, "data", None), "datasets", None) or []:
        if not Path(d).exists():
            hint = (" (`codemae prepare --optical A.tif --sar B.tif` writes it)" if Path(d) == Path(DATA_DIR)
                    else "")
            raise UserError(f"the dataset folder '{d}' does not exist{hint}; prepare it first, or point "
                            "--set data.datasets=[FOLDER] at a prepared one")
    task = getattr(recipe, "task", None)
    if task is not None and not task.from_scratch and task.pretrained and not Path(task.pretrained).exists():
        hint = " (`codemae pretrain hr` writes it)" if Path(task.pretrained) == Path(PRETRAIN_DIR) else ""
        raise UserError(f"the pretrained run '{task.pretrained}' does not exist{hint}; pretrain first, point "
                        "--set task.pretrained=RUN at another run, or train from scratch with "
                        "--set task.from_scratch=true --set task.pretrained=null")


def preflight(recipe, echo: Optional[Callable[[str], None]] = None) -> None:
    """Everything a run can check before it starts: weights files, sample datasets, input folders."""
    check_weight_files(recipe)
    data = getattr(recipe, "data", None)
    if data is not None and getattr(data, "datasets", None):
        from codemae_cli.data.samples import resolve_datasets

        data.datasets = resolve_datasets(list(data.datasets), echo)
    check_input_folders(recipe)


__all__ = ["check_input_folders", "check_weight_files", "preflight"]
