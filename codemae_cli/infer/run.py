"""``codemae predict`` from a fine-tuned checkpoint: checks, model loading, provenance tags.

    summary = predict_from_checkpoint("runs/seg", "scene.tif", out="mask.tif", sar="sar.tif")

The checkpoint's record (``CheckpointMeta``: its meta.json, read once) decides which inputs the
model reads, the units of the SAR scene (``--sar-scale auto``), how inputs are normalised and
what the classes are called; the output COG carries the model preset, the SHA-256 of
``model.safetensors``, the resolved recipe and the class names as tags.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from codemae_cli.errors import UserError

if TYPE_CHECKING:
    from codemae_cli.train.checkpoint import CheckpointMeta


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _default_window(img_size: Optional[int], patch: int) -> int:
    """The chip size the model was fine-tuned on: what it has learnt to see at once."""
    return -(-int(img_size or 224) // patch) * patch


def scene_nodata_rules(meta, given: dict, notes: list) -> dict:
    """Per modality, the nodata rule to read a scene with: the user's ``--nodata-*``, else the one
    given at prepare (the checkpoint records it), else None (the file's own); a note says so."""
    from codemae_cli.data.raster import nodata_override_meta
    from codemae_cli.train.checkpoint import MIXED

    rules = {}
    for m, value in given.items():
        rules[m] = nodata_override_meta(value)  # checks the value
        recorded = meta.nodata_override.get(m)
        if value is None and recorded == MIXED:
            notes.append(f"the training datasets were prepared with different --nodata-{m}: reading the scene's "
                         f"own nodata (--nodata-{m} to choose)")
        elif value is None and recorded is not None:
            rules[m] = recorded
            notes.append(f"{'SAR' if m == 'sar' else m} nodata {rules[m]}: the --nodata-{m} given at prepare "
                         f"(--nodata-{m} to change)")
    return rules


def scene_bands(meta, read: dict) -> dict:
    """Per modality read, the input bands of a scene to read (None: all), as prepare kept them.
    Refuses a checkpoint whose training datasets kept different bands: no single answer."""
    from codemae_cli.train.checkpoint import MIXED

    bands = {}
    for m, path in read.items():
        if path is None:
            continue
        if meta.band_selection.get(m) == MIXED:
            raise UserError(f"checkpoint '{meta.path}' was trained on datasets that kept different {m} bands at "
                            f"prepare, so it cannot tell which bands of a {m} scene to read; fine-tune on datasets "
                            f"prepared with the same --{m}-bands")
        bands[m] = meta.band_selection.get(m)
    return bands


def resolve_scenes(ckpt_inputs: str, scene: Optional[str], sar: Optional[str], inputs: Optional[str]):
    """Which scene is optical and which SAR, given the checkpoint's inputs and the user's override."""
    if ckpt_inputs not in ("optical", "sar", "both"):
        raise UserError(f"the checkpoint's inputs '{ckpt_inputs}' are not optical, sar or both")
    use = inputs or ckpt_inputs
    if use not in ("optical", "sar", "both"):
        raise UserError(f"--inputs must be optical, sar or both, not '{use}'")
    if ckpt_inputs != "both" and use != ckpt_inputs:
        raise UserError(f"this checkpoint was fine-tuned on {ckpt_inputs} input only, so it cannot predict from {use}")
    if use == "optical":
        if sar is not None:
            raise UserError("this prediction reads the optical scene only; drop --sar")
        if scene is None:
            raise UserError("pass the optical scene to predict")
        return scene, None, use
    if use == "sar":
        if scene is not None and sar is not None:
            raise UserError("this prediction reads SAR only: pass the SAR scene once (as SCENE or with --sar)")
        if scene is None and sar is None:
            raise UserError("pass the SAR scene to predict")
        return None, (sar if sar is not None else scene), use
    if scene is None or sar is None:
        raise UserError("this checkpoint reads optical and SAR: pass the optical scene and --sar SAR_SCENE")
    return scene, sar, use


def guard_predict_outputs(ckpt: Path, optical: Optional[str], sar: Optional[str], out,
                          probabilities: Optional[str], vectorize: Optional[str]) -> None:
    """No output may be, contain or lie inside an input (scenes, checkpoint); an existing output
    is replaced only when codemae wrote it; killed runs' temporaries beside the outputs go."""
    from codemae_cli.fsutil import (
        check_replaceable,
        guard_outputs,
        is_codemae_raster,
        is_codemae_vectors,
        sweep_stale,
    )
    from codemae_cli.infer.vectorize import check_vector_path

    outputs = [(out, "the output", is_codemae_raster), (probabilities, "--probabilities", is_codemae_raster),
               (vectorize, "--vectorize", is_codemae_vectors)]
    outputs = [o for o in outputs if o[0] is not None]
    guard_outputs([(p, what) for p, what, _ in outputs],
                  [(optical, "the optical scene"), (sar, "the SAR scene"), (ckpt, "the checkpoint")],
                  create_parents=False)
    if vectorize is not None:
        check_vector_path(vectorize)  # before the model is loaded, not after
    for path, what, ours in outputs:
        check_replaceable(path, what, ours, maker="codemae predict")
    for path, _, _ in outputs:
        sweep_stale(path)


@dataclass
class PredictPlan:
    """What the stages of :func:`predict_from_checkpoint` settle before the scene is read."""

    meta: CheckpointMeta  # the checkpoint's record, read once (rebound to the loaded model's)
    optical: Optional[str]  # the optical scene read, or None
    sar: Optional[str]  # the SAR scene read, or None
    inputs: str  # "optical" | "sar" | "both": what the model reads
    notes: list = field(default_factory=list)  # one line per choice made for the user
    sar_scale: str = "auto"  # the SAR scene's units, resolved against the checkpoint
    input_nodata: dict = field(default_factory=dict)  # per modality read: its nodata rule
    window: int = 0  # px, a multiple of the model's patch size
    bands: dict = field(default_factory=dict)  # per modality read: its input bands (None: all)


def predict_from_checkpoint(
    checkpoint: str | Path,
    scene: Optional[str] = None,
    *,
    out: str | Path,
    sar: Optional[str] = None,
    inputs: Optional[str] = None,
    window: Optional[int] = None,
    overlap: float | int = 0.25,
    batch_size: int = 8,
    device: str = "auto",
    tta: bool = False,
    probabilities: Optional[str] = None,
    probabilities_dtype: str = "uint8",
    vectorize: Optional[str] = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    sar_scale: str = "auto",
    precision: str = "auto",
    progress: bool = False,
    readers: int = 2,
    nodata_optical: Optional[str] = None,
    nodata_sar: Optional[str] = None,
) -> dict:
    """Load a fine-tuned segmentation checkpoint and predict a whole scene (see predict_scene).

    ``nodata_optical`` / ``nodata_sar``: the scenes' nodata as ``--nodata-*`` takes it; by default
    the override given at prepare (recorded in the checkpoint), else each file's own.

    Stages: check the request (cheap checks first: a typo in a path must not wait for a model to
    load) -> input rules (nodata, SAR scale) -> load the model -> window and statistics ->
    provenance tags -> predict_scene -> summary.
    """
    import torch

    from codemae_cli.device import resolve_device
    from codemae_cli.infer.predict import predict_scene

    plan = check_request(checkpoint, scene, sar, inputs, out, probabilities, vectorize)
    resolve_input_rules(plan, nodata_optical, nodata_sar, sar_scale)
    dev = resolve_device(device)
    model = load_model(plan, dev)
    resolve_window(plan, model, window)
    tags = provenance_tags(plan)

    def model_fn(optical, sar_x):
        return model(optical=optical, sar=sar_x)

    meta = plan.meta
    with torch.inference_mode():
        summary = predict_scene(
            model_fn, plan.optical, plan.sar, out, window=plan.window, overlap=overlap,
            batch_size=batch_size, stats=meta.stats, inputs=plan.inputs,
            class_names=meta.class_names or None,
            class_colors=[c.get("color") for c in meta.classes] or None,
            device=dev, tta=tta, probabilities=probabilities, probabilities_dtype=probabilities_dtype,
            vectorize=vectorize, min_area=min_area, simplify=simplify, tags=tags,
            sar_scale=plan.sar_scale, precision=precision, progress=progress, readers=readers,
            bands=plan.bands, input_nodata=plan.input_nodata,
        )
    summary["checkpoint"] = str(meta.path)
    summary["notes"] = plan.notes
    summary["checkpoint_sha256"] = tags["codemae_checkpoint_sha256"]
    summary["model"] = tags["codemae_model"]
    return summary


def check_request(checkpoint, scene: Optional[str], sar: Optional[str], inputs: Optional[str], out,
                  probabilities: Optional[str], vectorize: Optional[str]) -> PredictPlan:
    """Read the checkpoint's record once, check it maps scenes, decide which scenes are read and
    guard every output against them; all before any model is built (the outputs' format and
    distinctness are checked by ``predict_scene``, the API boundary)."""
    from codemae_cli.train.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint)  # the one read of meta.json; meta.path is the resolved directory
    ckpt = meta.path
    meta.require_finetuned()  # before the scenes and outputs are checked; the builder asks the same
    if meta.task != "segmentation":
        raise UserError(f"checkpoint '{ckpt}' is a {meta.task} model; only segmentation models map scenes")
    notes = []
    if (inputs is None and meta.inputs == "both" and scene is not None and sar is None
            and float(meta.raw.get("modality_dropout") or 0) > 0):
        # Fine-tuned with modality dropout, the model has learnt to map from optical alone.
        inputs = "optical"
        notes.append("no --sar given: predicting from the optical scene alone (the model was fine-tuned with "
                     "modality dropout); pass --sar SAR_SCENE to use both")
    optical_path, sar_path, use = resolve_scenes(meta.inputs, scene, sar, inputs)
    for p, what in ((optical_path, "optical"), (sar_path, "SAR")):
        if p is not None and not Path(p).exists():
            raise UserError(f"the {what} scene '{p}' does not exist")
    bands = scene_bands(meta, {"optical": optical_path, "sar": sar_path})
    guard_predict_outputs(ckpt, optical_path, sar_path, out, probabilities, vectorize)
    return PredictPlan(meta=meta, optical=optical_path, sar=sar_path, inputs=use, notes=notes, bands=bands)


