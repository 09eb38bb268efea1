"""Slide feature grids for anomaly models: one slide's tiles at the map grid (the finest mpp of
the feature set), with the features of every scale gathered onto it through `parent_index`.

Scale s of tile i is the feature of the tile that holds i at the s-th grid (fine -> coarse),
found by following `parent_index` from grid to grid, so the map grid carries one feature vector
of width D = sum of the scales' widths per tile.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import reduce
from math import gcd
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.anomaly.grid import grid_cells
from wsi_pipe.core.errors import ConfigError, EmptyInputError, StoreSchemaError
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry, resolve_slide_path
from wsi_pipe.store import open_store, schema

log = logging.getLogger(__name__)


@dataclass
class SlideGrid:
    """One slide's tiles at the map grid, in store row order.

    coords: (n, 2) int64 level-0 px top-left; feats: (n, D) float32 (scales concatenated);
    cells: (n, 2) int64 (col, row); shape: (n_rows, n_cols); mpp: the map grid's um/px;
    stride_l0 / tile_size_l0: level-0 px.
    """

    slide_id: str
    coords: np.ndarray
    feats: np.ndarray
    cells: np.ndarray
    shape: tuple[int, int]
    mpp: float
    stride_l0: float
    tile_size_l0: float
    scale_dims: list[int]
    slide_path: str | None = None
    label: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.coords)


def resolve_feature_set(
    layout: RunLayout, name: str | None, mpps: tuple[float, ...] | None
) -> tuple[str, tuple[float, ...]]:
    """(feature set, its grids fine -> coarse) of a run. Errors name the run and the fix."""
    sets = layout.feature_sets()
    if name is None:
        if not sets:
            raise EmptyInputError(
                f"{layout.root} has no feature sets under features/: run `wsi-pipe extract "
                f"{layout.root} --encoder ...` first"
            )
        if len(sets) > 1:
            raise ConfigError(
                f"{layout.root} has several feature sets ({', '.join(sets)}): give --features NAME"
            )
        name = sets[0]
    if name not in sets:
        raise StoreSchemaError(
            f"feature set {name!r} is missing in {layout.features_root} "
            f"(found: {', '.join(sets) or 'none'}): run `wsi-pipe extract {layout.root} --name {name} ...` "
            "or pass --features with one of those"
        )
    have = [m for m in layout.tile_mpps() if layout.features_dir(name, m).is_dir()]
    if not have:
        raise StoreSchemaError(
            f"feature set {name!r} of {layout.root} has no grids: re-run `wsi-pipe extract`"
        )
    if mpps is None:
        return name, tuple(sorted(have))
    out = []
    for m in mpps:
        match = [h for h in have if math.isclose(h, m, rel_tol=1e-6)]
        if not match:
            raise ConfigError(
                f"mpp {m:g} is not a grid of feature set {name!r} (it has {', '.join(f'{h:g}' for h in have)})"
            )
        out.append(match[0])
    return name, tuple(sorted(set(out)))


def infer_stride_l0(coords_l0: np.ndarray) -> int:
    """Grid stride in level-0 px from the gcd of tile offsets (stores without `stride_level0`)."""
    rel = np.asarray(coords_l0, np.int64) - np.asarray(coords_l0, np.int64).min(0)
    nz = np.unique(rel[rel > 0])
    return int(reduce(gcd, nz.tolist(), 0)) if len(nz) else 1


def _feature_store(layout: RunLayout, set_name: str, slide_id: str, mpp: float) -> Path:
    p = layout.find_feature_store(set_name, slide_id, mpp)
    if p is None:
        raise StoreSchemaError(
            f"slide {slide_id} has no {set_name!r} feature store at mpp {mpp:g} "
            f"(looked in {layout.features_dir(set_name, mpp)}): run `wsi-pipe extract` for it, "
            "or leave the slide out"
        )
    return p


def load_slide_grid(
    layout: RunLayout,
    set_name: str,
    entry: SlideEntry,
    mpps: tuple[float, ...],
    label: str | None = None,
) -> SlideGrid:
    """Read one slide's feature grid at `mpps` (finest first = the map grid)."""
    sid = entry.slide_id
    mpps = tuple(sorted(mpps))
    with open_store(_feature_store(layout, set_name, sid, mpps[0])) as r:
        coords = r.read(schema.COORDS).astype(np.int64)
        feats = [r.read(schema.FEATURES).astype(np.float32)]
        attrs = r.attrs
        coords_attrs = r.array_attrs(schema.COORDS)
        parent = r.read(schema.PARENT_INDEX) if schema.PARENT_INDEX in r.names else None
    rows = np.arange(len(coords))
    for fine, coarse in zip(mpps[:-1], mpps[1:]):
        if parent is None:
            raise StoreSchemaError(
                f"slide {sid}: the mpp {fine:g} store has no parent_index, so it "
                "cannot be linked to coarser grids: re-run `wsi-pipe tile` and `extract`"
            )
        rows = parent[rows]
        if np.any(rows < 0):
            raise StoreSchemaError(
                f"slide {sid}: {int((rows < 0).sum())} tiles at mpp {mpps[0]:g} have no parent at mpp "
                f"{coarse:g}: tile both grids in one `wsi-pipe tile` run, or use --mpp {mpps[0]:g}"
            )
        with open_store(_feature_store(layout, set_name, sid, coarse)) as r:
            f = r.read(schema.FEATURES)
            parent = r.read(schema.PARENT_INDEX) if schema.PARENT_INDEX in r.names else None
        if len(f) and rows.size and rows.max() >= len(f):
            raise StoreSchemaError(
                f"slide {sid}: parent_index points past the mpp {coarse:g} store: re-run extract"
            )
        feats.append(f[rows].astype(np.float32))
    n = len(coords)
    if n == 0:
        raise EmptyInputError(
            f"slide {sid} has no tiles at mpp {mpps[0]:g}: nothing to score (no tissue found)"
        )
    if n == 1:
        raise EmptyInputError(
            f"slide {sid} has a grid of 1 tile at mpp {mpps[0]:g}: an anomaly map needs at least 2 "
            "tiles; tile it at a finer mpp (--target-mpp) or leave it out of the cohort"
        )
    stride = attrs.get("stride_level0")
    stride_l0 = float(stride) if stride else float(infer_stride_l0(coords))
    tile_l0 = float(
        attrs.get("tile_size_level0_exact") or attrs.get("tile_size_level0") or stride_l0
    )
    cells, shape = grid_cells(coords, stride_l0)
    x = np.concatenate(feats, axis=1)
    if not np.all(np.isfinite(x)):
        raise StoreSchemaError(
            f"slide {sid}: its {set_name!r} features hold NaN/inf: re-run extract with --overwrite"
        )
    return SlideGrid(
        slide_id=sid,
        coords=coords,
        feats=x,
        cells=cells,
        shape=shape,
        mpp=float(mpps[0]),
        stride_l0=stride_l0,
        tile_size_l0=tile_l0,
        scale_dims=[f.shape[1] for f in feats],
        slide_path=resolve_slide_path(
            entry.slide_id, entry.path, attrs.get("slide_path"), fix="", must_exist=False
        )
        or None,
        label=label,
        attrs=attrs,
        coords_attrs=coords_attrs,
    )
