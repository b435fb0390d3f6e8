"""The published CoDe-MAE weights as a codemae pretraining checkpoint.

    result = import_reference_checkpoint("codemae_itpn_base.pth", "runs/codemae-paper/checkpoints/last")
    # then: codemae finetune recipes/seg.yaml --set task.pretrained=runs/codemae-paper

The reference state dict (``itpn_base_dec512d8b``: ``patch_embed_rgb`` / ``patch_embed_sar``,
shared decoders, distillation heads, conditioned contrast) is renamed into codemae's keys
(:func:`codemae_cli.model.weights.reference_to_codemae`), checked strictly against the model
its shapes describe, and written with the ordinary checkpoint writer, so ``codemae finetune``,
``codemae analyze`` and linear probing read it like any pretraining checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from codemae_cli.errors import UserError

# Teacher width -> the timm model the reference distilled from (a 1024-d DINOv3 ViT-L/16 on
# satellite imagery); other widths are matched to timm's plain DINOv3 ViTs by width.
TEACHERS = {1024: "vit_large_patch16_dinov3.sat493m", 384: "vit_small_patch16_dinov3", 768: "vit_base_patch16_dinov3"}


@dataclass
class ImportResult:
    checkpoint: Path
    preset: str
    img_size: int
    patch_size: int
    optical_bands: int
    sar_bands: int
    tensors: int  # tensors written
    dropped: list[str]  # codemae keys not written (e.g. distillation heads without a known teacher)


def _model_config(ref, teacher_model: Optional[str]):
    from codemae_cli.config import from_dict
    from codemae_cli.model.config import ModelConfig

    okd = {"enabled": teacher_model is not None, "aux_head": True}
    if teacher_model is not None:
        okd.update(teacher="timm", teacher_model=teacher_model, teacher_pretrained=False)
    data = {"backbone": "itpn", "preset": ref.preset, "img_size": ref.img_size, "patch_size": ref.patch_size,
            "okd": okd, "ccl": {"mode": "conditioned" if ref.ccl else "off"},
            "cdr": {"enabled": ref.cdr, "degradation": "channel"}}
    return from_dict(ModelConfig, data, "model")


def import_reference_checkpoint(src, out, optical_names: Optional[list[str]] = None,
                                sar_names: Optional[list[str]] = None) -> ImportResult:
    """Read the reference weights file ``src`` and write a pretraining checkpoint directory ``out``."""
    import torch

    from codemae_cli.config import to_dict
    from codemae_cli.model.codemae import build_model
    from codemae_cli.model.weights import read_weights_file, reference_to_codemae
    from codemae_cli.train.checkpoint import save_checkpoint

    state, ref = reference_to_codemae(read_weights_file(src))
    teacher = TEACHERS.get(ref.teacher_dim) if ref.okd else None
    dropped = []
    if teacher is None:
        dropped = sorted(k for k in state if k.startswith("okd_"))
        state = {k: v for k, v in state.items() if not k.startswith("okd_")}
    cfg = _model_config(ref, teacher)
    # On the meta device nothing is allocated (not even the teacher); assign=True then makes
    # the loaded tensors the parameters, so the strict load is the completeness check.
    with torch.device("meta"):
        model = build_model(cfg, ref.optical_bands, ref.sar_bands)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UserError(f"'{src}' does not fit the iTPN '{ref.preset}' CoDe-MAE it describes ({first})") from None
    bands = {"optical": optical_names or [f"optical_{i + 1}" for i in range(ref.optical_bands)],
             "sar": sar_names or [f"sar_{i + 1}" for i in range(ref.sar_bands)]}
    for modality, count in (("optical", ref.optical_bands), ("sar", ref.sar_bands)):
        if len(bands[modality]) != count:
            raise UserError(f"the checkpoint has {count} {modality} band(s) but {len(bands[modality])} names were given")
    meta = {"kind": "pretrain", "step": 0, "epoch": 0, "recipe": {"model": to_dict(cfg)}, "bands": bands,
            "stats": None, "imported_from": Path(src).name}
    path = save_checkpoint(Path(out), model, meta)
    return ImportResult(checkpoint=Path(path), preset=ref.preset, img_size=ref.img_size, patch_size=ref.patch_size,
                        optical_bands=ref.optical_bands, sar_bands=ref.sar_bands, tensors=len(state),
                        dropped=dropped)


__all__ = ["ImportResult", "TEACHERS", "import_reference_checkpoint"]
