"""Recipes: YAML mapped strictly onto nested dataclasses, with dotted command-line overrides.

    recipe = load_recipe("recipes/hr.yaml", PretrainRecipe, ["optim.blr=1e-4"])
    save_recipe(recipe, run_dir / "recipe.yaml")

Unknown keys are errors that name the closest valid key; values are checked against the
dataclass field types (int, float, bool, str, Optional, Literal, list/tuple, nested dataclass).
The section dataclasses live next to the code they configure (``codemae_cli.model.config``,
``codemae_cli.train.config`` ...); this module only knows how to load and save them.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from codemae_cli.errors import UserError

T = TypeVar("T")


def _suggest(key: str, valid: list[str], where: str = "") -> str:
    """The closest valid key as a full dotted path (copy-pastable into --set), else the valid keys."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{where + '.' if where else ''}{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(valid))}"


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise UserError naming ``where``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and _is_optional(tp):
            return None
        errors = []
        for arg in args:
            try:
                return _coerce(arg, value, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool) and value not in choices:
            # YAML 1.1 reads off/no/on/yes as booleans (`--set model.ccl.mode=off`): map back.
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in words]
            if len(spelled) == 1:
                value = spelled[0]
        if value not in choices:
            raise UserError(f"{where} must be one of {', '.join(map(repr, choices))}, not {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping of keys, not {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise UserError(f"{where} must be a list, not {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise UserError(f"{where} must have {len(args)} items, not {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=False)))
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where} must be a mapping, not {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where} must be true or false, not {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{where} must be an integer, not {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where} must be a number, not {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where} must be a string, not {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, refusing unknown keys with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'recipe'} must be a mapping of keys, not {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # Unknown keys first, so a wrong section is named before an earlier section is validated.
    for key in data:
        if key not in fields:
            path = f"{where}.{key}" if where else str(key)
            raise UserError(f"unknown recipe key '{path}'{_suggest(str(key), list(fields), where)}")
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        kwargs[key] = _coerce(hints[key], value, path)
    try:
        obj = cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise UserError(f"{where or 'recipe'}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict/list tree (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw recipe dict."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise UserError(f"override '{item}': '{part}' is not a section")
            node = node[part]
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"recipe '{p}' is a folder, not a recipe file")
    if not p.is_file():
        raise UserError(f"recipe file '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"recipe file '{p}' is not valid YAML{where}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe file '{p}' must hold a mapping of sections")
    return data


def load_recipe(path: str | Path | None, cls: type[T], overrides: list[str] | None = None) -> T:
    """Read YAML (or start from defaults when ``path`` is None), apply overrides, build ``cls``."""
    data = read_yaml(path) if path is not None else {}
    sections = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    if path is not None and "task" in data and "task" not in sections and "run" in sections:
        raise UserError(f"recipe '{path}' is a fine-tuning recipe (it has a task section); run it with codemae finetune")
    from_file = "task" in data
    data = apply_overrides(data, overrides)
    try:
        return from_dict(cls, data)
    except UserError as err:
        if path is not None and "task" in sections and not from_file and "unknown recipe key" in str(err):
            raise UserError(f"recipe '{path}' has no task section, so it looks like a pretraining recipe "
                            f"({err}); run it with codemae pretrain, or start from recipes/seg.yaml") from None
        raise


def dump_recipe(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=None)


def save_recipe(obj: Any, path: str | Path) -> Path:
    """Write the resolved recipe atomically."""
    from codemae_cli.fsutil import staged_file

    p = Path(path)
    with staged_file(p) as tmp:
        tmp.write_text(dump_recipe(obj))
    return p


__all__ = [
    "apply_overrides",
    "dump_recipe",
    "from_dict",
    "load_recipe",
    "read_yaml",
    "save_recipe",
    "to_dict",
]
