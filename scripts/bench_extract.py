"""Benchmark of `wsi-pipe extract`: is the encoder kept busy?

In one run, on one synthetic pyramidal JPEG slide (written here with tifffile, or --slide):
  (a) I/O floor   tiles/s of reading + decoding + resizing + normalising alone (the DataLoader
                  with the same workers, no model);
  (b) encoder     tiles/s of the encoder alone on in-memory uint8 batches (normalisation included);
  (c) end to end  tiles/s of `run_extract` on the slide (store writing included, model loading not).
Each is measured in --repeat rounds; every rate is reported as the median of the rounds with
its min-max spread, and the verdict -- the ratio (c) / min(a, b), goal >= 0.90 -- is judged on
the median of the rounds' ratios (each round's ratio uses that round's a, b and c, which saw
the same machine load). Best-of figures are not used: they pick whichever round was luckiest.

Page cache: the slide is written seconds before (a) and (c) read it, so by default it is read
from a warm page cache. `--cold` also measures (a) and (c) after dropping the slide file's pages
from the cache with posix_fadvise(POSIX_FADV_DONTNEED) (after an fsync, since dirty pages are not
dropped) and reports warm and cold side by side. How much of the file is resident afterwards is
checked with mincore(2) and printed; on a file system whose pages cannot be dropped (tmpfs,
where the cache is the storage) the cold figures are reported as not cold.

    python scripts/bench_extract.py                                  # CPU, small CNN
    python scripts/bench_extract.py --cold --repeat 5                # warm and cold I/O floor
    python scripts/bench_extract.py --encoder ssmamba_tiny --input-px 64
    python scripts/bench_extract.py --device cuda --encoder ssmamba_s --precision bf16 \
        --workers 12 --batch-size 256 --tiles 20000

Encoders: `small-cnn` (a 4-conv CNN defined here) or any registered architecture (random
weights: speed does not depend on them).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import math
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from wsi_pipe.core.config import ExtractConfig
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry, save_slide_table
from wsi_pipe.data.tile_dataset import TileDataset, TileSource
from wsi_pipe.stages import extract as ex
from wsi_pipe.store import schema, write_store

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SmallCNN(nn.Module):
    """A small encoder: patchify stem (8 px, stride 8) + two strided convs + pooling.

    About 12 M multiply-adds per 224-px tile, so on a CPU the I/O floor (a) is the bound and
    (c) / (a) shows what the pipeline itself costs.
    """

    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 8, stride=8),
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(64, dim, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.body(x)).flatten(1)


def write_synthetic_slide(path: Path, width: int, height: int, mpp: float = 0.5) -> None:
    """Tiled (256 px) JPEG pyramidal TIFF (wsi_pipe.synth), 3 levels, covered in a cheap
    H&E-coloured random texture (tissue everywhere, JPEG-compressible like real tissue)."""
    from wsi_pipe.synth import write_pyramidal_tiff

    palette = np.array([[230, 180, 210], [150, 80, 160], [240, 220, 235], [120, 60, 140]], np.int16)
    grain = np.random.default_rng(0).integers(-20, 21, (256, 256, 3)).astype(np.int16)

    def painter(x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        r = np.random.default_rng([int(x0), int(y0), int(ds)])
        cells = r.integers(0, len(palette), (math.ceil(h / 16), math.ceil(w / 16)))
        img = np.repeat(np.repeat(palette[cells], 16, 0), 16, 1)[:h, :w]
        return np.clip(img + grain[:h, :w], 0, 255).astype(np.uint8)

    write_pyramidal_tiff(path, width, height, mpp, levels=3, painter=painter)


def make_run(
    run: Path, slide: Path, tile_px: int, n_tiles: int, backend: str, store: str, mpp: float
) -> tuple[np.ndarray, dict]:
    """A run folder with one slide and one coords store (a full level-0 grid)."""
    from wsi_pipe.readers import open_slide

    with open_slide(str(slide), backend=backend) as r:
        w, h = r.dimensions
        level0_mpp = float(r.mpp)
        reader_backend = r.backend
    xs = np.arange(0, w - tile_px + 1, tile_px)
    ys = np.arange(0, h - tile_px + 1, tile_px)
    coords = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.int64)[:n_tiles]
    layout = RunLayout(run)
    attrs = {
        "kind": "coords",
        "slide_id": "synth",
        "slide_path": str(slide),
        "backend": reader_backend,
        "level0_mpp": level0_mpp,
        "target_mpp": level0_mpp,
        "tile_px": tile_px,
        "read_level": 0,
        "read_size_px": tile_px,
        "tile_size_level0": tile_px,
        "level0_width": w,
        "level0_height": h,
        "parent_mpp": -1.0,
        "config_hash": "bench",
    }
    write_store(
        layout.coords_store("synth", mpp, store),
        {
            schema.COORDS: coords,
            schema.TISSUE_FRACTION: np.ones(len(coords), np.float32),
            schema.PARENT_INDEX: np.full(len(coords), -1, np.int64),
        },
        attrs,
    )
    save_slide_table(layout.slides_table, [SlideEntry("synth", str(slide), "synth")])
    return coords, attrs


def make_multi_run(
    run: Path, slide: Path, coords: np.ndarray, attrs: dict, k: int, store: str, mpp: float
) -> None:
    """A run folder of `k` slides (ids synth0..), each a consecutive share of `coords` on the
    same file: many small slides, as in a biopsy cohort."""
    layout = RunLayout(run)
    entries = []
    for i, part in enumerate(np.array_split(coords, k)):
        sid = f"synth{i}"
        write_store(
            layout.coords_store(sid, mpp, store),
            {
                schema.COORDS: part,
                schema.TISSUE_FRACTION: np.ones(len(part), np.float32),
                schema.PARENT_INDEX: np.full(len(part), -1, np.int64),
            },
            {**attrs, "slide_id": sid},
        )
        entries.append(SlideEntry(sid, str(slide), sid))
    save_slide_table(layout.slides_table, entries)


def drop_page_cache(path: Path) -> None:
    """Evict `path`'s pages from the page cache: fsync (dirty pages are not dropped), then
    posix_fadvise(POSIX_FADV_DONTNEED) over the whole file. Raises OSError if unsupported."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Share of `path`'s pages in the page cache, by mincore(2) on a shared read-only mapping
    (mapping does not read the file); None where it cannot be told."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    n_pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            vec = (ctypes.c_ubyte * n_pages)()
            if libc.mincore(addr, size, vec) != 0:
                return None
            return sum(v & 1 for v in vec) / n_pages
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


