"""Tile orders for sequence aggregators, from level-0 tile coordinates (pure numpy).

- "store": the rows as stored.
- "hilbert": along a Hilbert curve over the tile grid (neighbouring tiles stay close in the
  sequence, which a causal scan benefits from).
- "circular_hilbert": SP-Mamba's order as we read it: concentric rectangular rings of the grid's
  bounding box from the outside in (each ring clockwise from its top-left corner), then a Hilbert
  curve over the central square (side = the largest power of two not above the grid's shorter
  side).

Every function returns a permutation `order` (n,) int64 such that `x[order]` is the reordered
sequence; `inverse_permutation(order)` maps back.

Grid cells come from the grid's stride in level-0 px. Pass the stride the tile stage stored
(`stride_level0` in a coords or feature store's root attributes, see `stride_from_attrs`): on a
slide at 0.263 um/px a 256-px grid at 0.5 um/px has a non-integer stride of 486.69 level-0 px, its
tiles start at round(i * stride) = 0, 487, 973, 1460, ... and the gcd of those offsets is 1 px, so
a gcd-based grid would run the curve over pixels instead of tiles. Without a stored stride,
`infer_stride_l0` recovers it from the coords themselves (exactly, for grids anchored at (0, 0)
like the tile stage's).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from functools import reduce
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TILE_ORDERS = ("store", "hilbert", "circular_hilbert")

#: root attribute of coords / feature stores holding the grid stride in level-0 px (float)
STRIDE_ATTR = "stride_level0"


def stride_from_attrs(attrs: Mapping[str, Any]) -> float | None:
    """The grid stride in level-0 px stored with a coords or feature store, or None."""
    value = attrs.get(STRIDE_ATTR)
    try:
        stride = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return stride if stride is not None and math.isfinite(stride) and stride > 0 else None


def _fits_anchored(values: np.ndarray, stride: float) -> bool:
    """True when every value is round(i * stride) for an integer i (a grid anchored at 0)."""
    idx = np.round(values / stride)
    return bool(np.all(np.abs(values - idx * stride) <= 0.5 + 1e-6))


def _anchored_stride(values: np.ndarray, min_gap: float) -> float | None:
    """The stride s with values == round(i * s), or None if no s in [min_gap, min_gap + 1] fits.

    Each value v at index i bounds s to [(v - 0.5) / i, (v + 0.5) / i]. Values are taken in
    increasing order, so the interval narrows (width ~ 1 / i) before a larger index could become
    ambiguous.
    """
    lo, hi = float(min_gap), float(min_gap) + 1.0
    for v in values[values > 0]:
        i = max(1, int(round(v / (0.5 * (lo + hi)))))
        lo, hi = max(lo, (v - 0.5) / i), min(hi, (v + 0.5) / i)
        if lo > hi + 1e-9:
            return None
    stride = 0.5 * (lo + hi)
    return stride if _fits_anchored(values, stride) else None


def infer_stride_l0(coords: np.ndarray) -> float:
    """Grid stride in level-0 px from tile coords alone; coords (n, 2) int level-0 px (x, y).

    1. the smallest gap between distinct x (or y) starts is floor(stride) for neighbouring tiles;
    2. if every start is round(i * s) for one s near that gap (the tile stage's grid, anchored
       at (0, 0), integer or not), that s is the stride;
    3. otherwise (a grid anchored elsewhere, e.g. per tissue piece): the gcd of the offsets from
       the first tile, as integer grids with a shifted origin have.
    Returns 1.0 when there are no two distinct starts on either axis.
    """
    c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    axes = [np.unique(c[:, k]) for k in range(2)]
    gaps = np.concatenate([np.diff(a) for a in axes])
    if len(gaps) == 0:
        return 1.0
    values = np.unique(np.concatenate(axes)).astype(np.float64)
    if values.min() >= 0:
        stride = _anchored_stride(values, float(gaps.min()))
        if stride is not None:
            return stride
    rel = np.concatenate([a - a.min() for a in axes])
    step = int(reduce(math.gcd, rel[rel > 0].tolist(), 0))
    log.debug("tile grid is not anchored at (0, 0): gcd of offsets = %d level-0 px", step)
    return float(max(1, step))


def grid_indices(coords: np.ndarray, step_l0: float | None = None) -> np.ndarray:
    """Integer grid cells of tiles: coords (n, 2) int level-0 px (x, y) -> (n, 2) int64 (col, row),
    counted from the top-left tile's cell.

    step_l0: the grid stride in level-0 px, as stored (`stride_from_attrs`; may be non-integer);
    None = `infer_stride_l0(coords)`. A grid anchored at (0, 0) maps start round(i * step) to
    cell i exactly; a grid anchored elsewhere is measured from its top-left tile.
    """
    c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(c) == 0:
        return c.copy()
    step = float(step_l0) if step_l0 is not None else infer_stride_l0(c)
    if not step > 0:
        raise ValueError(f"grid stride must be > 0 level-0 px, got {step_l0}")
    vals = c.astype(np.float64)
    if c.min() >= 0 and _fits_anchored(vals, step):
        cells = np.round(vals / step).astype(np.int64)
    else:
        cells = np.round((vals - vals.min(axis=0)) / step).astype(np.int64)
    return cells - cells.min(axis=0)


def hilbert_index(col: np.ndarray, row: np.ndarray, order: int) -> np.ndarray:
    """Distance along the Hilbert curve of side 2**order of cells (col, row), each (n,) int."""
    n = 1 << order
    x = np.asarray(col, dtype=np.int64).copy()
    y = np.asarray(row, dtype=np.int64).copy()
    d = np.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        # rotate the quadrant so the sub-curve has the canonical orientation
        flip = ~ry & rx
        x[flip] = n - 1 - x[flip]
        y[flip] = n - 1 - y[flip]
        swap = ~ry
        x[swap], y[swap] = y[swap], x[swap].copy()
        s >>= 1
    return d


def _order_bits(extent: int) -> int:
    return max(0, int(np.ceil(np.log2(max(1, extent)))))


def hilbert_order(coords: np.ndarray, step_l0: float | None = None) -> np.ndarray:
    """Permutation visiting tiles along a Hilbert curve over their grid. coords: (n, 2) level-0 px."""
    g = grid_indices(coords, step_l0)
    if len(g) == 0:
        return np.zeros(0, dtype=np.int64)
    bits = _order_bits(int(g.max()) + 1)
    return np.argsort(hilbert_index(g[:, 0], g[:, 1], bits), kind="stable").astype(np.int64)


def circular_hilbert_order(coords: np.ndarray, step_l0: float | None = None) -> np.ndarray:
    """Permutation: outer rings of the grid first (outside in, clockwise), then a Hilbert curve
    over the central square. coords: (n, 2) level-0 px."""
    g = grid_indices(coords, step_l0)
    n = len(g)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    col, row = g[:, 0], g[:, 1]
    w, h = int(col.max()) + 1, int(row.max()) + 1
    side = 1 << int(np.floor(np.log2(min(w, h))))
    n_rings = (min(w, h) - side) // 2
    ring = np.minimum.reduce([col, row, w - 1 - col, h - 1 - row])
    in_ring = ring < n_rings
    # clockwise position along ring r: top edge, right edge, bottom edge, left edge
    left, top = ring, ring
    right, bottom = w - 1 - ring, h - 1 - ring
    rw, rh = right - left, bottom - top
    pos = np.where(
        row == top,
        col - left,
        np.where(
            col == right,
            rw + (row - top),
            np.where(row == bottom, rw + rh + (right - col), 2 * rw + rh + (bottom - row)),
        ),
    )
    # centre: Hilbert over the cells inside the rings, in local coordinates
    cx0 = cy0 = n_rings
    bits = _order_bits(max(w, h) - 2 * n_rings)
    centre_key = hilbert_index(np.clip(col - cx0, 0, None), np.clip(row - cy0, 0, None), bits)
    group = np.where(in_ring, ring, n_rings)
    key = np.where(in_ring, pos, centre_key)
    return np.lexsort((key, group)).astype(np.int64)


def tile_order(
    coords: np.ndarray | None, how: str, step_l0: float | None = None
) -> np.ndarray | None:
    """Permutation for order `how` (one of TILE_ORDERS); None for "store" or when coords is None.

    step_l0: grid stride in level-0 px as stored (`stride_from_attrs`); None infers it.
    """
    if how not in TILE_ORDERS:
        raise ValueError(f"unknown tile order {how!r}; known: {', '.join(TILE_ORDERS)}")
    if how == "store" or coords is None:
        return None
    if how == "hilbert":
        return hilbert_order(coords, step_l0)
    return circular_hilbert_order(coords, step_l0)


def strided_permutation(n: int, stride: int) -> np.ndarray:
    """[0, s, 2s, ..., 1, 1+s, ...]: MambaMIL's sequence reordering of n items with stride s."""
    idx = np.arange(n, dtype=np.int64)
    s = max(1, min(int(stride), max(1, n)))
    return np.argsort((idx % s) * n + idx, kind="stable").astype(np.int64)


def inverse_permutation(order: np.ndarray) -> np.ndarray:
    """inv such that x[order][inv] == x."""
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order), dtype=order.dtype)
    return inv
