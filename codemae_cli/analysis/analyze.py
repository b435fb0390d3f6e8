"""``codemae analyze``: the representation analyses of one or more pretrained checkpoints.

For every checkpoint, on the same chips of a prepared dataset:

- effective rank and normalised singular-value spectrum of the optical and the SAR patch
  tokens and chip embeddings (dimensional collapse);
- modality gap between the optical and SAR chip-embedding centroids, paired vs unpaired
  cross-modal cosine similarity and optical->SAR retrieval accuracy;
- per-patch cross-modal cosine similarity of co-located tokens against the optical/SAR patch
  SSIM, and their correlation (does the model align the patches that share structure?);
- cross-modal reconstructions next to their targets for a few chips (when the checkpoint has
  a cross decoder, i.e. CDR or full cross reconstruction was on).

Outputs in ``out_dir``: ``analysis.json`` (all numbers), ``spectra.png``,
``similarity_vs_ssim.png`` and ``reconstructions_<name>.png`` per checkpoint with a cross
decoder. The directory is assembled in a temporary sibling and renamed at the end.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from codemae_cli.analysis import metrics as M
from codemae_cli.data.raster import choose_rgb
from codemae_cli.errors import UserError
from codemae_cli.fsutil import check_replaceable, guard_outputs, read_json_object, staged_directory
from codemae_cli.train.logging import pyplot

if TYPE_CHECKING:
    from codemae_cli.train.checkpoint import CheckpointMeta


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@dataclass
class Pretrained:
    """A pretraining checkpoint rebuilt for analysis: the model (eval mode), its record, a short name."""

    model: Any
    meta: CheckpointMeta
    name: str  # "<run>" for runs/<run>/checkpoints/last|best, "<run>/<checkpoint>" otherwise


def load_pretrained(path, device: str = "cpu") -> Pretrained:
    """Rebuild the CoDe-MAE model of a pretraining checkpoint (without its distillation branch)."""
    from codemae_cli.config import from_dict
    from codemae_cli.model import ModelConfig, build_model
    from codemae_cli.train.checkpoint import load_weights, read_checkpoint_meta

    meta = read_checkpoint_meta(path)
    if meta.kind != "pretrain":
        raise UserError(f"checkpoint '{path}' is a {meta.kind} checkpoint; analyze needs a pretraining checkpoint")
    if "model" not in meta.recipe or not meta.bands.get("optical") or not meta.bands.get("sar"):
        raise UserError(f"checkpoint '{path}' lacks the recipe's model section or its band lists")
    cfg = from_dict(ModelConfig, dict(meta.recipe["model"]), "model")
    # The analyses need the encoder and the decoders, not the distillation branch: its teacher
    # is not in the checkpoint and may need weights (or a download) this machine lacks.
    cfg.okd.enabled = False
    n_opt = len(meta.bands["optical"])
    # CDR's luminance as the run read it (its recorded red, green, blue)
    model = build_model(cfg, optical_bands=n_opt, sar_bands=len(meta.bands["sar"]),
                        luminance_rgb=meta.rgb_input.luminance_choice(meta.bands["optical"], n_opt))
    state = load_weights(meta.path)
    own = model.state_dict()
    wrong = [k for k in own if k.startswith("encoder.") and (k not in state or state[k].shape != own[k].shape)]
    if wrong:
        raise UserError(f"checkpoint '{path}' does not match the model its recipe describes (key '{wrong[0]}')")
    model.load_state_dict({k: v for k, v in state.items() if k in own and v.shape == own[k].shape}, strict=False)
    model.to(device).eval()
    return Pretrained(model=model, meta=meta, name=_checkpoint_name(meta.path))


def set_source_scale(model, meta: CheckpointMeta, stats: dict, dataset_meta: Optional[dict] = None) -> str:
    """Give the model the source scale its run computed the hog / sar_gradient targets at, for
    inputs normalised with ``stats``: the one the checkpoint records, else (checkpoints written
    before it was recorded) the analysed dataset's own; returns which ("checkpoint", "dataset",
    or "identity" when neither is known: normalised values clamped to [0, 1])."""
    from codemae_cli.data.source_scale import SourceScale, dataset_source_ranges
    from codemae_cli.data.stats import BandNorm

    rng, where = meta.source_range, "checkpoint"
    if rng is None and dataset_meta is not None:
        rng, where = dataset_source_ranges(dataset_meta, "being analysed"), "dataset"
    if rng is None:
        return "identity"
    norm = BandNorm.from_stats(stats["optical"]).concat(BandNorm.from_stats(stats["sar"]))
    model.set_source_scale(SourceScale.from_norms([norm], [rng], len(stats["optical"]["mean"])))
    return where


def _checkpoint_name(ckpt: Path) -> str:
    # runs/<run>/checkpoints/<name> -> "<run>" (or "<run>/<name>" when not last/best).
    ckpt = Path(ckpt)
    if ckpt.parent.name == "checkpoints":
        run = ckpt.parent.parent.name
        return run if ckpt.name in ("last", "best") else f"{run}/{ckpt.name}"
    return ckpt.name


def select_chips(dataset, split: str, max_chips: int) -> np.ndarray:
    """Up to ``max_chips`` chip indices of ``split``, evenly spread (deterministic)."""
    idx = dataset.indices(split)
    if idx.size == 0:
        splits = sorted(set(dataset.index["split"].astype(str)))
        raise UserError(f"the dataset has no '{split}' chips (splits present: {', '.join(splits)})")
    if idx.size > max_chips:
        idx = idx[np.linspace(0, idx.size - 1, max_chips).round().astype(int)]
    return idx


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
def extract_features(model, optical: np.ndarray, sar: np.ndarray, *, layer: Optional[int] = None,
                     batch_size: int = 16, device: str = "cpu") -> dict:
    """Token maps of one encoder depth for normalised chips (N, C, H, W): dict optical/sar -> (N, D, h, w)."""
    import torch

    enc = model.encoder
    depth = int(enc.depth)
    layer = depth - 1 if layer is None else int(layer)
    if not 0 <= layer < depth:
        raise UserError(f"layer {layer} is outside the encoder's 0..{depth - 1} blocks")
    out: dict[str, list] = {"optical": [], "sar": []}
    with torch.inference_mode():
        for s in range(0, optical.shape[0], batch_size):
            o = torch.from_numpy(optical[s : s + batch_size]).to(device)
            r = torch.from_numpy(sar[s : s + batch_size]).to(device)
            feats = enc.forward_features(optical=o, sar=r, layers=(layer,))
            out["optical"].append(feats["optical"][-1].float().cpu().numpy())
            out["sar"].append(feats["sar"][-1].float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


@dataclass(frozen=True)
class PatchPairs:
    """Co-located optical/SAR patches of the analysed chips, (N, h, w) each: the cosine similarity
    of their tokens and the SSIM of their structure images (NaN where a pixel is invalid)."""

    cosine: np.ndarray
    ssim: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        return np.isfinite(self.ssim)


def patch_pairs(f_opt: np.ndarray, f_sar: np.ndarray, lum: np.ndarray, sar_int: np.ndarray, valid: np.ndarray,
                patch: int) -> PatchPairs:
    """Token similarity and structure SSIM of every co-located patch pair (see representation_metrics)."""
    n, _, h, w = f_opt.shape
    # Patch SSIM on per-chip stretched structure channels; invalid pixels make the patch NaN.
    ssim = np.empty((n, h, w))
    for i in range(n):
        a = np.where(valid[i], lum[i], np.nan)
        b = np.where(valid[i], sar_int[i], np.nan)
        ssim[i] = M.patch_ssim(M.unit_range(a), M.unit_range(b), patch)[:h, :w]
    return PatchPairs(cosine=M.patch_cosine(f_opt, f_sar), ssim=ssim)


def representation_metrics(f_opt: np.ndarray, f_sar: np.ndarray, lum: np.ndarray, sar_int: np.ndarray,
                           valid: np.ndarray, patch: int, *, pairs: Optional[PatchPairs] = None) -> dict:
    """All numbers of one checkpoint from token maps (N, D, h, w) and raw structure images.

    ``lum``/``sar_int``: (N, H, W) optical luminance and SAR intensity in stored units;
    ``valid``: (N, H, W) where both modalities have data; ``pairs``: their :func:`patch_pairs`
    when already computed.
    """
    n, d, h, w = f_opt.shape
    tok_o = f_opt.transpose(0, 2, 3, 1).reshape(-1, d)
    tok_s = f_sar.transpose(0, 2, 3, 1).reshape(-1, d)
    emb_o, emb_s = f_opt.mean(axis=(2, 3)), f_sar.mean(axis=(2, 3))
    if pairs is None:
        pairs = patch_pairs(f_opt, f_sar, lum, sar_int, valid, patch)
    cos, ssim, keep = pairs.cosine, pairs.ssim, pairs.valid

    spec_o, spec_s = M.singular_spectrum(tok_o), M.singular_spectrum(tok_s)
    return {
        "chips": int(n),
        "tokens": int(tok_o.shape[0]),
        "embed_dim": int(d),
        "effective_rank": {
            "optical_tokens": M.effective_rank(tok_o),
            "sar_tokens": M.effective_rank(tok_s),
            "joint_tokens": M.effective_rank(np.concatenate([tok_o, tok_s])),
            "optical_chips": M.effective_rank(emb_o),
            "sar_chips": M.effective_rank(emb_s),
        },
        "modality_gap": {"chips": M.modality_gap(emb_o, emb_s), "tokens": M.modality_gap(tok_o, tok_s)},
        "similarity": {
            "chips": M.paired_similarity(emb_o, emb_s),
            "patches_colocated": float(np.mean(cos)),
        },
        "patch_ssim": {"mean": float(np.nanmean(ssim)) if keep.any() else float("nan"),
                       "valid_patches": int(keep.sum())},
        # SSIM's structure term is signed: contrast reversal (a bright roof over a dark radar
        # footprint) is shared structure too, so the correlation with |SSIM| is reported as well.
        "similarity_vs_ssim": {**M.similarity_ssim_correlation(cos[keep], ssim[keep]),
                               "spearman_abs": M.rank_correlation(cos[keep], np.abs(ssim[keep]))},
        "spectrum": {"optical": spec_o.tolist(), "sar": spec_s.tolist()},
    }


# --------------------------------------------------------------------------------------------
# reconstructions
# --------------------------------------------------------------------------------------------
def cross_reconstructions(model, optical: np.ndarray, sar: np.ndarray, *, seed: int = 0,
                          device: str = "cpu") -> Optional[dict]:
    """Cross-decoder predictions and their targets for a few normalised chips, as images.

    Returns None when the model has no cross decoder (CDR off). Otherwise a dict with the
    inputs, ``mask`` (B, H, W) (1 = masked, i.e. predicted) and, per direction
    (``sar_to_optical``, ``optical_to_sar``), ``pred``/``target`` images (B, c, H, W) built
    from the model's per-patch outputs. The targets are recomputed with the model's own
    degradation; degradations that are not images (patch means, HOG) give None.
    """
    import torch

    from codemae_cli.model.targets import degraded_target

    cfg = getattr(model, "cfg", None)
    if cfg is None or not cfg.cdr.enabled:
        return None
    img = int(getattr(model, "img_size", 0) or optical.shape[-1])
    p = int(model.encoder.patch_size)
    o = torch.from_numpy(_fit(optical, img)).to(device)
    s = torch.from_numpy(_fit(sar, img)).to(device)
    torch.manual_seed(seed)  # the same mask for every checkpoint
    with torch.inference_mode():
        out = model(o, s, paired=True)
        deg = cfg.cdr.degradation
        _, o_src, s_src = model.source_images(o, s, None)  # hog / sar_gradient: the run's source scale
        targets = {
            "sar_to_optical": degraded_target(o, "optical", deg, p, getattr(model, "rgb_bands", None),
                                              cfg.norm_pix_loss, o_src),
            "optical_to_sar": degraded_target(s, "sar", deg, p, None, cfg.norm_pix_loss, s_src),
        }
    preds = {"sar_to_optical": out.get("pred_cdr_optical"), "optical_to_sar": out.get("pred_cdr_sar")}
    result: dict[str, Any] = {"optical": o.cpu().numpy(), "sar": s.cpu().numpy(), "degradation": deg}
    for direction, pred in preds.items():
        tgt = targets[direction]
        if pred is None or pred.shape != tgt.shape or pred.shape[-1] % (p * p):
            continue  # a degradation that is not an image (patch mean, HOG)
        result[direction] = {"pred": _unpatchify(pred.float().cpu(), p, img),
                             "target": _unpatchify(tgt.float().cpu(), p, img)}
    if not any(d in result for d in preds):
        return None
    mask = out.get("mask")
    if mask is not None:
        m = mask.float().cpu().reshape(mask.shape[0], img // p, img // p)
        result["mask"] = m.repeat_interleave(p, 1).repeat_interleave(p, 2).numpy()
    return result


def _fit(x: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop (or zero-pad) chips (N, C, H, W) to size x size."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, size, size), dtype=np.float32)
    hh, ww = min(h, size), min(w, size)
    y0, x0 = (h - hh) // 2, (w - ww) // 2
    out[:, :, :hh, :ww] = x[:, :, y0 : y0 + hh, x0 : x0 + ww]
    return out


def _unpatchify(t, p: int, img: int) -> np.ndarray:
    """(B, L, p*p*c) per-patch values (all L patches) -> (B, c, H, W)."""
    from codemae_cli.model.targets import unpatchify

    b, L, k = t.shape
    g = img // p
    if L != g * g:
        raise ValueError(f"expected {g * g} patches, got {L}")
    return unpatchify(t, p, k // (p * p), (g, g)).numpy()


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _plot_spectra(results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mod in zip(axes, ("optical", "sar"), strict=False):
        for name, r in results.items():
            s = np.asarray(r["spectrum"][mod])
            s = s[s > 1e-10]  # centring leaves one exact zero; float noise is not spectrum
            rank = r["effective_rank"][f"{mod}_tokens"]
            ax.semilogy(np.arange(1, s.size + 1), s, label=f"{name} (erank {rank:.1f})")
        ax.set_title(f"{mod} token spectrum")
        ax.set_xlabel("singular value index")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("normalised singular value")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scatter(analyses: list[CheckpointAnalysis], path: Path) -> None:
    plt = pyplot()
    n = len(analyses)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax, a in zip(axes.ravel(), analyses, strict=False):
        keep = a.patch_pairs.valid
        ax.scatter(a.patch_pairs.ssim[keep], a.patch_pairs.cosine[keep], s=3, alpha=0.4)
        c = a.metrics["similarity_vs_ssim"]
        ax.set_title(f"{a.name}\nSpearman {c['spearman']:.2f}, Pearson {c['pearson']:.2f}", fontsize=9)
        ax.set_xlabel("optical/SAR patch SSIM")
        ax.set_ylabel("token cosine similarity")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reconstructions(rec: dict, name: str, path: Path, max_rows: int = 4) -> None:
    plt = pyplot()
    directions = [d for d in ("sar_to_optical", "optical_to_sar") if d in rec]
    n = min(max_rows, rec["optical"].shape[0])
    cols = 2 + 2 * len(directions)
    fig, axes = plt.subplots(n, cols, figsize=(2.2 * cols, 2.2 * n), squeeze=False)
    mask = rec.get("mask")

    def show(ax, img, title):
        img = np.asarray(img)
        img = img.mean(0) if img.ndim == 3 else img
        lo, hi = np.percentile(img, [2, 98])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        ax.set_title(title, fontsize=7)
        ax.axis("off")

    for i in range(n):
        show(axes[i, 0], rec["optical"][i], "optical input")
        show(axes[i, 1], rec["sar"][i], "SAR input")
        for j, d in enumerate(directions):
            tgt, pred = rec[d]["target"][i], rec[d]["pred"][i]
            if mask is not None:  # only masked patches are predicted; show the rest as target
                pred = np.where(mask[i][None] > 0, pred, tgt)
            label = "optical" if d == "sar_to_optical" else "SAR"
            show(axes[i, 2 + 2 * j], tgt, f"{label} target ({rec.get('degradation', '?')})")
            show(axes[i, 3 + 2 * j], pred, f"{label} from {'SAR' if label == 'optical' else 'optical'}")
    fig.suptitle(f"{name}: cross-modal reconstructions (masked patches predicted)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# --------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------
def is_analysis_dir(path: Path) -> bool:
    """An output folder of run_analyze: its analysis.json lists the checkpoints analysed."""
    return "checkpoints" in read_json_object(Path(path) / "analysis.json")


def _guard_output(out: Path, checkpoints, dataset_dir, overwrite: bool) -> None:
    """The output may not be, contain or lie inside a checkpoint or the dataset; --overwrite
    replaces an earlier analysis only."""
    from codemae_cli.train.checkpoint import resolve_checkpoint

    inputs = [(resolve_checkpoint(c), "the checkpoint") for c in checkpoints]
    guard_outputs([(out, "the output folder")], [*inputs, (dataset_dir, "the dataset")], folder=True)
    check_replaceable(out, "the output folder", is_analysis_dir, overwrite=overwrite,
                      maker="codemae analyze")


@dataclass(frozen=True)
class AnalysisChips:
    """The chips every checkpoint is analysed on, in stored units, and their structure images."""

    chip_ids: list[str]
    optical: np.ndarray  # (N, Co, T, T) stored optical, NaN = nodata
    sar: np.ndarray  # (N, Cs, T, T) stored SAR (dB), NaN = nodata
    valid: np.ndarray  # (N, T, T) both modalities have data
    luminance: np.ndarray  # (N, T, T) optical luminance (the SSIM's optical channel)
    sar_intensity: np.ndarray  # (N, T, T) SAR intensity (the SSIM's SAR channel)


@dataclass
class CheckpointAnalysis:
    """One checkpoint's numbers (the JSON entry), its patch pairs and its reconstruction images, if any."""

    name: str
    metrics: dict  # the checkpoint's entry of analysis.json
    patch_pairs: PatchPairs  # for the similarity-vs-SSIM figure
    reconstruction: Optional[dict] = None


