"""Tile orders over grids with non-integer level-0 strides (`wsi_pipe.mil.ordering`).

A slide at 0.263 um/px tiled with 256-px tiles at 0.5 um/px has a stride of 486.69 level-0 px:
tiles start at 0, 487, 973, 1460, ... whose gcd is 1 px. The orders must run over tiles, using
the stride stored with the grid (or one recovered exactly from the coords), not over pixels.
"""

from __future__ import annotations

import math
from functools import reduce
from pathlib import Path

import numpy as np
import pytest

from wsi_pipe.core import geometry
from wsi_pipe.mil.ordering import (
    circular_hilbert_order,
    grid_indices,
    hilbert_order,
    infer_stride_l0,
    stride_from_attrs,
    tile_order,
)

STRIDE_0263 = 256 * 0.5 / 0.263  # 486.69... level-0 px


def _grid(
    n_cols: int, n_rows: int, stride: float, first: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """Coords of an (n_cols x n_rows) block of the tile stage's grid (anchored at (0, 0), starts
    round(i * stride)) beginning at grid cell `first`; returns (coords, true cells from 0)."""
    extent = int(math.ceil((max(n_cols + first[0], n_rows + first[1]) + 1) * stride))
    xs = geometry.grid_starts(extent, stride)[first[0] : first[0] + n_cols]
    ys = geometry.grid_starts(extent, stride)[first[1] : first[1] + n_rows]
    gx, gy = np.meshgrid(xs, ys)
    cols, rows = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
    return (
        np.stack([gx.ravel(), gy.ravel()], 1).astype(np.int64),
        np.stack([cols.ravel(), rows.ravel()], 1).astype(np.int64),
    )


def _steps(cells: np.ndarray, order: np.ndarray) -> np.ndarray:
    return np.abs(np.diff(cells[order], axis=0)).sum(1)


def test_the_0263_grid_defeats_a_gcd() -> None:
    coords, _ = _grid(8, 8, STRIDE_0263)
    assert coords[:4, 0].tolist() == [0, 487, 973, 1460]
    offsets = (coords - coords.min(0)).ravel()
    assert reduce(math.gcd, offsets[offsets > 0].tolist(), 0) == 1  # the old step: 1 px


@pytest.mark.parametrize("first", [(0, 0), (37, 211)])  # tissue anywhere on the slide
@pytest.mark.parametrize("stride", [STRIDE_0263, 256 * 0.5 / 0.2527, (256 - 32) * 1.9, 256.0])
def test_grid_cells_from_stored_and_inferred_stride(stride: float, first: tuple[int, int]) -> None:
    coords, cells = _grid(8, 8, stride, first)
    np.testing.assert_array_equal(grid_indices(coords, stride), cells)
    assert infer_stride_l0(coords) == pytest.approx(stride, abs=0.5 / (first[0] + 8))
    np.testing.assert_array_equal(grid_indices(coords), cells)


@pytest.mark.parametrize("step", ["stored", "inferred"])
def test_hilbert_runs_over_tiles_on_a_0263_slide(step: str) -> None:
    coords, cells = _grid(16, 16, STRIDE_0263, (5, 9))
    stride = STRIDE_0263 if step == "stored" else None
    order = hilbert_order(coords, stride)
    assert sorted(order.tolist()) == list(range(256))
    assert (_steps(cells, order) == 1).all()  # one unbroken curve of neighbouring tiles
    # the pixel-level grid the gcd gave is not one curve over tiles: it jumps
    assert (_steps(cells, hilbert_order(coords, 1)) > 1).any()


@pytest.mark.parametrize("step", ["stored", "inferred"])
def test_circular_hilbert_rings_on_a_0263_slide(step: str) -> None:
    coords, cells = _grid(12, 12, STRIDE_0263)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(coords))  # store order is not grid order
    coords, cells = coords[perm], cells[perm]
    order = circular_hilbert_order(coords, STRIDE_0263 if step == "stored" else None)
    g = cells[order]
    ring = np.minimum.reduce([g[:, 0], g[:, 1], 11 - g[:, 0], 11 - g[:, 1]])
    # 12 x 12 -> 2 outer rings (44 + 36 tiles), clockwise from the top-left, then an 8 x 8 curve
    assert ring[:44].tolist() == [0] * 44 and ring[44:80].tolist() == [1] * 36
    assert g[0].tolist() == [0, 0] and g[1].tolist() == [1, 0]
    assert (_steps(g, np.arange(80, 144)) == 1).all()


