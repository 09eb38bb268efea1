"""The k top-ranked tiles of a slide, read from the slide and written as PNG files.

Heatmaps (most attended tiles) and anomaly maps (most anomalous tiles) both show them:
1. choose the level once: the best level for a downsample of tile side / `out_px` (never finer
   than level 0), so a big tile is not read at full resolution only to be shrunk;
2. read each tile's level-0 box (x, y, tile_size_l0) at that level: round(tile_size_l0 / level
   downsample) px;
3. shrink to `out_px` when larger (`imageops.tiles.resize_tile`; smaller tiles stay as read);
4. write `rank<r>_x<x>_y<y>.png` (r from 1, two digits) atomically into `out_dir`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsi_pipe.core.fsutil import atomic_write_bytes
from wsi_pipe.imageops.tiles import encode_png, resize_tile
from wsi_pipe.readers.base import BaseSlideReader


def top_tile_name(rank: int, x: int, y: int) -> str:
    """File name of the tile of rank `rank` (1 = top) at level-0 (x, y)."""
    return f"rank{rank:02d}_x{x}_y{y}.png"


def write_top_tiles(
    reader: BaseSlideReader,
    coords_l0: np.ndarray,
    order: Sequence[int] | np.ndarray,
    tile_size_l0: float,
    out_dir: Path,
    k: int,
    out_px: int = 256,
) -> list[Path]:
    """Write the first `k` rows of `order` (row indices into `coords_l0`, best first); returns
    the files in rank order."""
    level = reader.best_level_for_downsample(max(1.0, tile_size_l0 / out_px))
    size_lvl = max(1, int(round(tile_size_l0 / reader.level_downsamples[level])))
    written = []
    for r, i in enumerate(list(order)[: max(0, k)], start=1):
        x, y = int(coords_l0[i, 0]), int(coords_l0[i, 1])
        tile = reader.read_region((x, y), level, (size_lvl, size_lvl))
        if tile.shape[0] > out_px:
            tile = resize_tile(tile, out_px)
        p = out_dir / top_tile_name(r, x, y)
        atomic_write_bytes(p, encode_png(tile))
        written.append(p)
    return written