def run_analyze(
    checkpoints: Sequence[str | Path],
    dataset_dir: str | Path,
    out_dir: str | Path,
    split: str = "val",
    max_chips: int = 64,
    *,
    layer: Optional[int] = None,
    reconstructions: int = 4,
    batch_size: int = 16,
    device: str = "cpu",
    overwrite: bool = False,
    plots: bool = True,
) -> dict:
    """Analyse ``checkpoints`` on up to ``max_chips`` chips of ``split``; returns the JSON dict.

    ``layer``: encoder block whose tokens are analysed (default: the last one).
    ``reconstructions``: how many chips to show in the reconstruction figures (0: none).
    ``device``: auto | cpu | cuda | cuda:N.
    """
    from codemae_cli.data.shards import PreparedDataset
    from codemae_cli.device import resolve_device
    from codemae_cli.tasks.evaluate import jsonable

    if not checkpoints:
        raise UserError("give at least one checkpoint to analyse")
    if max_chips < 2:
        raise UserError("max_chips must be at least 2 (paired vs unpaired similarity needs two chips)")
    device = str(resolve_device(device))
    out = Path(out_dir)
    data = PreparedDataset(dataset_dir)
    _guard_output(out, checkpoints, dataset_dir, overwrite)
    if not data.meta.get("paired", True):
        raise UserError(f"dataset '{dataset_dir}' is not paired; the cross-modal analyses need co-registered pairs")
    chips = load_analysis_chips(data, split, max_chips)
    with staged_directory(out) as tmp:
        analyses: list[CheckpointAnalysis] = []
        for path in checkpoints:
            a = analyse_checkpoint(path, chips, data.stats, layer=layer, reconstructions=reconstructions,
                                   batch_size=batch_size, device=device, taken={x.name for x in analyses},
                                   dataset_meta=data.meta)
            analyses.append(a)
        doc = {
            "dataset": str(dataset_dir),
            "split": split,
            "chips": chips.chip_ids,
            "checkpoints": jsonable({a.name: a.metrics for a in analyses}),
        }
        (tmp / "analysis.json").write_text(json.dumps(doc, indent=2))
        if plots:
            _write_plots(analyses, tmp)
    return doc


