"""Memory-mappable chip shards: the streaming writer used by ``prepare`` and the reader used by
everything downstream (``PreparedDataset``).

Layout (docs/architecture.md section 1)::

    OUT/metadata.json
    OUT/index.gpkg                 layer "chips": one row per chip, with `shard` and `offset`
    OUT/shards/optical_00000.npy   float32 (n, C_opt, T, T), NaN = nodata
    OUT/shards/sar_00000.npy       float32 (n, C_sar, T, T), dB, NaN = nodata
    OUT/shards/label_00000.npy     uint8 (n, T, T), 255 = ignore      (only with labels)

Shards are plain uncompressed ``.npy`` files so a reader maps them with
``np.load(mmap_mode="r")`` and a chip costs one page-cache copy, not a GeoTIFF decode.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from codemae_cli.errors import UserError

FORMAT = "codemae-chips"
FORMAT_VERSION = 1
MODALITIES = ("optical", "sar", "label")
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


class ShardWriter:
    """Write chips of all modalities into parallel shards of at most ``shard_size`` chips.

    ``prefix`` tags the files so several worker processes can write into the same directory;
    ``prepare`` renames the parts to the final ``<modality>_<k:05d>.npy`` numbering.
    ``write`` returns ``(part, offset)`` where ``part`` is the index of this writer's part.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        tile: int,
        optical_bands: int,
        sar_bands: int,
        labels: bool,
        shard_size: int = 1024,
        prefix: str = "part",
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tile = int(tile)
        self.shapes = {
            "optical": (np.float32, (optical_bands, tile, tile)),
            "sar": (np.float32, (sar_bands, tile, tile)),
        }
        if labels:
            self.shapes["label"] = (np.uint8, (tile, tile))
        self.shard_size = max(1, int(shard_size))
        self.prefix = prefix
        self.parts: list[dict] = []  # [{"files": {modality: path}, "count": n}]
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

    def write(self, optical: np.ndarray, sar: np.ndarray, label: Optional[np.ndarray] = None) -> tuple[int, int]:
        if self._writers is None or self.parts[-1]["count"] >= self.shard_size:
            self._close_part()
            self._open_part()
        assert self._writers is not None
        self._writers["optical"].append(optical)
        self._writers["sar"].append(sar)
        if "label" in self._writers:
            if label is None:
                raise ValueError("this writer stores labels: pass one per chip")
            self._writers["label"].append(label)
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


class PreparedDataset:
    """Read a directory written by ``codemae prepare``.

    ``read(i)`` returns float32 copies (optical, sar) and a uint8 label copy so callers may
    modify them or hand them to ``torch.from_numpy``. Shards are opened lazily with
    ``np.load(mmap_mode="r")`` and cached per process: a DataLoader worker forked after a read
    reopens its own maps instead of sharing file positions or handles with the parent.
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

        self.index = gpd.read_file(index_path, layer="chips")
        # Plain numpy columns: indexing a GeoDataFrame per sample is far slower than the read.
        self._shard = self.index["shard"].to_numpy(dtype=np.int64)
        self._offset = self.index["offset"].to_numpy(dtype=np.int64)
        self._chip_id = self.index["chip_id"].astype(str).to_numpy()
        self._split = self.index["split"].astype(str).to_numpy()
        self.has_labels = self.meta.get("labels") is not None
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._shard)

    def __getitem__(self, i: int) -> dict:
        return self.read(i)

    def __getstate__(self):  # pickling for spawned workers: maps are reopened on demand
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

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

    def _map(self, modality: str, k: int) -> np.ndarray:
        if os.getpid() != self._pid:  # forked: do not reuse the parent's maps
            self._maps = {}
            self._pid = os.getpid()
        key = (modality, k)
        arr = self._maps.get(key)
        if arr is None:
            path = self.root / "shards" / shard_name(modality, k)
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            self._maps[key] = arr
        return arr

    def indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self._split == split)

    def read(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"chip {i} out of range 0..{len(self) - 1}")
        k, off = int(self._shard[i]), int(self._offset[i])
        out = {
            "optical": np.array(self._map("optical", k)[off], dtype=np.float32),
            "sar": np.array(self._map("sar", k)[off], dtype=np.float32),
            "label": np.array(self._map("label", k)[off], dtype=np.uint8) if self.has_labels else None,
            "chip_id": str(self._chip_id[i]),
            "split": str(self._split[i]),
        }
        return out
