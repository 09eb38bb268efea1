"""Benchmark: slide-reader throughput (OpenSlide vs tiffslide) and tissue segmentation time.

    python scripts/bench_readers.py [--side 20000] [--n 2000] [--out /tmp/bench_slide.tiff]

Writes a synthetic 3-level JPEG TIFF (side x side level-0 px at 0.25 um/px, tissue discs),
reads `n` random 256-px level-0 regions with each backend (same regions, one process) and
prints tiles/s and the ratio to OpenSlide; then times `segment_tissue` at 8 um/px on every real
slide in ../shared/data/wsi (reading + resizing the level, and segmenting, separately).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from wsi_pipe.core.config import SegmentConfig
from wsi_pipe.imageops import segment_tissue
from wsi_pipe.readers import open_slide
from wsi_pipe.synth import DiscPainter, write_pyramidal_tiff

SHARED_WSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi"


def bench_reads(path: Path, n: int, side: int) -> None:
    rng = np.random.default_rng(0)
    locs = rng.integers(0, side - 256, (n, 2))
    base = None
    for backend in ("openslide", "tiffslide"):
        with open_slide(path, backend=backend) as r:
            r.read_region((0, 0), 0, (256, 256))  # warm-up
            t0 = time.perf_counter()
            for x, y in locs:
                r.read_region((int(x), int(y)), 0, (256, 256))
            dt = time.perf_counter() - t0
        rate = n / dt
        base = base or rate
        print(
            f"  {backend:10s} {rate:8.0f} tiles/s  ({dt:.2f} s for {n}; x{rate / base:.2f} vs openslide)"
        )


def bench_segmentation(cfg: SegmentConfig) -> None:
    overrides = {"BRACS_1640_N_3_cropped.tiff": 0.25}
    for p in sorted(SHARED_WSI.iterdir()):
        t0 = time.perf_counter()
        with open_slide(p, mpp_override=overrides.get(p.name)) as r:
            t_open = time.perf_counter() - t0
            level = r.best_level_for_downsample(cfg.seg_mpp / r.mpp)
            img = r.read_at_mpp(cfg.seg_mpp)
            t_read = time.perf_counter() - t0 - t_open
            t1 = time.perf_counter()
            res = segment_tissue(img, cfg.seg_mpp, cfg)
            t_seg = time.perf_counter() - t1
        print(
            f"  {p.name:32s} {r.backend:9s} level {level} -> {img.shape[1]}x{img.shape[0]} px: "
            f"open {t_open * 1e3:6.1f} ms, read+resize {t_read * 1e3:6.1f} ms, "
            f"segment {t_seg * 1e3:6.1f} ms, tissue {res.tissue_fraction:.2f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=20000)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/wsi_pipe_bench_slide.tiff"))
    args = ap.parse_args()
    s = args.side
    painter = DiscPainter([(s * 0.3, s * 0.3, s * 0.25), (s * 0.7, s * 0.6, s * 0.28)])
    t0 = time.perf_counter()
    write_pyramidal_tiff(args.out, s, s, 0.25, levels=3, painter=painter)
    print(
        f"wrote {s}x{s} 3-level slide in {time.perf_counter() - t0:.1f} s "
        f"({args.out.stat().st_size / 1e6:.1f} MB)"
    )
    print(f"random 256-px level-0 reads, {args.n} regions:")
    bench_reads(args.out, args.n, s)
    if SHARED_WSI.is_dir():
        print(f"segmentation at {SegmentConfig().seg_mpp} um/px on {SHARED_WSI}:")
        bench_segmentation(SegmentConfig())
    args.out.unlink()


if __name__ == "__main__":
    main()
