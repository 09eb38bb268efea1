"""Triton selective scan (forward + backward) against the sequential reference, on CPU.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors. The variable must be
set before triton is first imported: triton's own library functions (`tl.sum`, `tl.cdiv`,
`tl.sigmoid`, ...) are decorated at import time, and an interpreted kernel cannot call compiled-
mode ones. Other tests in the same pytest process may import triton first (through torch), so
the real tests run in a child pytest process started with TRITON_INTERPRET=1
(`test_triton_kernels_in_interpreter`); in the parent they are skipped.

The interpreter is slow: shapes stay tiny, and CHUNK / BLOCK_D are lowered so that a few dozen
positions cross several chunk boundaries and a group spans several channel blocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import skip_or_fail_in_ci

from wsi_pipe.nn import selective_scan, selective_scan_ref
from wsi_pipe.nn.mamba import SS2D, set_scan_backend

INNER = os.environ.get("WSI_PIPE_TRITON_INNER") == "1"
inner_only = pytest.mark.skipif(not INNER, reason="runs in the TRITON_INTERPRET=1 child process")


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def test_triton_kernels_in_interpreter():
    """Run this module's kernel tests in a child process with TRITON_INTERPRET=1 from the start."""
    if INNER:
        pytest.skip("this is the child process")
    if not _triton_importable():
        skip_or_fail_in_ci(
            "triton is not installed (pip install triton); the Triton scan is untested"
        )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", WSI_PIPE_TRITON_INNER="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__))],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton tests failed:\n{tail}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.split("passed")[0], tail


@pytest.fixture
def scan_triton(monkeypatch):
    import triton

    assert triton.knobs.runtime.interpret, "TRITON_INTERPRET=1 must be set before importing triton"
    import wsi_pipe.nn.scan_triton as module

    monkeypatch.setattr(module, "CHUNK", 8)
    monkeypatch.setattr(module, "BLOCK_D", 4)
    return module


def make_inputs(b, d, n, length, groups, full, seed=0, dtype=torch.float32, decay_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (b, n, length) if groups is None else (b, groups, n, length)
    t = {
        "u": torch.randn(b, d, length, generator=g),
        "delta": torch.randn(b, d, length, generator=g).abs() * 0.5 * decay_scale,
        "A": -torch.rand(d, n, generator=g) * 4 - 0.1,
        "B": torch.randn(*shape_bc, generator=g),
        "C": torch.randn(*shape_bc, generator=g),
    }
    if full:
        t["delta"] = torch.randn(b, d, length, generator=g) * 0.5
        t["D"] = torch.randn(d, generator=g)
        t["z"] = torch.randn(b, d, length, generator=g)
        t["delta_bias"] = torch.randn(d, generator=g) * 0.5
    for k in ("u", "delta", "z", "B", "C"):
        if k in t:
            t[k] = t[k].to(dtype)
    return {k: v.requires_grad_() for k, v in t.items()}


def assert_close_scaled(actual, expected, rel, what=""):
    scale = expected.detach().float().abs().max().clamp_min(1e-6)
    err = (actual.detach().float() - expected.detach().float()).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x scale {scale:.3g}"


def outputs_and_grads(fn, t, softplus):
    y = fn(**t, delta_softplus=softplus)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    return y, dict(zip(t, torch.autograd.grad(y, list(t.values()), gy), strict=True))


CASES = [
    # b, d, n, length, groups, full (D, z, delta_bias + softplus)
    (2, 8, 4, 21, None, True),  # odd length over three chunks, two channel blocks
    (1, 12, 3, 13, 3, True),  # grouped B/C (3 groups of 4 channels), n padded 3 -> 4
    (1, 10, 2, 9, 2, False),  # no D / z / bias / softplus; 5 channels per group: masked lanes
]


@inner_only
@pytest.mark.parametrize("b,d,n,length,groups,full", CASES)
def test_triton_matches_sequential_fp32(scan_triton, b, d, n, length, groups, full):
    t = make_inputs(b, d, n, length, groups, full)
    y, g = outputs_and_grads(scan_triton.selective_scan_triton, t, full)
    y_ref, g_ref = outputs_and_grads(selective_scan_ref, t, full)
    assert y.shape == (b, d, length) and y.dtype == torch.float32
    assert_close_scaled(y, y_ref, 1e-5, "out")
    for k in t:
        assert g[k].shape == t[k].shape
        assert_close_scaled(g[k], g_ref[k], 1e-5, k)


@inner_only
def test_triton_extreme_decays_stay_finite_and_exact(scan_triton):
    """exp(-1000) decays: no overflow, no NaN in the recomputed backward."""
    t = make_inputs(1, 4, 4, 11, None, False, decay_scale=400.0)
    y, g = outputs_and_grads(scan_triton.selective_scan_triton, t, False)
    y_ref, g_ref = outputs_and_grads(selective_scan_ref, t, False)
    assert torch.isfinite(y).all()
    assert_close_scaled(y, y_ref, 1e-5, "out")
    for k in t:
        assert torch.isfinite(g[k]).all(), k
        assert_close_scaled(g[k], g_ref[k], 1e-5, k)


@inner_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_inputs_keep_a_float32_state(scan_triton, dtype):
    t = make_inputs(1, 8, 4, 10, 2, True, dtype=dtype)
    y, g = outputs_and_grads(scan_triton.selective_scan_triton, t, True)
    t32 = {k: v.detach().float().requires_grad_() for k, v in t.items()}
    y32 = selective_scan_ref(**t32, delta_softplus=True)
    assert y.dtype == dtype
    # same rounded values, float32 inside: one rounding of the output dtype apart
    assert_close_scaled(y, y32, torch.finfo(dtype).eps)
    for k in t:
        assert g[k].dtype == t[k].dtype and torch.isfinite(g[k].float()).all(), k


@inner_only
def test_triton_through_dispatch_and_mixer(scan_triton):
    torch.manual_seed(0)
    t = make_inputs(1, 4, 2, 6, None, True)
    y = selective_scan(**t, delta_softplus=True, backend="triton")
    assert_close_scaled(y, selective_scan_ref(**t, delta_softplus=True), 1e-5)
    m = SS2D(dim=4, d_state=2, expand=1.0, scan_backend="triton")
    x = torch.randn(1, 2, 3, 4)
    y_tr = m(x)
    gp_tr = torch.autograd.grad(y_tr.sum(), list(m.parameters()))
    set_scan_backend(m, "sequential")
    y_seq = m(x)
    gp_seq = torch.autograd.grad(y_seq.sum(), list(m.parameters()))
    assert_close_scaled(y_tr, y_seq, 1e-5)
    for a, b in zip(gp_tr, gp_seq, strict=True):
        assert_close_scaled(a, b, 1e-5)
