"""The pretraining recipe: ``data``, ``model``, ``optim`` and ``run`` sections.

    recipe = load_pretrain_recipe("recipes/hr.yaml", ["optim.blr=1e-4", "run.output_dir=runs/x"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from codemae_cli.errors import UserError
from codemae_cli.model.config import ModelConfig
from codemae_cli.train.config import DataConfig, OptimConfig, RunConfig


@dataclass
class PretrainRecipe:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        if self.data.img_size != self.model.img_size:
            raise UserError(f"data.img_size ({self.data.img_size}) and model.img_size ({self.model.img_size}) "
                            "must be equal: the loader crops to the size the model is built for")


def load_pretrain_recipe(path: str | Path | None, overrides: list[str] | None = None) -> PretrainRecipe:
    """Strictly load a pretraining recipe (unknown keys are errors) with dotted overrides."""
    from codemae_cli.config import load_recipe

    return load_recipe(path, PretrainRecipe, overrides)


__all__ = ["PretrainRecipe", "load_pretrain_recipe"]