def resolve_input_rules(plan: PredictPlan, nodata_optical: Optional[str], nodata_sar: Optional[str],
                        sar_scale: str) -> None:
    """Each scene's nodata rule, and the SAR scene's units checked against what it holds."""
    given = {m: v for m, v, p in (("optical", nodata_optical, plan.optical), ("sar", nodata_sar, plan.sar)) if p}
    plan.input_nodata = scene_nodata_rules(plan.meta, given, plan.notes)
    plan.sar_scale = sar_scale
    if plan.sar is not None:
        plan.sar_scale, warning = plan.meta.sar_scale_for(sar_scale)
        if warning:
            plan.notes.append(warning)
        from codemae_cli.data.raster import check_sar_scale, open_source, parse_nodata

        # A wrong scale would map nodata only; the scene's nodata rule decides what is a value.
        check_sar_scale(open_source(plan.sar, "SAR"), plan.sar_scale, nodata=parse_nodata(plan.input_nodata.get("sar")))


def load_model(plan: PredictPlan, dev):
    """The fine-tuned model in eval mode, built from the record already read (``plan.meta`` is
    rebound to the record the builder returns)."""
    try:
        from codemae_cli.tasks import build_task_model_from_checkpoint
    except ImportError as err:  # pragma: no cover - the fine-tuning package ships it
        raise RuntimeError("codemae_cli.tasks.build_task_model_from_checkpoint is not available") from err
    model, plan.meta = build_task_model_from_checkpoint(plan.meta, dev)
    model.eval()
    return model


