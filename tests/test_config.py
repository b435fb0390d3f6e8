"""Recipe loading contracts: strict keys with suggestions, typed overrides, round trip."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from codemae_cli.config import apply_overrides, dump_recipe, from_dict, load_recipe, save_recipe
from codemae_cli.errors import UserError


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    steps: Optional[int] = None
    paths: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_unknown_key_names_closest():
    with pytest.raises(UserError, match=r"unknown recipe key 'inner.lrr'; did you mean 'inner.lr'"):
        from_dict(Outer, {"inner": {"lrr": 1}})


def test_types_are_checked_and_coerced():
    cfg = from_dict(Outer, {"steps": 3.0, "inner": {"lr": 1, "betas": [0.8, 0.9]}})
    assert cfg.steps == 3 and isinstance(cfg.inner.lr, float) and cfg.inner.betas == (0.8, 0.9)
    with pytest.raises(UserError, match="must be one of"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(UserError, match="must be an integer"):
        from_dict(Outer, {"steps": "many"})
    with pytest.raises(UserError, match="must have 2 items"):
        from_dict(Outer, {"inner": {"betas": [0.9]}})


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: base\ninner:\n  lr: 0.1\n")
    cfg = load_recipe(p, Outer, ["inner.lr=2e-4", "paths=[a, b]", "steps=null", "inner.mode=b"])
    assert cfg.inner.lr == pytest.approx(2e-4) and cfg.paths == ["a", "b"] and cfg.steps is None
    assert cfg.inner.mode == "b" and cfg.name == "base"
    with pytest.raises(UserError, match="did you mean"):
        load_recipe(p, Outer, ["inner.mod=b"])
    with pytest.raises(UserError, match="key.sub=value"):
        apply_overrides({}, ["noequals"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = from_dict(Outer, {"paths": ["d1"], "inner": {"betas": [0.5, 0.6]}})
    out = save_recipe(cfg, tmp_path / "run" / "recipe.yaml")
    assert load_recipe(out, Outer) == cfg
    assert "betas" in dump_recipe(cfg)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml", Outer)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad, Outer)