def load_analysis_chips(data, split: str, max_chips: int) -> AnalysisChips:
    """Up to ``max_chips`` chips of ``split`` and their structure images; refused when no pixel
    is valid in both modalities."""
    from codemae_cli.model.targets import choose_luminance

    idx = select_chips(data, split, max_chips)
    chips = [data.read(i) for i in idx]
    raw_opt = np.stack([c["optical"] for c in chips])
    raw_sar = np.stack([c["sar"] for c in chips])
    valid = np.isfinite(raw_opt).all(1) & np.isfinite(raw_sar).all(1)
    if not valid.any():
        raise UserError(f"the selected '{split}' chips have no pixel valid in both modalities")
    # The luminance CDR reads: the bands of the one RGB decision (as the OKD teacher and the quick-look)
    n_opt = raw_opt.shape[1]
    rgb = choose_luminance(n_opt, None, choose_rgb([(str(data.root), data.meta)], n_opt)).bands
    return AnalysisChips(chip_ids=[c["chip_id"] for c in chips], optical=raw_opt, sar=raw_sar, valid=valid,
                         luminance=M.optical_luminance(raw_opt, rgb), sar_intensity=M.sar_intensity(raw_sar))


def normalise_chips(raw: np.ndarray, stats: dict) -> np.ndarray:
    """(N, C, H, W) stored values -> per-band z-scores with NaN (nodata) set to 0 (the mean)."""
    from codemae_cli.data.stats import BandNorm

    norm = BandNorm.from_stats(stats)
    return np.stack([norm.apply(c) for c in raw])


