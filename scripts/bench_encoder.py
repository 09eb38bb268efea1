"""Benchmark tile encoders in one run: parameters, FLOPs, tiles/s (median and min-max of several
timed rounds), throughput relative to ResNet-50, and the selective scan's share of forward time
measured with the torch profiler. Random weights, one input shared by every model, one process.

    python scripts/bench_encoder.py --models resnet50 ssmamba_s --scan-backends auto torch
    python scripts/bench_encoder.py --batch-size 8 --iters 5            # all default models
    python scripts/bench_encoder.py --device cuda --dtype bf16 --scan-backends auto triton torch
    python scripts/bench_encoder.py --foundation --batch-size 2 --iters 2 --no-profile  # + big

`--foundation` adds rows for the pathology foundation models (UNI, UNI2-h, Virchow2,
H-optimus-0, Prov-GigaPath: 0.3-1.1 B parameters, 224 px; several seconds per tile on a CPU),
left out by default. Their random weights are drawn from N(0, 0.02) into a model built on the
meta device (timm's own initialisation of 1.1 B parameters takes ~35 s and is irrelevant to
speed).

Timing: models are timed round-robin; each round runs every (model, scan backend) once on the
same batch, so all columns of one round see the same machine load, and the ratio to ResNet-50 is
taken per round, then its median is reported (a loaded machine shifts all columns together).
`--scan-backends auto torch` gives "after" and "before" of the compiled CPU scan in one run
(``auto`` under inference is the numba scan on CPU; ``torch`` the autograd-capable torch scan).

Scan share: one extra forward under `torch.profiler`; the scan calls are labelled
``wsi_pipe.selective_scan.<backend>`` (see `wsi_pipe.nn.selective_scan.PROFILE_LABEL`) and their
inclusive CPU time is divided by the profiled forward's wall time. On CUDA it is host time of
the launches unless the device synchronises, so it is reported for CPU only.

FLOPs are counted for one tile with `torch.utils.flop_counter.FlopCounterMode`, which sees
matmuls and convolutions but not the elementwise selective scan; the scan is added analytically
(9 flops per (batch, channel, position, state) element: exp, decay and input products,
recurrence multiply-add, output multiply-add). 1 MAC = 2 FLOPs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import wsi_pipe.nn.mamba as mamba_mod
import wsi_pipe.nn.scan_cpu as scan_cpu_mod
from wsi_pipe.encoders import FOUNDATION_MODELS, can_build_empty, create_encoder
from wsi_pipe.nn.mamba import set_scan_backend
from wsi_pipe.nn.selective_scan import (
    PROFILE_LABEL,
    cuda_scan_available,
    resolve_scan_backend,
    selective_scan_ref,
    selective_scan_torch,
)

DEFAULT_MODELS = ["resnet50", "ssmamba_t", "ssmamba_s", "ssmamba_b", "medmamba_t", "vit_s16"]
MAMBA_FAMILIES = ("ssmamba", "medmamba")
SCAN_FLOPS_PER_ELEMENT = 9


def build_model(name: str, device: torch.device) -> torch.nn.Module:
    """Random weights; a model that can be built empty gets N(0, 0.02) (fast for giants)."""
    if name not in FOUNDATION_MODELS or not can_build_empty(name):
        return create_encoder(name, scan_backend="auto").eval().to(device)
    model = create_encoder(name, empty=True).to_empty(device=device)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.normal_(0.0, 0.02)
            else:
                t.zero_()
    return model.eval()


class ScanFlops:
    """Counts analytic selective-scan FLOPs of every scan made through wsi_pipe.nn.mamba
    (generic `selective_scan` calls and the fused four-direction CPU scan)."""

    def __init__(self) -> None:
        self.flops = 0
        self._orig = mamba_mod.selective_scan
        self._orig_cross = scan_cpu_mod.cross_scan_numba

    def __enter__(self) -> ScanFlops:
        def counted(u, delta, A, B, C, *args, **kw):
            b, d, length = u.shape
            self.flops += SCAN_FLOPS_PER_ELEMENT * b * d * length * A.shape[1]
            return self._orig(u, delta, A, B, C, *args, **kw)

        def counted_cross(x, delta, A, *args, **kw):
            b, e, length = x.shape
            self.flops += SCAN_FLOPS_PER_ELEMENT * b * 4 * e * length * A.shape[1]
            return self._orig_cross(x, delta, A, *args, **kw)

        mamba_mod.selective_scan = counted
        scan_cpu_mod.cross_scan_numba = counted_cross
        return self

    def __exit__(self, *exc: object) -> None:
        mamba_mod.selective_scan = self._orig
        scan_cpu_mod.cross_scan_numba = self._orig_cross


def count_flops(model: torch.nn.Module, px: int, device: torch.device) -> tuple[float, float]:
    """(GFLOPs counted by FlopCounterMode, analytic scan GFLOPs) for one tile."""
    x = torch.randn(1, 3, px, px, device=device)
    with torch.no_grad(), ScanFlops() as sf, FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 1e9, sf.flops / 1e9


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_s(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Seconds of one inference forward of the batch x."""
    dev = x.device
    with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        sync(dev)
        t = time.perf_counter()
        model(x)
        sync(dev)
        return time.perf_counter() - t


