"""Imports run one way, down the rooms of the data's journey (docs/architecture.md): a module
may import its own room, the rooms below it and the shared base modules, never a room above.
Imports inside functions count too: they are arrows all the same."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "codemae_cli"
# Lowest first. The base modules (errors, config, fsutil, device, threads, the package) sit
# below every room and import no room. Top-level helpers of the commands (default folders,
# checks before work) sit with the commands. A new top-level module goes in one of these lists
# and in docs/architecture.md.
ROOMS = ["data", "model", "train", "tasks", "infer", "analysis", "bench", "commands", "cli", "__main__", "launch"]
BASE = {"errors", "config", "fsutil", "device", "threads", "__init__"}
WITH_COMMANDS = {"defaults", "preflight"}


def _room(parts: tuple[str, ...]) -> str:
    room = parts[0] if parts else "__init__"
    return "commands" if room in WITH_COMMANDS else room


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module == "codemae_cli":
                names = [f"codemae_cli.{a.name}" for a in node.names]
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(line, n) for line, n in out if n == "codemae_cli" or n.startswith("codemae_cli.")]


def test_no_import_runs_up_the_rooms():
    back = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("").parts
        here = _room(rel)
        for line, name in _imports(path):
            there = _room(tuple(name.split(".")[1:2]))
            if there in BASE or there == here or "__version__" in name:
                continue
            if here in BASE or ROOMS.index(there) > ROOMS.index(here):
                back.append(f"{'/'.join(rel)}.py:{line} imports {name}")
    assert not back, "imports that run up the rooms:\n" + "\n".join(back)


def test_every_module_belongs_to_a_known_room():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("").parts
        assert _room(rel) in ROOMS or _room(rel) in BASE, (
            f"{path} is in no room: add it to the lists of tests/test_imports.py and to docs/architecture.md")