def analyse_checkpoint(path, chips: AnalysisChips, dataset_stats: dict, *, layer: Optional[int] = None,
                       reconstructions: int = 4, batch_size: int = 16, device: str = "cpu",
                       taken: Collection[str] = (), dataset_meta: Optional[dict] = None) -> CheckpointAnalysis:
    """Load one pretraining checkpoint and measure its representations on ``chips``.

    ``taken``: names of the checkpoints analysed before (a second checkpoint of one run, e.g.
    best and last, gets a ``#k`` suffix). ``dataset_meta``: the chips' dataset metadata, whose
    source range stands in for that of a checkpoint that does not record one.
    """
    import torch

    pre = load_pretrained(path, device=device)
    model, meta, name = pre.model, pre.meta, pre.name
    if name in taken:
        name = f"{name}#{len(taken)}"
    _check_bands(path, meta.bands, chips)
    stats = meta.stats or dataset_stats
    source_scale = set_source_scale(model, meta, stats, dataset_meta)
    x_opt, x_sar = normalise_chips(chips.optical, stats["optical"]), normalise_chips(chips.sar, stats["sar"])
    p = int(model.encoder.patch_size)
    t = (min(x_opt.shape[-2:]) // p) * p  # tokens need whole patches: crop to a multiple of p
    if t == 0:
        raise UserError(f"chips of {x_opt.shape[-1]} px are smaller than the model's {p}-px patch")
    crop = (slice(None), slice(None), slice(0, t), slice(0, t))
    start = time.perf_counter()
    feats = extract_features(model, x_opt[crop], x_sar[crop], layer=layer, batch_size=batch_size, device=device)
    lum, sar_int, valid = chips.luminance[:, :t, :t], chips.sar_intensity[:, :t, :t], chips.valid[:, :t, :t]
    pairs = patch_pairs(feats["optical"], feats["sar"], lum, sar_int, valid, p)
    r = representation_metrics(feats["optical"], feats["sar"], lum, sar_int, valid, p, pairs=pairs)
    r["checkpoint"] = str(path)
    r["layer"] = int(model.encoder.depth - 1 if layer is None else layer)
    r["step"] = meta.raw.get("step")
    r["components"] = _components(meta.recipe)
    r["source_scale"] = source_scale
    rec = None
    if reconstructions > 0:
        k = min(reconstructions, x_opt.shape[0])
        rec = cross_reconstructions(model, x_opt[:k], x_sar[:k], device=device)
        if rec is not None:
            r["reconstructions"] = f"reconstructions_{_safe_name(name)}.png"
    r["seconds"] = round(time.perf_counter() - start, 2)
    del model, pre
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return CheckpointAnalysis(name=name, metrics=r, patch_pairs=pairs, reconstruction=rec)


def _check_bands(path, bands: dict, chips: AnalysisChips) -> None:
    n_opt, n_sar = chips.optical.shape[1], chips.sar.shape[1]
    if len(bands["optical"]) != n_opt or len(bands["sar"]) != n_sar:
        raise UserError(
            f"checkpoint '{path}' expects {len(bands['optical'])} optical and {len(bands['sar'])} "
            f"SAR bands, the dataset has {n_opt} and {n_sar}"
        )


def _write_plots(analyses: list[CheckpointAnalysis], folder: Path) -> None:
    results = {a.name: a.metrics for a in analyses}
    _plot_spectra(results, folder / "spectra.png")
    _plot_scatter(analyses, folder / "similarity_vs_ssim.png")
    for a in analyses:
        if a.reconstruction is not None:
            _plot_reconstructions(a.reconstruction, a.name, folder / f"reconstructions_{_safe_name(a.name)}.png")


def _components(recipe: dict) -> dict:
    """Which of OKD/CCL/CDR the checkpoint was trained with (from its resolved recipe)."""
    m = recipe.get("model") or {}
    okd, ccl, cdr = m.get("okd") or {}, m.get("ccl") or {}, m.get("cdr") or {}
    return {
        "okd": bool(okd.get("enabled")) and okd.get("teacher"),
        "ccl": ccl.get("mode"),
        "cdr": bool(cdr.get("enabled")) and cdr.get("degradation"),
    }


__all__ = ["AnalysisChips", "CheckpointAnalysis", "PatchPairs", "Pretrained", "analyse_checkpoint", "cross_reconstructions", "extract_features",
           "load_analysis_chips", "load_pretrained", "normalise_chips", "patch_pairs", "representation_metrics", "run_analyze",
           "select_chips", "set_source_scale"]
