#!/usr/bin/env python3
"""Benchmark `wsi-pipe tile`: seconds per slide and tiles/s, split into slide I/O and the rest.

Slides: a generated 50,000 x 50,000 px, 3-level (downsamples 1, 4, 16) pyramidal TIFF at 0.25 um/px with tissue discs
(cached in --cache), plus every slide in ../shared/data/wsi that has an mpp. Baseline, measured in
the same run on the same segmentation: CLAM-style coordinate filtering (a Python loop asking
cv2.pointPolygonTest whether each patch's centre/corner points lie in a tissue contour), which gives
no tissue fraction. Ratio = baseline seconds / ours for the coordinate step.

    python scripts/bench_tile.py [--size 50000] [--cache /tmp/wsi_bench]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from wsi_pipe.core import geometry
from wsi_pipe.core.config import TileConfig
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import discover
from wsi_pipe.imageops.tissue import box_fractions
from wsi_pipe.readers import open_slide
from wsi_pipe.stages.tile import _seg_mpp_for, _segmentation_image, tile_slide
from wsi_pipe.synth import DiscPainter, write_pyramidal_tiff


def clam_style_coords(tissue, scale, dims, tile_l0: float) -> int:
    """CLAM-like: for each grid patch, test 4 points near its centre against every contour."""
    contours = [np.round(o / np.array(scale)).astype(np.int32).reshape(-1, 1, 2) for o, _ in tissue.polygons]
    holes = [[np.round(h / np.array(scale)).astype(np.int32).reshape(-1, 1, 2) for h in hs] for _, hs in tissue.polygons]
    kept = 0
    for cont, hs in zip(contours, holes):
        x0, y0, w, h = cv2.boundingRect(cont)
        for y in np.arange(y0, y0 + h, tile_l0):
            for x in np.arange(x0, x0 + w, tile_l0):
                c = (float(x + tile_l0 / 2), float(y + tile_l0 / 2))
                shift = tile_l0 / 4
                pts = [(c[0] - shift, c[1] - shift), (c[0] + shift, c[1] + shift),
                       (c[0] + shift, c[1] - shift), (c[0] - shift, c[1] + shift)]
                if any(cv2.pointPolygonTest(cont, p, False) >= 0 for p in pts):
                    if not any(cv2.pointPolygonTest(hh, c, False) > 0 for hh in hs):
                        kept += 1
    return kept


def bench_slide(entry, cfg: TileConfig, out: Path) -> dict:
    lay = RunLayout(out)
    t0 = time.perf_counter()
    info = tile_slide(entry, cfg, lay)
    total = time.perf_counter() - t0
    # the coordinate step alone, ours vs the CLAM-style loop, on the same mask
    from wsi_pipe.imageops.tissue import segment_tissue

    with open_slide(entry.path, mpp_override=entry.mpp) as r:
        seg_mpp = _seg_mpp_for(r.mpp, r.dimensions, cfg.segment.seg_mpp)
        img, scale = _segmentation_image(r, seg_mpp)
        dims, mpp = r.dimensions, r.mpp
    tissue = segment_tissue(img, seg_mpp, cfg.segment)
    tile_l0 = cfg.tile_px * cfg.target_mpps[0] / mpp
    t1 = time.perf_counter()
    cand = geometry.grid_coords(dims[0], dims[1], tile_l0)
    frac = box_fractions(tissue.mask, geometry.tile_boxes(cand, tile_l0, scale))
    n_ours = int((frac >= cfg.min_tissue_fraction).sum())
    ours = time.perf_counter() - t1
    t2 = time.perf_counter()
    n_clam = clam_style_coords(tissue, scale, dims, tile_l0)
    clam = time.perf_counter() - t2
    n = sum(info["tiles"].values())
    return dict(slide=entry.slide_id, size=f"{dims[0]}x{dims[1]}", tiles=n, total_s=total,
                io_s=info["seconds_io"], rest_s=total - info["seconds_io"], tiles_per_s=n / total,
                coords_ours_s=ours, coords_clam_s=clam, n_ours=n_ours, n_clam=n_clam)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_bench")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    big = args.cache / f"synthetic_{args.size}_step4.tif"
    if not big.exists():
        s = args.size
        rng = np.random.default_rng(0)
        discs = [(float(rng.uniform(0.2, 0.8) * s), float(rng.uniform(0.2, 0.8) * s), float(rng.uniform(0.05, 0.15) * s)) for _ in range(4)]
        t = time.perf_counter()
        write_pyramidal_tiff(big, s, s, 0.25, levels=3, painter=DiscPainter(discs), level_step=4)
        print(f"generated {big.name} in {time.perf_counter() - t:.1f} s")
    entries = discover([big])
    if args.shared.is_dir():
        entries += [e for e in discover([args.shared]) if "BRACS" not in e.slide_id and "tiny" not in e.slide_id]
    cfg = TileConfig(target_mpps=(0.5,), tile_px=256)
    rows = []
    with tempfile.TemporaryDirectory() as td:
        for e in entries:
            rows.append(bench_slide(e, cfg, Path(td)))
    hdr = f"{'slide':28s} {'size':>12s} {'tiles':>6s} {'total s':>8s} {'io s':>6s} {'rest s':>7s} {'tiles/s':>8s} {'coords ours s':>13s} {'CLAM-style s':>12s} {'ratio':>6s}"
    print(hdr)
    for r in rows:
        print(f"{r['slide'][:28]:28s} {r['size']:>12s} {r['tiles']:6d} {r['total_s']:8.2f} {r['io_s']:6.2f} "
              f"{r['rest_s']:7.2f} {r['tiles_per_s']:8.0f} {r['coords_ours_s']:13.4f} {r['coords_clam_s']:12.4f} "
              f"{r['coords_clam_s'] / max(r['coords_ours_s'], 1e-9):6.1f}x")


if __name__ == "__main__":
    main()
