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
"""

from __future__ import annotations

from functools import reduce
from math import gcd

import numpy as np

TILE_ORDERS = ("store", "hilbert", "circular_hilbert")


def grid_indices(coords: np.ndarray, step_l0: int | None = None) -> np.ndarray:
    """Integer grid cells of tiles: coords (n, 2) int level-0 px (x, y) -> (n, 2) int64 (col, row).

    step_l0: grid stride in level-0 px; None = the gcd of the offsets from the top-left tile
    (exact for tiles on one regular grid, with or without overlap).
    """
    c = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if len(c) == 0:
        return c.copy()
    rel = c - c.min(axis=0)
    if step_l0 is None:
        nz = np.unique(rel[rel > 0])
        step_l0 = int(reduce(gcd, nz.tolist(), 0)) if len(nz) else 1
    return rel // max(1, int(step_l0))


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


def hilbert_order(coords: np.ndarray, step_l0: int | None = None) -> np.ndarray:
    """Permutation visiting tiles along a Hilbert curve over their grid. coords: (n, 2) level-0 px."""
    g = grid_indices(coords, step_l0)
    if len(g) == 0:
        return np.zeros(0, dtype=np.int64)
    bits = _order_bits(int(g.max()) + 1)
    return np.argsort(hilbert_index(g[:, 0], g[:, 1], bits), kind="stable").astype(np.int64)


def circular_hilbert_order(coords: np.ndarray, step_l0: int | None = None) -> np.ndarray:
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
        row == top, col - left,
        np.where(col == right, rw + (row - top),
                 np.where(row == bottom, rw + rh + (right - col), 2 * rw + rh + (bottom - row))),
    )
    # centre: Hilbert over the cells inside the rings, in local coordinates
    cx0 = cy0 = n_rings
    bits = _order_bits(max(w, h) - 2 * n_rings)
    centre_key = hilbert_index(np.clip(col - cx0, 0, None), np.clip(row - cy0, 0, None), bits)
    group = np.where(in_ring, ring, n_rings)
    key = np.where(in_ring, pos, centre_key)
    return np.lexsort((key, group)).astype(np.int64)


def tile_order(coords: np.ndarray | None, how: str, step_l0: int | None = None) -> np.ndarray | None:
    """Permutation for order `how` (one of TILE_ORDERS); None for "store" or when coords is None."""
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
