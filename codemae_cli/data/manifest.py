"""Scene manifests: many optical/SAR pairs for one ``prepare`` run.

CSV: a header with ``optical`` and ``sar`` columns, optional ``labels`` and ``scene_id``;
several files of one modality in one cell are separated by ``;`` (e.g. single-band files).
YAML: a list of mappings (or ``{scenes: [...]}``) with the same keys; ``optical``/``sar`` may
be lists. Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from codemae_cli.errors import UserError


@dataclass
class SceneSpec:
    optical: list[str]
    sar: list[str]
    labels: Optional[str] = None
    scene_id: Optional[str] = None
    extra: dict = field(default_factory=dict)


def _paths(value, base: Path, where: str) -> list[str]:
    if value is None or value == "" or value == []:
        raise UserError(f"{where} is empty")
    items = value if isinstance(value, list) else [p for p in str(value).split(";")]
    out = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        p = Path(item).expanduser()
        out.append(str(p if p.is_absolute() else base / p))
    if not out:
        raise UserError(f"{where} is empty")
    return out


def read_manifest(path: str | Path) -> list[SceneSpec]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"manifest '{p}' does not exist")
    if not p.is_file():
        raise UserError(f"manifest '{p}' is not a file")
    base = p.parent
    rows: list[dict]
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError:
            raise UserError(f"manifest '{p}' is not valid YAML") from None
        if isinstance(data, dict) and "scenes" in data:
            data = data["scenes"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise UserError(f"manifest '{p}' must be a list of scenes with optical and sar keys")
        rows = data
    else:
        try:
            with open(p, newline="") as fh:
                reader = csv.DictReader(fh)
                rows = [dict(r) for r in reader]
                header = reader.fieldnames or []
        except (UnicodeDecodeError, csv.Error):
            raise UserError(f"manifest '{p}' is not a readable CSV file") from None
        missing = [c for c in ("optical", "sar") if c not in header]
        if missing:
            raise UserError(f"manifest '{p}' has no '{missing[0]}' column (needs optical and sar)")
    if not rows:
        raise UserError(f"manifest '{p}' lists no scenes")
    scenes = []
    for k, r in enumerate(rows, start=1):
        unknown = set(r) - {"optical", "sar", "labels", "scene_id"}
        where = f"manifest '{p}' row {k}"
        if unknown and p.suffix.lower() in (".yaml", ".yml"):
            raise UserError(f"{where} has unknown key '{sorted(unknown)[0]}' (use optical, sar, labels, scene_id)")
        labels = r.get("labels")
        labels = str(labels).strip() if labels not in (None, "") else None
        if labels:
            lp = Path(labels).expanduser()
            labels = str(lp if lp.is_absolute() else base / lp)
        sid = r.get("scene_id")
        scenes.append(SceneSpec(
            optical=_paths(r.get("optical"), base, f"{where}: optical"),
            sar=_paths(r.get("sar"), base, f"{where}: sar"),
            labels=labels,
            scene_id=str(sid).strip() if sid not in (None, "") else None,
        ))
    return scenes
