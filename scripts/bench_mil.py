#!/usr/bin/env python
"""Time forward+backward and peak memory of every MIL aggregator on bags of 1k, 10k, 100k tiles.

    python scripts/bench_mil.py                      # CPU (and CUDA when available), all methods
    python scripts/bench_mil.py --methods mamba --sizes 1000 100000 --device cpu
    python scripts/bench_mil.py --methods mamba --sizes 100000 --device cpu --infer-only \
        --infer-backends auto torch          # inference before (torch scan) / after (auto)

Each (method, bag size, device) runs in a fresh subprocess so peak memory is its own: on CPU the
peak RSS growth over the process after model and input are built (ru_maxrss), on CUDA
`torch.cuda.max_memory_allocated`. One step = forward + cross-entropy + backward + Adam step on a
(n_tiles, 512) bag, the production sizes of `MilConfig` (hidden 256; msm 3 stages; mamba 2
layers). Linearity is reported as time per tile relative to the smallest bag of the same run.

Inference (`infer s`): one forward in eval mode under `torch.no_grad()` (what predict / heatmap
run), the minimum of --reps. `--infer-backends auto torch` times it once per scan backend on
the same model and bag in the same process (on CPU ``auto`` is the compiled numba scan, ``torch``
the autograd scan it replaces); `--infer-only` skips the training step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DIM = 512


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(
    method: str,
    n: int,
    device: str,
    reps: int,
    threads: int,
    backend: str,
    infer_backends: list[str] | None = None,
    infer_only: bool = False,
) -> dict:
    import torch

    from wsi_pipe.mil import create_aggregator
    from wsi_pipe.mil.train import MilModel
    from wsi_pipe.nn.mamba import set_scan_backend

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    kw = {"hidden_dim": 256, "dropout": 0.25}
    if method == "mamba":
        kw.update(n_layers=2, scan_backend=backend)
    if method == "msm":
        kw.update(n_stages=3)
    model = MilModel(create_aggregator(method, DIM, 2, **kw)).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(n, DIM, device=device)
    side = int(n**0.5) + 1
    idx = torch.arange(n, device=device)
    coords = torch.stack([idx % side, idx // side], 1) * 256
    y = torch.tensor([1], device=device)

    def step() -> None:
        out = model(x, coords)
        loss = torch.nn.functional.cross_entropy(out.logits[None], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    base_rss = _rss_mb()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated() / 2**20
    if n < 50_000 and not infer_only:  # warm-up (allocates Adam state); largest bags timed cold
        step()
        sync()
    times = []
    for _ in range(0 if infer_only else reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    model.eval()
    infer: dict[str, float] = {}
    for be in infer_backends or [backend]:
        if method == "mamba":
            set_scan_backend(model, be)
        best = float("inf")
        with torch.no_grad():
            model(x[:256], coords[:256])  # warm-up: kernel compilation, allocator
            for _ in range(max(1, reps)):
                t0 = time.perf_counter()
                model(x, coords)
                sync()
                best = min(best, time.perf_counter() - t0)
        infer[be] = best
    res = {
        "method": method,
        "n_tiles": n,
        "device": device,
        "threads": threads,
        "train_step_s": min(times) if times else float("nan"),
        "infer_s": infer[(infer_backends or [backend])[0]],
        "infer_s_by_backend": infer,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_over_base_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss,
    }
    if device == "cuda":
        res["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 - base_gpu
        res["gpu"] = torch.cuda.get_device_name()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    ap.add_argument("--sizes", nargs="*", type=int, default=[1_000, 10_000, 100_000])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--scan-backend",
        default="auto",
        help="mamba: auto | torch | numba | triton | cuda (training and inference)",
    )
    ap.add_argument(
        "--infer-backends",
        nargs="*",
        default=None,
        help="mamba: time inference once per scan backend, e.g. 'auto torch'",
    )
    ap.add_argument("--infer-only", action="store_true", help="skip the training step")
    ap.add_argument("--json", default=None, help="also write all results to this file")
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "N", "DEVICE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(
            json.dumps(
                run_one(
                    a.one[0],
                    int(a.one[1]),
                    a.one[2],
                    a.reps,
                    a.threads,
                    a.scan_backend,
                    a.infer_backends,
                    a.infer_only,
                )
            )
        )
        return

    import torch

    from wsi_pipe.mil import list_aggregators

    methods = a.methods or list_aggregators()
    devices = ["cpu", "cuda"] if a.device == "all" else [a.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
        print("no CUDA device: CPU only")
    results = []
    print(
        f"{'method':8} {'device':6} {'tiles':>7} {'train step s':>12} {'per-tile vs smallest':>21} "
        f"{'infer s':>8} {'peak MB':>9}  infer s by scan backend"
    )
    for dev in devices:
        for m in methods:
            first = None
            for n in sorted(a.sizes):
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    m,
                    str(n),
                    dev,
                    "--reps",
                    str(a.reps),
                    "--threads",
                    str(a.threads),
                    "--scan-backend",
                    a.scan_backend,
                ]
                if a.infer_backends and m == "mamba":
                    cmd += ["--infer-backends", *a.infer_backends]
                if a.infer_only:
                    cmd += ["--infer-only"]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{m:8} {dev:6} {n:>7} FAILED: {p.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                results.append(r)
                per_tile = r["train_step_s"] / n
                first = first or per_tile
                peak = r.get("peak_gpu_mb", r["peak_over_base_mb"])
                by_be = "  ".join(f"{k}={v:.3f}s" for k, v in r["infer_s_by_backend"].items())
                print(
                    f"{m:8} {dev:6} {n:>7} {r['train_step_s']:>12.4f} {per_tile / first:>21.2f} "
                    f"{r['infer_s']:>8.4f} {peak:>9.0f}  {by_be}",
                    flush=True,
                )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
