"""Selective scan backends against the sequential reference; Mamba / SS2D mixers; gated attention.

Tolerances (documented in wsi_pipe/nn/selective_scan.py): every backend computes in float32, so
fp32 inputs agree with the sequential reference to ~1e-6 relative (asserted at 1e-5).

Half precision (bf16 / fp16 inputs, float32 state): `half_precision_bound` derives the tolerance
instead of picking one. Compared with a float32 run on the same (already rounded) values and the
same rounded cotangent, a half-precision output or gradient differs by
(1) its final rounding to the half dtype: at most the unit roundoff u = eps / 2 of that dtype
    (2^-8 for bf16, 2^-11 for fp16) relative to its magnitude, and
(2) the different float32 evaluation order of the two backends: each gradient element is a sum
    of at most m = b * l * d float32 terms (batch x sequence length x channels), whose rounding
    error is at most gamma_m = m u32 / (1 - m u32), u32 = 2^-24 (the standard summation bound),
    counted once per backend.
So |err| <= (u + 2 gamma_m) * max|reference|. The mamba-ssm kernel test on a GPU keeps its own
looser tolerance (different kernels, different exp implementations).

The `cuda` backend's wrapper (reshapes, casts, grouped B/C) runs in CI with
`reference_selective_scan_fn` (the sequential reference behind mamba-ssm's `selective_scan_fn`
signature and input checks) substituted for the kernel entry point.
"""

from __future__ import annotations

import importlib
import logging

import pytest
import torch

from wsi_pipe.core.errors import KernelUnavailableError
from wsi_pipe.nn import SS2D, GatedAttention, Mamba, selective_scan, selective_scan_ref
from wsi_pipe.nn.mamba import grid_sequences, merge_grid_sequences, set_scan_backend
from wsi_pipe.nn.selective_scan import (
    cuda_scan_available,
    reference_selective_scan_fn,
    resolve_scan_backend,
    selective_scan_torch,
    substitute_cuda_kernel,
)

# the package re-exports the function `selective_scan`, which shadows the submodule attribute
scan_module = importlib.import_module("wsi_pipe.nn.selective_scan")


