"""Pure grid maths of anomaly maps (numpy + OpenCV, no torch, no I/O).

A slide's tiles are cells of a regular grid: cell (col, row) = round(coords_l0 / stride_l0)
(`wsi_pipe.core.geometry.grid_index`), shifted so the top-left tile's bounding box starts at 0.
The grid is neither square nor full: cells without a tile are background.

Scanning: SP-Mamba scans a square feature map along a circular-Hilbert (CH) curve. We pad a
slide's grid (or each window of a large grid) to the *CH-scan size*: the smallest square side
S >= the grid's longer side such that S - 2**floor(log2 S) is even, so the outer rings leave
exactly a power-of-two centre for the Hilbert curve. Pad and background cells are masked.

Every order function returns `perm` (L,) int64 over the S*S canvas cells in row-major index
(`row * S + col`), so `seq = canvas_flat[perm]`.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from wsi_pipe.mil.ordering import circular_hilbert_order, hilbert_order

SCAN_ORDERS = ("circular_hilbert", "hilbert", "row_major")


# ------------------------------------------------------------------------------- cells
def grid_cells(coords_l0: np.ndarray, stride_l0: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Grid cells of tiles. coords_l0: (n, 2) int level-0 px (x, y) top-left; stride_l0: grid
    stride in level-0 px. Returns (cells (n, 2) int64 (col, row) from the bounding box's top-left,
    (n_rows, n_cols))."""
    c = np.asarray(coords_l0, dtype=np.float64).reshape(-1, 2)
    if len(c) == 0:
        return np.zeros((0, 2), np.int64), (0, 0)
    if not stride_l0 > 0:
        raise ValueError(f"stride_l0 must be > 0, got {stride_l0}")
    idx = np.round(c / float(stride_l0)).astype(np.int64)
    idx -= idx.min(axis=0)
    shape = (int(idx[:, 1].max()) + 1, int(idx[:, 0].max()) + 1)
    return idx, shape