def med_min_max(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of a list of rates."""
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], unit: str = "tiles/s", digits: int = 1) -> str:
    med, lo, hi = med_min_max(values)
    return (
        f"{med:.{digits}f} {unit} (min-max {lo:.{digits}f}-{hi:.{digits}f}, {len(values)} rounds)"
    )


def build_encoder(name: str, input_px: int, device: torch.device) -> ex.EncoderBundle:
    if name == "small-cnn":
        spec = SimpleNamespace(
            name=name, input_px=input_px, mean=IMAGENET_MEAN, std=IMAGENET_STD, embed_dim=128
        )
        return ex.encoder_bundle(SmallCNN(128), spec, "random", name, device)
    from wsi_pipe.encoders import create_encoder  # registered arch, random weights

    made = create_encoder(name)
    model, spec = made if isinstance(made, tuple) else (made, made.spec)
    if input_px != int(spec.input_px):
        spec = SimpleNamespace(
            **{k: getattr(spec, k) for k in ("name", "mean", "std", "embed_dim")}, input_px=input_px
        )
    return ex.encoder_bundle(model, spec, "random", name, device)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--slide", type=Path, help="use this slide instead of a synthetic one")
    p.add_argument("--tiles", type=int, default=2304, help="tiles to extract")
    p.add_argument("--tile-px", type=int, default=256)
    p.add_argument(
        "--input-px", type=int, default=224, help="encoder input px (resize when != tile px)"
    )
    p.add_argument("--encoder", default="small-cnn")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--backend", default="openslide", help="reader: openslide | tiffslide")
    p.add_argument("--store", default="h5")
    p.add_argument(
        "--slides",
        type=int,
        default=16,
        help="also extract the same tiles split into this many slides, with workers kept "
        "across slides and, as the baseline, restarted per slide (0: skip)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds of (a, b, c); each rate is reported as median and min-max",
    )
    p.add_argument(
        "--cold",
        action="store_true",
        help="also measure (a) and (c) after dropping the slide from the page cache",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder for the synthetic slide and run (default: a temp folder; use a "
        "disk-backed one for --cold, tmpfs pages cannot be dropped)",
    )
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()

    device = ex.resolve_device(args.device)
    cfg = ExtractConfig(
        encoder=args.encoder,
        device=device.type,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        precision=args.precision,
        store=args.store,
        name="bench",
    )
    threads = ex.cpu_threads_for(cfg, device)
    enc = build_encoder(args.encoder, args.input_px, device)
    mpp = 0.5
    with tempfile.TemporaryDirectory(prefix="bench_extract_", dir=args.workdir) as tmp:
        slide = args.slide
        if slide is None:
            side = 256 * math.ceil(math.sqrt(args.tiles * (args.tile_px / 256) ** 2))
            slide = Path(tmp) / "synth.tif"
            t0 = time.perf_counter()
            write_synthetic_slide(slide, side, side, mpp)
            print(f"synthetic slide {side}x{side} px written in {time.perf_counter() - t0:.1f} s")
        run = Path(tmp) / "run"
        coords, attrs = make_run(
            run, slide, args.tile_px, args.tiles, args.backend, args.store, mpp
        )
        n = len(coords)
        src = TileSource(
            "synth",
            str(slide),
            attrs["backend"],
            0,
            args.tile_px,
            enc.input_px,
            coords,
            attrs["level0_mpp"],
        )
        print(
            f"{n} tiles of {args.tile_px} px -> {enc.input_px} px, encoder {args.encoder}, "
            f"device {device}, {args.precision}, batch {args.batch_size}, workers {args.workers}, "
            f"main threads {threads if threads is not None else torch.get_num_threads()}, "
            f"reader {attrs['backend']}, cores {len(os.sched_getaffinity(0))}"
        )

        shift, scale = ex.norm_params(enc, device)

        def measure_a() -> float:
            """I/O floor: the stage's loader, tiles moved to the device and normalised, no model."""
            with ex.torch_threads(threads):
                t0 = time.perf_counter()
                seen = 0
                with ex.make_pool(cfg, device) as pool:
                    for tiles, _rows in pool.batches(src, args.batch_size):
                        seen += len(ex.normalise(tiles.to(device, non_blocking=True), shift, scale))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                assert seen == n
                return n / (time.perf_counter() - t0)

        # in-memory batches for (b): a few real batches, cycled
        ds0 = TileDataset(src)
        mem = []
        for s in range(0, min(n, 8 * args.batch_size), args.batch_size):
            idx = range(s, min(s + args.batch_size, n))
            mem.append((torch.stack([ds0[i][0] for i in idx]), torch.arange(s, s + len(idx))))
        ds0.close()
        if device.type == "cuda":
            mem = [(t.pin_memory(), r) for t, r in mem]
        batches = [mem[i % len(mem)] for i in range(math.ceil(n / args.batch_size))]

        def measure_b() -> float:
            """The encoder alone on in-memory uint8 batches (normalisation included)."""
            with ex.torch_threads(threads):
                ex.embed_batches(
                    enc, batches[:3], lambda r, f: None, device=device, precision=args.precision
                )  # warm-up
                tb = ex.embed_batches(
                    enc, batches, lambda r, f: None, device=device, precision=args.precision
                )
            return tb.n_tiles / tb.total_s

        def measure_c() -> tuple[float, dict]:
            """End to end through the stage: runner, slide checks, loader, model, store writing."""
            t0 = time.perf_counter()
            summary = ex.run_extract(run, cfg, progress=False, encoder=enc, overwrite=True)
            dt = time.perf_counter() - t0
            if not summary.ok:
                raise SystemExit(f"extract failed: {summary.results}")
            return n / dt, summary.results[0].info

        multi = Path(tmp) / "multi"
        if args.slides > 1:
            make_multi_run(multi, slide, coords, attrs, args.slides, args.store, mpp)

        def measure_multi(persistent: bool) -> float:
            t0 = time.perf_counter()
            summary = ex.run_extract(
                multi,
                cfg,
                progress=False,
                encoder=enc,
                overwrite=True,
                persistent_workers=persistent,
            )
            dt = time.perf_counter() - t0
            if not summary.ok:
                raise SystemExit(f"extract failed: {summary.results}")
            return n / dt

        def warm_up_cache() -> None:
            with open(slide, "rb") as f:
                while f.read(1 << 22):
                    pass

        def go_cold() -> float | None:
            """Drop the slide from the page cache; returns the share still resident."""
            drop_page_cache(slide)
            return resident_fraction(slide)

        keys = ["a", "b", "c"] + (["a_cold", "c_cold"] if args.cold else [])
        rates: dict[str, list[float]] = {k: [] for k in [*keys, "kept", "restarted"]}
        resident: list[float] = []
        waits = []
        for rep in range(args.repeat):
            warm_up_cache()
            rates["a"].append(measure_a())
            rates["b"].append(measure_b())
            warm_up_cache()
            rc, info = measure_c()
            rates["c"].append(rc)
            waits.append(info["data_wait"]["0.5"])
            line = (
                f"  round {rep}: a {rates['a'][-1]:.1f}, b {rates['b'][-1]:.1f}, c {rc:.1f} "
                f"tiles/s, c/min(a,b) {rc / min(rates['a'][-1], rates['b'][-1]):.3f}, model "
                f"waited for data {waits[-1]}"
            )
            if args.cold:
                left = go_cold()
                rates["a_cold"].append(measure_a())
                go_cold()
                rates["c_cold"].append(measure_c()[0])
                resident.append(left if left is not None else float("nan"))
                line += (
                    f"; cold ({'?' if left is None else f'{left:.0%}'} resident after the "
                    f"drop): a {rates['a_cold'][-1]:.1f}, c {rates['c_cold'][-1]:.1f}"
                )
            if args.slides > 1:
                warm_up_cache()
                rates["kept"].append(measure_multi(True))
                rates["restarted"].append(measure_multi(False))
                line += (
                    f"; {args.slides} slides: workers kept {rates['kept'][-1]:.1f}, restarted "
                    f"per slide {rates['restarted'][-1]:.1f} tiles/s"
                )
            print(line, flush=True)

    def round_ratios(a_key: str, c_key: str) -> list[float]:
        """(c) / min(a, b) of each round: a, b and c of one round saw the same machine load."""
        return [
            c / min(a, b) for a, b, c in zip(rates[a_key], rates["b"], rates[c_key], strict=True)
        ]

    print("warm page cache (the slide was read just before):")
    print(f"(a) I/O floor   : {fmt(rates['a'])}")
    print(f"(b) encoder     : {fmt(rates['b'])}")
    print(f"(c) end to end  : {fmt(rates['c'])}  (model waited for data: {', '.join(waits)})")
    ratios = {"warm": round_ratios("a", "c")}
    if args.cold:
        if resident and all(r == r for r in resident):
            how = f"{max(resident):.0%} of the slide resident after each drop (mincore)"
        else:
            how = "residency after the drop could not be checked (mincore unavailable)"
        print(f"cold page cache (posix_fadvise DONTNEED before each; {how}):")
        if resident and max(r for r in resident if r == r) > 0.5:
            print("  NOTE: the drop did not take (e.g. tmpfs): these figures are NOT cold")
        print(f"(a) I/O floor   : {fmt(rates['a_cold'])}")
        print(f"(c) end to end  : {fmt(rates['c_cold'])}")
        ratios["cold"] = round_ratios("a_cold", "c_cold")
    verdicts = {}
    for mode, rr in ratios.items():
        med, lo, hi = med_min_max(rr)
        verdicts[mode] = med >= 0.9
        print(
            f"ratio (c) / min(a, b), {mode}: median {med:.3f} (min-max {lo:.3f}-{hi:.3f} over "
            f"{len(rr)} rounds); goal >= 0.90 on the median: "
            f"{'met' if verdicts[mode] else 'NOT met'}"
        )
    multi_d = {}
    if args.slides > 1:
        per_slide = args.tiles / args.slides
        speedup = [k / r for k, r in zip(rates["kept"], rates["restarted"], strict=True)]
        print(
            f"{args.slides} slides of ~{per_slide:.0f} tiles: workers kept across slides "
            f"{fmt(rates['kept'])}; restarted per slide {fmt(rates['restarted'])}; kept / "
            f"restarted {fmt(speedup, 'x', 2)}"
        )
        multi_d = {
            "slides": args.slides,
            "kept_tiles_s": med_min_max(rates["kept"]),
            "restarted_tiles_s": med_min_max(rates["restarted"]),
        }
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    **multi_d,
                    "rounds": rates,
                    "resident_after_drop": resident,
                    "median_min_max": {k: med_min_max(v) for k, v in rates.items() if v},
                    "ratio_median_min_max": {m: med_min_max(r) for m, r in ratios.items()},
                    "goal_met_on_median": verdicts,
                    "args": {k: str(v) for k, v in vars(args).items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
