"""Spatial train/val/test split by blocks of chips, reproducible with a seed.

Neighbouring chips share most of their context (and overlap when the stride is smaller than
the tile), so chips are grouped into square blocks of ``block x block`` chip positions per
scene and whole blocks are assigned to a split. Blocks of all scenes are shuffled with the
seed and dealt out in the requested proportions (largest remainder), giving every split with
a non-zero fraction at least one block when there are enough blocks.
"""

from __future__ import annotations

import math

import numpy as np

from codemae_cli.errors import UserError

SPLITS = ("train", "val", "test")


def parse_split(text: str | tuple | list) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' (or percentages '80,10,10', or 'train' fractions only '0.9,0.1') -> fractions."""
    if isinstance(text, str):
        parts = [p for p in text.replace(":", ",").replace("/", ",").split(",") if p.strip()]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise UserError(f"--split '{text}' must be fractions like 0.8,0.1,0.1") from None
    else:
        vals = [float(v) for v in text]
    if not 1 <= len(vals) <= 3 or any(v < 0 or not math.isfinite(v) for v in vals):
        raise UserError(f"--split '{text}' must be one to three non-negative fractions like 0.8,0.1,0.1")
    vals = vals + [0.0] * (3 - len(vals))
    total = sum(vals)
    if total <= 0:
        raise UserError(f"--split '{text}' must not be all zero")
    if abs(total - 1.0) > 1e-6 and abs(total - 100.0) > 1e-6:
        raise UserError(f"--split '{text}' must sum to 1 (or 100)")
    return tuple(v / total for v in vals)  # type: ignore[return-value]


def block_key(row_index: int, col_index: int, block: int) -> tuple[int, int]:
    """Block of a chip from its position in the scene's chip lattice."""
    return row_index // block, col_index // block


def assign_blocks(keys: list, fractions: tuple[float, float, float], seed: int) -> dict:
    """Map each block key (hashable, sortable) to 'train' | 'val' | 'test'."""
    keys = sorted(set(keys))
    n = len(keys)
    if n == 0:
        return {}
    exact = [f * n for f in fractions]
    counts = [int(math.floor(e)) for e in exact]
    for k in sorted(range(3), key=lambda k: exact[k] - counts[k], reverse=True)[: n - sum(counts)]:
        counts[k] += 1
    # Every split asked for gets a block when there are enough blocks: take from the largest.
    wanted = [k for k in range(3) if fractions[k] > 0]
    if n >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                donor = max(range(3), key=lambda j: counts[j])
                counts[donor] -= 1
                counts[k] += 1
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    pos = 0
    for k, c in enumerate(counts):
        for idx in order[pos: pos + c]:
            out[keys[idx]] = SPLITS[k]
        pos += c
    return out