def resolve_window(plan: PredictPlan, model, window: Optional[int]) -> None:
    """The window (by default the fine-tuning chip size), a multiple of the patch size; and the
    normalisation statistics each input read needs."""
    encoder = getattr(model, "encoder", None)
    patch = int(getattr(encoder, "patch_size", 16) or 16)
    win = int(window) if window is not None else _default_window(plan.meta.img_size, patch)
    if window is None:
        plan.notes.append(f"window {win} px: the chip size the model was fine-tuned on (--window to change it)")
    if win % patch:
        raise UserError(f"the window ({win} px) must be a multiple of the model's patch size ({patch} px)")
    plan.window = win
    stats = plan.meta.stats
    for m, p in (("optical", plan.optical), ("sar", plan.sar)):
        if p is not None and not (stats.get(m) or {}).get("mean"):
            raise UserError(f"checkpoint '{plan.meta.path}' holds no {m} normalisation statistics, "
                            "so it cannot read that input")


def provenance_tags(plan: PredictPlan) -> dict:
    """The output COG's tags: model preset, checkpoint and its SHA-256, recipe, inputs, bands."""
    from codemae_cli.train.checkpoint import MODEL_FILE

    meta = plan.meta
    return {
        "codemae_model": meta.preset,
        "codemae_checkpoint": str(meta.path),
        "codemae_checkpoint_sha256": sha256_file(meta.path / MODEL_FILE),
        "codemae_recipe": json.dumps(meta.recipe, sort_keys=True, default=str),
        "codemae_inputs": plan.inputs,
        "codemae_version": meta.raw.get("codemae_version", ""),
        "codemae_bands": json.dumps(meta.bands),
    }


__all__ = ["PredictPlan", "predict_from_checkpoint", "resolve_scenes", "scene_bands", "scene_nodata_rules",
           "sha256_file"]