def index_grid(cells: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Dense (n_rows, n_cols) int64 map from cell to row of `cells` (-1 = background).
    Raises ValueError when two tiles fall on one cell (coords are not on one grid)."""
    h, w = shape
    out = np.full((h, w), -1, np.int64)
    if len(cells) == 0:
        return out
    flat = cells[:, 1] * w + cells[:, 0]
    if len(np.unique(flat)) != len(flat):
        raise ValueError(
            "two tiles map to one grid cell: coords are not on one regular grid "
            "(an overlapping tiling? give the store's stride_level0)"
        )
    out.reshape(-1)[flat] = np.arange(len(cells), dtype=np.int64)
    return out


def canonical_order(cells: np.ndarray) -> np.ndarray:
    """Permutation sorting cells row-major (row, then col): a store-order-free processing order."""
    return np.lexsort((cells[:, 0], cells[:, 1])).astype(np.int64)


# ------------------------------------------------------------------------------ CH size
def ch_size(n: int) -> int:
    """CH-scan side for a grid whose longer side is `n` cells: the smallest S >= n with
    S - 2**floor(log2 S) even (rings of width 1 around a power-of-two Hilbert centre)."""
    s = max(1, int(n))
    while (s - (1 << (s.bit_length() - 1))) % 2:
        s += 1
    return s


def ch_floor(n: int) -> int:
    """The largest valid CH-scan side <= n (n >= 1)."""
    s = max(1, int(n))
    while (s - (1 << (s.bit_length() - 1))) % 2:
        s -= 1
    return s


# ------------------------------------------------------------------------------ orders
def _orient(col: np.ndarray, row: np.ndarray, side: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Orientation k of the canvas: 0 identity, 1 transpose, 2 rotate 180, 3 anti-transpose."""
    m = side - 1
    if k == 0:
        return col, row
    if k == 1:
        return row, col
    if k == 2:
        return m - col, m - row
    return m - row, m - col


@lru_cache(maxsize=64)
def _base_perm(side: int, order: str, orientation: int) -> np.ndarray:
    cells = np.arange(side * side, dtype=np.int64)
    col, row = cells % side, cells // side
    oc, orow = _orient(col, row, side, orientation)
    if order == "row_major":
        perm = np.argsort(orow * side + oc, kind="stable").astype(np.int64)
    else:
        xy = np.stack([oc, orow], axis=1)  # every canvas cell, step 1
        fn = circular_hilbert_order if order == "circular_hilbert" else hilbert_order
        perm = fn(xy, step_l0=1)
    perm.setflags(write=False)
    return perm


def scan_orders(
    side: int, order: str = "circular_hilbert", n_orientations: int = 2, bidirectional: bool = True
) -> np.ndarray:
    """The K scan sequences of an S x S canvas: (K, S*S) int64 permutations of row-major cell
    indices; K = n_orientations * (2 if bidirectional else 1). Orientations: identity,
    transpose, rotate 180, anti-transpose (each a different CH path); reversed copies follow."""
    if order not in SCAN_ORDERS:
        raise ValueError(f"unknown scan order {order!r}; choose one of {SCAN_ORDERS}")
    if not 1 <= n_orientations <= 4:
        raise ValueError(f"n_orientations must be 1..4, got {n_orientations}")
    fwd = np.stack([_base_perm(side, order, k) for k in range(n_orientations)])
    return np.concatenate([fwd, fwd[:, ::-1]]) if bidirectional else fwd


def inverse_perms(perms: np.ndarray) -> np.ndarray:
    """inv (K, L) with seq[k][inv[k]] == canvas (row-major)."""
    inv = np.empty_like(perms)
    k = np.arange(perms.shape[0])[:, None]
    inv[k, perms] = np.arange(perms.shape[1], dtype=perms.dtype)[None, :]
    return inv


# ----------------------------------------------------------------------------- windows
def plan_windows(
    shape: tuple[int, int], max_side: int, halo: int | None = None
) -> tuple[int, np.ndarray, int]:
    """Windows that cover a grid of `shape` (n_rows, n_cols) for the scan.

    A grid whose longer side fits in `max_side` gets one canvas of side ch_size(longer side),
    with the grid centred in it. A larger grid gets square windows of side S = ch_floor(max_side)
    overlapping by `halo` cells on each side (default S // 8); each cell takes its score from the
    one window whose core (the window minus its halo) holds it.
    Returns (S, origins (m, 2) int64 (col0, row0) of each window's top-left in grid cells
    (may be negative), core offset `halo`); with one canvas, halo is 0.
    """
    h, w = shape
    longer = max(h, w)
    if longer <= max_side:
        s = ch_size(longer)
        return s, np.array([[-((s - w) // 2), -((s - h) // 2)]], np.int64), 0
    s = ch_floor(max_side)
    halo = s // 8 if halo is None else int(halo)
    core = s - 2 * halo
    if core < 1:
        raise ValueError(f"window side {s} leaves no core with halo {halo}")
    cols = np.arange(0, w, core) - halo
    rows = np.arange(0, h, core) - halo
    gc, gr = np.meshgrid(cols, rows)
    return s, np.stack([gc.ravel(), gr.ravel()], axis=1).astype(np.int64), halo


def window_index(index: np.ndarray, origins: np.ndarray, side: int) -> np.ndarray:
    """Row indices of each window's cells: index (H, W) from `index_grid`; origins (m, 2)
    (col0, row0). Returns (m, side, side) int64, -1 for background and outside the grid."""
    h, w = index.shape
    pad = side
    padded = np.full((h + 2 * pad, w + 2 * pad), -1, np.int64)
    padded[pad : pad + h, pad : pad + w] = index
    r = origins[:, 1][:, None] + pad + np.arange(side)[None, :]  # (m, S)
    c = origins[:, 0][:, None] + pad + np.arange(side)[None, :]
    r = np.clip(r, 0, padded.shape[0] - 1)
    c = np.clip(c, 0, padded.shape[1] - 1)
    return padded[r[:, :, None], c[:, None, :]]


def core_mask(side: int, halo: int) -> np.ndarray:
    """bool (side, side): the window's core (every cell when halo == 0)."""
    m = np.zeros((side, side), bool)
    m[halo : side - halo, halo : side - halo] = True
    return m


# ------------------------------------------------------------------------ map and score
def dense_map(
    values: np.ndarray, cells: np.ndarray, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tile values (n,) -> (map (H, W) float64 with 0 off tissue, mask (H, W) bool)."""
    h, w = shape
    m = np.zeros((h, w), np.float64)
    mask = np.zeros((h, w), bool)
    m[cells[:, 1], cells[:, 0]] = values
    mask[cells[:, 1], cells[:, 0]] = True
    return m, mask


def masked_gaussian(values: np.ndarray, mask: np.ndarray, sigma_cells: float) -> np.ndarray:
    """Gaussian smoothing that only averages tissue cells: G*(v*m) / G*(m) on the mask, 0 off it.
    values, mask: (H, W). sigma_cells <= 0 returns values (masked). Background never leaks in."""
    v = np.where(mask, values, 0.0).astype(np.float64)
    if sigma_cells <= 0:
        return v
    k = int(2 * np.ceil(3 * sigma_cells) + 1)
    num = cv2.GaussianBlur(v, (k, k), sigma_cells, borderType=cv2.BORDER_CONSTANT)
    den = cv2.GaussianBlur(
        mask.astype(np.float64), (k, k), sigma_cells, borderType=cv2.BORDER_CONSTANT
    )
    out = np.zeros_like(v)
    ok = mask & (den > 1e-12)
    out[ok] = num[ok] / den[ok]
    return out


SCORE_PARTS = ("max", "dog", "concentration")


def slide_score(
    smoothed: np.ndarray,
    mask: np.ndarray,
    dog_sigmas: tuple[float, float] = (1.0, 4.0),
    conc_quantile: float = 0.99,
    conc_radius_cells: float = 3.0,
    w_dog: float = 1.0,
    w_conc: float = 1.0,
) -> tuple[float, dict[str, float]]:
    """SP-Mamba's image score on a slide map: max + w_dog * contrast + w_conc * concentration.

    smoothed: (H, W) anomaly map (already smoothed), mask: (H, W) tissue cells. Only tissue
    cells count. contrast = max over tissue of the difference of two masked Gaussians of the map
    (sigmas in cells): a peak standing out from its surroundings. concentration = share of the
    map's top values (>= its `conc_quantile` quantile) lying within `conc_radius_cells` of the
    peak: high when the high values form one compact focus, low when they are scattered.
    Returns (score, {"max", "dog", "concentration"}).
    """
    vals = smoothed[mask]
    if vals.size == 0:
        raise ValueError("slide_score needs at least one tissue cell")
    peak = float(vals.max())
    g1 = masked_gaussian(smoothed, mask, dog_sigmas[0])
    g2 = masked_gaussian(smoothed, mask, dog_sigmas[1])
    dog = float((g1 - g2)[mask].max())
    thr = float(np.quantile(vals, conc_quantile))
    rows, cols = np.nonzero(mask & (smoothed >= thr))
    top = smoothed[rows, cols]
    pr, pc = np.unravel_index(int(np.argmax(np.where(mask, smoothed, -np.inf))), smoothed.shape)
    near = np.hypot(rows - pr, cols - pc) <= conc_radius_cells
    w = top - top.min() + 1e-12
    conc = float(w[near].sum() / w.sum())
    score = peak + w_dog * dog + w_conc * conc
    return score, {"max": peak, "dog": dog, "concentration": conc}