def make_inputs(b, d, n, length, groups=None, full=True, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape_bc = (b, n, length) if groups is None else (b, groups, n, length)
    t = {
        "u": torch.randn(b, d, length, generator=g),
        "delta": torch.randn(b, d, length, generator=g) * 0.5,
        "A": -torch.rand(d, n, generator=g) * 4 - 0.1,
        "B": torch.randn(*shape_bc, generator=g),
        "C": torch.randn(*shape_bc, generator=g),
    }
    if full:
        t["D"] = torch.randn(d, generator=g)
        t["z"] = torch.randn(b, d, length, generator=g)
        t["delta_bias"] = torch.randn(d, generator=g) * 0.5
    else:
        t["delta"] = t["delta"].abs()  # no softplus: keep steps positive like real use
    for k in ("u", "delta", "z", "B", "C"):
        if k in t:
            t[k] = t[k].to(dtype)
    return {k: v.requires_grad_() for k, v in t.items()}


def run(fn, t, softplus, **kw):
    return fn(**t, delta_softplus=softplus, **kw)


def grads(y, t):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    return dict(zip(t, torch.autograd.grad(y, list(t.values()), gy), strict=True))


def assert_close_scaled(actual, expected, rel):
    scale = expected.detach().float().abs().max().clamp_min(1e-6)
    err = (actual.detach().float() - expected.detach().float()).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x scale {scale:.3g}"


CASES = [
    # b, d, n, length, groups, full(D, z, delta_bias + softplus), chunk
    (2, 8, 4, 77, None, True, 16),  # odd length, several chunks, last one partial
    (1, 6, 3, 5, None, True, 16),  # batch 1, shorter than one chunk
    (1, 4, 16, 1, None, False, None),  # single step
    (3, 8, 4, 64, 2, True, 16),  # grouped B/C, length a multiple of the chunk
    (2, 5, 2, 131, None, False, 32),  # no D/z/bias/softplus, prime length
    (1, 16, 8, 300, 4, True, None),  # default chunk
]


@pytest.mark.parametrize("b,d,n,length,groups,full,chunk", CASES)
def test_torch_scan_matches_sequential_fp32(b, d, n, length, groups, full, chunk):
    t = make_inputs(b, d, n, length, groups, full)
    y_ref = run(selective_scan_ref, t, full)
    y = run(selective_scan_torch, t, full, chunk=chunk)
    assert y.shape == (b, d, length) and y.dtype == torch.float32
    assert_close_scaled(y, y_ref, 1e-5)
    g_ref, g = grads(y_ref, t), grads(y, t)
    for k in t:
        assert_close_scaled(g[k], g_ref[k], 1e-5)


def test_chunk_length_does_not_change_results():
    t = make_inputs(2, 8, 4, 50, None, True)
    y0 = run(selective_scan_torch, t, True, chunk=7)
    y1 = run(selective_scan_torch, t, True, chunk=64)
    assert_close_scaled(y1, y0, 1e-6)
    g0, g1 = grads(y0, t), grads(y1, t)
    for k in t:
        assert_close_scaled(g1[k], g0[k], 1e-6)


def test_large_decay_is_stable():
    """Steps that decay the state by exp(-1000) must not overflow (no exp of positive sums)."""
    t = make_inputs(1, 4, 4, 40, None, False)
    with torch.no_grad():
        t["delta"].mul_(100.0)
    y_ref = run(selective_scan_ref, t, False)
    y = run(selective_scan_torch, t, False, chunk=16)
    assert torch.isfinite(y).all()
    assert_close_scaled(y, y_ref, 1e-5)
    for k, v in grads(y, t).items():
        assert torch.isfinite(v).all(), k


def half_precision_bound(dtype: torch.dtype, b: int, length: int, d: int) -> float:
    """Relative bound (to the max of the reference) derived in the module docstring."""
    unit_roundoff = torch.finfo(dtype).eps / 2
    m = b * length * d
    u32 = 2.0**-24
    gamma_m = m * u32 / (1 - m * u32)
    return unit_roundoff + 2 * gamma_m


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length", [45, 300])
def test_half_precision_within_derived_bound(dtype, length):
    b, d = 2, 8
    t = make_inputs(b, d, 4, length, None, True, dtype=dtype)
    y = run(selective_scan_torch, t, True, chunk=16)
    assert y.dtype == dtype
    # the float32 reference on the very same (rounded) values and the same rounded cotangent
    t32 = {k: v.detach().float().requires_grad_() for k, v in t.items()}
    y32 = run(selective_scan_ref, t32, True)
    bound = half_precision_bound(dtype, b, length, d)
    assert bound < 2 * torch.finfo(dtype).eps  # about one rounding of the dtype (was 0.2)
    assert_close_scaled(y, y32, bound)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    g = dict(zip(t, torch.autograd.grad(y, list(t.values()), gy), strict=True))
    g32 = dict(zip(t32, torch.autograd.grad(y32, list(t32.values()), gy.float()), strict=True))
    for k in t:
        assert g[k].dtype == t[k].dtype
        assert_close_scaled(g[k], g32[k], bound)


def test_dispatch_and_errors(caplog, monkeypatch):
    t = make_inputs(1, 4, 2, 9, None, True)
    monkeypatch.setattr(scan_module, "_LOGGED_CHOICES", set())
    with caplog.at_level(logging.INFO, logger="wsi_pipe.nn.selective_scan"):
        y_auto = run(selective_scan, t, True, backend="auto")
        run(selective_scan, t, True, backend="auto")
    choice_lines = [r for r in caplog.records if "backend" in r.getMessage()]
    assert len(choice_lines) == 1 and "'torch'" in choice_lines[0].getMessage()
    assert torch.equal(y_auto, run(selective_scan, t, True, backend="torch"))
    assert_close_scaled(run(selective_scan, t, True, backend="sequential"), y_auto, 1e-5)
    with pytest.raises(KernelUnavailableError, match="scan_backend='torch'"):
        run(selective_scan, t, True, backend="cuda")
    with pytest.raises(ValueError, match="unknown scan backend"):
        run(selective_scan, t, True, backend="fast")
    bad = dict(t, A=torch.randn(3, 2))
    with pytest.raises(ValueError, match="A must be"):
        run(selective_scan, bad, True)


def test_auto_order_on_cuda(monkeypatch):
    """auto on CUDA: mamba-ssm when it imports, else triton when it imports, else torch."""
    monkeypatch.setattr(scan_module, "_LOGGED_CHOICES", set())
    monkeypatch.setattr(scan_module, "cuda_scan_available", lambda: True)
    assert resolve_scan_backend("auto", "cuda") == "cuda"
    monkeypatch.setattr(scan_module, "cuda_scan_available", lambda: False)
    monkeypatch.setattr(scan_module, "triton_scan_available", lambda: True)
    assert resolve_scan_backend("auto", "cuda") == "triton"
    monkeypatch.setattr(scan_module, "triton_scan_available", lambda: False)
    assert resolve_scan_backend("auto", "cuda") == "torch"
    # training on CUDA follows the same order (all three have a backward)
    assert resolve_scan_backend("auto", "cuda", grad_enabled=True) == "torch"
    assert resolve_scan_backend("torch", "cuda") == "torch"


def test_auto_on_cpu_falls_back_to_torch_without_numba(caplog, monkeypatch):
    monkeypatch.setattr(scan_module, "_LOGGED_CHOICES", set())
    monkeypatch.setattr(scan_module, "numba_scan_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="wsi_pipe.nn.selective_scan"):
        assert resolve_scan_backend("auto", "cpu", grad_enabled=False) == "torch"
        assert resolve_scan_backend("auto", "cpu", grad_enabled=False) == "torch"
    lines = [r.getMessage() for r in caplog.records if "backend" in r.getMessage()]
    assert len(lines) == 1 and "numba not importable" in lines[0]
    t = make_inputs(1, 4, 2, 9, None, True)
    with torch.no_grad():
        y = run(selective_scan, t, True, backend="auto")
    assert_close_scaled(y, run(selective_scan_ref, t, True), 1e-5)


# --------------------------------------------------------- cuda backend's wrapper, kernel substituted
@pytest.mark.parametrize("groups", [None, 2])
def test_cuda_call_path_with_substituted_kernel(groups):
    """The cuda backend's casts / contiguity / grouped-B handling, with the sequential reference
    behind selective_scan_fn's signature in place of the compiled kernel."""
    t = make_inputs(2, 8, 4, 23, groups, True)
    with pytest.raises(KernelUnavailableError):  # without the substitute: CPU tensors refused
        run(selective_scan, t, True, backend="cuda")
    with substitute_cuda_kernel(reference_selective_scan_fn):
        y = run(selective_scan, t, True, backend="cuda")
        # non-contiguous B/C (as the encoders pass them: views of the x_proj output) and a
        # float32 delta with bf16 u: the wrapper must cast / copy them for the kernel
        tb = {k: v.detach().clone() for k, v in t.items()}
        tb["u"] = tb["u"].bfloat16()
        tb["B"] = tb["B"].transpose(-1, -2).contiguous().transpose(-1, -2)
        yb = run(selective_scan, tb, True, backend="cuda")
    y_t = run(selective_scan, t, True, backend="torch")
    assert_close_scaled(y, y_t, 1e-5)
    g, g_t = grads(y, t), grads(y_t, t)
    for k in t:
        assert_close_scaled(g[k], g_t[k], 1e-5)
    assert yb.dtype == torch.bfloat16 and torch.isfinite(yb.float()).all()
    # the stand-in enforces the kernel's input contract, so a wrapper regression fails here
    with pytest.raises(TypeError, match="delta"):
        reference_selective_scan_fn(
            tb["u"], t["delta"], t["A"], t["B"].bfloat16(), t["C"].bfloat16()
        )
    with pytest.raises(ValueError, match="stride"):
        reference_selective_scan_fn(
            t["u"].detach().transpose(1, 2).contiguous().transpose(1, 2),
            t["delta"], t["A"], t["B"], t["C"],
        )  # fmt: skip


def test_encoder_mixers_on_cuda_call_path_with_substituted_kernel():
    """The grouped-B call every encoder makes (DirectionalScan: B of shape (b, 4, n, l)) and the
    1-D Mamba mixer, through the cuda backend's wrapper on CPU."""
    torch.manual_seed(0)
    ss2d = SS2D(dim=8, d_state=4, scan_backend="torch")
    mixer = Mamba(d_model=8, d_state=4, scan_backend="torch")
    for module, x in ((ss2d, torch.randn(2, 3, 5, 8)), (mixer, torch.randn(2, 11, 8))):
        y_t = module(x)
        gp_t = torch.autograd.grad(y_t.square().sum(), list(module.parameters()))
        set_scan_backend(module, "cuda")
        with substitute_cuda_kernel(reference_selective_scan_fn):
            y_c = module(x)
            gp_c = torch.autograd.grad(y_c.square().sum(), list(module.parameters()))
        set_scan_backend(module, "torch")
        assert_close_scaled(y_c, y_t, 1e-5)
        for a, b in zip(gp_c, gp_t, strict=True):
            assert_close_scaled(a, b, 1e-5)


@pytest.mark.gpu
def test_cuda_kernel_matches_torch_scan():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not cuda_scan_available():
        pytest.skip("mamba-ssm is not installed (pip install 'wsi-pipe[gpu]')")
    t = {
        k: v.detach().cuda().requires_grad_()
        for k, v in make_inputs(2, 64, 16, 1000, None, True).items()
    }
    y_k = run(selective_scan, t, True, backend="cuda")
    y_t = run(selective_scan, t, True, backend="torch")
    assert_close_scaled(y_k, y_t, 1e-4)
    g_k, g_t = grads(y_k, t), grads(y_t, t)
    for k in t:
        assert_close_scaled(g_k[k], g_t[k], 1e-3)


# ------------------------------------------------------------------------------------- mixers
def test_mamba_mixer_backends_agree_and_is_causal():
    torch.manual_seed(0)
    m = Mamba(d_model=16, d_state=8, scan_backend="torch")
    x = torch.randn(2, 37, 16, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    set_scan_backend(m, "sequential")
    y_seq = m(x)
    assert_close_scaled(y, y_seq, 1e-5)
    gx, gx_seq = (torch.autograd.grad(v.square().sum(), x)[0] for v in (y, y_seq))
    assert_close_scaled(gx, gx_seq, 1e-5)
    # changing the future must not change the past
    x2 = x.detach().clone()
    x2[:, 20:] = torch.randn(2, 17, 16)
    with torch.no_grad():
        y2 = m(x2)
    assert torch.allclose(y2[:, :20], y_seq.detach()[:, :20], atol=1e-6)
    assert not torch.allclose(y2[:, 20:], y_seq.detach()[:, 20:], atol=1e-3)


def test_grid_sequences_roundtrip():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    seqs = grid_sequences(x)
    assert seqs.shape == (2, 4, 3, 20)
    assert torch.equal(seqs[:, 1, :, :4], x[:, :, :, 0])  # column-major walks down column 0
    assert torch.equal(seqs[:, 2], seqs[:, 0].flip(-1))
    assert torch.equal(merge_grid_sequences(seqs, 4, 5), 4 * x)


def test_ss2d_shapes_and_backends():
    torch.manual_seed(0)
    m = SS2D(dim=8, d_state=4, scan_backend="torch")
    x = torch.randn(2, 5, 7, 8)
    y = m(x)
    assert y.shape == x.shape
    with torch.no_grad():
        y_seq = set_scan_backend(m, "sequential")(x)
    assert_close_scaled(y, y_seq, 1e-5)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_gated_attention_masks_and_pools():
    torch.manual_seed(0)
    att = GatedAttention(dim=6, hidden=4)
    h = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    logits = att(h, mask)
    assert logits.shape == (2, 5) and torch.isinf(logits[0, 3:]).all()
    pooled, w = att.pool(h, logits)
    assert pooled.shape == (2, 6) and torch.allclose(w.sum(-1), torch.ones(2))
    # the masked bag equals the unpadded bag
    p0, _ = att.pool(h[0, :3], att(h[0, :3]))
    assert torch.allclose(pooled[0], p0, atol=1e-6)
    assert GatedAttention(6, 4, n_heads=3)(h[0]).shape == (5, 3)
