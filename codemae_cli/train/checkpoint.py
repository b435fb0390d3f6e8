"""Checkpoints: a directory of safetensors + JSON, written atomically (docs/architecture.md, 3).

    RUN/checkpoints/<name>/
      model.safetensors    unwrapped model state_dict (no pickle, ever)
      meta.json            kind, versions, step, epoch, recipe, bands, stats, ...
      resume.safetensors   optimizer tensors, EMA teacher, RNG states (uint8 tensors)
      resume.json          scalar optimizer state, scheduler step, epoch, sampler position

The directory is written through :func:`codemae_cli.fsutil.staged_directory`: built under a
temporary sibling name and renamed into place; an existing checkpoint of the same name is moved
aside first and removed only after the new one is in place, so a crash at any moment leaves one
complete checkpoint behind (readers find a moved-aside one, the next save puts it back first).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from codemae_cli.data.raster import RGBChoice
from codemae_cli.errors import UserError
from codemae_cli.fsutil import moved_aside, staged_directory

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
RESUME_TENSORS = "resume.safetensors"
RESUME_JSON = "resume.json"
_TENSOR_TAG = "__tensor__"
_TUPLE_TAG = "__tuple__"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def unwrap_model(model):
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and model.__class__.__name__ in (
            "DistributedDataParallel", "DataParallel", "FullyShardedDataParallel"):
            model = model.module
        else:
            return model


def versions() -> dict:
    import torch

    from codemae_cli import __version__

    out = {"codemae_version": __version__, "torch_version": torch.__version__}
    try:
        import timm

        out["timm_version"] = timm.__version__
    except Exception:  # timm is a dependency, but meta must never fail to write
        out["timm_version"] = None
    return out


def _plain_state(state: dict) -> dict:
    """CPU, contiguous, unshared copies: safetensors refuses tensors that share storage."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _split_tree(tree: Any, tensors: dict, prefix: str) -> Any:
    """Replace tensors in a nested structure by placeholders, collecting them in ``tensors``."""
    import numpy as np
    import torch

    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().to("cpu").contiguous().clone()
        return {_TENSOR_TAG: prefix}
    if isinstance(tree, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(tree)).clone()
        return {_TENSOR_TAG: prefix, "numpy": True}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"resume state keys must be str or int, got {type(k).__name__}")
            out[str(k)] = _split_tree(v, tensors, f"{prefix}/{k}")
        return out
    if isinstance(tree, tuple):
        return {_TUPLE_TAG: [_split_tree(v, tensors, f"{prefix}/{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [_split_tree(v, tensors, f"{prefix}/{i}") for i, v in enumerate(tree)]
    if isinstance(tree, (np.integer, np.floating, np.bool_)):
        return tree.item()
    if tree is None or isinstance(tree, (str, int, float, bool)):
        return tree
    raise TypeError(f"cannot store a {type(tree).__name__} in a checkpoint's resume state")


def _join_tree(tree: Any, tensors: dict) -> Any:
    if isinstance(tree, dict):
        if _TENSOR_TAG in tree:
            t = tensors[tree[_TENSOR_TAG]]
            return t.numpy() if tree.get("numpy") else t
        if _TUPLE_TAG in tree:
            return tuple(_join_tree(v, tensors) for v in tree[_TUPLE_TAG])
        return {k: _join_tree(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tree(v, tensors) for v in tree]
    return tree


def capture_rng() -> dict:
    """Torch CPU/CUDA, numpy and Python RNG states (tensors as uint8, the rest JSON-able)."""
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": np.asarray(keys, dtype=np.uint32).view(np.uint8),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}
    version, internal, gauss_next = random.getstate()
    state["python"] = {"version": version, "state": list(internal), "gauss_next": gauss_next}
    return state


def restore_rng(state: dict | None) -> None:
    """Inverse of :func:`capture_rng` (missing parts are left alone)."""
    import numpy as np
    import torch

    if not state:
        return
    if "torch" in state:
        torch.set_rng_state(state["torch"].to(torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [t.to(torch.uint8) for t in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        s = state["numpy"]
        keys = np.asarray(s["keys"], dtype=np.uint8).view(np.uint32)
        np.random.set_state((s["kind"], keys, s["pos"], s["has_gauss"], s["gauss"]))
    if "python" in state:
        s = state["python"]
        random.setstate((s["version"], tuple(s["state"]), s["gauss_next"]))


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default))


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------
def save_checkpoint(directory, model, meta: dict, optimizer=None, resume_extra: dict | None = None,
                    rng: bool = True) -> Path:
    """Write a checkpoint directory atomically and return its path.

    ``model`` may be wrapped (DDP, torch.compile): the unwrapped module's state_dict is saved.
    ``meta`` is completed with versions. When ``optimizer`` or ``resume_extra`` is given, the
    resume state is written too: optimizer state, RNG states (when ``rng``) and ``resume_extra``
    (any nested dict of scalars, strings, lists and tensors: scheduler step, epoch, sampler
    position, EMA teacher state_dict ...).
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    with staged_directory(directory) as tmp:
        module = unwrap_model(model)
        save_file(_plain_state(module.state_dict()), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        if optimizer is not None or resume_extra is not None:
            tensors: dict = {}
            doc: dict = {"format": "codemae-resume", "format_version": 1}
            if optimizer is not None:
                doc["optimizer"] = _split_tree(optimizer.state_dict(), tensors, "optimizer")
            if rng:
                doc["rng"] = _split_tree(capture_rng(), tensors, "rng")
            doc["extra"] = _split_tree(dict(resume_extra or {}), tensors, "extra")
            save_file(tensors, str(tmp / RESUME_TENSORS), metadata={"format": "pt"})
            _write_json(tmp / RESUME_JSON, doc)
        full_meta = {**versions(), **dict(meta)}
        full_meta.setdefault("format", "codemae-checkpoint")
        # meta.json last: its presence marks a complete checkpoint.
        _write_json(tmp / META_FILE, full_meta)
    return directory


# --------------------------------------------------------------------------------------------
# resolve / load
# --------------------------------------------------------------------------------------------
def is_checkpoint_dir(p: Path) -> bool:
    """Whether ``p`` holds a complete checkpoint (its weights and, written last, its meta.json)."""
    return (p / MODEL_FILE).is_file() and (p / META_FILE).is_file()


def resolve_checkpoint(path, prefer: tuple[str, ...] = ("best", "last")) -> Path:
    """A checkpoint directory from a checkpoint dir, its model.safetensors, or a run directory.

    A run directory resolves to ``checkpoints/best`` then ``checkpoints/last`` (order set by
    ``prefer``).
    """
    p = Path(path).expanduser()
    if p.is_file() and p.name in (MODEL_FILE, META_FILE):
        p = p.parent
    if not p.exists():
        raise UserError(f"checkpoint '{path}' does not exist")
    if not p.is_dir():
        raise UserError(f"checkpoint '{path}' is not a codemae checkpoint directory or run directory")
    if is_checkpoint_dir(p):
        return p
    if (p / MODEL_FILE).is_file() or (p / META_FILE).is_file():
        raise UserError(f"checkpoint '{path}' is incomplete: it needs both {MODEL_FILE} and {META_FILE}")
    ckpts = p / "checkpoints"
    base = ckpts if ckpts.is_dir() else p
    for name in prefer:
        cand = base / name
        if is_checkpoint_dir(cand):
            return cand
        rec = moved_aside(cand, is_checkpoint_dir)  # a save killed between its two renames
        if rec is not None:
            return rec
    if ckpts.is_dir():
        raise UserError(f"run directory '{path}' has no complete checkpoint ({' or '.join(prefer)}) in checkpoints/")
    raise UserError(f"'{path}' is not a codemae checkpoint (no {MODEL_FILE} and {META_FILE}) "
                    "nor a run directory with checkpoints/")


def read_meta(path) -> dict:
    """meta.json of a checkpoint (resolved like :func:`resolve_checkpoint`)."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, ValueError):
        raise UserError(f"checkpoint '{ckpt}' has a corrupt {META_FILE}") from None
    if not isinstance(meta, dict) or "codemae_version" not in meta:
        raise UserError(f"checkpoint '{ckpt}' is not a codemae checkpoint ({META_FILE} lacks codemae_version)")
    return meta


# The SAR units a scene can be read in (prediction); what prepare records as a dataset's input
# scale may also be "slc" (complex samples) or "mixed" (scenes in different units).
_SCENE_SAR_SCALES = ("db", "linear", "amplitude")


@dataclass(frozen=True)
class RGBRecord:
    """Which optical bands a pretraining run read as red, green, blue: meta.json ``rgb_input``
    (``{bands, names, rule, source, teacher, luminance}``). Checkpoints written before it record
    ``teacher_input`` (``{bands, names, rule}`` or null: the teacher's bands alone) or nothing
    (the teacher read the first three bands); their CDR luminance read the first three bands of a
    3- or 4-band image, whatever the names said."""

    choice: Optional[RGBChoice]  # the run's one decision; None in checkpoints written before it was recorded
    teacher: Optional[tuple[int, ...]]  # the bands a timm / file OKD teacher read; None: EMA teacher or no OKD
    luminance: Optional[tuple[int, ...]]  # the bands of CDR's luminance; None: the band mean (or not recorded)
    written: str  # "rgb_input" | "teacher_input" | "none": what the checkpoint records

    @classmethod
    def from_meta(cls, meta: dict) -> RGBRecord:
        if isinstance(meta.get("rgb_input"), dict):
            r = meta["rgb_input"]
            choice = RGBChoice(tuple(str(n) for n in r.get("names") or ()), _band_tuple(r.get("bands")),
                               str(r.get("rule") or ""), str(r.get("source") or "run"))
            return cls(choice, _band_tuple(r.get("teacher")), _band_tuple(r.get("luminance")), "rgb_input")
        if "teacher_input" in meta:
            return cls(None, _band_tuple((meta["teacher_input"] or {}).get("bands")), None, "teacher_input")
        return cls(None, None, None, "none")

    def teacher_choice(self, now: RGBChoice, optical_bands: int) -> RGBChoice:
        """The RGB decision to give a resumed run's teacher: the recorded one (``now``: what the
        datasets' names say today, for the band names, and where nothing was recorded)."""
        keep = "as in the run being resumed"
        if self.written == "rgb_input":
            return RGBChoice(now.names, self.choice.bands, keep, "run")
        if self.written == "none":  # the teacher read the first three bands
            return RGBChoice(now.names, (0, 1, 2) if optical_bands >= 3 else None, f"the first three, {keep}", "run")
        if self.teacher is not None and len(self.teacher) == 3:
            return RGBChoice(now.names, self.teacher, keep, "run")
        return now  # an EMA teacher or no OKD: nothing to keep

    def luminance_choice(self, names: Sequence[str], optical_bands: int) -> RGBChoice:
        """The RGB decision of the run's CDR luminance, for a resumed run or an analysis."""
        if self.written == "rgb_input":
            return RGBChoice(tuple(names), self.luminance, "as in the run being resumed", "run")
        first = (0, 1, 2) if optical_bands in (3, 4) else None
        return RGBChoice(tuple(names), first, "the first three bands of a 3- or 4-band image, as in the run "
                         "being resumed (written before CDR's luminance followed the band names)", "run")

    def to_meta(self) -> dict:
        return {**(self.choice.to_meta() if self.choice else {"bands": None, "names": [], "rule": "", "source": "run"}),
                "teacher": list(self.teacher) if self.teacher else None,
                "luminance": list(self.luminance) if self.luminance else None}


def _band_tuple(value) -> Optional[tuple[int, ...]]:
    return tuple(int(b) for b in value) if value else None


@dataclass(frozen=True)
class BestRecord:
    """A fine-tuning checkpoint's best validation so far (meta.json ``best``): the metric that
    chooses it, its value, the 1-based epoch and that epoch's metrics. Every field is None before
    the first validation, for pretraining checkpoints and for checkpoints that do not record it."""

    metric: Optional[str] = None
    value: Optional[float] = None
    epoch: Optional[int] = None
    metrics: Optional[dict] = None

    @classmethod
    def from_meta(cls, value, path) -> BestRecord:
        """meta.json's ``best`` (absent: every field None); a malformed entry is refused."""
        if value is None:
            return cls()
        bad = UserError(f"checkpoint '{path}' records an invalid best entry {value!r}")
        if not isinstance(value, dict) or not isinstance(value.get("metrics"), (dict, type(None))):
            raise bad
        try:
            return cls(metric=_optional(str, value.get("metric")), value=_optional(float, value.get("value")),
                       epoch=_optional(int, value.get("epoch")), metrics=value.get("metrics"))
        except (TypeError, ValueError):
            raise bad from None


def _optional(kind, value):
    return None if value is None else kind(value)


@dataclass
class CheckpointMeta:
    """A checkpoint's meta.json as a typed record: read once, by :func:`read_checkpoint_meta`.

    Checkpoints written before a field existed load with the default documented here.
    """

    path: Path  # the resolved checkpoint directory
    kind: str  # "pretrain" | "finetune"
    bands: dict  # {"optical": [names], "sar": [names]}: the bands the model reads, in order
    band_selection: dict  # {"optical"|"sar": [1-based input bands kept at prepare] | None (all) | "mixed"
    #                       (datasets that kept different bands: predict cannot read a scene)}; default all
    nodata_override: dict  # {"optical"|"sar": --nodata-* given at prepare, as data.raster.nodata_override_meta
    #                        records it: None (each file's own nodata; the default), "none", "nan", a number,
    #                        or "mixed" (datasets prepared with different ones: predict reads the file's own)}
    sar_scale: str  # units of the SAR rasters the training data came from: db | linear | amplitude | slc
    #                 | mixed | unknown (default: unknown, read as dB by predict)
    stats: dict  # {"optical"|"sar": {"mean": [...], "std": [...]}}: normalisation (SAR in dB)
    img_size: Optional[int]  # training chip size (default: the recipe's model.img_size)
    patch_size: Optional[int]  # default: the encoder config's, then the recipe's
    classes: list  # [{"name", "color"}] of a fine-tuned model; [] for pretraining
    backbone: str  # encoder architecture: vit | itpn (default vit)
    preset: str  # model size preset (default "unknown")
    task: Optional[str]  # "segmentation" | "classification" (fine-tuned models), else None
    inputs: str  # "optical" | "sar" | "both" (default both)
    recipe: dict  # the resolved recipe of the run
    encoder_config: Optional[dict]  # the encoder's ModelConfig (fine-tuned models)
    source_ranges: list  # pretraining: per dataset (in the order of raw["datasets"]), the source scale its
    #                      OKD teacher and hog / sar_gradient targets saw, {"optical": [lo, hi], "sar": [lo, hi]}
    #                      (data/source_scale.py); default [] (older checkpoints: readers use the dataset's own)
    rgb_input: RGBRecord  # pretraining: the optical bands read as red, green, blue (teacher, CDR luminance)
    best: BestRecord  # fine-tuning: the best validation so far (default: all None)
    load_report: Optional[dict]  # fine-tuning: what loading the pretrained encoder did, as tasks/model_io.py
    #                              LoadReport.as_dict() writes it (source, loaded, missing, unexpected,
    #                              skipped); None for a run from scratch and for checkpoints without it
    raw: dict  # the whole meta.json, for fields not typed here (metrics, versions, ...)

    @classmethod
    def from_dict(cls, meta: dict, path: Path) -> CheckpointMeta:
        recipe = meta.get("recipe") or {}
        model = recipe.get("model") or {}
        enc = meta.get("encoder_config")
        task = meta.get("task")
        if isinstance(task, dict):  # very early fine-tuning checkpoints stored the task section
            task = task.get("kind")
        if task is None and meta.get("kind") == "finetune":
            task = (recipe.get("task") or {}).get("kind", "segmentation")
        classes = [c if isinstance(c, dict) else {"name": str(c), "color": None} for c in meta.get("classes") or []]
        return cls(
            path=Path(path), kind=str(meta.get("kind", "pretrain")), bands=dict(meta.get("bands") or {}),
            band_selection={m: (meta.get("band_selection") or {}).get(m) for m in ("optical", "sar")},
            nodata_override={m: (meta.get("nodata_override") or {}).get(m) for m in ("optical", "sar")},
            sar_scale=str(meta.get("sar_scale") or "unknown"), stats=dict(meta.get("stats") or {}),
            img_size=meta.get("img_size") or model.get("img_size"),
            patch_size=meta.get("patch_size") or (enc or {}).get("patch_size") or model.get("patch_size"),
            classes=classes, backbone=str(meta.get("backbone") or (enc or model).get("backbone") or "vit"),
            preset=str(meta.get("preset") or (enc or {}).get("preset") or model.get("preset") or "unknown"),
            task=task, inputs=str(meta.get("inputs") or "both"), recipe=recipe, encoder_config=enc,
            source_ranges=_source_ranges(meta.get("source_ranges"), path), rgb_input=RGBRecord.from_meta(meta),
            best=BestRecord.from_meta(meta.get("best"), path), load_report=_load_report(meta.get("load_report"), path),
            raw=meta)

    @property
    def source_range(self) -> Optional[dict]:
        """The source scale that goes with :attr:`stats` and :attr:`bands` (the first dataset's);
        None when the checkpoint does not record it."""
        return self.source_ranges[0] if self.source_ranges else None

    def recorded_source_range(self, dataset) -> Optional[dict]:
        """The source scale the run used for the dataset at ``dataset`` (its path as the run named
        it), or None when the checkpoint does not record one for it."""
        for name, rng in zip(self.raw.get("datasets") or [], self.source_ranges, strict=False):
            if str(name) == str(dataset):
                return rng
        return None

    def require_finetuned(self) -> None:
        """Refuse, in one sentence, a checkpoint that is not a fine-tuned model (predict, evaluate,
        and the task-model builder all ask here)."""
        if self.kind != "finetune":
            raise UserError(f"checkpoint '{self.path}' is a {self.kind} checkpoint, not a fine-tuned model; "
                            "fine-tune it first with `codemae finetune`")

    @property
    def class_names(self) -> list[str]:
        return [str(c.get("name", i)) for i, c in enumerate(self.classes)]

    def sar_scale_for(self, choice: str = "auto") -> tuple[str, Optional[str]]:
        """The units to read a SAR scene in, and a warning line (None when there is nothing to say).

        ``auto``: the units of the training data's SAR rasters (complex SLC samples are read as
        intensity whatever the units, so "linear"); dB when the checkpoint does not record them.
        A choice that differs from the training data is honoured, with a warning.
        """
        trained = "linear" if self.sar_scale == "slc" else self.sar_scale
        known = trained in _SCENE_SAR_SCALES
        if choice == "auto":
            if known:
                return trained, None
            return "db", (f"the checkpoint does not record the units of its training SAR ({self.sar_scale}); "
                          "reading the SAR scene as dB (--sar-scale db|linear|amplitude to say)")
        if choice not in _SCENE_SAR_SCALES:
            raise UserError(f"--sar-scale must be auto, db, linear or amplitude, not '{choice}'")
        if known and choice != trained:
            return choice, (f"--sar-scale {choice}, but the model was trained on SAR prepared from {trained} rasters; "
                            "right only if this scene's units differ from those of the training scenes")
        return choice, None


def _load_report(value, path) -> Optional[dict]:
    """meta.json's ``load_report``: a dict or None (absent)."""
    if value is not None and not isinstance(value, dict):
        raise UserError(f"checkpoint '{path}' records an invalid load_report {value!r}")
    return value


def _source_ranges(value, path) -> list:
    """meta.json's ``source_ranges``, checked: a list of {"optical"|"sar": [lo, hi]} with lo < hi."""
    out = []
    for entry in value or []:
        try:
            pair = {m: [float(v) for v in entry[m]] for m in ("optical", "sar")}
        except (KeyError, TypeError, ValueError):
            pair = None
        if pair is None or not all(len(r) == 2 and -math.inf < r[0] < r[1] < math.inf for r in pair.values()):
            raise UserError(f"checkpoint '{path}' records an invalid source_ranges entry {entry!r}")
        out.append(pair)
    return out


MIXED = "mixed"  # a provenance field on which the training datasets disagree


def data_provenance(dataset_metas: list[dict]) -> dict:
    """What a checkpoint records about its training data's inputs, from the datasets' metadata.json:
    ``sar_scale`` (units of the SAR rasters), ``band_selection`` (per modality, the input bands kept
    at prepare, 1-based; None: all) and ``nodata_override`` (``--nodata-*`` given at prepare; None:
    each file's own). A field on which the datasets disagree is ``"mixed"``, never the first
    dataset's value, and with several datasets each one's is kept in ``inputs_per_dataset``
    (in the order of ``datasets``). A selection of every band in order equals None ("all")."""
    scales = {str((m.get("sar") or {}).get("input_scale") or "unknown") for m in dataset_metas}
    sections = {m: [d.get(m) or {} for d in dataset_metas] for m in ("optical", "sar")}
    out = {"sar_scale": scales.pop() if len(scales) == 1 else MIXED,
           "band_selection": {m: _one_selection(secs) for m, secs in sections.items()},
           "nodata_override": {m: _one_value([s.get("nodata_override") for s in secs]) for m, secs in sections.items()}}
    if len(dataset_metas) > 1:
        out["inputs_per_dataset"] = [{m: {"band_selection": sections[m][i].get("selected"),
                                          "nodata_override": sections[m][i].get("nodata_override")}
                                      for m in sections} for i in range(len(dataset_metas))]
    return out


def _one_selection(sections: list[dict]):
    """The band selection the datasets share (None: all bands), or MIXED."""
    lists = {tuple(s["selected"]) for s in sections if s.get("selected")}
    if not lists:
        return None
    if len(lists) > 1:
        return MIXED
    chosen = lists.pop()
    every = tuple(range(1, len(chosen) + 1))
    for s in sections:  # "all bands" of a dataset agrees only with every band of it, in order
        if not s.get("selected") and int(s.get("count") or 0) and (chosen != every or int(s["count"]) != len(chosen)):
            return MIXED
    return list(chosen)


def _one_value(values: list):
    """The value every dataset recorded (None for none), or MIXED."""
    first = values[0] if values else None
    return first if all(v == first for v in values) else MIXED


def read_checkpoint_meta(path) -> CheckpointMeta:
    """The typed meta.json of a checkpoint (a checkpoint directory or a run directory)."""
    ckpt = resolve_checkpoint(path)
    return CheckpointMeta.from_dict(read_meta(ckpt), ckpt)


def load_weights(ckpt: Path, map_location="cpu") -> dict:
    """The state_dict in ``ckpt/model.safetensors`` (an already resolved checkpoint directory)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(Path(ckpt) / MODEL_FILE), device=str(map_location))
    except Exception:
        raise UserError(f"checkpoint '{ckpt}' has a corrupt {MODEL_FILE}") from None


def load_checkpoint(path, map_location="cpu") -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a checkpoint; weights read with safetensors (no pickle)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    return load_weights(ckpt, map_location), meta


def has_resume(path) -> bool:
    p = Path(path)
    return (p / RESUME_JSON).is_file() and (p / RESUME_TENSORS).is_file()


def load_resume(path, optimizer=None, restore_rng_state: bool = False) -> dict:
    """The resume state of a checkpoint: ``{"extra": {...}, "rng": {...}, "optimizer": {...}}``.

    With ``optimizer`` its state is loaded in place; with ``restore_rng_state`` the RNG states of
    this process are restored. ``extra`` holds what was passed as ``resume_extra``.
    """
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path, prefer=("last", "best"))
    if not has_resume(ckpt):
        raise UserError(f"checkpoint '{ckpt}' has no resume state ({RESUME_JSON}, {RESUME_TENSORS})")
    try:
        doc = json.loads((ckpt / RESUME_JSON).read_text())
        tensors = load_file(str(ckpt / RESUME_TENSORS), device="cpu")
    except Exception:
        raise UserError(f"checkpoint '{ckpt}' has a corrupt resume state") from None
    if not isinstance(doc, dict) or doc.get("format") != "codemae-resume":
        raise UserError(f"checkpoint '{ckpt}' has a resume state that is not a codemae resume state")
    try:
        out = {k: _join_tree(v, tensors) for k, v in doc.items() if k in ("optimizer", "rng", "extra")}
    except KeyError:
        raise UserError(f"checkpoint '{ckpt}' has an inconsistent resume state") from None
    out.setdefault("extra", {})
    if "optimizer" in out:
        opt = out["optimizer"]
        # JSON turned the integer parameter ids into strings.
        opt["state"] = {int(k): v for k, v in opt.get("state", {}).items()}
        if optimizer is not None:
            try:
                optimizer.load_state_dict(opt)
            except (ValueError, KeyError, RuntimeError) as err:
                raise UserError(f"checkpoint '{ckpt}' optimizer state does not match this model ({err})") from None
    elif optimizer is not None:
        raise UserError(f"checkpoint '{ckpt}' holds no optimizer state to resume from")
    if restore_rng_state:
        restore_rng(out.get("rng"))
    return out


__all__ = [
    "BestRecord",
    "CheckpointMeta",
    "capture_rng",
    "MIXED",
    "data_provenance",
    "has_resume",
    "is_checkpoint_dir",
    "load_checkpoint",
    "load_weights",
    "load_resume",
    "read_checkpoint_meta",
    "read_meta",
    "resolve_checkpoint",
    "restore_rng",
    "save_checkpoint",
    "unwrap_model",
    "versions",
]
