"""Selective scan (the S6 recurrence of Mamba) with three interchangeable backends.

Semantics are those of `selective_scan_ref` in state-spaces/mamba
(`mamba_ssm/ops/selective_scan_interface.py`), real-valued A only:

    delta' = softplus(delta + delta_bias)            (bias and softplus optional)
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t      h_{-1} = 0, per (b, d, n)
    y_t    = <C_t, h_t>_n + D * u_t
    out    = y * silu(z)                              (when z is given)

Shapes: u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or grouped (b, g, n, l) with d % g == 0
(channel block i of size d/g uses group i); D, delta_bias: (d,). Internally everything is computed
in float32 and the output is cast back to u's dtype, like the reference.

Backends (weights are the same whichever runs; only speed and memory differ):

* ``"sequential"``: `selective_scan_ref`, a Python loop over l. The test oracle.
* ``"torch"``: pure PyTorch, parallel, with autograd; always available. The sequence is cut into
  chunks of T steps; inside a chunk the recurrence is solved by a log-depth (Brent-Kung) scan
  that only multiplies decays (all <= 1) and adds, so it never exponentiates a positive number
  and cannot overflow; the state is carried from chunk to chunk by a loop of l/T iterations.
  Large inputs run each chunk under a custom backward that recomputes the chunk, so a backward
  pass keeps only (b, d, n) per chunk instead of (b, d, l, n) tensors: a (1, 256, 100_000)
  scan with n=16 trains in a few hundred MB.
* ``"numba"``: forward-only compiled CPU scan (`wsi_pipe.nn.scan_cpu`, needs numba): a loop
  over (batch, channel block) with a float32 state in registers and no (b, d, l, n) tensor.
  For inference (extract, predict, heatmap, anomaly scoring) on CPU.
* ``"triton"``: Triton kernels, forward and backward (`wsi_pipe.nn.scan_triton`, needs triton
  and a CUDA device, or ``TRITON_INTERPRET=1`` on CPU for tests); no build step.
* ``"cuda"``: mamba-ssm's fused kernel `selective_scan_fn` (extra ``wsi-pipe[gpu]``), imported
  lazily; raises `KernelUnavailableError` when it cannot be used.
* ``"auto"``: on CUDA tensors ``cuda`` when mamba-ssm imports, else ``triton`` when triton
  imports, else ``torch``; on CPU ``numba`` when autograd is off (``torch.no_grad()`` /
  ``torch.inference_mode()``) and numba imports, else ``torch``. Each choice is logged once per
  process.

Tolerances (tests/test_scan.py): every backend keeps a float32 state, so with fp32 inputs they
agree with the sequential reference to ~1e-6 of the output scale (asserted at 1e-5).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

from wsi_pipe.core.errors import KernelUnavailableError

log = logging.getLogger(__name__)

ScanBackend = Literal["auto", "torch", "numba", "triton", "cuda", "sequential"]
SCAN_BACKENDS: tuple[str, ...] = ("auto", "torch", "numba", "triton", "cuda", "sequential")

#: torch.profiler label of every scan call ("<label>.<backend>"); scripts/bench_encoder.py sums it
PROFILE_LABEL = "wsi_pipe.selective_scan"
#: chunk length of the torch backend when the caller does not pick one
DEFAULT_CHUNK = 256
#: elements of one (b, d, T, n) chunk tensor above which the chunk length is reduced
_CHUNK_ELEMENT_BUDGET = 1 << 20

# log de-dup cache: which (requested, chosen, reason) lines were already logged in this process
_LOGGED_CHOICES: set[tuple[str, str, str]] = set()

_GPU_FIX = (
    "install the GPU extra on a CUDA machine (`pip install 'wsi-pipe[gpu]'` builds mamba-ssm "
    "against the local torch; set TORCH_CUDA_ARCH_LIST to your GPU, e.g. 9.0) or use "
    "scan_backend='torch' (pure PyTorch, same weights and results)"
)


# ------------------------------------------------------------------------------------ helpers
def _prepare_shapes(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Validate the shapes of a scan's inputs; return (b, d, l, n, g) (g = 1 for (b, n, l) B/C)."""
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(
            f"u and delta must both be (b, d, l); got {tuple(u.shape)}, {tuple(delta.shape)}"
        )
    if A.is_complex():
        raise ValueError("complex A is not supported; pass a real (d, n) A")
    b, d, length = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d={d}, n); got {tuple(A.shape)}")
    n = A.shape[1]
    groups = []
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 3:
            M = M.unsqueeze(1)
        if M.dim() != 4 or M.shape[0] != b or M.shape[2] != n or M.shape[3] != length:
            raise ValueError(
                f"{name} must be (b={b}, n={n}, l={length}) or (b, g, n, l); got {tuple(M.shape)} "
                "(a time-invariant (d, n) B/C is not supported)"
            )
        if d % M.shape[1]:
            raise ValueError(f"{name} has {M.shape[1]} groups, which do not divide d={d}")
        groups.append(M.shape[1])
    if groups[0] != groups[1]:
        raise ValueError(
            f"B and C must have the same number of groups; got {groups[0]}, {groups[1]}"
        )
    return b, d, length, n, groups[0]