def test_sparse_tissue_keeps_true_cells() -> None:
    """Tiles missing between tissue pieces: the cells stay those of the full grid."""
    coords, cells = _grid(40, 30, STRIDE_0263, (3, 4))
    keep = ((cells[:, 0] - 10) ** 2 + (cells[:, 1] - 12) ** 2 < 64) | (cells[:, 0] > 33)
    np.testing.assert_array_equal(grid_indices(coords[keep]), cells[keep] - cells[keep].min(0))
    np.testing.assert_array_equal(
        grid_indices(coords[keep], STRIDE_0263), cells[keep] - cells[keep].min(0)
    )


def test_grid_not_anchored_at_zero_and_edge_cases() -> None:
    # an integer grid with its own origin (e.g. another tool's per-contour grid)
    cols, rows = np.meshgrid(np.arange(6), np.arange(5))
    c = np.stack([cols.ravel(), rows.ravel()], 1).astype(np.int64) * 192 + np.array([100, 37])
    assert infer_stride_l0(c) == 192
    assert grid_indices(c).max(0).tolist() == [5, 4]
    assert grid_indices(c, 192.0).max(0).tolist() == [5, 4]
    one = np.array([[487, 973]])
    assert grid_indices(one).tolist() == [[0, 0]] and hilbert_order(one).tolist() == [0]
    assert grid_indices(np.zeros((0, 2), np.int64)).shape == (0, 2)
    assert tile_order(np.zeros((0, 2), np.int64), "hilbert").tolist() == []
    with pytest.raises(ValueError, match="stride"):
        grid_indices(one, 0.0)


def test_stride_from_attrs() -> None:
    assert stride_from_attrs({"stride_level0": 486.69}) == 486.69
    assert stride_from_attrs({"stride_level0": np.float64(256)}) == 256.0
    for bad in (
        {},
        {"stride_level0": None},
        {"stride_level0": "x"},
        {"stride_level0": -1},
        {"stride_level0": float("nan")},
    ):
        assert stride_from_attrs(bad) is None


def test_stride_stored_by_the_tile_stage(tmp_path: Path, wsi_dir: Path) -> None:
    """End to end: tile a real slide declared as 0.263 um/px, order its tiles by the stored
    stride; neighbours on the curve are neighbouring tiles."""
    from wsi_pipe.core.config import TileConfig
    from wsi_pipe.core.layout import RunLayout
    from wsi_pipe.stages.tile import run_tile
    from wsi_pipe.store import open_store, schema

    slide = wsi_dir / "CMU-1-Small-Region.svs"
    if not slide.exists():
        pytest.skip(f"{slide} is missing")
    cfg = TileConfig(target_mpps=(0.5,), tile_px=64, mpp_override=0.263)
    summary = run_tile([str(slide)], tmp_path / "run", cfg, progress=False)
    assert not getattr(summary, "failed", None)
    store = RunLayout(tmp_path / "run").coords_store("CMU-1-Small-Region", 0.5, "h5")
    with open_store(store) as r:
        coords = np.asarray(r.read(schema.COORDS))
        stride = stride_from_attrs(r.attrs)
    assert stride == pytest.approx(64 * 0.5 / 0.263)
    truth = geometry.grid_index(coords, stride)
    truth -= truth.min(0)
    np.testing.assert_array_equal(grid_indices(coords, stride), truth)
    np.testing.assert_array_equal(grid_indices(coords), truth)  # the fallback agrees
    order = tile_order(coords, "hilbert", stride)
    assert sorted(order.tolist()) == list(range(len(coords)))
    assert np.median(_steps(truth, order)) == 1
