"""Benchmark tile encoders: parameters, FLOPs, tiles/s; and the torch selective scan vs the
sequential reference. Random weights, one input shared by every model, one process.

    python scripts/bench_encoder.py                          # batch 64, 224 px (slow on 2 cores)
    python scripts/bench_encoder.py --batch-size 8 --px 224 --iters 2
    python scripts/bench_encoder.py --device cuda --dtype bf16   # on a GPU: also cuda scan kernel

FLOPs are counted for one tile with `torch.utils.flop_counter.FlopCounterMode`, which sees
matmuls and convolutions but not the elementwise selective scan; the scan is added analytically
(9 flops per (batch, channel, position, state) element: exp, decay and input products,
recurrence multiply-add, output multiply-add). 1 MAC = 2 FLOPs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import wsi_pipe.nn.mamba as mamba_mod
from wsi_pipe.encoders import create_encoder
from wsi_pipe.nn.mamba import set_scan_backend
from wsi_pipe.nn.selective_scan import cuda_scan_available, selective_scan_ref, selective_scan_torch

DEFAULT_MODELS = ["ssmamba_t", "ssmamba_s", "ssmamba_b", "medmamba_t", "resnet50", "vit_s16"]
SCAN_FLOPS_PER_ELEMENT = 9


class ScanFlops:
    """Counts analytic selective-scan FLOPs of every call made through wsi_pipe.nn.mamba."""

    def __init__(self) -> None:
        self.flops = 0
        self._orig = mamba_mod.selective_scan

    def __enter__(self) -> ScanFlops:
        def counted(u, delta, A, B, C, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            b, d, length = u.shape
            self.flops += SCAN_FLOPS_PER_ELEMENT * b * d * length * A.shape[1]
            return self._orig(u, delta, A, B, C, *args, **kw)

        mamba_mod.selective_scan = counted
        return self

    def __exit__(self, *exc: object) -> None:
        mamba_mod.selective_scan = self._orig


def count_flops(model: torch.nn.Module, px: int, device: torch.device) -> tuple[float, float]:
    """(GFLOPs counted by FlopCounterMode, analytic scan GFLOPs) for one tile."""
    x = torch.randn(1, 3, px, px, device=device)
    with torch.no_grad(), ScanFlops() as sf, FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 1e9, sf.flops / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tiles_per_s(
    model: torch.nn.Module, x: torch.Tensor, iters: int, dtype: torch.dtype | None
) -> float:
    """Median forward throughput (tiles/s) over `iters` timed runs, after a small warm-up."""
    dev = x.device
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        model(x[:2])  # warm-up at the same px (kernels, allocator) without a full batch
        sync(dev)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            model(x)
            sync(dev)
            times.append(time.perf_counter() - t)
    return x.shape[0] / statistics.median(times)


def bench_scan(device: torch.device, b: int, d: int, n: int, length: int, reps: int) -> dict:
    """fwd+bwd seconds of the torch scan, the sequential reference and (GPU) the cuda kernel."""
    g = torch.Generator().manual_seed(0)
    args = [
        torch.randn(b, d, length, generator=g),
        torch.randn(b, d, length, generator=g) * 0.5,
        -torch.rand(d, n, generator=g) * 4,
        torch.randn(b, n, length, generator=g),
        torch.randn(b, n, length, generator=g),
        torch.randn(d, generator=g),
    ]
    args = [a.to(device).requires_grad_() for a in args]
    fns = {"torch": selective_scan_torch, "sequential": selective_scan_ref}
    if device.type == "cuda" and cuda_scan_available():
        from wsi_pipe.nn.selective_scan import selective_scan_cuda

        fns["cuda"] = selective_scan_cuda
    out = {}
    for name, fn in fns.items():
        times = []
        for _ in range(reps + 1):
            t = time.perf_counter()
            y = fn(*args, delta_softplus=True)
            y.sum().backward()
            sync(device)
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times[1:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--px", type=int, default=224)
    ap.add_argument("--iters", type=int, default=1, help="timed forward passes per model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--scan-length", type=int, default=1024)
    ap.add_argument("--skip-scan", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, 3, a.px, a.px, device=device)
    print(
        f"# device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"batch {a.batch_size}, {a.px} px, {a.dtype}, median of {a.iters} timed forward pass(es)"
    )
    print(
        f"{'model':12s} {'params M':>9s} {'GFLOPs':>8s} {'scan GF':>8s} {'tiles/s':>9s} {'vs resnet50':>11s}"
    )
    rows = []
    for name in a.models:
        model = create_encoder(name, scan_backend="auto").eval().to(device)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gf, scan_gf = count_flops(model, a.px, device)
        tps = tiles_per_s(model, x, a.iters, dtype)
        rows.append((name, params, gf, scan_gf, tps))
        print(f"{name:12s} {params:9.2f} {gf + scan_gf:8.2f} {scan_gf:8.2f} {tps:9.2f}", flush=True)
        if (
            device.type == "cuda"
            and name.startswith(("ssmamba", "medmamba"))
            and cuda_scan_available()
        ):
            set_scan_backend(model, "torch")
            print(
                f"{'':12s} torch-scan backend: {tiles_per_s(model, x, a.iters, dtype):.2f} tiles/s"
            )
        del model
    base = {r[0]: r[4] for r in rows}.get("resnet50")
    if base:
        print("\nthroughput relative to resnet50 (same input, same run):")
        for name, *_, tps in rows:
            print(f"  {name:12s} {tps / base:6.3f}x")
    if not a.skip_scan:
        b, d, n, length = 2, 256, 16, a.scan_length
        s = bench_scan(device, b, d, n, length, reps=2)
        print(f"\nselective scan fwd+bwd, (b={b}, d={d}, n={n}, l={length}), median seconds:")
        for k, v in s.items():
            print(f"  {k:10s} {v:8.4f} s   ({s['sequential'] / v:5.1f}x vs sequential)")


if __name__ == "__main__":
    main()
