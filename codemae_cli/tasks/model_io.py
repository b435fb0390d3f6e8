"""Building task models: from a recipe (with pretrained encoder weights) or from a fine-tuned
checkpoint (what ``codemae predict`` and ``codemae evaluate`` load).

    model, report = build_task_model(recipe, optical_bands=4, sar_bands=2, classes=classes)
    model, meta = build_task_model_from_checkpoint("runs/seg", device="cuda")   # meta: CheckpointMeta
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from codemae_cli.errors import UserError

if TYPE_CHECKING:
    from codemae_cli.train.checkpoint import CheckpointMeta

ENCODER_PREFIX = "encoder."
# The encoder size of a from-scratch run whose recipe names none: small enough for a CPU, and
# said loudly (a silent 86 M-parameter base model is what people did not ask for).
FROM_SCRATCH_PRESET = "small"


@dataclass
class LoadReport:
    """What happened when pretrained weights were loaded into the encoder."""

    source: Optional[str] = None
    loaded: int = 0
    missing: list[str] = field(default_factory=list)  # in the encoder, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # encoder.* keys of the checkpoint not in the model
    skipped: list[str] = field(default_factory=list)  # shape mismatch on parts the task never uses

    def as_dict(self) -> dict:
        return {"source": self.source, "loaded": self.loaded, "missing": self.missing,
                "unexpected": self.unexpected, "skipped": self.skipped}


def encoder_config(recipe, pretrained: Optional[CheckpointMeta] = None):
    """The ``ModelConfig`` to build the encoder with.

    With a checkpoint's record (``pretrained``): its own model section (so the trunk is rebuilt
    exactly as it was pretrained; a fine-tuned checkpoint's encoder config), with this recipe's
    image size, drop-path and attention switch. The recipe's preset / patch size, when given,
    must agree with the checkpoint.
    """
    from codemae_cli.config import from_dict, to_dict
    from codemae_cli.model.config import ModelConfig

    m = recipe.model
    if pretrained is not None:
        raw = copy.deepcopy(pretrained.encoder_config if pretrained.encoder_config is not None
                            else pretrained.recipe.get("model"))
        if not isinstance(raw, dict):
            raise UserError("the pretrained checkpoint's recipe has no model section, so its encoder cannot be rebuilt")
        try:
            cfg = from_dict(ModelConfig, raw, "model")
        except UserError as err:
            raise UserError(f"the pretrained checkpoint's model section is not understood by this codemae ({err})") from None
        if m.backbone is not None and m.backbone != cfg.backbone:
            raise UserError(f"the checkpoint was pretrained with backbone '{cfg.backbone}' but the recipe asks for "
                            f"'{m.backbone}'; remove model.backbone or use a matching checkpoint")
        if m.preset is not None and m.preset != cfg.preset:
            raise UserError(f"the checkpoint was pretrained with preset '{cfg.preset}' but the recipe asks for "
                            f"'{m.preset}'; remove model.preset or use a matching checkpoint")
        if m.patch_size is not None and m.patch_size != cfg.patch_size:
            raise UserError(f"the checkpoint was pretrained with patch size {cfg.patch_size} but the recipe asks "
                            f"for {m.patch_size}")
        data = to_dict(cfg)
    else:
        backbone = m.backbone or "vit"
        if m.preset is None and backbone != "vit":
            raise UserError(f"model.preset is not set: name the size of the {backbone} encoder to train from scratch "
                            "(e.g. --set model.preset=base)")
        data = {"backbone": backbone, "preset": m.preset or FROM_SCRATCH_PRESET}
        if m.patch_size is not None:
            data["patch_size"] = m.patch_size
    # Fine-tuning never runs the distillation teacher: keep it from being built or validated.
    data.setdefault("okd", {})["enabled"] = False
    data["img_size"] = m.img_size
    data["drop_path"] = m.drop_path
    data["fused_attn"] = m.fused_attn
    data["init_weights"] = None  # the pretrained checkpoint's weights replace any initialisation
    cfg = from_dict(ModelConfig, data, "model")
    if m.img_size % cfg.patch_size:
        raise UserError(f"model.img_size {m.img_size} is not a multiple of the patch size {cfg.patch_size}")
    return cfg


def encoder_state_from_checkpoint(state: dict) -> dict:
    """The ``encoder.*`` entries of a CoDeMAE / TaskModel state dict, prefix removed."""
    enc = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    if not enc:
        raise UserError("the checkpoint holds no encoder weights (no 'encoder.' keys); it is not a CoDe-MAE checkpoint")
    return enc


def load_encoder_weights(encoder, enc_state: dict, used: Optional[set] = None, source: Optional[str] = None) -> LoadReport:
    """Copy matching weights into ``encoder``; refuse shape mismatches on parts the task uses.

    ``used``: names of encoder parameters the task trains or runs (None = all). A mismatch on
    an unused part (the SAR patch embedding of an optical-only task with other SAR bands) is
    skipped and reported.
    """
    import torch

    own = encoder.state_dict()
    report = LoadReport(source=source)
    to_load = {}
    for k, v in enc_state.items():
        if k not in own:
            report.unexpected.append(k)
            continue
        # A learnable position table of another grid is resampled by the encoder when loaded.
        if tuple(v.shape) != tuple(own[k].shape) and not k.endswith("pos_embed"):
            if used is None or k in used:
                raise UserError(f"the checkpoint does not fit this model: '{k}' has shape {tuple(v.shape)} in the "
                                f"checkpoint and {tuple(own[k].shape)} here (different preset, patch size or bands)")
            report.skipped.append(k)
            continue
        to_load[k] = v
    report.missing = sorted(k for k in own if k not in enc_state)
    # Buffers and parameters the checkpoint lacks keep their initialisation (reported above).
    with torch.no_grad():
        encoder.load_state_dict(to_load, strict=False)
    report.loaded = len(to_load)
    used_missing = [k for k in report.missing if used is None or k in used]
    if report.loaded == 0 or (used is not None and len(used_missing) > len(used) // 2):
        raise UserError("the checkpoint does not fit this model: most encoder weights are missing from it")
    return report


def build_task_model(recipe, optical_bands: int, sar_bands: int, num_classes: int,
                     pretrained: Optional[CheckpointMeta] = None):
    """A fresh :class:`TaskModel` (random weights) for ``recipe``, plus its encoder ModelConfig
    (the encoder of the checkpoint whose record is ``pretrained``, see :func:`encoder_config`)."""
    from codemae_cli.model import build_encoder
    from codemae_cli.tasks.heads import build_head
    from codemae_cli.tasks.model import TaskModel, default_layers

    cfg = encoder_config(recipe, pretrained)
    encoder = build_encoder(cfg, optical_bands=optical_bands, sar_bands=sar_bands)
    t = recipe.task
    layers = tuple(t.layers) if t.layers else default_layers(encoder)
    if t.head in ("upernet", "fpn") and t.kind == "segmentation" and len(layers) != 4:
        raise UserError(f"task.head={t.head} needs 4 entries in task.layers, got {len(layers)}")
    depth = int(encoder.depth)
    if any(not 0 <= i < depth for i in layers):
        raise UserError(f"task.layers must be block indices in 0..{depth - 1} for preset '{cfg.preset}'")
    pyramid = bool(getattr(encoder, "multiscale", False)) and t.kind == "segmentation" and t.head in ("upernet", "fpn")
    in_dim = encoder.pyramid_dim if pyramid else encoder.feature_dim
    head = build_head(t.kind, t.head, in_dim, num_classes, neck_dim=t.neck_dim, multiscale_input=pyramid)
    model = TaskModel(encoder, head, inputs=t.inputs, fusion=t.fusion, layers=layers,
                      modality_dropout=t.modality_dropout, freeze_encoder=t.linear_probe, task=t.kind)
    return model, cfg


def build_task_model_from_checkpoint(checkpoint, device="cpu"):
    """``(model, meta)`` of a fine-tuned checkpoint, in eval mode; ``meta`` is its
    :class:`~codemae_cli.train.checkpoint.CheckpointMeta`.

    ``checkpoint``: a checkpoint directory, a run directory, or the record already read (then
    neither the path is resolved nor meta.json read again). Normalise inputs with ``meta.stats``.
    """
    from codemae_cli.config import from_dict
    from codemae_cli.tasks.config import FinetuneRecipe
    from codemae_cli.train.checkpoint import CheckpointMeta, load_weights, read_checkpoint_meta

    meta = checkpoint if isinstance(checkpoint, CheckpointMeta) else read_checkpoint_meta(checkpoint)
    where = meta.path
    meta.require_finetuned()
    for key in ("recipe", "encoder_config", "bands", "classes", "inputs"):
        if key not in meta.raw:
            raise UserError(f"checkpoint '{where}' lacks '{key}' in its meta.json; it was not written by `codemae finetune`")
    try:
        recipe = from_dict(FinetuneRecipe, meta.recipe)
    except UserError as err:
        raise UserError(f"checkpoint '{where}' has a recipe this codemae does not understand ({err})") from None
    # Rebuild exactly the encoder that was trained (its config is stored), no pretrained load.
    recipe.model.backbone = meta.encoder_config.get("backbone", "vit")
    recipe.model.preset = meta.encoder_config["preset"]
    recipe.model.patch_size = meta.encoder_config["patch_size"]
    model, _ = build_task_model(recipe, len(meta.bands["optical"]), len(meta.bands["sar"]),
                                len(meta.classes), pretrained=meta)
    try:
        model.load_state_dict(load_weights(meta.path), strict=True)
    except RuntimeError:
        raise UserError(f"checkpoint '{where}' weights do not match the model its meta.json describes") from None
    return model.to(device).eval(), meta


__all__ = [
    "LoadReport",
    "build_task_model",
    "build_task_model_from_checkpoint",
    "encoder_config",
    "encoder_state_from_checkpoint",
    "load_encoder_weights",
]
