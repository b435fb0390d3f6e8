"""The fine-tuning recipe: ``data``, ``model`` (encoder), ``task``, ``optim`` and ``run`` sections.

    recipe = load_recipe("recipes/seg.yaml", FinetuneRecipe, ["task.inputs=sar"])

The data, optimisation and run sections are the ones pretraining uses
(:mod:`codemae_cli.train.config`); ``model`` only holds what is needed to rebuild the encoder,
and ``task`` says what to learn on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from codemae_cli.errors import UserError
from codemae_cli.train.config import DataConfig, OptimConfig, RunConfig

SEG_METRICS = ("miou", "mf1", "oa", "macc", "kappa")
CLS_METRICS = ("top1", "oa", "miou", "mf1", "macc", "kappa")
MULTILABEL_METRICS = ("micro_map", "macro_map", "micro_f1", "macro_f1")

# A qualitative palette (Tableau 10) for classes the recipe gives without a colour.
DEFAULT_COLORS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


@dataclass
class ClassSpec:
    """One output class: its name and an RGB colour for quick-looks and styled rasters."""

    name: str
    color: Optional[list[int]] = None

    def validate(self) -> None:
        if not self.name:
            raise UserError("every entry of task.classes needs a non-empty name")
        if self.color is not None and (len(self.color) != 3 or any(not 0 <= c <= 255 for c in self.color)):
            raise UserError(f"task.classes colour of '{self.name}' must be three integers in 0..255")


@dataclass
class EncoderSection:
    """How to rebuild the encoder. ``backbone``/``preset``/``patch_size`` left empty are taken
    from the pretrained checkpoint. From scratch they default to ``vit``/``small``/16, the preset
    said loudly in the log (an iTPN encoder needs its preset named)."""

    backbone: Optional[str] = None  # vit | itpn
    preset: Optional[str] = None  # tiny | small | base | large
    img_size: int = 224
    patch_size: Optional[int] = None
    drop_path: float = 0.1  # stochastic depth while fine-tuning (0 for linear probing)
    fused_attn: bool = True

    def validate(self) -> None:
        if self.img_size < 1:
            raise UserError("model.img_size must be positive")
        if self.patch_size is not None and (self.patch_size < 1 or self.img_size % self.patch_size):
            raise UserError("model.img_size must be a multiple of model.patch_size")
        if not 0 <= self.drop_path < 1:
            raise UserError("model.drop_path must be in [0, 1)")


@dataclass
class TaskConfig:
    """What to learn on top of the encoder."""

    kind: Literal["segmentation", "classification"] = "segmentation"
    multilabel: bool = False  # classification: every class present in the chip (sigmoid + BCE)
    inputs: Literal["optical", "sar", "both"] = "both"
    # segmentation: upernet | fpn | linear; classification: pool (mean-pooled tokens, LayerNorm,
    # linear) | linear. Empty: upernet for segmentation, pool for classification.
    head: Optional[Literal["upernet", "fpn", "pool", "linear"]] = None
    neck_dim: int = 256  # channels of the UPerNet/FPN neck
    fusion: Literal["concat", "mean"] = "concat"  # how optical and SAR features are combined
    linear_probe: bool = False  # frozen encoder, BatchNorm without affine + linear head
    pretrained: Optional[str] = None  # pretrain checkpoint (directory or run directory)
    from_scratch: bool = False  # random encoder (baseline); exclusive with `pretrained`
    classes: list[ClassSpec] = field(default_factory=list)  # empty: from the dataset's labels
    ignore_index: int = 255
    class_weights: Optional[list[float]] = None
    best_metric: str = "miou"
    modality_dropout: float = 0.0  # probability that a sample loses one modality (inputs=both; else ignored)
    layers: Optional[list[int]] = None  # encoder blocks feeding the neck (default: the encoder's)
    min_class_fraction: float = 0.01  # multi-label target: class covers >= this share of the chip

    def validate(self) -> None:
        if self.head is None:
            self.head = "upernet" if self.kind == "segmentation" else "pool"
        allowed = ("upernet", "fpn", "linear") if self.kind == "segmentation" else ("pool", "linear")
        if self.head not in allowed:
            raise UserError(f"task.head={self.head} does not fit task.kind={self.kind}; use one of {', '.join(allowed)}")
        if self.pretrained and self.from_scratch:
            raise UserError("set either task.pretrained or task.from_scratch, not both")
        if self.linear_probe and self.head != "linear":
            raise UserError("task.linear_probe needs task.head=linear (BatchNorm without affine + linear layer)")
        if not 0 <= self.modality_dropout < 1:
            raise UserError("task.modality_dropout must be in [0, 1)")
        if self.inputs != "both":
            # Dropping one of two modalities means nothing with one input: a recipe written for
            # both (recipes/seg.yaml) runs as is with --set task.inputs=sar.
            self.modality_dropout = 0.0
        if self.multilabel and self.kind != "classification":
            raise UserError("task.multilabel only applies when task.kind=classification")
        if not 0 <= self.ignore_index <= 255:
            raise UserError("task.ignore_index must be in 0..255 (labels are stored as uint8)")
        if self.neck_dim < 8:
            raise UserError("task.neck_dim must be at least 8")
        if not 0 < self.min_class_fraction <= 1:
            raise UserError("task.min_class_fraction must be in (0, 1]")
        valid = self.valid_metrics()
        if self.best_metric not in valid:
            raise UserError(f"task.best_metric must be one of {', '.join(valid)} for this task, not '{self.best_metric}'")
        if self.class_weights is not None and self.classes and len(self.class_weights) != len(self.classes):
            raise UserError("task.class_weights must have one weight per entry of task.classes")
        if self.class_weights is not None and any(w < 0 for w in self.class_weights):
            raise UserError("task.class_weights must not be negative")

    def valid_metrics(self) -> tuple[str, ...]:
        if self.kind == "segmentation":
            return SEG_METRICS
        return MULTILABEL_METRICS if self.multilabel else CLS_METRICS


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """AdamW (fine-tuning) or SGD (the paper's linear probing: lr 0.5, no weight decay)."""

    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = 0.9  # SGD only
    blr: float = 1e-3  # lr = blr * batch / 256 (MAE fine-tuning default)
    batch_size: int = 16
    epochs: int = 50
    warmup_epochs: float = 2
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.momentum < 1:
            raise UserError("optim.momentum must lie in [0, 1)")


@dataclass
class FinetuneRecipe:
    data: DataConfig = field(default_factory=lambda: DataConfig(crop_scale=(0.5, 1.0)))
    model: EncoderSection = field(default_factory=EncoderSection)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))

    def validate(self) -> None:
        if not self.data.datasets:
            raise UserError("data.datasets is empty; list at least one prepared dataset directory")
        if self.data.img_size != self.model.img_size:
            raise UserError(f"data.img_size ({self.data.img_size}) and model.img_size ({self.model.img_size}) must be "
                            "equal: chips are resized to the size the model is built for")


__all__ = [
    "ClassSpec",
    "DEFAULT_COLORS",
    "EncoderSection",
    "FinetuneOptimConfig",
    "FinetuneRecipe",
    "TaskConfig",
]
