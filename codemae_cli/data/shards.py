"""Memory-mappable chip shards: the ONE writer of the prepared-dataset format (used by
``prepare``, the analysis testbed, the loader bench and the test fakes) and the reader used by
everything downstream (``PreparedDataset``).

Layout (docs/architecture.md section 1), format version 2::

    OUT/metadata.json
    OUT/index.gpkg                      layer "chips": one row per chip, with `shard` and `offset`
    OUT/shards/optical_00000.npy        source dtype (uint8/uint16/int8/int16) or float32 (n, C_opt, T, T)
    OUT/shards/optical_valid_00000.npy  uint8 (n, T, ceil(T/8)): packed validity bits (integer optical only)
    OUT/shards/sar_00000.npy            int16 (n, C_sar, T, T): dB in steps of 1/256, -32768 = nodata
    OUT/shards/label_00000.npy          uint8 (n, T, T), 255 = ignore      (only with labels)

Float optical keeps NaN = nodata. Version 1 datasets (float32 optical and SAR) still load.
Shards are plain uncompressed ``.npy`` files so a reader maps them with
``np.load(mmap_mode="r")`` and a chip costs one page-cache copy, not a GeoTIFF decode.

Writing a dataset: a :class:`ShardLayout` (dtypes), one or more :class:`ShardWriter` (shard
parts; encodes chips and accumulates the train split's stats on the stored values), then
:func:`finish_dataset` (numbers the parts, writes index.gpkg and metadata.json).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from codemae_cli.data.source_scale import source_ranges
from codemae_cli.data.stats import RunningStats
from codemae_cli.errors import UserError

FORMAT = "codemae-chips"
FORMAT_VERSION = 2
MODALITIES = ("optical", "optical_valid", "sar", "label")
# Integer optical kept as is: every value of these fits float32 exactly and costs <= 2 bytes.
INTEGER_OPTICAL = ("uint8", "int8", "uint16", "int16")
# SAR dB as fixed point: int16 counts of 1/256 dB, i.e. a rounding error of at most 0.002 dB
# over +-128 dB (calibrated and uncalibrated SAR alike). Same size as float16, but a tenth of its
# error where float16 is coarsest, and int16 -> float32 is a fast cast where numpy's
# float16 -> float32 is not (docs/architecture.md s.1, docs/performance.md).
SAR_DTYPE = "int16"
SAR_STEP_DB = 1.0 / 256.0
SAR_NODATA = -32768
# Fixed header size: the header is written once with a placeholder count and rewritten with the
# final count, so it must not change length. 128 bytes holds any 4-D shape of realistic size.
_HEADER_BYTES = 128
_MAGIC = b"\x93NUMPY\x01\x00"


def shard_name(modality: str, k: int) -> str:
    return f"{modality}_{k:05d}.npy"


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    room = _HEADER_BYTES - len(_MAGIC) - 2 - 1  # 2 bytes header length, 1 byte final newline
    if len(text) > room:
        raise ValueError(f"shape {shape} does not fit the fixed .npy header")
    text = text.ljust(room) + "\n"
    return _MAGIC + (len(text)).to_bytes(2, "little") + text.encode("latin1")


class NpyStreamWriter:
    """Append equally shaped items to a ``.npy`` file without holding them in memory.

    The header is written up front with a count of 0 and rewritten with the real count on
    ``close()``; until then the file is not a valid array (prepare writes into a temp dir).
    """

    def __init__(self, path: str | Path, dtype, item_shape: tuple[int, ...]):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.item_shape = tuple(int(s) for s in item_shape)
        self.count = 0
        self._fh = open(self.path, "wb")
        self._fh.write(_npy_header(self.dtype, (0, *self.item_shape)))

    def append(self, items: np.ndarray) -> None:
        """Append one item (``item_shape``) or a batch (``(n, *item_shape)``)."""
        arr = np.ascontiguousarray(items, dtype=self.dtype)
        if arr.shape == self.item_shape:
            arr = arr[None]
        if arr.shape[1:] != self.item_shape:
            raise ValueError(f"item shape {arr.shape[1:]} != {self.item_shape}")
        self._fh.write(memoryview(arr).cast("B"))  # contiguous: no extra copy
        self.count += arr.shape[0]

    def close(self) -> None:
        if self._fh.closed:
            return
        self._fh.seek(0)
        self._fh.write(_npy_header(self.dtype, (self.count, *self.item_shape)))
        self._fh.close()

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ShardLayout:
    """Shapes and dtypes of a dataset's shards (recorded in metadata.json as ``"shards"``)."""

    tile: int
    optical_bands: int
    sar_bands: int
    labels: bool
    optical_dtype: str = "float32"
    sar_dtype: str = SAR_DTYPE

    @classmethod
    def for_source(cls, source_dtype: str, **kwargs) -> ShardLayout:
        """The layout that keeps integer optical in its source dtype (else float32)."""
        dt = str(np.dtype(source_dtype)) if source_dtype else "float32"
        return cls(optical_dtype=dt if dt in INTEGER_OPTICAL else "float32", **kwargs)

    @classmethod
    def from_meta(cls, meta: dict) -> ShardLayout:
        """The layout of a dataset's metadata; version 1 datasets are float32 throughout."""
        sh = meta.get("shards") or {}
        return cls(tile=int(meta["tile"]), optical_bands=int(meta.get("optical", {}).get("count", 0)),
                   sar_bands=int(meta.get("sar", {}).get("count", 0)), labels=meta.get("labels") is not None,
                   optical_dtype=sh.get("optical", "float32"), sar_dtype=sh.get("sar", "float32"))

    @property
    def sar_fixed_point(self) -> bool:
        """SAR stored as int16 counts of SAR_STEP_DB with the SAR_NODATA sentinel (version 2);
        else float dB with NaN nodata (version 1)."""
        return self.sar_dtype == SAR_DTYPE

    @property
    def sar_step(self) -> float:
        """dB per stored SAR unit (1 for float SAR shards)."""
        return SAR_STEP_DB if self.sar_fixed_point else 1.0

    def encode_sar(self, db: np.ndarray) -> np.ndarray:
        """float32 dB with NaN nodata -> the stored SAR array."""
        if not self.sar_fixed_point:
            return np.asarray(db, dtype=self.sar_dtype)
        q = np.clip(np.rint(db * np.float32(1.0 / SAR_STEP_DB)), -32767, 32767)
        return np.where(np.isnan(q), SAR_NODATA, q).astype(np.int16)

    def decode_sar(self, stored: np.ndarray) -> np.ndarray:
        """Stored SAR -> float32 dB with NaN nodata (a new array)."""
        out = np.array(stored, dtype=np.float32)
        if self.sar_fixed_point:
            out *= np.float32(SAR_STEP_DB)  # exact: 15-bit counts times a power of two
            out[stored == SAR_NODATA] = np.nan
        return out

    @property
    def optical_mask(self) -> bool:
        """Integer optical cannot hold NaN: its nodata lives in a packed validity mask."""
        return self.optical_dtype in INTEGER_OPTICAL

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        t = self.tile
        out = {"optical": (np.dtype(self.optical_dtype), (self.optical_bands, t, t))}
        if self.optical_mask:
            out["optical_valid"] = (np.dtype(np.uint8), (t, (t + 7) // 8))
        out["sar"] = (np.dtype(self.sar_dtype), (self.sar_bands, t, t))
        if self.labels:
            out["label"] = (np.dtype(np.uint8), (t, t))
        return out

    def to_meta(self) -> dict:
        out = {m: str(dt) if m != "optical_valid" else "packbits" for m, (dt, _) in self.arrays().items()}
        if self.sar_fixed_point:
            out["sar_step_db"] = SAR_STEP_DB
        return out

    def encode_optical(self, chip: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """float32 (C, T, T) with NaN nodata -> (stored array, valid (T, T) bool or None).

        Integer dtypes: rounded and clipped to the dtype's range (a no-op for integer sources
        read on the grid; resampled values lose < 0.5 of a digital number), nodata -> 0.
        """
        if not self.optical_mask:
            return np.asarray(chip, dtype=self.optical_dtype), None
        valid = ~np.isnan(chip).any(axis=0)
        info = np.iinfo(self.optical_dtype)
        q = np.clip(np.rint(chip), info.min, info.max)
        if not valid.all():
            q[:, ~valid] = 0
        return q.astype(self.optical_dtype), valid


class ShardWriter:
    """Write chips of all modalities into parallel shards of at most ``shard_size`` chips.

    ``write`` takes float32 optical (NaN = nodata), float32 SAR in dB (NaN = nodata) and
    uint8 labels, encodes them as ``layout`` says and, for ``train=True`` chips, adds the
    STORED values to :attr:`stats` (so stats and reads agree exactly). ``prefix`` tags the
    files so several worker processes can write into the same directory;
    :func:`finish_dataset` renames the parts to the final ``<modality>_<k:05d>.npy`` numbering.
    ``write`` returns ``(part, offset)`` where ``part`` is the index of this writer's part.
    """

    def __init__(self, directory: str | Path, layout: ShardLayout, *, shard_size: int = 1024,
                 prefix: str = "part"):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        self.shapes = layout.arrays()
        self.shard_size = max(1, int(shard_size))
        self.prefix = prefix
        self.parts: list[dict] = []  # [{"files": {modality: path}, "count": n}]
        self.stats = {"optical": RunningStats(layout.optical_bands), "sar": RunningStats(layout.sar_bands)}
        self._writers: Optional[dict[str, NpyStreamWriter]] = None

    def _open_part(self) -> None:
        k = len(self.parts)
        files = {m: self.directory / f"{self.prefix}_{m}_{k:05d}.npy" for m in self.shapes}
        self._writers = {m: NpyStreamWriter(files[m], dt, shp) for m, (dt, shp) in self.shapes.items()}
        self.parts.append({"files": {m: str(p) for m, p in files.items()}, "count": 0})

    def _close_part(self) -> None:
        if self._writers is not None:
            for w in self._writers.values():
                w.close()
            self._writers = None

    def write(self, optical: np.ndarray, sar: np.ndarray, label: Optional[np.ndarray] = None, *,
              train: bool = False) -> tuple[int, int]:
        if self._writers is None or self.parts[-1]["count"] >= self.shard_size:
            self._close_part()
            self._open_part()
        assert self._writers is not None
        opt, valid = self.layout.encode_optical(optical)
        sar_q = self.layout.encode_sar(sar)
        self._writers["optical"].append(opt)
        if valid is not None:
            self._writers["optical_valid"].append(np.packbits(valid, axis=-1))
        self._writers["sar"].append(sar_q)
        if "label" in self._writers:
            if label is None:
                raise ValueError("this writer stores labels: pass one per chip")
            self._writers["label"].append(label)
        if train:
            self.stats["optical"].update(opt, valid)
            self.stats["sar"].update(self.layout.decode_sar(sar_q))
        part = len(self.parts) - 1
        offset = self.parts[part]["count"]
        self.parts[part]["count"] += 1
        return part, offset

    def close(self) -> list[dict]:
        self._close_part()
        return self.parts

    def abort(self) -> None:
        if self._writers is not None:
            for w in self._writers.values():
                w.abort()
            self._writers = None
        for part in self.parts:
            for p in part["files"].values():
                Path(p).unlink(missing_ok=True)


def number_parts(shards_dir: Path, parts: list[dict]) -> list[Optional[int]]:
    """Rename shard parts (in list order) to ``<modality>_<k:05d>.npy``; empty parts are
    deleted. Returns the final shard number of each part (None for the deleted)."""
    numbers: list[Optional[int]] = []
    k = 0
    for part in parts:
        if part["count"] == 0:
            for p in part["files"].values():
                Path(p).unlink(missing_ok=True)
            numbers.append(None)
            continue
        for modality, path in part["files"].items():
            Path(path).rename(Path(shards_dir) / shard_name(modality, k))
        numbers.append(k)
        k += 1
    return numbers


def finish_dataset(root: str | Path, layout: ShardLayout, parts: list[dict], chips: list[dict], geometries: list,
                   crs, stats: dict[str, RunningStats], meta: dict) -> dict:
    """The last step of every writer of the format: number the shards, write the index and
    metadata.json. Returns the metadata written.

    ``parts``: every writer's parts in order; ``chips``: index rows whose ``shard`` is a
    position in ``parts`` and ``offset`` the row inside it (rewritten to final numbers);
    ``stats``: the merged train-split stats; ``meta``: the writer's own metadata keys (bands,
    labels, scenes, ...), stored after the format keys.
    """
    import geopandas as gpd

    root = Path(root)
    numbers = number_parts(root / "shards", parts)
    rows = [{**c, "shard": numbers[c["shard"]]} for c in chips]
    index = gpd.GeoDataFrame(rows, geometry=list(geometries), crs=crs)
    index.to_file(root / "index.gpkg", layer="chips", driver="GPKG")
    splits = {s: int((index["split"] == s).sum()) for s in ("train", "val", "test")}
    n_shards = sum(n is not None for n in numbers)
    if splits["train"]:
        st = {m: stats[m].to_meta() for m in ("optical", "sar")}
    else:
        st = {m: {"mean": [None] * len(stats[m].mean), "std": [None] * len(stats[m].mean)} for m in ("optical", "sar")}
    from codemae_cli import __version__

    out = {"format": FORMAT, "format_version": FORMAT_VERSION, "codemae_version": __version__,
           "tile": layout.tile, "shards": layout.to_meta(), "n_shards": n_shards, **meta,
           "stats": st, "splits": splits}
    out.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    out["optical"] = {**meta.get("optical", {}), "count": layout.optical_bands}
    out["sar"] = {"scale": "db", **meta.get("sar", {}), "count": layout.sar_bands}
    # The source scale the OKD teacher and the HOG / ratio-gradient targets see; a writer's own
    # (prepare --optical-range) wins over the rules.
    for m, rule in source_ranges(out["optical"].get("source_dtype"), st).items():
        out[m] = {**rule, **out[m]}
    (root / "metadata.json").write_text(json.dumps(out, indent=1))
    return out


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


class ShardMaps:
    """The memory maps of one dataset's shards, opened on first use and cached per process.

    A DataLoader worker forked after a read reopens its own maps instead of sharing file
    positions or handles with the parent; pickling (spawned workers) drops the cache.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def array(self, modality: str, k: int) -> np.ndarray:
        """Shard ``k`` of ``modality`` (a read-only memory map)."""
        if os.getpid() != self._pid:  # forked: do not reuse the parent's maps
            self._maps, self._pid = {}, os.getpid()
        arr = self._maps.get((modality, k))
        if arr is None:
            path = self.root / "shards" / shard_name(modality, k)
            try:
                # A plain ndarray over the map: np.memmap's Python-level indexing costs ~8 us a crop.
                arr = np.load(path, mmap_mode="r", allow_pickle=False).view(np.ndarray)
            except (OSError, ValueError):
                raise UserError(f"shard '{path}' is missing or corrupt; re-run `codemae prepare`") from None
            self._maps[(modality, k)] = arr
        return arr


class PreparedDataset:
    """Read a directory written by ``codemae prepare`` (format version 1 or 2).

    ``read(i)`` returns float32 copies (optical, sar; NaN = nodata whatever the stored dtype)
    and a uint8 label copy so callers may modify them or hand them to ``torch.from_numpy``.
    Shards are memory-mapped on first use (:class:`ShardMaps`, per process).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "metadata.json"
        index_path = self.root / "index.gpkg"
        if not meta_path.is_file() or not index_path.is_file():
            raise UserError(f"'{self.root}' is not a prepared dataset (metadata.json or index.gpkg missing)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"'{meta_path}' is not valid JSON") from None
        if self.meta.get("format") != FORMAT:
            raise UserError(f"'{self.root}' is not a codemae-chips dataset")
        if int(self.meta.get("format_version", 0)) > FORMAT_VERSION:
            raise UserError(
                f"'{self.root}' uses chip format version {self.meta['format_version']}, newer than this "
                f"codemae understands ({FORMAT_VERSION})"
            )
        import geopandas as gpd

        self.layout = ShardLayout.from_meta(self.meta)
        self.index = gpd.read_file(index_path, layer="chips")
        # Plain numpy columns: indexing a GeoDataFrame per sample is far slower than the read.
        self._shard = self.index["shard"].to_numpy(dtype=np.int64)
        self._offset = self.index["offset"].to_numpy(dtype=np.int64)
        self._chip_id = self.index["chip_id"].astype(str).to_numpy()
        self._split = self.index["split"].astype(str).to_numpy()
        self.has_labels = self.meta.get("labels") is not None
        self.maps = ShardMaps(self.root)

    def __len__(self) -> int:
        return len(self._shard)

    def __getitem__(self, i: int) -> dict:
        return self.read(i)

    @property
    def shard_column(self) -> np.ndarray:
        """Shard number of every row of the index (read-only view)."""
        return _read_only(self._shard)

    @property
    def offset_column(self) -> np.ndarray:
        """Position of every row of the index inside its shard (read-only view)."""
        return _read_only(self._offset)

    @property
    def stats(self) -> dict:
        return self.meta["stats"]

    @property
    def tile(self) -> int:
        return int(self.meta["tile"])

    @property
    def classes(self) -> Optional[list[str]]:
        labels = self.meta.get("labels")
        if not labels:
            return None
        classes = labels["classes"]
        return [classes[str(k)] for k in sorted(int(k) for k in classes)]

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self._split == split)

    def read(self, i: int, rows: slice = slice(None), cols: slice = slice(None)) -> dict:
        """Chip ``i`` (or the ``rows``/``cols`` slices of it, steps allowed: a decimated read
        touches only the rows it samples) decoded to float32 with NaN = nodata."""
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"chip {i} out of range 0..{len(self) - 1}")
        k, off = int(self._shard[i]), int(self._offset[i])
        valid = None
        if self.layout.optical_mask:
            bits = self.maps.array("optical_valid", k)[off, rows]
            valid = np.unpackbits(bits, axis=-1, count=self.layout.tile)[:, cols]
        optical = np.array(self.maps.array("optical", k)[off, :, rows, cols], dtype=np.float32)
        if valid is not None:
            optical[:, valid == 0] = np.nan
        return {
            "optical": optical,
            "sar": self.layout.decode_sar(self.maps.array("sar", k)[off, :, rows, cols]),
            "label": np.array(self.maps.array("label", k)[off, rows, cols], dtype=np.uint8) if self.has_labels else None,
            "chip_id": str(self._chip_id[i]),
            "split": str(self._split[i]),
        }