def _prepare(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Validate shapes; return float32 u, delta (bias+softplus applied), A, and B, C as (b,g,n,l)."""
    _, _, _, n, _ = _prepare_shapes(u, delta, A, B, C)
    Bg = (B if B.dim() == 4 else B.unsqueeze(1)).float()
    Cg = (C if C.dim() == 4 else C.unsqueeze(1)).float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.float(), delta, A.float(), Bg, Cg, n


def _finish(
    y: torch.Tensor,
    u: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


# --------------------------------------------------------------------------- sequential oracle
def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Sequential reference: one Python step per position. Slow; the test oracle.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    Returns (b, d, l) in u's dtype.
    """
    dtype_in = u.dtype
    uf, dt, Af, Bg, Cg, n = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, length = uf.shape
    g = Bg.shape[1]
    # (b, g, d/g, ...) views so that channel block i reads group i of B and C
    dt4 = dt.view(b, g, d // g, length)
    du4 = (dt * uf).view(b, g, d // g, length)
    A3 = Af.view(g, d // g, n)
    h = uf.new_zeros(b, g, d // g, n)
    ys = []
    for t in range(length):
        decay = torch.exp(dt4[..., t, None] * A3)
        h = decay * h + du4[..., t, None] * Bg[:, :, None, :, t]
        ys.append((h * Cg[:, :, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(b, d, length)
    return _finish(y, uf, D, z, dtype_in)


# ------------------------------------------------------------------------ chunked parallel scan
# The torch backend works sequence-major: (l, b, g, e[, n]) with e = d / g, so that every slice
# along the sequence is one contiguous block of b*g*e*n numbers (fast elementwise kernels).


def _affine_scan_(a: torch.Tensor, x: torch.Tensor) -> None:
    """In-place inclusive scan of the affine maps h -> a_t * h + x_t along dim 0.

    a, x: (T, ...). Afterwards x[t] is the state after step t from a zero start and a[t] the
    product of the decays up to t. Brent-Kung (work-efficient) order: an up-sweep and a
    down-sweep of log2(T) levels each; it only multiplies decays (<= 1) and adds, so it
    cannot overflow.
    """
    T = x.shape[0]
    stride = 1
    while stride < T:  # up-sweep: position i = k*2s - 1 absorbs i - s
        tgt = slice(2 * stride - 1, None, 2 * stride)
        src = slice(stride - 1, T - stride, 2 * stride)
        x[tgt].addcmul_(a[tgt], x[src])
        a[tgt].mul_(a[src])
        stride *= 2
    stride //= 2
    while stride >= 1:  # down-sweep: position i = k*2s + s - 1 absorbs the full prefix at i - s
        tgt = slice(3 * stride - 1, None, 2 * stride)
        src = slice(2 * stride - 1, T - stride, 2 * stride)
        x[tgt].addcmul_(a[tgt], x[src])
        a[tgt].mul_(a[src])
        stride //= 2


def _chunk_states(
    du: torch.Tensor,
    dt: torch.Tensor,
    A3: torch.Tensor,
    Bc: torch.Tensor,
    h0: torch.Tensor,
    keep_decay: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """States of one chunk. du, dt: (T, b, g, e); A3: (g, e, n); Bc: (T, b, g, n); h0: (b, g, e, n).

    Returns h: (T, b, g, e, n), the state after each step, and (if `keep_decay`) the per-step
    decays (same shape; the backward pass needs them, the forward pass does not).
    """
    decay = (dt[..., None] * A3).exp_()  # (T, b, g, e, n), in (0, 1]
    h = du[..., None] * Bc[:, :, :, None, :]
    cum = decay.clone() if keep_decay else decay
    _affine_scan_(cum, h)
    h.addcmul_(cum, h0)
    return h, (decay if keep_decay else None)


def _contract_n(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_n x[t,b,g,e,n] * v[t,b,g,n] -> (t, b, g, e), as one batched matmul."""
    t, b, g, e, n = x.shape
    return torch.bmm(x.reshape(t * b * g, e, n), v.reshape(t * b * g, n, 1)).view(t, b, g, e)


def _contract_e(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_e x[t,b,g,e,n] * w[t,b,g,e] -> (t, b, g, n), as one batched matmul."""
    t, b, g, e, n = x.shape
    return torch.bmm(w.reshape(t * b * g, 1, e), x.reshape(t * b * g, e, n)).view(t, b, g, n)


class _ChunkedScan(torch.autograd.Function):
    """y[t] = <C_t, h_t>_n with h_t = exp(dt_t A) h_{t-1} + du_t B_t, chunk by chunk (sequence-major).

    Forward keeps only the state at each chunk boundary; backward recomputes a chunk's states
    and solves the adjoint recurrence G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1} with the same
    scan on the reversed chunk, so memory is O(b*d*n*(T + l/T)) instead of O(b*d*n*l).
    """

    @staticmethod
    def forward(ctx, du, dt, A3, Bl, Cl, T):
        # the scan is float32 by design: keep autocast from lowering the batched matmuls
        with torch.autocast(du.device.type, enabled=False):
            return _ChunkedScan._forward(ctx, du, dt, A3, Bl, Cl, T)

    @staticmethod
    def _forward(ctx, du, dt, A3, Bl, Cl, T):
        length = du.shape[0]
        h = du.new_zeros(*du.shape[1:], A3.shape[-1])
        y = du.new_empty(du.shape)
        boundaries = []
        for s in range(0, length, T):
            sl = slice(s, min(s + T, length))
            boundaries.append(h)
            hs, _ = _chunk_states(du[sl], dt[sl], A3, Bl[sl], h, keep_decay=False)
            h = hs[-1].clone()
            y[sl] = _contract_n(hs, Cl[sl])
            del hs
        ctx.save_for_backward(du, dt, A3, Bl, Cl, torch.stack(boundaries))
        ctx.T = T
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _ChunkedScan._backward(ctx, dy.float())

    @staticmethod
    def _backward(ctx, dy):
        du, dt, A3, Bl, Cl, boundaries = ctx.saved_tensors
        T = ctx.T
        length = du.shape[0]
        dy = dy.contiguous()
        d_du, d_dt = torch.empty_like(du), torch.empty_like(dt)
        dB, dC = torch.empty_like(Bl), torch.empty_like(Cl)
        dA3 = torch.zeros_like(A3)
        carry = torch.zeros_like(boundaries[0])  # dL/dh at the end of this chunk, from later ones
        starts = list(range(0, length, T))
        for i in reversed(range(len(starts))):
            sl = slice(starts[i], min(starts[i] + T, length))
            h0 = boundaries[i]
            Ct = Cl[sl, :, :, None, :]
            dyc = dy[sl, ..., None]  # (t, b, g, e, 1)
            h, decay = _chunk_states(du[sl], dt[sl], A3, Bl[sl], h0)
            dC[sl] = _contract_e(h, dy[sl])
            # adjoint: G_t = C_t dy_t + decay_{t+1} G_{t+1}, scanned on the reversed chunk
            G = (Ct * dyc).flip(0)
            G[0] += carry
            rev_decay = torch.ones_like(decay)
            rev_decay[1:] = decay[1:].flip(0)
            _affine_scan_(rev_decay, G)
            del rev_decay
            G = G.flip(0)
            d_du[sl] = _contract_n(G, Bl[sl])
            dB[sl] = _contract_e(G, du[sl])
            carry = decay[0] * G[0]
            # d(dt*A)_t = G_t * h_{t-1} * decay_t  (h_{-1} = h0)
            h_prev = torch.cat((h0[None], h[:-1]), dim=0)
            del h
            g_log = G.mul_(h_prev).mul_(decay)
            del h_prev, decay
            d_dt[sl] = (g_log * A3).sum(-1)
            dA3 += torch.einsum("tbgen,tbge->gen", g_log, dt[sl])
        return d_du, d_dt, dA3, dB, dC, None


def _pick_chunk(b: int, d: int, n: int, length: int, chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return chunk
    t = DEFAULT_CHUNK
    while t > 16 and b * d * n * t > _CHUNK_ELEMENT_BUDGET:
        t //= 2
    return min(t, max(length, 1))


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
) -> torch.Tensor:
    """Pure-PyTorch chunked parallel scan; same arguments and result as `selective_scan_ref`.

    chunk: steps per chunk (None = 256, halved down to 16 while one (b, d, chunk, n) float32
    temporary would exceed 1M elements, to stay in cache). Peak extra memory is a few such
    temporaries plus one (b, d, n) state per chunk, whatever l is.
    """
    dtype_in = u.dtype
    uf, dt, Af, Bg, Cg, n = _prepare(u, delta, A, B, C, delta_bias, delta_softplus)
    b, d, length = uf.shape
    g = Bg.shape[1]
    e = d // g
    T = _pick_chunk(b, d, n, length, chunk)
    # sequence-major copies (one pass over (b, d, l) tensors, n times smaller than the states)
    du_l = (dt * uf).view(b, g, e, length).permute(3, 0, 1, 2).contiguous()
    dt_l = dt.view(b, g, e, length).permute(3, 0, 1, 2).contiguous()
    B_l = Bg.permute(3, 0, 1, 2).contiguous()
    C_l = Cg.permute(3, 0, 1, 2).contiguous()
    y_l = _ChunkedScan.apply(du_l, dt_l, Af.view(g, e, n), B_l, C_l, T)  # (l, b, g, e)
    y = y_l.permute(1, 2, 3, 0).reshape(b, d, length)
    return _finish(y, uf, D, z, dtype_in)


# -------------------------------------------------------------------------------- cuda kernel
#: stand-in for mamba-ssm's `selective_scan_fn` (same signature), set by `substitute_cuda_kernel`
_CUDA_KERNEL_OVERRIDE: Callable[..., torch.Tensor] | None = None


@contextlib.contextmanager
def substitute_cuda_kernel(fn: Callable[..., torch.Tensor]) -> Iterator[None]:
    """Run the ``cuda`` backend with `fn` in place of mamba-ssm's `selective_scan_fn`.

    `fn` takes `selective_scan_fn`'s arguments (u, delta, A, B, C, D, z, delta_bias,
    delta_softplus). Inside the block the ``cuda`` backend accepts tensors on any device and
    ``auto`` on CUDA counts mamba-ssm as importable, so the wrapper's reshapes, casts and
    grouped-B handling run in CI with e.g. `reference_selective_scan_fn`; only the compiled
    kernel itself needs a GPU. Not thread-safe; for tests and device checks.
    """
    global _CUDA_KERNEL_OVERRIDE
    previous, _CUDA_KERNEL_OVERRIDE = _CUDA_KERNEL_OVERRIDE, fn
    try:
        yield
    finally:
        _CUDA_KERNEL_OVERRIDE = previous


def reference_selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor:
    """`selective_scan_ref` behind `selective_scan_fn`'s signature and input contract.

    Checks what mamba-ssm's kernel checks before it runs (selective_scan.cpp): delta, B, C and z
    in u's dtype, A / D / delta_bias float32, unit stride along l, B/C as (b, n, l) or
    (b, g, n, l); then computes with the sequential reference.
    """
    if return_last_state:
        raise NotImplementedError("wsi-pipe never asks for the last state")
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            raise TypeError(f"selective_scan_fn: {name} is {t.dtype}, u is {u.dtype}")
    for name, t in (("A", A), ("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"selective_scan_fn: {name} must be float32, got {t.dtype}")
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"selective_scan_fn: {name} must have stride 1 along l")
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _import_cuda_scan() -> Callable[..., torch.Tensor]:
    if _CUDA_KERNEL_OVERRIDE is not None:
        return _CUDA_KERNEL_OVERRIDE
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # ImportError, or OSError/RuntimeError from a broken build
        raise KernelUnavailableError(
            f"scan_backend='cuda' needs mamba-ssm's selective_scan_fn, which failed to import "
            f"({type(e).__name__}: {e}); {_GPU_FIX}"
        ) from e
    return selective_scan_fn


def cuda_scan_available() -> bool:
    """True when CUDA is available and mamba-ssm's selective scan kernel imports."""
    if not torch.cuda.is_available():
        return False
    try:
        _import_cuda_scan()
    except KernelUnavailableError:
        return False
    return True


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """mamba-ssm's fused CUDA kernel; raises KernelUnavailableError on CPU or without mamba-ssm.

    Shapes as `selective_scan_ref`. The kernel wants delta, B, C, z in u's dtype, float32
    A / D / delta_bias and unit stride along l; this wrapper provides that (the cast and the
    copies are no-ops for the encoders' usual inputs).
    """
    _prepare_shapes(u, delta, A, B, C)
    if not u.is_cuda and _CUDA_KERNEL_OVERRIDE is None:
        raise KernelUnavailableError(
            f"scan_backend='cuda' needs CUDA tensors, got tensors on {u.device}; move the model to "
            "a GPU or use scan_backend='torch' (or 'auto')"
        )
    fn = _import_cuda_scan()

    def like_u(t: torch.Tensor) -> torch.Tensor:
        t = t.to(u.dtype)
        return t if t.stride(-1) == 1 else t.contiguous()

    def f32(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.float().contiguous()

    return fn(
        like_u(u),
        like_u(delta),
        A.float().contiguous(),
        like_u(B),
        like_u(C),
        f32(D),
        None if z is None else like_u(z),
        f32(delta_bias),
        delta_softplus,
    )


# ---------------------------------------------------------------------- numba / triton backends
def numba_scan_available() -> bool:
    """True when numba imports and the compiled CPU inference scan builds."""
    from wsi_pipe.nn.scan_cpu import numba_scan_available as available

    return available()


@functools.lru_cache(maxsize=1)
def triton_scan_available() -> bool:
    """True when triton imports (the kernels still need CUDA tensors, or TRITON_INTERPRET=1)."""
    try:
        import wsi_pipe.nn.scan_triton  # noqa: F401
    except Exception as e:  # ImportError, or a triton build that fails at import
        log.debug("triton scan unavailable: %s: %s", type(e).__name__, e)
        return False
    return True


def selective_scan_numba(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward-only compiled CPU scan; see `wsi_pipe.nn.scan_cpu.selective_scan_numba`."""
    from wsi_pipe.nn.scan_cpu import selective_scan_numba as fn

    return fn(*args, **kwargs)


def selective_scan_triton(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Triton scan with autograd; see `wsi_pipe.nn.scan_triton.selective_scan_triton`."""
    try:
        from wsi_pipe.nn.scan_triton import selective_scan_triton as fn
    except Exception as e:
        raise KernelUnavailableError(
            f"scan_backend='triton' needs triton, which failed to import ({type(e).__name__}: "
            f"{e}); `pip install triton` on a CUDA machine or use scan_backend='torch'"
        ) from e
    return fn(*args, **kwargs)


# ----------------------------------------------------------------------------------- dispatch
def resolve_scan_backend(
    backend: str, device: torch.device | str, grad_enabled: bool | None = None
) -> str:
    """The backend `selective_scan` runs for tensors on `device` ('torch', 'numba', ...).

    grad_enabled: whether autograd is recording (default: `torch.is_grad_enabled()`); on CPU
    ``auto`` picks the forward-only ``numba`` scan only when it is not.
    """
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; choose one of {SCAN_BACKENDS}")
    if backend != "auto":
        return backend
    device = torch.device(device)
    if device.type == "cuda":
        if cuda_scan_available():
            return _log_choice("auto", "cuda", "tensors on CUDA and mamba-ssm imports")
        if triton_scan_available():
            return _log_choice(
                "auto", "triton", "tensors on CUDA, mamba-ssm not importable, triton imports"
            )
        return _log_choice(
            "auto",
            "torch",
            "tensors on CUDA but neither mamba-ssm nor triton imports "
            "(pip install 'wsi-pipe[gpu]' or triton)",
        )
    if grad_enabled is None:
        grad_enabled = torch.is_grad_enabled()
    if device.type == "cpu" and not grad_enabled:
        if numba_scan_available():
            return _log_choice("auto", "numba", "CPU tensors, autograd off, numba imports")
        return _log_choice(
            "auto", "torch", "CPU tensors, autograd off, numba not importable (pip install numba)"
        )
    return _log_choice("auto", "torch", f"tensors on {device.type}, autograd on")


def _log_choice(requested: str, chosen: str, reason: str) -> str:
    key = (requested, chosen, reason)
    if key not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(key)
        log.info("selective scan backend %r -> %r (%s)", requested, chosen, reason)
    return chosen


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan with the semantics of mamba-ssm's `selective_scan_ref`.

    u: (b, d, l) input; delta: (b, d, l) step sizes; A: (d, n) real, normally negative;
    B, C: (b, n, l) or (b, g, n, l) input-dependent; D: (d,) skip; z: (b, d, l) gate;
    delta_bias: (d,) added to delta before the optional softplus.
    backend: 'auto' | 'torch' | 'numba' | 'triton' | 'cuda' | 'sequential' (module docstring).
    Returns out: (b, d, l) in u's dtype.
    """
    chosen = resolve_scan_backend(backend, u.device)
    fn = _BACKEND_FUNCTIONS[chosen]
    with torch.profiler.record_function(f"{PROFILE_LABEL}.{chosen}"):
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


_BACKEND_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "torch": selective_scan_torch,
    "numba": selective_scan_numba,
    "triton": selective_scan_triton,
    "cuda": selective_scan_cuda,
    "sequential": selective_scan_ref,
}
