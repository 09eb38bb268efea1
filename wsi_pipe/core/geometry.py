"""Pure grid / box maths in level-0 pixels (no I/O, no torch).

Grids are anchored at the slide origin (0, 0) so grids of different mpps line up: tile i of a
grid starts at round(i * stride_l0). Because rounding moves a start by < 0.5 px and strides are
>= 1 px, the grid index of a start is recovered exactly by round(start / stride_l0).
"""

from __future__ import annotations

import numpy as np


def grid_starts(extent_l0: int, stride_l0: float) -> np.ndarray:
    """Starts (int64, level-0 px) of tiles that begin inside [0, extent_l0): round(i * stride)."""
    if stride_l0 <= 0:
        raise ValueError(f"stride must be > 0, got {stride_l0}")
    n = int(np.ceil(extent_l0 / stride_l0 - 1e-9)) if extent_l0 > 0 else 0
    starts = np.round(np.arange(n) * stride_l0).astype(np.int64)
    return starts[starts < extent_l0]


def grid_coords(width_l0: int, height_l0: int, stride_l0: float) -> np.ndarray:
    """All tile top-left corners of a grid, row-major (y, then x). coords: (n, 2) int64 (x, y)."""
    xs = grid_starts(width_l0, stride_l0)
    ys = grid_starts(height_l0, stride_l0)
    gx, gy = np.meshgrid(xs, ys)  # rows = y
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def grid_index(coords: np.ndarray, stride_l0: float) -> np.ndarray:
    """(col, row) grid indices of tile starts made by `grid_starts`. (n, 2) int64."""
    return np.round(coords / stride_l0).astype(np.int64)


def tile_boxes(coords: np.ndarray, tile_size_l0: float, scale: tuple[float, float]) -> np.ndarray:
    """Boxes [x0, y0, x1, y1] (float64) of tiles in another frame: frame px = level-0 px * scale.

    coords: (n, 2) level-0 px; scale: (sx, sy), e.g. mask px per level-0 px.
    """
    c = coords.astype(np.float64)
    sx, sy = scale
    return np.stack(
        [c[:, 0] * sx, c[:, 1] * sy, (c[:, 0] + tile_size_l0) * sx, (c[:, 1] + tile_size_l0) * sy],
        axis=1,
    )


def parent_rows(
    child_coords: np.ndarray,
    child_size_l0: float,
    parent_coords: np.ndarray,
    parent_stride_l0: float,
    parent_grid_shape: tuple[int, int],
) -> np.ndarray:
    """Row in `parent_coords` of the coarse tile holding each child tile's centre (-1 if none).

    child_coords: (n, 2) level-0 px; parent_coords: (m, 2) starts of a coarse grid with stride
    `parent_stride_l0`; parent_grid_shape: (n_cols, n_rows) of the full coarse grid. Returns
    (n,) int64.
    """
    if len(child_coords) == 0:
        return np.zeros(0, np.int64)
    centre = child_coords.astype(np.float64) + child_size_l0 / 2.0
    col = np.clip(np.floor(centre[:, 0] / parent_stride_l0), 0, parent_grid_shape[0] - 1).astype(
        np.int64
    )
    row = np.clip(np.floor(centre[:, 1] / parent_stride_l0), 0, parent_grid_shape[1] - 1).astype(
        np.int64
    )
    key_child = row * parent_grid_shape[0] + col
    out = np.full(len(child_coords), -1, np.int64)
    if len(parent_coords) == 0:
        return out
    pidx = grid_index(parent_coords, parent_stride_l0)
    key_parent = pidx[:, 1] * parent_grid_shape[0] + pidx[:, 0]
    order = np.argsort(key_parent)
    sorted_keys = key_parent[order]
    pos = np.searchsorted(sorted_keys, key_child)
    pos_c = np.clip(pos, 0, len(sorted_keys) - 1)
    hit = sorted_keys[pos_c] == key_child
    out[hit] = order[pos_c[hit]]
    return out


def parent_keys_needed(
    child_coords: np.ndarray,
    child_size_l0: float,
    parent_stride_l0: float,
    parent_grid_shape: tuple[int, int],
) -> np.ndarray:
    """Coarse-grid starts (m, 2) int64 of the tiles that hold the centres of `child_coords`."""
    if len(child_coords) == 0:
        return np.zeros((0, 2), np.int64)
    centre = child_coords.astype(np.float64) + child_size_l0 / 2.0
    col = np.clip(np.floor(centre[:, 0] / parent_stride_l0), 0, parent_grid_shape[0] - 1)
    row = np.clip(np.floor(centre[:, 1] / parent_stride_l0), 0, parent_grid_shape[1] - 1)
    cr = np.unique(np.stack([col, row], axis=1).astype(np.int64), axis=0)
    return np.round(cr * parent_stride_l0).astype(np.int64)


def sort_row_major(coords: np.ndarray) -> np.ndarray:
    """Permutation that orders tiles by y, then x."""
    return np.lexsort((coords[:, 0], coords[:, 1]))
