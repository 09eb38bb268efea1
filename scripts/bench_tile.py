#!/usr/bin/env python3
"""Benchmark `wsi-pipe tile`: seconds per slide and coordinates written per second.

"Coordinates written per second" = tile coordinates in the slide's store(s) / seconds. It counts
tile positions decided and written, not tiles read or encoded (tiling reads only a low-resolution
level for the tissue mask), so it is not comparable with a reader's or an encoder's tiles/s.

Slides: a generated `--size` square, 3-level (downsamples 1, 4, 16) pyramidal TIFF at 0.25 um/px
with tissue discs (cached in --cache), plus every slide in ../shared/data/wsi that has an mpp
(BRACS, whose mpp is a placeholder, and the 16-px crop are left out).

Two modes:

- default (in process): `tile_slide` per slide, split into slide I/O and the rest, then the
  coordinate step alone on the same mask, ours (exact tissue fraction per tile from a
  summed-area table) vs a CLAM-style loop (point-in-polygon tests per patch, no fraction).
- `--side-by-side`: whole processes on the same slides, each started fresh (interpreter start,
  imports, slide open, segmentation, coordinates, store written):
    ours      `python -m wsi_pipe.cli.app tile SLIDE --out DIR --mpp 0.5 --tile-px 256`
    baseline  `python scripts/bench_tile.py --baseline-process SLIDE OUT.h5 ...`: a CLAM-style
              pipeline written here (not CLAM's code): OpenSlide (tiffslide for files OpenSlide
              refuses), a level near 1/64, HSV
              saturation median-filtered and Otsu-thresholded, a morphological close, contours
              with holes filtered by area, then for every grid patch in each contour's bounding
              box four points around the patch centre tested with cv2.pointPolygonTest (kept if
              any lies in the contour and the centre in no hole), coords written to HDF5.
  Each process is run --repeat times (alternating); the table gives the median wall time with
  its min-max and coordinates written per second from the median. The two count different tiles
  (other masks, other keep rules), so both counts are printed; where the baseline keeps none
  (an all-tissue crop: Otsu on saturation splits it into pieces under the area filter) the
  ratio is n/a. Ours also writes a GeoJSON, a QC PNG and the state files, and starts the CLI.

    python scripts/bench_tile.py [--size 50000] [--cache /tmp/wsi_bench]
    python scripts/bench_tile.py --side-by-side --repeat 3 [--size 20000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

TARGET_MPP = 0.5
TILE_PX = 256


# ------------------------------------------------------------------ CLAM-style coordinates
def clam_style_coords(
    contours: list[np.ndarray], holes: list[list[np.ndarray]], tile_l0: float
) -> np.ndarray:
    """CLAM-like patch filter: contours / holes (k, 1, 2) int32 in level-0 px; for each grid
    patch in a contour's bounding box, 4 points around its centre (+-tile/4) are tested with
    cv2.pointPolygonTest; kept if any lies in the contour and the centre is in no hole.
    Returns (n, 2) int64 level-0 top-left corners."""
    kept: list[tuple[int, int]] = []
    shift = tile_l0 / 4
    for cont, hs in zip(contours, holes, strict=True):
        x0, y0, w, h = cv2.boundingRect(cont)
        for y in np.arange(y0, y0 + h, tile_l0):
            for x in np.arange(x0, x0 + w, tile_l0):
                cx, cy = float(x + tile_l0 / 2), float(y + tile_l0 / 2)
                pts = [
                    (cx - shift, cy - shift),
                    (cx + shift, cy + shift),
                    (cx + shift, cy - shift),
                    (cx - shift, cy + shift),
                ]
                if any(cv2.pointPolygonTest(cont, p, False) >= 0 for p in pts):
                    if not any(cv2.pointPolygonTest(hh, (cx, cy), False) > 0 for hh in hs):
                        kept.append((int(x), int(y)))
    return np.asarray(kept, np.int64).reshape(-1, 2)


def baseline_process(
    slide: str, out_h5: str, level0_mpp: float, target_mpp: float, tile_px: int
) -> int:
    """The whole CLAM-style tiling of one slide (see the module doc); returns the coords count."""
    import h5py
    import openslide

    try:
        s = openslide.OpenSlide(slide)
    except openslide.OpenSlideUnsupportedFormatError:  # e.g. OME-TIFF with JPEG tiles
        import tiffslide

        s = tiffslide.TiffSlide(slide)
    level = s.get_best_level_for_downsample(64)
    ds = float(s.level_downsamples[level])
    img = np.asarray(s.read_region((0, 0), level, s.level_dimensions[level]).convert("RGB"))
    sat = cv2.medianBlur(cv2.cvtColor(img, cv2.COLOR_RGB2HSV)[..., 1], 7)
    _, binary = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((4, 4), np.uint8))
    found, hier = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    min_area = 100 * (256 / ds) ** 2 / 64  # about 1.6 patches of 256 px at level 0
    contours, holes = [], []
    if hier is not None:
        hier = hier[0]
        for i, c in enumerate(found):
            if hier[i][3] != -1 or cv2.contourArea(c) < min_area:
                continue
            hs, child = [], hier[i][2]
            while child != -1:
                if cv2.contourArea(found[child]) > min_area / 10:
                    hs.append(found[child])
                child = hier[child][0]
            contours.append(np.round(c * ds).astype(np.int32))
            holes.append([np.round(h * ds).astype(np.int32) for h in hs])
    tile_l0 = tile_px * target_mpp / level0_mpp
    coords = clam_style_coords(contours, holes, tile_l0)
    with h5py.File(out_h5, "w") as f:
        d = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=True)
        d.attrs.update(
            {
                "patch_size": tile_px,
                "patch_level": 0,
                "downsample": [1.0, 1.0],
                "level_dim": list(s.dimensions),
                "name": Path(slide).stem,
            }
        )
    s.close()
    return len(coords)


# ---------------------------------------------------------------------------- the slides
def bench_slides(size: int, cache: Path, shared: Path) -> list:  # type: ignore[type-arg]
    """Slide entries: the generated slide, then the shared real slides that have an mpp."""
    from wsi_pipe.core.manifest import discover
    from wsi_pipe.synth import DiscPainter, write_pyramidal_tiff

    cache.mkdir(parents=True, exist_ok=True)
    big = cache / f"synthetic_{size}_step4.tif"
    if not big.exists():
        rng = np.random.default_rng(0)
        discs = [
            (
                float(rng.uniform(0.2, 0.8) * size),
                float(rng.uniform(0.2, 0.8) * size),
                float(rng.uniform(0.05, 0.15) * size),
            )
            for _ in range(4)
        ]
        t = time.perf_counter()
        write_pyramidal_tiff(
            big, size, size, 0.25, levels=3, painter=DiscPainter(discs), level_step=4
        )
        print(f"generated {big.name} in {time.perf_counter() - t:.1f} s")
    entries = discover([big])
    if shared.is_dir():
        entries += [
            e for e in discover([shared]) if "BRACS" not in e.slide_id and "tiny" not in e.slide_id
        ]
    return entries


def _count_coords(run: Path) -> int:
    import h5py

    n = 0
    for p in run.glob("tiles/**/*.h5"):
        with h5py.File(p, "r") as f:
            n += len(f["coords"])
    return n


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt


def side_by_side(entries: list, repeat: int) -> None:  # type: ignore[type-arg]
    """Whole processes, ours vs the CLAM-style baseline, on the same slides (module doc)."""
    from wsi_pipe.readers import open_slide

    print(
        f"{'slide':28s} {'coords ours':>11s} {'baseline':>8s} {'ours s (min-max)':>20s} "
        f"{'baseline s (min-max)':>22s} {'ours coords/s':>13s} {'baseline coords/s':>17s} "
        f"{'ours / baseline':>15s}"
    )
    with tempfile.TemporaryDirectory(prefix="bench_tile_") as td:
        for e in entries:
            with open_slide(e.path, mpp_override=e.mpp) as r:
                mpp = float(r.mpp)
            t_ours, t_base, n_ours, n_base = [], [], 0, 0
            for i in range(repeat):  # alternate, so slow phases of the machine hit both
                out = Path(td) / f"ours_{e.slide_id}_{i}"
                t_ours.append(
                    _timed(
                        [
                            sys.executable,
                            "-m",
                            "wsi_pipe.cli.app",
                            "-q",
                            "tile",
                            str(e.path),
                            "--out",
                            str(out),
                            "--mpp",
                            str(TARGET_MPP),
                            "--tile-px",
                            str(TILE_PX),
                        ]
                    )
                )
                n_ours = _count_coords(out)
                h5 = Path(td) / f"base_{e.slide_id}_{i}.h5"
                t_base.append(
                    _timed(
                        [
                            sys.executable,
                            __file__,
                            "--baseline-process",
                            str(e.path),
                            str(h5),
                            "--level0-mpp",
                            repr(mpp),
                        ]
                    )
                )
                import h5py

                with h5py.File(h5, "r") as f:
                    n_base = len(f["coords"])
            mo, mb = statistics.median(t_ours), statistics.median(t_base)
            print(
                f"{e.slide_id[:28]:28s} {n_ours:11d} {n_base:8d} "
                f"{mo:8.2f} ({min(t_ours):.2f}-{max(t_ours):.2f}) "
                f"{mb:10.2f} ({min(t_base):.2f}-{max(t_base):.2f}) "
                f"{n_ours / mo:13.0f} {n_base / mb:17.0f} "
                f"{f'{(n_ours / mo) / (n_base / mb):.2f}x' if n_base else 'n/a':>15s}",
                flush=True,
            )


def in_process(entries: list) -> None:  # type: ignore[type-arg]
    """`tile_slide` per slide, then the coordinate step alone: ours vs the CLAM-style loop."""
    from wsi_pipe.core import geometry
    from wsi_pipe.core.config import TileConfig
    from wsi_pipe.core.layout import RunLayout
    from wsi_pipe.imageops.tissue import box_fractions, segment_tissue
    from wsi_pipe.readers import open_slide
    from wsi_pipe.stages.tile import _seg_mpp_for, _segmentation_image, tile_slide

    cfg = TileConfig(target_mpps=(TARGET_MPP,), tile_px=TILE_PX)
    print(
        f"{'slide':28s} {'size':>12s} {'coords':>6s} {'total s':>8s} {'io s':>6s} {'rest s':>7s} "
        f"{'coords written/s':>16s} {'coord step ours s':>17s} {'CLAM-style s':>12s} {'ratio':>6s}"
    )
    with tempfile.TemporaryDirectory() as td:
        for entry in entries:
            t0 = time.perf_counter()
            info = tile_slide(entry, cfg, RunLayout(Path(td)))
            total = time.perf_counter() - t0
            with open_slide(entry.path, mpp_override=entry.mpp) as r:
                seg_mpp = _seg_mpp_for(r.mpp, r.dimensions, cfg.segment.seg_mpp)
                img, scale = _segmentation_image(r, seg_mpp)
                dims, mpp = r.dimensions, r.mpp
            tissue = segment_tissue(img, seg_mpp, cfg.segment)
            tile_l0 = cfg.tile_px * cfg.target_mpps[0] / mpp
            t1 = time.perf_counter()
            cand = geometry.grid_coords(dims[0], dims[1], tile_l0)
            frac = box_fractions(tissue.mask, geometry.tile_boxes(cand, tile_l0, scale))
            int((frac >= cfg.min_tissue_fraction).sum())
            ours = time.perf_counter() - t1
            sc = np.array(scale)
            contours = [
                np.round(o / sc).astype(np.int32).reshape(-1, 1, 2) for o, _ in tissue.polygons
            ]
            holes = [
                [np.round(h / sc).astype(np.int32).reshape(-1, 1, 2) for h in hs]
                for _, hs in tissue.polygons
            ]
            t2 = time.perf_counter()
            clam_style_coords(contours, holes, tile_l0)
            clam = time.perf_counter() - t2
            n = sum(info["tiles"].values())
            print(
                f"{entry.slide_id[:28]:28s} {f'{dims[0]}x{dims[1]}':>12s} {n:6d} {total:8.2f} "
                f"{info['seconds_io']:6.2f} {total - info['seconds_io']:7.2f} {n / total:16.0f} "
                f"{ours:17.4f} {clam:12.4f} {clam / max(ours, 1e-9):5.1f}x",
                flush=True,
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=50_000, help="side of the generated slide, px")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "wsi_bench")
    ap.add_argument(
        "--shared",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi",
    )
    ap.add_argument(
        "--side-by-side",
        action="store_true",
        help="whole processes: wsi-pipe tile vs the CLAM-style baseline",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each process (side by side)")
    ap.add_argument(
        "--baseline-process", nargs=2, metavar=("SLIDE", "OUT_H5"), help=argparse.SUPPRESS
    )  # one baseline run (started by --side-by-side)
    ap.add_argument("--level0-mpp", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.baseline_process:
        baseline_process(*args.baseline_process, args.level0_mpp, TARGET_MPP, TILE_PX)
        return
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    entries = bench_slides(args.size, args.cache, args.shared)
    if args.side_by_side:
        side_by_side(entries, args.repeat)
    else:
        in_process(entries)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
