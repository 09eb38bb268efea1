"""The compiled CPU inference scan (numba) against the sequential reference, and its dispatch.

Parity 1e-5 of the output scale in fp32 (both keep a float32 state; the compiled kernel's exp is
a polynomial with < 3e-7 relative error). The first call compiles the kernels (numba caches
them in __pycache__ for later processes).
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch
from conftest import skip_or_fail_in_ci

from wsi_pipe.core.errors import KernelUnavailableError
from wsi_pipe.encoders import create_encoder
from wsi_pipe.nn import SS2D, Mamba, selective_scan, selective_scan_ref
from wsi_pipe.nn.mamba import DirectionalScan, set_scan_backend
from wsi_pipe.nn.selective_scan import resolve_scan_backend

scan_module = importlib.import_module("wsi_pipe.nn.selective_scan")

try:
    import numba  # noqa: F401
except ImportError:
    skip_or_fail_in_ci(
        "numba is not installed (pip install numba); the CPU inference scan is untested"
    )
    pytest.skip("numba is not installed", allow_module_level=True)

from wsi_pipe.nn.scan_cpu import selective_scan_numba  # noqa: E402


def make_inputs(b, d, n, length, groups, full, seed=0, decay_scale=1.0):
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
        t["delta"] = torch.randn(b, d, length, generator=g) * 3  # both softplus branches
        t["D"] = torch.randn(d, generator=g)
        t["z"] = torch.randn(b, d, length, generator=g)
        t["delta_bias"] = torch.randn(d, generator=g) * 0.5
    return t


def assert_close_scaled(actual, expected, rel, what=""):
    scale = expected.detach().float().abs().max().clamp_min(1e-6)
    err = (actual.detach().float() - expected.detach().float()).abs().max()
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel} x scale {scale:.3g}"


CASES = [
    # b, d, n, length, groups, full
    (2, 40, 4, 150, None, True),  # > one 64-position chunk, 40 channels: 16 + 16 + 8 lanes
    (1, 6, 3, 5, None, True),  # fewer channels than a SIMD block
    (3, 32, 16, 1, None, False),  # single step, no D / z / bias / softplus
    (2, 24, 8, 70, 4, True),  # grouped B/C, 6 channels per group
    (1, 12, 2, 131, 3, False),  # grouped, prime length, no extras
]


@pytest.mark.parametrize("b,d,n,length,groups,full", CASES)
def test_numba_matches_sequential_fp32(b, d, n, length, groups, full):
    t = make_inputs(b, d, n, length, groups, full)
    with torch.no_grad():
        y = selective_scan_numba(**t, delta_softplus=full)
        y_ref = selective_scan_ref(**t, delta_softplus=full)
    assert y.shape == (b, d, length) and y.dtype == torch.float32
    assert_close_scaled(y, y_ref, 1e-5)


def test_numba_extreme_decays_and_half_inputs():
    t = make_inputs(1, 16, 4, 40, None, False, decay_scale=400.0)  # exp(-1000)-size decays
    with torch.no_grad():
        y = selective_scan_numba(**t)
        assert torch.isfinite(y).all()
        assert_close_scaled(y, selective_scan_ref(**t), 1e-5)
        th = {k: (v.bfloat16() if k in ("u", "delta", "B", "C", "z") else v) for k, v in t.items()}
        yh = selective_scan_numba(**th)
        assert yh.dtype == torch.bfloat16
        assert_close_scaled(yh, selective_scan_ref(**th), torch.finfo(torch.bfloat16).eps)


def test_numba_refuses_gradients_and_cuda_tensors():
    t = {k: v.requires_grad_() for k, v in make_inputs(1, 4, 2, 5, None, True).items()}
    with pytest.raises(KernelUnavailableError, match="forward-only"):
        selective_scan_numba(**t, delta_softplus=True)
    with torch.no_grad():
        selective_scan_numba(**t, delta_softplus=True)  # fine without autograd


def test_auto_picks_numba_only_without_autograd(caplog, monkeypatch):
    monkeypatch.setattr(scan_module, "_LOGGED_CHOICES", set())
    t = make_inputs(1, 8, 4, 9, None, True)
    with caplog.at_level(logging.INFO, logger="wsi_pipe.nn.selective_scan"):
        assert resolve_scan_backend("auto", "cpu") == "torch"  # grad mode on: training path
        with torch.no_grad():
            assert resolve_scan_backend("auto", "cpu") == "numba"
            y = selective_scan(**t, delta_softplus=True)
            selective_scan(**t, delta_softplus=True)
        with torch.inference_mode():
            assert resolve_scan_backend("auto", "cpu") == "numba"
    lines = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert sum("'numba'" in m for m in lines) == 1  # logged once
    assert_close_scaled(y, selective_scan_ref(**t, delta_softplus=True), 1e-5)


@pytest.mark.parametrize("h,w", [(5, 7), (8, 8), (3, 1)])
def test_fused_four_direction_scan_matches_generic_path(h, w):
    """DirectionalScan's fused CPU path (no direction copies) equals the sequential generic path."""
    torch.manual_seed(0)
    m = DirectionalScan(20, d_state=4, scan_backend="auto")
    x = torch.randn(2, 20, h, w)
    with torch.no_grad():
        y = m(x)
        y_seq = set_scan_backend(m, "sequential")(x)
    assert_close_scaled(y, y_seq, 1e-5)


def test_mixers_and_encoder_inference_use_numba_and_agree():
    torch.manual_seed(0)
    mixer = Mamba(d_model=16, d_state=8, scan_backend="auto")
    ss2d = SS2D(dim=8, d_state=4, scan_backend="auto")
    for module, x in ((mixer, torch.randn(2, 37, 16)), (ss2d, torch.randn(2, 5, 6, 8))):
        with torch.inference_mode():
            y = module(x)
        set_scan_backend(module, "sequential")
        with torch.no_grad():
            y_seq = module(x)
        set_scan_backend(module, "auto")
        assert_close_scaled(y, y_seq, 1e-5)
    enc = create_encoder("ssmamba_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = enc(x)
        y_t = set_scan_backend(enc, "torch")(x)
    assert_close_scaled(y, y_t, 1e-5)
