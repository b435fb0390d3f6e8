"""CoDe-MAE: dual-modality masked autoencoder with OKD, CCL and CDR.

Forward stages (B pairs, N patches, n = int(N (1 - mask_ratio)) visible, D trunk width,
Dd decoder width, T teacher width):

    random_masking      one mask per pair                      ids_keep (B, n), mask (B, N)
    forward_encoder     optical + SAR as one 2B batch          latent (2B, n, D), aux (2B, n, D)
    decoder_embed       Linear to the decoder width            h (2B, n, Dd) = [h_o; h_s]
    forward_self        shared self decoder, own modality      pred (B, N, C_m p^2) per modality
    forward_cdr         shared cross decoder, other modality   pred (B, N, K) per direction
    forward_okd         heads on LN(h_o) and the aux branch    (B, n, T) vs teacher tokens
    forward_ccl         conditioned cross-attention + InfoNCE  scalar

The OKD teacher (timm / file) and the ``hog`` / ``sar_gradient`` CDR targets see the images at
their source scale in [0, 1] (``self.source``, loaded from the datasets by
:meth:`CoDeMAE.set_source_scale`; ``forward(..., source=)`` names each sample's dataset).

The decoder-embedding LayerNorm of the reference (LN + Linear) is the trunk's final norm
(``encoder.norm``), so downstream users of the encoder keep it. With the iTPN backbone the
encoder returns its three pyramid levels instead, and ``decoder_embed`` projects each through
its own LN + Linear and sums them (``PyramidDecoderEmbed``), as the reference does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from codemae_cli.data.raster import RGBChoice, choose_rgb
from codemae_cli.errors import UserError
from codemae_cli.model.ccl import ConditionedContrast, info_nce, pooled_embedding
from codemae_cli.model.config import ModelConfig
from codemae_cli.model.decoder import MAEDecoder, PatchHeads
from codemae_cli.model.encoder import EncoderBase
from codemae_cli.model.errors import ModelInputError
from codemae_cli.model.layers import init_weights, make_block, norm_layer
from codemae_cli.model.source import SourceScaler
from codemae_cli.model.targets import (
    SOURCE_DEGRADATIONS,
    choose_luminance,
    degraded_target,
    masked_mse,
    pixel_target,
    target_dim,
    uses_luminance,
)
from codemae_cli.model.teacher import (
    EMATeacher,
    TeacherInput,
    TimmTeacher,
    choose_teacher_input,
    create_timm_teacher,
    teacher_targets,
)
from codemae_cli.model.trunk import build_trunk


def random_masking(batch: int, num_patches: int, mask_ratio: float, device) -> tuple[torch.Tensor, ...]:
    """MAE's per-sample random masking by sorting uniform noise.

    -> ids_keep (B, n) visible indices, ids_restore (B, N) inverse permutation,
       mask (B, N) float with 1 = hidden, 0 = visible; n = int(N * (1 - mask_ratio)).
    """
    n_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch, num_patches, device=device)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first n are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :n_keep]
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to patch order
    return ids_keep, ids_restore, mask


def _gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, N, K) gathered at (B, n) -> (B, n, K)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class CoDeMAE(nn.Module):
    def __init__(self, cfg: ModelConfig, optical_bands: int, sar_bands: int,
                 rgb: Optional[RGBChoice] = None, luminance_rgb: Optional[RGBChoice] = None):
        super().__init__()
        cfg.validate()
        if optical_bands < 1 or sar_bands < 1:
            raise ValueError("CoDe-MAE needs at least one optical and one SAR band")
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.patch_size = cfg.patch_size
        self.bands = {"optical": optical_bands, "sar": sar_bands}
        self.encoder = build_trunk(cfg, optical_bands, sar_bands)
        self.source = SourceScaler(optical_bands, sar_bands)
        # the stages below register their modules in this order (parameter initialisation follows it)
        dec_kw = self._build_self_branch()
        self._choose_colours(rgb, luminance_rgb)
        if cfg.cdr.enabled:
            self._build_cross_branch(dec_kw)
        self._build_okd()
        if cfg.ccl.mode == "conditioned":
            self.ccl = ConditionedContrast(int(cfg.spec["decoder_dim"]), cfg.ccl.num_heads, cfg.ccl.temperature,
                                           cfg.fused_attn, cfg.ccl.gather_grad)
        self._init_parameters()

    # -- construction stages ------------------------------------------------------------------
    def _build_self_branch(self) -> dict:
        """Decoder embedding feeding every head (self, cross, OKD, CCL), the self decoder and its
        heads; returns the decoders' settings."""
        cfg, spec, p = self.cfg, self.cfg.spec, self.patch_size
        D, Dd = int(spec["embed_dim"]), int(spec["decoder_dim"])
        # (2B, n, D) -> (2B, n, Dd), or, for iTPN, its pyramid levels summed into (2B, n, Dd)
        if cfg.backbone == "itpn":
            from codemae_cli.model.itpn import PyramidDecoderEmbed

            self.decoder_embed = PyramidDecoderEmbed(int(spec["fpn_dim"]), Dd, levels=3)
        else:
            self.decoder_embed = nn.Linear(D, Dd)
        dec_kw = dict(dim=Dd, depth=int(spec["decoder_depth"]), num_heads=int(spec["decoder_heads"]),
                      grid=self.encoder.grid, mlp_ratio=float(spec["mlp_ratio"]), fused_attn=cfg.fused_attn)
        self.self_decoder = MAEDecoder(**dec_kw)
        self.self_heads = PatchHeads(Dd, {m: c * p * p for m, c in self.bands.items()})
        return dec_kw

    def _choose_colours(self, rgb: Optional[RGBChoice], luminance_rgb: Optional[RGBChoice]) -> None:
        """Red, green, blue: one decision for the OKD teacher's input and CDR's luminance
        (``luminance_rgb``: only where a resumed run recorded another one for CDR)."""
        optical_bands = self.bands["optical"]
        self.rgb = rgb if rgb is not None else choose_rgb([], optical_bands)
        self.luminance = choose_luminance(optical_bands, self.cfg.cdr.rgb_bands, luminance_rgb or self.rgb)
        self.rgb_bands = self.luminance.bands
        if self.rgb_bands and max(self.rgb_bands) >= optical_bands:
            raise ValueError("model.cdr.rgb_bands names a band the optical input does not have")
        if self.uses_luminance and self.luminance.source == "names" and (luminance_rgb or self.rgb).conflict:
            raise UserError((luminance_rgb or self.rgb).conflict)

    def _build_cross_branch(self, dec_kw: dict) -> None:
        """CDR: one cross decoder for both directions; heads by target modality."""
        Dd, p, deg = dec_kw["dim"], self.patch_size, self.cfg.cdr.degradation
        self.cross_decoder = MAEDecoder(**dec_kw)
        self.cross_heads = PatchHeads(Dd, {m: target_dim(deg, c, p) for m, c in self.bands.items()})

    def _build_okd(self) -> None:
        """OKD heads; the teacher lives outside the module tree (not in state_dict, not seen by
        DDP or the optimizer)."""
        cfg, spec = self.cfg, self.cfg.spec
        D, Dd = int(spec["embed_dim"]), int(spec["decoder_dim"])
        self._teacher: Optional[nn.Module] = None
        self._teacher_synced = False
        self.teacher_input: Optional[TeacherInput] = None  # the bands a timm / file teacher sees
        self.aux_layer = None
        if not cfg.okd.enabled:
            return
        T = self._build_teacher_dim(self.rgb)
        self.okd_norm = norm_layer(Dd)
        self.okd_head = nn.Linear(Dd, T)
        if cfg.okd.aux_head:
            # As the reference: the output of block int(0.75 * depth) (0-based; block 9 of 12).
            self.aux_layer = min(int(0.75 * self.encoder.depth), self.encoder.depth - 1)
            self.okd_aux_blocks = nn.ModuleList(
                [make_block(D, int(spec["num_heads"]), float(spec["mlp_ratio"]), 0.0, cfg.fused_attn)
                 for _ in range(2)]
            )
            self.okd_aux_norm = norm_layer(D)
            self.okd_aux_head = nn.Linear(D, T)
        if cfg.okd.sar_side:
            self.okd_sar_norm = norm_layer(Dd)
            self.okd_sar_head = nn.Linear(Dd, T)

    def _init_parameters(self) -> None:
        """Fresh weights (MAE's initialisation), then ``model.init_weights`` if named, then the
        EMA teacher as an exact copy of the student."""
        self.apply(init_weights)
        for dec in self._decoders():
            nn.init.normal_(dec.mask_token, std=0.02)
        self.init_report = None
        if self.cfg.init_weights:
            from codemae_cli.model.weights import load_init_weights

            self.init_report = load_init_weights(self, self.cfg.init_weights)
        if self.cfg.okd.enabled and self.cfg.okd.teacher == "ema":
            self._set_teacher(EMATeacher(self.encoder))

    # -- teacher plumbing ---------------------------------------------------------------------
    def _build_teacher_dim(self, rgb: RGBChoice) -> int:
        okd = self.cfg.okd
        if okd.teacher == "ema":
            return self.encoder.embed_dim
        model = create_timm_teacher(okd, fused_attn=self.cfg.fused_attn)
        in_chans = int(model.patch_embed.proj.in_channels) if hasattr(model, "patch_embed") else 3
        self.teacher_input = choose_teacher_input(self.bands["optical"], okd.teacher_bands, in_chans, rgb)
        teacher = TimmTeacher(model, self.teacher_input.bands)
        self._set_teacher(teacher)
        return teacher.dim

    def _set_teacher(self, teacher: nn.Module) -> None:
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # bypass nn.Module registration

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher

    @property
    def uses_luminance(self) -> bool:
        """Whether a CDR target reduces the optical image to one channel (luminance / band mean)."""
        return uses_luminance(self.cfg.cdr)

    def describe_rgb(self) -> list[str]:
        """Start-up lines: the optical bands the OKD teacher reads as red, green, blue, and those
        of CDR's luminance (said once when they are the same)."""
        lines = [self.teacher_input.describe()] if self.teacher_input is not None else []
        lum, n = self.luminance, self.bands["optical"]
        if not self.uses_luminance or n == 1:
            return lines
        if lines and lum.bands == self.teacher_input.bands:
            also = " (if they are not red, green, blue, set model.cdr.rgb_bands too)" if lum.source == "first" else ""
            lines[0] += f"; CDR's luminance (0.299 R + 0.587 G + 0.114 B) reads the same bands{also}"
        elif lum.bands is None:
            why = {"explicit": "model.cdr.rgb_bands=[]", "first": "the band names do not say which are red, green "
                   "and blue; set model.cdr.rgb_bands for a luminance"}.get(lum.source, lum.rule)
            lines.append(f"CDR's one-channel optical target: the mean of the {n} optical bands ({why})")
        else:
            hint = "; if these are not, set model.cdr.rgb_bands to their 0-based positions" if lum.source == "first" else ""
            lines.append(f"CDR luminance (0.299 R + 0.587 G + 0.114 B): optical bands "
                         f"{', '.join(self.rgb.band_names(lum.bands))} (model.cdr.rgb_bands="
                         f"[{','.join(map(str, lum.bands))}]); {lum.rule}{hint}")
        return lines

    def _apply(self, fn, recurse: bool = True):
        # .to()/.cuda()/.half() must move the unregistered teacher too.
        super()._apply(fn, recurse)
        if self._teacher is not None:
            self._teacher._apply(fn)
        return self

    def teacher_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA teacher's weights (for the resume state); empty for frozen teachers, which
        are rebuilt from their name/file."""
        if self._teacher is None or not isinstance(self._teacher, EMATeacher):
            return {}
        return {k: v.detach().clone() for k, v in self._teacher.state_dict().items()}

    def load_teacher_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        if not isinstance(self._teacher, EMATeacher):
            raise ValueError("this model has no EMA teacher to load weights into")
        self._teacher.load_state_dict(state, strict=True)
        self._teacher_synced = True

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step after each optimizer step; a no-op for frozen teachers or OKD off.

        The first call also aligns the teachers across ranks (see :meth:`sync_teacher`)."""
        if self._teacher is not None and not self._teacher_synced:
            self.sync_teacher()
        if isinstance(self._teacher, EMATeacher):
            self._teacher.update(self.encoder, self.cfg.okd.ema_momentum)

    @torch.no_grad()
    def sync_teacher(self) -> None:
        """Broadcast rank 0's teacher to all ranks (no-op when not distributed).

        Ranks build their teachers independently (an EMA copy of a student DDP has not yet
        broadcast, or random timm weights), so an engine calls this once after wrapping the
        model in DDP; :meth:`update_teacher` does it on its first call otherwise. It is kept out
        of ``forward`` so a compiled forward never sees the flag change (no recompilation).
        """
        import torch.distributed as dist

        self._teacher_synced = True
        if self._teacher is None or not (dist.is_available() and dist.is_initialized()):
            return
        if dist.get_world_size() == 1:
            return
        for t in list(self._teacher.parameters()) + list(self._teacher.buffers()):
            dist.broadcast(t.data, src=0)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        return self.encoder.state_dict()

    def _decoders(self) -> list[MAEDecoder]:
        return [m for m in (self.self_decoder, getattr(self, "cross_decoder", None)) if m is not None]

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides norms and biases: mask tokens and a
        learnable position table. (The reference's model lists its position table here too, but
        its optimiser, timm's add_weight_decay without a skip list, decays both.)"""
        return {n for n, _ in self.named_parameters() if n.endswith(("mask_token", "pos_embed"))}

    # -- stages -------------------------------------------------------------------------------
    def forward_encoder(self, optical: torch.Tensor, sar: torch.Tensor, ids_keep: torch.Tensor):
        """-> latent (2B, n, D) normed, aux (2B, n, D) or None."""
        return self.encoder.forward_masked([("optical", optical), ("sar", sar)], ids_keep, self.aux_layer)

    def forward_self(self, h: torch.Tensor, ids_restore: torch.Tensor, grid, B: int):
        dec = self.self_decoder(h, ids_restore.repeat(2, 1), grid)  # (2B, N, Dd)
        return self.self_heads(dec[:B], "optical"), self.self_heads(dec[B:], "sar")  # (B, N, C_m p^2)

    def forward_cdr(self, h: torch.Tensor, ids_restore: torch.Tensor, grid, B: int):
        dec = self.cross_decoder(h, ids_restore.repeat(2, 1), grid)  # (2B, N, Dd)
        # Optical tokens predict the degraded SAR target and vice versa.
        return self.cross_heads(dec[:B], "sar"), self.cross_heads(dec[B:], "optical")

    def forward_okd(self, h_o, h_s, aux, teacher_input, ids_keep, grid):
        """-> (loss, detached parts) with SmoothL1 main + aux heads (+ cosine SAR side)."""
        B = h_o.shape[0]
        targets = _gather_tokens(teacher_targets(self._teacher, teacher_input, grid), ids_keep)  # (B, n, T)
        main = self.okd_head(self.okd_norm(h_o))  # (B, n, T)
        parts = {"okd_main": F.smooth_l1_loss(main.float(), targets)}
        if self.cfg.okd.aux_head:
            a = aux[:B]  # optical half of the 3/4-depth trunk output, (B, n, D)
            for blk in self.okd_aux_blocks:
                a = blk(a)
            a = self.okd_aux_head(self.okd_aux_norm(a))  # (B, n, T)
            parts["okd_aux"] = F.smooth_l1_loss(a.float(), targets)
        if self.cfg.okd.sar_side:
            s = self.okd_sar_head(self.okd_sar_norm(h_s))  # SAR tokens -> paired optical teacher
            parts["okd_sar"] = (1 - F.cosine_similarity(s.float(), targets, dim=-1)).mean()
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    def forward_ccl(self, h_o, h_s, latent, B: int) -> torch.Tensor:
        ccl = self.cfg.ccl
        if ccl.mode == "conditioned":
            return self.ccl(h_o, h_s)
        # rigid: plain InfoNCE on the mean-pooled encoder tokens themselves (iTPN: its stride-16
        # level), or (the reference's placement) on the decoder-embedding projection h that also
        # feeds the decoders
        if ccl.rigid_on == "decoder_embed":
            a, b = h_o, h_s
        else:
            tokens = latent if isinstance(latent, torch.Tensor) else latent[0].flatten(2)  # (2B, n, D | F)
            a, b = tokens[:B], tokens[B:]
        return info_nce(pooled_embedding(a), pooled_embedding(b), ccl.temperature, ccl.gather_grad)

    def set_source_scale(self, table) -> None:
        """Load the datasets' source-scale table (:class:`codemae_cli.data.source_scale.SourceScale`,
        one row per dataset, in the order of the batches' ``dataset`` numbers)."""
        self.source.set_table(table)

    def source_images(self, optical, sar, source):
        """What needs the source scale: (teacher input, optical source, SAR source), each None
        when no component uses it."""
        cfg = self.cfg
        on_source = cfg.cdr.enabled and cfg.cdr.degradation in SOURCE_DEGRADATIONS
        teacher_source = cfg.okd.enabled and getattr(self._teacher, "input_scale", "") == "source"
        opt_src = self.source(optical, "optical", source) if (on_source or teacher_source) else None
        sar_src = self.source(sar, "sar", source) if on_source else None
        return (opt_src if teacher_source else optical), opt_src, sar_src

    def forward(self, optical: torch.Tensor, sar: torch.Tensor, paired: Union[bool, torch.Tensor] = True,
                source: Optional[torch.Tensor] = None) -> dict:
        """optical (B, Co, H, W), sar (B, Cs, H, W) normalised; paired: bool or (B,); source:
        (B,) dataset number of each sample (for the source scale; None: dataset 0)."""
        cfg = self.cfg
        if optical.shape[0] != sar.shape[0] or optical.shape[-2:] != sar.shape[-2:]:
            raise ModelInputError(
                f"optical {tuple(optical.shape)} and SAR {tuple(sar.shape)} batches must share batch and size"
            )
        B = optical.shape[0]
        grid = self.encoder.check_image(optical, "optical")
        self.encoder.check_image(sar, "sar")
        N = grid[0] * grid[1]
        p = self.patch_size

        ids_keep, ids_restore, mask = random_masking(B, N, cfg.mask_ratio, optical.device)
        latent, aux = self.forward_encoder(optical, sar, ids_keep)  # (2B, n, D) | iTPN levels
        h = self.decoder_embed(latent)  # (2B, n, Dd)
        h_o, h_s = h[:B], h[B:]

        out: dict = {"mask": mask, "ids_keep": ids_keep}
        losses: dict[str, torch.Tensor] = {}
        with torch.autocast(optical.device.type, enabled=False):
            teacher_input, opt_src, sar_src = self.source_images(optical, sar, source)  # (B, C_m, H, W) in [0, 1]
            tgt_o = pixel_target(optical, p, cfg.norm_pix_loss)  # (B, N, Co p^2)
            tgt_s = pixel_target(sar, p, cfg.norm_pix_loss)
        pred_o, pred_s = self.forward_self(h, ids_restore, grid, B)
        losses["self_optical"] = masked_mse(pred_o, tgt_o, mask)
        losses["self_sar"] = masked_mse(pred_s, tgt_s, mask)
        out["pred_self_optical"], out["pred_self_sar"] = pred_o, pred_s

        if cfg.cdr.enabled:
            deg = cfg.cdr.degradation
            with torch.autocast(optical.device.type, enabled=False):
                cdr_s = degraded_target(sar, "sar", deg, p, None, cfg.norm_pix_loss, sar_src)
                cdr_o = degraded_target(optical, "optical", deg, p, self.rgb_bands, cfg.norm_pix_loss, opt_src)
            pred_to_s, pred_to_o = self.forward_cdr(h, ids_restore, grid, B)
            losses["cdr"] = 0.5 * (masked_mse(pred_to_s, cdr_s, mask) + masked_mse(pred_to_o, cdr_o, mask))
            out["pred_cdr_sar"], out["pred_cdr_optical"] = pred_to_s, pred_to_o

        if cfg.okd.enabled:
            losses["okd"], out["okd_terms"] = self.forward_okd(h_o, h_s, aux, teacher_input, ids_keep, grid)

        if cfg.ccl.mode != "off":
            losses["ccl"] = self.forward_ccl(h_o, h_s, latent, B)

        # Unpaired batches: CCL and CDR are computed (every parameter keeps a gradient, so DDP
        # needs no find_unused_parameters) but weighted by zero.
        if isinstance(paired, torch.Tensor):
            gate = paired.to(device=optical.device).bool().all().float()
        else:
            gate = 1.0 if paired else 0.0
        weights = self.loss_weights(gate)
        out["losses"] = losses
        out["loss"] = sum(weights[k] * v for k, v in losses.items())
        return out

    def loss_weights(self, gate: Union[float, torch.Tensor] = 1.0) -> dict:
        """The weight of every loss term; ``gate`` = 0 for unpaired batches (CCL, CDR).
        The self term is the mean over the two modalities, as the reference averages over 2B."""
        cfg = self.cfg
        return {
            "self_optical": 0.5 * cfg.self_weight,
            "self_sar": 0.5 * cfg.self_weight,
            "cdr": cfg.cdr.weight * gate,
            "okd": cfg.okd.weight,
            "ccl": cfg.ccl.weight * gate,
        }


def build_model(cfg: ModelConfig, optical_bands: int, sar_bands: int, rgb: Optional[RGBChoice] = None,
                luminance_rgb: Optional[RGBChoice] = None) -> CoDeMAE:
    """The full CoDe-MAE pretraining model for the given band counts. ``rgb``: where red, green,
    blue are (:func:`~codemae_cli.data.raster.choose_rgb`; default: by band order alone), read
    by a timm / file teacher and by CDR's luminance; ``luminance_rgb``: another decision for CDR's
    luminance alone (a resumed run that recorded one)."""
    if optical_bands < 1 or sar_bands < 1:
        raise UserError("CoDe-MAE needs at least one optical band and one SAR band")
    try:
        return CoDeMAE(cfg, optical_bands, sar_bands, rgb, luminance_rgb)
    except ValueError as err:
        raise UserError(str(err)) from None


def build_encoder(cfg: ModelConfig, optical_bands: int, sar_bands: int) -> EncoderBase:
    """The encoder alone (for fine-tuning and analysis): same keys as ``model.encoder``.
    ``cfg.init_weights`` is not applied here: the caller loads pretrained weights."""
    cfg.validate()
    encoder = build_trunk(cfg, optical_bands, sar_bands)
    encoder.apply(init_weights)
    return encoder
