"""Pretrained weights from outside codemae: initialisation of the student encoder
(``model.init_weights``) and import of the published CoDe-MAE checkpoint.

    report = load_init_weights(model, "mae_pretrain_vit_base.safetensors")   # timm / MAE ViT
    report = load_init_weights(model, "itpn_base_pixel_1600e.safetensors")   # iTPN release
    state, cfg, bands = reference_to_codemae(read_weights_file("codemae_itpn_base.pth"))

Files are read as safetensors, or, for ``.pth`` / ``.pt`` / ``.bin`` releases, with torch's
weights-only loader (plain tensors and containers; never arbitrary unpickling).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from codemae_cli.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Keys of other parts of a pretraining model (decoders, mask tokens) that never initialise an encoder.
SKIP_PREFIXES = ("mask", "decoder")
# Position / class tokens of timm ViTs: codemae's ViT uses a fixed sin-cos table and no class token.
VIT_SKIPPED = ("pos_embed", "cls_token", "reg_token", "head.", "fc_norm.")


@dataclass
class InitReport:
    """What ``model.init_weights`` did to the encoder."""

    source: str
    loaded: list[str] = field(default_factory=list)  # copied as they are
    adapted: list[str] = field(default_factory=list)  # patch embeddings adapted to the band count
    missing: list[str] = field(default_factory=list)  # encoder keys the file does not provide
    unexpected: list[str] = field(default_factory=list)  # file keys this encoder has no place for
    skipped: list[str] = field(default_factory=list)  # file keys left out on purpose (decoders, masks, cls)

    def summary(self) -> str:
        def few(keys: list[str]) -> str:
            return "" if not keys else " (" + ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "") + ")"

        return (f"init weights from {self.source}: {len(self.loaded)} loaded, {len(self.adapted)} adapted"
                f"{few(self.adapted)}, {len(self.missing)} missing{few(self.missing)}, {len(self.unexpected)} "
                f"unexpected{few(self.unexpected)}, {len(self.skipped)} skipped")

    def as_dict(self) -> dict:
        return {"source": self.source, "loaded": len(self.loaded), "adapted": self.adapted,
                "missing": self.missing, "unexpected": self.unexpected, "skipped": self.skipped}


# -- reading files ------------------------------------------------------------------------------
def read_weights_file(path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a safetensors file or a weights-only torch file.

    Wrappers of training scripts are unwrapped (``{"model": ...}``, ``{"state_dict": ...}``) and
    a DDP ``module.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"'{path}' is not a readable safetensors file ({err})") from None
    elif path.suffix in TORCH_SUFFIXES:
        import pickle

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise UserError(f"'{path}' cannot be read as plain weights with torch's weights-only loader "
                            f"({str(err).splitlines()[0]})") from None
    else:
        raise UserError(f"'{path}' is neither a .safetensors file nor a torch weights file ({', '.join(TORCH_SUFFIXES)})")
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise UserError(f"'{path}' holds no weights")
    flat = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            flat[k[len("module."):] if k.startswith("module.") else k] = v
    if not flat:
        raise UserError(f"'{path}' holds no tensors")
    return flat


def convert_to_safetensors(src, dst) -> int:
    """Write the tensors of a weights file as safetensors (atomic); returns the tensor count."""
    from safetensors.torch import save_file

    from codemae_cli.fsutil import staged_file

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise UserError("the converted file must not replace the weights file it is read from")
    state = {k: v.contiguous() for k, v in read_weights_file(src).items()}
    with staged_file(dst) as tmp:  # appears whole or not at all
        save_file(state, str(tmp), metadata={"format": "pt", "source": src.name})
    return len(state)


# -- initialisation -----------------------------------------------------------------------------
def adapt_patch_weight(weight: torch.Tensor, in_chans: int, kernel: int) -> torch.Tensor:
    """An RGB patch projection (O, 3, k, k) for ``in_chans`` bands and kernel size ``kernel``:
    channels by timm's ``adapt_input_conv`` (summed for one band, tiled and rescaled for more),
    kernel resampled by timm's ``resample_patch_embed`` (FlexiViT's pseudo-inverse)."""
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    w = weight.float()
    if w.shape[1] != in_chans:
        w = adapt_input_conv(in_chans, w)
    if w.shape[-1] != kernel:
        w = resample_patch_embed(w, [kernel, kernel])
    return w.to(weight.dtype)


def _patch_embed_sources(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """File patch-embedding entries by target modality ({"optical": {"proj.weight": ...}, ...}).
    A single ImageNet embedding serves both modalities; a CoDe-MAE file has one each."""
    per = {"optical": "patch_embed_rgb.", "sar": "patch_embed_sar.", "*": "patch_embed."}
    found = {m: {k[len(p):]: v for k, v in state.items() if k.startswith(p)} for m, p in per.items()}
    shared = found.pop("*")
    return {m: (found[m] or shared) for m in ("optical", "sar")}


def _encoder_key(key: str, backbone: str) -> Optional[str]:
    """The encoder key a file key maps to (None: skipped on purpose)."""
    if key.startswith(SKIP_PREFIXES) or key.startswith(("patch_embed", "norm_cls", "lm_", "cls_pt_layers")):
        return None
    if backbone == "vit" and key.startswith(VIT_SKIPPED):
        return None
    return key


def load_init_weights(model, path) -> InitReport:
    """Initialise ``model.encoder`` (a CoDeMAE or an encoder) from a local weights file.

    Patch embeddings are adapted to each modality's band count (an RGB release is copied into
    both embeddings); decoders stay fresh (``mask*`` / ``decoder*`` keys are skipped); shape
    mismatches elsewhere are refused with one sentence naming the key.
    """
    encoder = getattr(model, "encoder", model)
    backbone = "itpn" if getattr(encoder, "multiscale", False) else "vit"
    state = read_weights_file(path)
    report = InitReport(source=str(path))
    own = encoder.state_dict()
    to_load: dict[str, torch.Tensor] = {}
    for modality, entries in _patch_embed_sources(state).items():
        if modality not in encoder.patch_embed:
            continue
        target = encoder.patch_embed[modality]
        for name, v in entries.items():
            key = f"patch_embed.{modality}.{name}"
            if key not in own:
                report.unexpected.append(key)
            elif name == "proj.weight" and v.shape != own[key].shape:
                to_load[key] = adapt_patch_weight(v, target.proj.in_channels, target.proj.kernel_size[0])
                report.adapted.append(key)
            else:
                to_load[key] = v
    for k, v in state.items():
        key = _encoder_key(k, backbone)
        if key is None:
            if not k.startswith("patch_embed"):
                report.skipped.append(k)
            continue
        if key not in own:
            report.unexpected.append(k)
            continue
        if v.shape != own[key].shape and key != "absolute_pos_embed":  # the table resamples on load
            raise UserError(f"the weights in '{path}' do not fit this model: '{k}' has shape {tuple(v.shape)} "
                            f"there and {tuple(own[key].shape)} here (another preset or backbone?)")
        to_load[key] = v
    if not any(k.startswith("blocks.") for k in to_load):
        raise UserError(f"'{path}' holds no {backbone} trunk weights this model can use "
                        f"(model.backbone is '{backbone}')")
    with torch.no_grad():
        encoder.load_state_dict(to_load, strict=False)
    report.loaded = sorted(k for k in to_load if k not in report.adapted)
    report.missing = sorted(k for k in own if k not in to_load)
    return report


# -- the published CoDe-MAE checkpoint ----------------------------------------------------------
# Reference key (regular expression) -> codemae key of the pretraining model; None: not imported.
_REFERENCE_KEYS: list[tuple[str, Optional[str]]] = [
    (r"patch_embed_rgb\.(.*)", r"encoder.patch_embed.optical.\1"),
    (r"patch_embed_sar\.(.*)", r"encoder.patch_embed.sar.\1"),
    (r"(absolute_pos_embed|blocks\..*|align_dim_.*|split_.*|block_16to8\..*|block_8to4\..*|fpn_modules\..*)",
     r"encoder.\1"),
    (r"decoder_embed\.(.*)", r"decoder_embed.\1"),
    (r"mask_token", "self_decoder.mask_token"),
    (r"decoder_blocks\.(.*)", r"self_decoder.blocks.\1"),
    (r"decoder_norm\.(.*)", r"self_decoder.norm.\1"),
    (r"decoder_pred\.(.*)", r"self_heads.heads.{width}.\1"),
    (r"mask_token_cross", "cross_decoder.mask_token"),
    (r"decoder_blocks_cross\.(.*)", r"cross_decoder.blocks.\1"),
    (r"decoder_norm_cross\.(.*)", r"cross_decoder.norm.\1"),
    (r"decoder_pred_cross\.(.*)", r"cross_heads.heads.{width}.\1"),
    (r"norm\.(.*)", r"okd_norm.\1"),
    (r"lm_head\.(.*)", r"okd_head.\1"),
    (r"norm_cls\.(.*)", r"okd_aux_norm.\1"),
    (r"lm_cls_head\.(.*)", r"okd_aux_head.\1"),
    (r"cls_pt_layers\.(.*)", r"okd_aux_blocks.\1"),
    (r"contrastive_loss\.crossattn_rgb\.cattn\.n_q\.(.*)", r"ccl.cross_optical.norm_q.\1"),
    (r"contrastive_loss\.crossattn_rgb\.cattn\.n_kv\.(.*)", r"ccl.cross_optical.norm_kv.\1"),
    (r"contrastive_loss\.crossattn_rgb\.cattn\.(q|kv|proj)\.(.*)", r"ccl.cross_optical.\1.\2"),
    (r"contrastive_loss\.crossattn_sar\.cattn\.n_q\.(.*)", r"ccl.cross_sar.norm_q.\1"),
    (r"contrastive_loss\.crossattn_sar\.cattn\.n_kv\.(.*)", r"ccl.cross_sar.norm_kv.\1"),
    (r"contrastive_loss\.crossattn_sar\.cattn\.(q|kv|proj)\.(.*)", r"ccl.cross_sar.\1.\2"),
    (r"decoder_pos_embed", None),  # the same fixed sin-cos table codemae rebuilds
    (r"relative_position_index", None),
]


@dataclass
class ReferenceModel:
    """What a reference state dict says about the model it came from."""

    preset: str
    img_size: int
    patch_size: int
    optical_bands: int
    sar_bands: int
    okd: bool  # distillation heads present (teacher width from lm_head)
    ccl: bool  # conditioned cross-attention present
    cdr: bool  # cross decoder present
    teacher_dim: Optional[int] = None


def describe_reference(state: dict) -> ReferenceModel:
    """Preset, sizes and components of a reference ``itpn_*_dec*`` state dict (by its shapes)."""
    from codemae_cli.model.config import ITPN_PRESETS

    for key in ("patch_embed_rgb.proj.weight", "patch_embed_sar.proj.weight", "absolute_pos_embed"):
        if key not in state:
            raise UserError(f"the file is not a CoDe-MAE iTPN checkpoint: it has no '{key}'")
    if "decoder_embed_rgb.0.0.weight" in state:
        raise UserError("the checkpoint uses separate optical and SAR decoders (dec_share off); codemae's "
                        "CoDe-MAE shares its decoders and cannot import it")
    width = int(state["absolute_pos_embed"].shape[-1])
    depth = len({k.split(".")[1] for k in state if re.match(r"blocks\.\d+\.attn\.qkv\.weight", k)})
    preset = next((n for n, s in ITPN_PRESETS.items() if int(s["embed_dim"]) == width and int(s["depth"]) == depth),
                  None)
    if preset is None:
        raise UserError(f"the checkpoint's trunk ({depth} blocks of width {width}) matches no iTPN preset "
                        f"({', '.join(ITPN_PRESETS)})")
    w = state["patch_embed_rgb.proj.weight"]
    patch = int(w.shape[-1]) * 4
    side = int(round(state["absolute_pos_embed"].shape[1] ** 0.5))
    return ReferenceModel(
        preset=preset, img_size=side * patch, patch_size=patch, optical_bands=int(w.shape[1]),
        sar_bands=int(state["patch_embed_sar.proj.weight"].shape[1]), okd="lm_head.weight" in state,
        ccl="contrastive_loss.crossattn_rgb.cattn.q.weight" in state,
        cdr="decoder_blocks_cross.0.norm1.weight" in state,
        teacher_dim=int(state["lm_head.weight"].shape[0]) if "lm_head.weight" in state else None,
    )


def map_reference_key(key: str, width_of: dict[str, int]) -> Optional[str]:
    """The codemae key of a reference key; None when it is deliberately not imported.
    ``width_of`` gives the prediction-head widths ({"self": ..., "cross": ...})."""
    for pattern, target in _REFERENCE_KEYS:
        m = re.fullmatch(pattern, key)
        if m:
            if target is None:
                return None
            head = "cross" if "cross" in key else "self"
            return m.expand(target).replace("{width}", str(width_of.get(head, 0)))
    raise UserError(f"the checkpoint has a key codemae does not know: '{key}'")


def reference_to_codemae(state: dict, levels: int = 3) -> tuple[dict[str, torch.Tensor], ReferenceModel]:
    """Rename a reference state dict into codemae's CoDeMAE keys.

    The reference appends a mask token to each of its ``levels`` pyramid levels before summing
    them, so a masked position carries ``levels`` mask tokens; codemae adds one, scaled here by
    ``levels`` so the decoders see exactly the same input.
    """
    ref = describe_reference(state)
    widths = {"self": int(state["decoder_pred.weight"].shape[0]) if "decoder_pred.weight" in state else 0,
              "cross": int(state["decoder_pred_cross.weight"].shape[0]) if "decoder_pred_cross.weight" in state else 0}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        target = map_reference_key(key, widths)
        if target is None:
            continue
        if target.endswith("mask_token"):
            value = value * levels
        out[target] = value
    return out, ref


__all__ = ["InitReport", "ReferenceModel", "adapt_patch_weight", "convert_to_safetensors", "describe_reference",
           "load_init_weights", "map_reference_key", "read_weights_file", "reference_to_codemae"]
