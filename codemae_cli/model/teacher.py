"""OKD teachers: a frozen timm model (hub weights or a local safetensors file) or an EMA copy
of the student's optical encoder. Teachers never receive gradients.

Targets are the teacher's patch tokens (prefix/register tokens dropped) on the student's patch
grid (bilinear resampling when the teacher's grid differs), passed through a LayerNorm without
affine parameters.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from codemae_cli.data.raster import RGBChoice, choose_rgb
from codemae_cli.errors import UserError
from codemae_cli.model.config import OKDConfig
from codemae_cli.model.layers import set_fused_attn


def create_timm_teacher(cfg: OKDConfig, fused_attn: bool = True) -> nn.Module:
    """Build the timm teacher named by ``cfg.teacher_model`` (weights per ``cfg.teacher``)."""
    import timm

    name = cfg.teacher_model
    kwargs: dict = dict(num_classes=0)
    if cfg.teacher == "file":
        kwargs.update(pretrained=True, pretrained_cfg_overlay=_file_overlay(cfg))
    else:
        kwargs.update(pretrained=bool(cfg.teacher_pretrained))
    try:
        model = timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError:  # architectures without dynamic_img_size support
        try:
            model = timm.create_model(name, **kwargs)
        except RuntimeError as err:
            raise _teacher_error(cfg, err) from None
    except RuntimeError as err:  # unknown model name or weights that do not fit it
        raise _teacher_error(cfg, err) from None
    except Exception as err:  # hub/network errors when the weights are not cached locally
        if cfg.teacher == "timm" and cfg.teacher_pretrained:
            raise UserError(
                f"could not load the pretrained weights of teacher '{name}' ({type(err).__name__}); "
                "download them first, or point model.okd.teacher_weights at a local .safetensors file"
            ) from None
        raise
    # The overlay's weights would otherwise stay referenced by the model's config.
    getattr(model, "pretrained_cfg", {}).pop("state_dict", None)
    model.eval().requires_grad_(False)
    set_fused_attn(model, fused_attn)
    return model


def _file_overlay(cfg: OKDConfig) -> dict:
    """timm's pretrained-config overlay that loads ``cfg.teacher_weights`` strictly.

    The tensors are read here with safetensors (pickled checkpoints can run arbitrary code when
    loaded, so nothing else is read). timm loads weights non-strictly whenever the model's head
    differs from the pretrained one (here always: num_classes=0), which would keep a half-random
    teacher from weights of another architecture with only a log line. So the head is dropped
    here and the overlay says the weights have none: timm then keeps its strict load, and any
    missing or unexpected key or shape mismatch fails the build.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from timm.models import clean_state_dict, get_pretrained_cfg_value

    path = Path(cfg.teacher_weights or "")
    if not path.is_file():
        raise UserError(f"teacher weights file '{path}' does not exist")
    if path.suffix.lower() != ".safetensors":
        raise UserError(f"teacher weights file '{path}' must be a .safetensors file")
    try:
        state = clean_state_dict(load_file(str(path)))
    except (SafetensorError, OSError) as err:
        raise UserError(f"teacher weights file '{path}' is not a readable safetensors file ({err})") from None
    if not state:
        raise UserError(f"teacher weights file '{path}' holds no tensors")
    heads = get_pretrained_cfg_value(cfg.teacher_model, "classifier") or ()
    for head in (heads,) if isinstance(heads, str) else heads:
        state.pop(f"{head}.weight", None)
        state.pop(f"{head}.bias", None)
    return dict(state_dict=state, num_classes=0)


def _teacher_error(cfg: OKDConfig, err: Exception) -> UserError:
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "Unknown model" in msg or "Invalid model" in msg:
        return UserError(f"model.okd.teacher_model '{cfg.teacher_model}' is not a timm model name")
    if cfg.teacher == "file":
        return UserError(
            f"teacher weights file '{cfg.teacher_weights}' does not fit model '{cfg.teacher_model}': "
            f"{_first_misfit(str(err)) or msg}"
        )
    return UserError(f"could not build teacher '{cfg.teacher_model}': {msg}")


def _first_misfit(text: str) -> str:
    """The first problem of a failed ``load_state_dict``, as a phrase: its first missing or
    unexpected key (with the number of such keys) or its first shape mismatch; "" for another error."""
    for kind, label in (("Missing", "missing"), ("Unexpected", "unexpected")):
        found = re.search(kind + r' key\(s\) in state_dict: (.*?)\. *$', text, re.MULTILINE)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            if keys:
                more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
                return f"{label} key '{keys[0]}'{more}"
    found = re.search(r"size mismatch for (\S+): copying a param with shape (.*?) from checkpoint, "
                      r"the shape in current model is (.*?)\.?$", text, re.MULTILINE)
    if found:
        return f"'{found.group(1)}' has shape {found.group(2)}, the model wants {found.group(3)}"
    return ""


class TimmTeacher(nn.Module):
    """A frozen timm ViT teacher. Input: the optical image at its source scale in [0, 1]
    (model/source.py: the dataset normalisation undone, divided by the recorded source range;
    for 8-bit data the image / 255, as the reference code feeds its teacher).

    Preprocessing: select ``bands`` (read as RGB), then normalise with the teacher's
    pretrained_cfg mean/std. No per-image stretch: what the teacher sees does not depend on
    the scene's own brightness, and its colour balance is the source's.
    """

    input_scale = "source"

    def __init__(self, model: nn.Module, bands: Sequence[int]):
        super().__init__()
        self.model = model
        self.bands = tuple(bands)
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        chans = len(self.bands)
        if len(mean) != chans:  # single-channel or exotic teachers: broadcast the first value
            mean, std = (mean[0],) * chans, (std[0],) * chans
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.dim = int(getattr(model, "num_features", model.embed_dim))
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", 16)
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.in_chans = chans

    def prepare(self, optical: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) source-scale optical -> (B, 3, H, W) in the teacher's normalisation."""
        x = optical[:, list(self.bands)].float()  # (B, 3, H, W)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, optical: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """-> patch tokens (B, h*w, T) and the teacher grid (h, w)."""
        x = self.prepare(optical)
        tokens = self.model.forward_features(x)  # (B, prefix + h*w, T)
        tokens = tokens[:, self.num_prefix_tokens :]
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return tokens, grid