def scan_share(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype | None) -> float:
    """Fraction of one forward's wall time spent inside labelled selective-scan calls."""
    from torch.profiler import ProfilerActivity, profile

    dev = x.device
    with (
        torch.no_grad(),
        torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None),
        profile(activities=[ProfilerActivity.CPU]) as prof,
    ):
        sync(dev)
        t = time.perf_counter()
        model(x)
        sync(dev)
        wall = time.perf_counter() - t
    scan_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key.startswith(PROFILE_LABEL))
    return scan_us / 1e6 / wall


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
    ap.add_argument(
        "--foundation",
        action="store_true",
        help="also the pathology foundation models (big: 0.3-1.1 B parameters; needs --px 224)",
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--px", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5, help="timed rounds (every model once each)")
    ap.add_argument(
        "--scan-backends",
        nargs="+",
        default=["auto"],
        help="scan backends to time each Mamba model with, e.g. 'auto torch' (after / before)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-profile", action="store_true", help="skip the scan-share profile")
    ap.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    ap.add_argument("--scan-length", type=int, default=1024)
    ap.add_argument("--skip-scan", action="store_true", help="skip the scan fwd+bwd micro-bench")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    a = ap.parse_args()
    if a.foundation:
        a.models = a.models + [n for n in FOUNDATION_MODELS if n not in a.models]
    if a.px != 224 and any(n in FOUNDATION_MODELS for n in a.models):
        ap.error("the foundation models are benchmarked at their cards' 224 px: use --px 224")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    torch.manual_seed(0)
    x = torch.randn(a.batch_size, 3, a.px, a.px, device=device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    print(
        f"# device {device}{f' ({gpu})' if gpu else ''}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, batch {a.batch_size}, {a.px} px, {a.dtype}, "
        f"{a.iters} timed round(s) after one warm-up forward"
    )

    # (label, model); Mamba models once per requested scan backend, the same weights each time
    entries: list[tuple[str, str, str, torch.nn.Module]] = []
    for name in a.models:
        model = build_model(name, device)
        backends = a.scan_backends if name.startswith(MAMBA_FAMILIES) else ["-"]
        for be in backends:
            label = name if be == "-" else f"{name}[{be}]"
            entries.append((label, name, be, model))
    info: dict[str, dict] = {}
    for label, name, be, model in entries:
        if be != "-":
            set_scan_backend(model, be)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gf, scan_gf = (
            (float("nan"), float("nan")) if a.no_flops else count_flops(model, a.px, device)
        )
        with torch.no_grad():
            resolved = "-" if be == "-" else resolve_scan_backend(be, device, grad_enabled=False)
        info[label] = {
            "model": name,
            "scan_backend": be,
            "resolved_backend": resolved,
            "params_m": params,
            "gflops": gf + scan_gf,
            "scan_gflops": scan_gf,
        }
        forward_s(model, x[:2], dtype)  # warm-up: kernels, numba / triton compilation, allocator

    times: dict[str, list[float]] = {label: [] for label, *_ in entries}
    for _ in range(a.iters):
        for label, _name, be, model in entries:
            if be != "-":
                set_scan_backend(model, be)
            times[label].append(forward_s(model, x, dtype))
    base = "resnet50" if "resnet50" in times else None

    print(
        f"\n{'model[scan backend]':24s} {'runs':>8s} {'params M':>9s} {'GFLOPs':>7s} "
        f"{'scan GF':>7s} {'tiles/s median':>14s} {'(min-max)':>15s} {'vs resnet50':>11s} "
        f"{'scan share':>10s}"
    )
    results = []
    for label, _name, be, model in entries:
        tps = [a.batch_size / t for t in times[label]]
        row = dict(info[label])
        row.update(
            tiles_per_s_median=statistics.median(tps),
            tiles_per_s_min=min(tps),
            tiles_per_s_max=max(tps),
            rounds=len(tps),
        )
        if base:
            ratios = [tb / tm for tm, tb in zip(times[label], times[base], strict=True)]
            row["vs_resnet50_median"] = statistics.median(ratios)
            row["vs_resnet50_min"], row["vs_resnet50_max"] = min(ratios), max(ratios)
        if be != "-" and not a.no_profile and device.type == "cpu":
            set_scan_backend(model, be)
            row["scan_share"] = scan_share(model, x, dtype)
        results.append(row)
        ratio = f"{row['vs_resnet50_median']:6.3f}x" if base else ""
        share = f"{row['scan_share']:9.0%}" if "scan_share" in row else ""
        print(
            f"{label:24s} {row['resolved_backend']:>8s} {row['params_m']:9.2f} "
            f"{row['gflops']:7.2f} {row['scan_gflops']:7.2f} {row['tiles_per_s_median']:14.2f} "
            f"{'(' + format(row['tiles_per_s_min'], '.2f') + '-' + format(row['tiles_per_s_max'], '.2f') + ')':>15s} "
            f"{ratio:>11s} {share:>10s}",
            flush=True,
        )
    if base:
        print(
            "\n'vs resnet50' is the median over rounds of the per-round ratio (same batch, same "
            "round, so the same machine load)."
        )
    scan = None
    if not a.skip_scan:
        b, d, n, length = 2, 256, 16, a.scan_length
        scan = bench_scan(device, b, d, n, length, reps=2)
        print(f"\nselective scan fwd+bwd, (b={b}, d={d}, n={n}, l={length}), median seconds:")
        for k, v in scan.items():
            print(f"  {k:10s} {v:8.4f} s   ({scan['sequential'] / v:5.1f}x vs sequential)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "device": str(device),
                    "gpu": gpu,
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "batch_size": a.batch_size,
                    "px": a.px,
                    "dtype": a.dtype,
                    "rounds": a.iters,
                    "encoders": results,
                    "scan_fwd_bwd_s": scan,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