class EMATeacher(nn.Module):
    """An exponential moving average of the student's optical encoder (patch embedding,
    positions, trunk, final norm). It sees the full (unmasked) optical image, normalised as the
    student sees it."""

    input_scale = "normalised"

    def __init__(self, encoder: nn.Module):
        super().__init__()
        enc = copy.deepcopy(encoder)
        # The SAR patch embedding plays no part in the optical teacher.
        for name in list(enc.patch_embed.keys()):
            if name != "optical":
                del enc.patch_embed[name]
        self.encoder = enc.eval().requires_grad_(False)
        self.dim = encoder.embed_dim
        self.patch_size = encoder.patch_size

    @torch.no_grad()
    def forward(self, optical: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens = self.encoder.forward_tokens(optical, "optical")  # (B, N, D)
        grid = (optical.shape[-2] // self.patch_size, optical.shape[-1] // self.patch_size)
        return tokens, grid

    @torch.no_grad()
    def update(self, student_encoder: nn.Module, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        student = dict(student_encoder.named_parameters())
        t_params, s_params = [], []
        for name, p in self.encoder.named_parameters():
            t_params.append(p)
            s_params.append(student[name].detach())
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def teacher_targets(teacher: nn.Module, optical: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Teacher patch tokens on the student's grid, LayerNorm without affine: -> (B, h*w, T) fp32."""
    with torch.no_grad():
        tokens, t_grid = teacher(optical)  # (B, ht*wt, T)
        tokens = tokens.float()
        if tuple(t_grid) != tuple(grid):
            B, _, T = tokens.shape
            maps = tokens.transpose(1, 2).reshape(B, T, *t_grid)
            maps = F.interpolate(maps, size=tuple(grid), mode="bilinear", align_corners=False)
            tokens = maps.flatten(2).transpose(1, 2)
        return F.layer_norm(tokens, tokens.shape[-1:])


@dataclass(frozen=True)
class TeacherInput:
    """The optical bands a frozen teacher reads as its input channels (R, G, B), and why."""

    bands: tuple[int, ...]  # 0-based optical band indices, in the teacher's channel order
    names: tuple[str, ...]  # their names
    rule: str  # how they were chosen, as the start-up line says it

    def describe(self) -> str:
        """The start-up line: the bands by name, and the model.okd.teacher_bands value they are."""
        seen = ", ".join(self.names)
        return (f"OKD teacher input (R, G, B): optical bands {seen} (model.okd.teacher_bands="
                f"[{','.join(map(str, self.bands))}]); {self.rule}")


def choose_teacher_input(optical_bands: int, bands: Optional[Sequence[int]], in_chans: int = 3,
                         rgb: Optional[RGBChoice] = None) -> TeacherInput:
    """The optical bands the teacher sees: ``bands`` (model.okd.teacher_bands) when given; a
    single band as grey; for a 3-channel teacher, red, green, blue of the run's one RGB decision
    (``rgb``, :func:`~codemae_cli.data.raster.choose_rgb`; without one, the decision on band
    order alone); else the first ``in_chans`` bands. A guess among more bands than the teacher
    reads is said on the start-up line, with the way to change it."""
    rgb = rgb if rgb is not None else choose_rgb([], optical_bands)
    names = rgb.band_names(range(optical_bands))
    if bands is not None:
        bad = [b for b in bands if b >= optical_bands]
        if bad:
            raise UserError(
                f"model.okd.teacher_bands names band {bad[0]} but the optical input has {optical_bands} bands"
            )
        if len(bands) != in_chans:
            raise UserError(f"model.okd.teacher_bands must name {in_chans} bands for this teacher, not {len(bands)}")
        return _input(bands, names, "as model.okd.teacher_bands says")
    if optical_bands == 1:
        return _input((0,) * in_chans, names, "the one optical band as grey")  # panchromatic
    if in_chans == 3 and rgb.bands is not None and max(rgb.bands) < optical_bands:
        if rgb.conflict:
            raise UserError(rgb.conflict)
        return _input(rgb.bands, names, rgb.rule + (_hint(in_chans) if rgb.source == "first" else ""))
    if optical_bands == in_chans:
        return _input(range(in_chans), names, "the optical bands in their order")
    if optical_bands > in_chans:
        return _input(range(in_chans), names, f"the first {in_chans}{_hint(in_chans)}")
    raise UserError(
        f"the optical input has {optical_bands} bands; set model.okd.teacher_bands to the {in_chans} "
        "bands the teacher should see"
    )


def _hint(in_chans: int) -> str:
    example = ",".join(map(str, reversed(range(in_chans))))
    return ("; if these are not, set model.okd.teacher_bands to their 0-based positions "
            f"(e.g. --set model.okd.teacher_bands=[{example}])")


def _input(bands: Sequence[int], names: Sequence[str], rule: str) -> TeacherInput:
    bands = tuple(int(b) for b in bands)
    return TeacherInput(bands, tuple(names[b] for b in bands), rule)
