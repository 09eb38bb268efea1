"""Forward-only selective scan for CPU inference, compiled with numba (``backend="numba"``).

Same semantics and arguments as `wsi_pipe.nn.selective_scan.selective_scan_ref`, but:

* no autograd (it is picked by ``auto`` only when autograd is off: ``torch.no_grad()``,
  ``torch.inference_mode()``), and
* no (b, d, l, n) or (b, d, T, n) state tensor: each worker keeps the float32 state of one block
  of ``_BLOCK`` channels x n states in a small local array and walks the sequence once, so memory
  is O(b * d * l) (the inputs and the output) whatever n is.

Layout: the kernel reads u, delta, z as (b, l, d) and B, C as (b, l, g, n) so that the innermost
loop runs over contiguous channels of one group (one SIMD lane per channel, B_t / C_t broadcast),
which LLVM vectorises; ``exp`` is a vectorisable Cody-Waite + degree-7 polynomial
(relative error < 3e-7 on [-87, 88]; decays below exp(-87) flush to 0, like float32 ``exp``).
The work is split over (batch, channel block) with ``numba.prange``; the thread count follows
``torch.get_num_threads()``.

numba is an optional dependency, imported lazily: `numba_scan_available()` says whether it
imports, and `selective_scan_numba` raises `KernelUnavailableError` when it does not.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from wsi_pipe.core.errors import KernelUnavailableError

log = logging.getLogger(__name__)

#: channels per work item; a multiple of the SIMD width (8 float32 lanes on AVX2)
_BLOCK = 16
#: positions per chunk copied into the worker's local (position, channel) buffers
_STEPS = 64


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """Compile (or load from numba's cache) the scan kernel; raises ImportError without numba."""
    import numba
    import numpy as np
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _i32_as_f32(typingctx, i):
        sig = types.float32(types.int32)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))

        return sig, codegen

    f32 = np.float32

    @numba.njit(inline="always", fastmath=True, error_model="numpy")
    def exp_f32(x):
        # exp(x) = 2^k * exp(r), r = x - k ln2 in [-ln2/2, ln2/2]; 2^k built from its bits
        xc = max(min(x, f32(88.0)), f32(-87.0))
        kf = np.floor(xc * f32(1.4426950408889634) + f32(0.5))
        r = xc - kf * f32(0.693145751953125)
        r = r - kf * f32(1.428606765330187e-06)
        p = f32(1.9875691500e-4)
        p = p * r + f32(1.3981999507e-3)
        p = p * r + f32(8.3334519073e-3)
        p = p * r + f32(4.1665795894e-2)
        p = p * r + f32(1.6666665459e-1)
        p = p * r + f32(5.0000001201e-1)
        p = p * r * r + r + f32(1.0)
        y = p * _i32_as_f32((np.int32(kf) + np.int32(127)) << np.int32(23))
        return y if x > f32(-87.0) else f32(0.0)

    @numba.njit(inline="always", fastmath=True, error_model="numpy")
    def log1p_small(y):
        # log(1 + y) for y in [0, 1]: 2 atanh(s), s = y / (2 + y) in [0, 1/3]; odd series to s^15
        s = y / (f32(2.0) + y)
        s2 = s * s
        p = f32(1.0 / 15.0)
        p = p * s2 + f32(1.0 / 13.0)
        p = p * s2 + f32(1.0 / 11.0)
        p = p * s2 + f32(1.0 / 9.0)
        p = p * s2 + f32(1.0 / 7.0)
        p = p * s2 + f32(1.0 / 5.0)
        p = p * s2 + f32(1.0 / 3.0)
        p = p * s2 + f32(1.0)
        return f32(2.0) * s * p

    block = _BLOCK  # compile-time constants: the channel loops unroll into SIMD vectors
    steps = _STEPS

    @numba.njit(parallel=True, fastmath=True, boundscheck=False, error_model="numpy", cache=True)
    def scan(u, delta, At, Bm, Cm, Dv, bias, z, has_z, softplus, out):
        """u, delta, z, out: (b, d, l); At: (n, d); Bm, Cm: (b, g, n, l); Dv, bias: (d,).

        All C-contiguous float32; out is written in place.
        """
        b, d, length = u.shape
        n = At.shape[0]
        g = Bm.shape[1]
        e = d // g
        per_group = (e + block - 1) // block
        items = b * g * per_group
        for item in numba.prange(items):
            bi = item // (g * per_group)
            gi = (item % (g * per_group)) // per_group
            j0 = (item % per_group) * block  # first channel of this block inside group gi
            c0 = gi * e + j0
            w = min(block, e - j0)  # lanes >= w are padding: A = dt = 0 keeps their state at 0
            h = np.zeros((n, block), dtype=np.float32)
            Ab = np.zeros((n, block), dtype=np.float32)
            Db = np.zeros(block, dtype=np.float32)
            bb = np.zeros(block, dtype=np.float32)
            for j in range(w):
                Db[j] = Dv[c0 + j]
                bb[j] = bias[c0 + j]
                for k in range(n):
                    Ab[k, j] = At[k, c0 + j]
            # one chunk of `steps` positions, transposed to (position, lane) in local buffers
            dtl = np.zeros((steps, block), dtype=np.float32)
            dul = np.zeros((steps, block), dtype=np.float32)
            yl = np.zeros((steps, block), dtype=np.float32)
            ul = np.zeros((steps, block), dtype=np.float32)
            zl = np.zeros((steps, block), dtype=np.float32)
            Bl = np.empty((steps, n), dtype=np.float32)
            Cl = np.empty((steps, n), dtype=np.float32)
            acc = np.empty(block, dtype=np.float32)
            for t0 in range(0, length, steps):
                m = min(steps, length - t0)
                # gather raw values (lanes >= w stay 0), then one SIMD pass over (position, lane)
                for j in range(w):
                    for s in range(m):
                        dtl[s, j] = delta[bi, c0 + j, t0 + s]
                        ul[s, j] = u[bi, c0 + j, t0 + s]
                        if has_z:
                            zl[s, j] = z[bi, c0 + j, t0 + s]
                for s in range(m):
                    for j in range(block):
                        x = dtl[s, j] + bb[j]
                        if softplus:  # log(1 + e^x), no overflow for large x
                            x = max(x, f32(0.0)) + log1p_small(exp_f32(-abs(x)))
                        dtl[s, j] = x
                        dul[s, j] = x * ul[s, j]
                        yl[s, j] = Db[j] * ul[s, j]
                for k in range(n):
                    for s in range(m):
                        Bl[s, k] = Bm[bi, gi, k, t0 + s]
                        Cl[s, k] = Cm[bi, gi, k, t0 + s]
                for s in range(m):
                    for j in range(block):
                        acc[j] = f32(0.0)
                    for k in range(n):
                        bk = Bl[s, k]
                        ck = Cl[s, k]
                        for j in range(block):
                            v = exp_f32(dtl[s, j] * Ab[k, j]) * h[k, j] + dul[s, j] * bk
                            h[k, j] = v
                            acc[j] += v * ck
                    for j in range(block):
                        yl[s, j] += acc[j]
                if has_z:
                    for s in range(m):
                        for j in range(block):
                            zv = zl[s, j]
                            yl[s, j] = yl[s, j] * zv / (f32(1.0) + exp_f32(-zv))
                for j in range(w):
                    for s in range(m):
                        out[bi, c0 + j, t0 + s] = yl[s, j]

    @numba.njit(parallel=True, fastmath=True, boundscheck=False, error_model="numpy", cache=True)
    def cross_scan(x, delta, At, xdbl, r, Dv, bias, height, width, out):
        """Four-direction scan of a (height, width) grid, summed back onto the grid.

        x: (b, e, L) row-major grid; out: (b, L, e) (channels last); delta: (b, 4, e, L); At: (n, 4 e); xdbl:
        (b, 4, r + 2n, L) whose rows r.. r+n-1 are B and r+n.. r+2n-1 are C; Dv, bias: (4 e,);
        all indexed by row-major position. Direction k walks
        the positions row-major (k=0), column-major (1), and both reversed (2, 3); delta is
        passed through softplus. All C-contiguous float32; out is written in place.
        """
        b, e, length = x.shape
        n = At.shape[0]
        per_group = (e + block - 1) // block
        items = b * per_group
        for item in numba.prange(items):
            bi = item // per_group
            j0 = (item % per_group) * block
            w = min(block, e - j0)
            h = np.zeros((n, block), dtype=np.float32)
            Ab = np.zeros((n, block), dtype=np.float32)
            Db = np.zeros(block, dtype=np.float32)
            bb = np.zeros(block, dtype=np.float32)
            dtl = np.zeros((steps, block), dtype=np.float32)
            dul = np.zeros((steps, block), dtype=np.float32)
            yl = np.zeros((steps, block), dtype=np.float32)
            Bl = np.empty((steps, n), dtype=np.float32)
            Cl = np.empty((steps, n), dtype=np.float32)
            ul = np.zeros((steps, block), dtype=np.float32)
            pos = np.empty(steps, dtype=np.int64)
            acc = np.empty(block, dtype=np.float32)
            for kd in range(4):
                for j in range(block):
                    Db[j] = f32(0.0)
                    bb[j] = f32(0.0)
                    for k in range(n):
                        h[k, j] = f32(0.0)
                        Ab[k, j] = f32(0.0)
                for j in range(w):
                    c = kd * e + j0 + j
                    Db[j] = Dv[c]
                    bb[j] = bias[c]
                    for k in range(n):
                        Ab[k, j] = At[k, c]
                for t0 in range(0, length, steps):
                    m = min(steps, length - t0)
                    for s in range(m):
                        t = t0 + s if kd < 2 else length - 1 - t0 - s
                        if kd % 2 == 1:  # column-major: t -> (row t % height, column t // height)
                            t = (t % height) * width + t // height
                        pos[s] = t
                    # gather raw values (lanes >= w stay 0), then one SIMD pass
                    for j in range(w):
                        for s in range(m):
                            dtl[s, j] = delta[bi, kd, j0 + j, pos[s]]
                            ul[s, j] = x[bi, j0 + j, pos[s]]
                    for s in range(m):
                        for j in range(block):
                            xv = dtl[s, j] + bb[j]
                            xv = max(xv, f32(0.0)) + log1p_small(exp_f32(-abs(xv)))
                            dtl[s, j] = xv
                            dul[s, j] = xv * ul[s, j]
                            yl[s, j] = Db[j] * ul[s, j]
                    for k in range(n):
                        for s in range(m):
                            Bl[s, k] = xdbl[bi, kd, r + k, pos[s]]
                            Cl[s, k] = xdbl[bi, kd, r + n + k, pos[s]]
                    for s in range(m):
                        for j in range(block):
                            acc[j] = f32(0.0)
                        for k in range(n):
                            bk = Bl[s, k]
                            ck = Cl[s, k]
                            for j in range(block):
                                v = exp_f32(dtl[s, j] * Ab[k, j]) * h[k, j] + dul[s, j] * bk
                                h[k, j] = v
                                acc[j] += v * ck
                        for j in range(block):
                            yl[s, j] += acc[j]
                    for s in range(m):
                        orow = out[bi, pos[s]]
                        if kd == 0:
                            for j in range(w):
                                orow[j0 + j] = yl[s, j]
                        else:
                            for j in range(w):
                                orow[j0 + j] += yl[s, j]

    return scan, cross_scan


@functools.lru_cache(maxsize=1)
def numba_scan_available() -> bool:
    """True when numba imports and the CPU inference kernel compiles."""
    try:
        _kernel()
    except Exception as e:  # ImportError, or a numba/llvmlite build that cannot compile
        log.debug("numba CPU scan unavailable: %s: %s", type(e).__name__, e)
        return False
    return True


def selective_scan_numba(
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
    """Forward-only compiled CPU scan; arguments and result as `selective_scan_ref`.

    u, delta, z: (b, d, l); A: (d, n); B, C: (b, n, l) or (b, g, n, l); D, delta_bias: (d,).
    Returns (b, d, l) in u's dtype (a transposed view of a (b, l, d) buffer). Raises
    `KernelUnavailableError` for CUDA tensors, without numba, or when a gradient is required.
    """
    if u.device.type != "cpu":
        raise KernelUnavailableError(
            f"scan_backend='numba' runs on CPU tensors only, got tensors on {u.device}; "
            "use scan_backend='auto'"
        )
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)
    ):
        raise KernelUnavailableError(
            "scan_backend='numba' is forward-only (no autograd); run it under torch.no_grad() / "
            "torch.inference_mode(), or use scan_backend='auto' (which trains with 'torch')"
        )
    try:
        kernel, _ = _kernel()
    except Exception as e:
        raise KernelUnavailableError(
            f"scan_backend='numba' needs numba ({type(e).__name__}: {e}); `pip install numba` "
            "or use scan_backend='torch' (same weights and results)"
        ) from e
    from wsi_pipe.nn.selective_scan import _prepare_shapes

    b, d, length, n, g = _prepare_shapes(u, delta, A, B, C)

    def f32c(x: torch.Tensor) -> torch.Tensor:
        return x.detach().float().contiguous()  # no copy for float32 contiguous inputs

    with torch.no_grad():
        zeros = u.new_zeros(d, dtype=torch.float32)
        u_c = f32c(u)
        out = torch.empty(b, d, length, dtype=torch.float32)
        _set_numba_threads()
        kernel(
            u_c.numpy(),
            f32c(delta).numpy(),
            f32c(A.t()).numpy(),
            f32c(B if B.dim() == 4 else B.unsqueeze(1)).numpy(),
            f32c(C if C.dim() == 4 else C.unsqueeze(1)).numpy(),
            (f32c(D) if D is not None else zeros).numpy(),
            (f32c(delta_bias) if delta_bias is not None else zeros).numpy(),
            (f32c(z) if z is not None else u_c).numpy(),
            z is not None,
            bool(delta_softplus),
            out.numpy(),
        )
    return out.to(u.dtype)


def _set_numba_threads() -> None:
    """Run numba's parallel loops on torch's thread count (capped by numba's own pool)."""
    import numba

    cap = int(getattr(numba.config, "NUMBA_NUM_THREADS", 1))
    numba.set_num_threads(max(1, min(torch.get_num_threads(), cap)))


def cross_scan_numba(
    x: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    x_dbl: torch.Tensor,
    dt_rank: int,
    D: torch.Tensor,
    delta_bias: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Forward-only fused four-direction scan of a grid (VMamba's cross-scan + scan + merge).

    Equals ``merge_grid_sequences(selective_scan(grid_sequences(x), ...))`` of
    `wsi_pipe.nn.mamba.DirectionalScan` with softplus on, but reads every direction straight from
    the row-major grid (no flipped / transposed copies) and sums the directions in place.
    x: (b, e, height * width) row-major; delta: (b, 4, e, height * width); x_dbl:
    (b, 4, dt_rank + 2 n, height * width), the x_proj output whose last 2 n rows are B then C
    (read in place, no split copies); both indexed by row-major position (the projections are
    per position, so they need no reordering); A: (4 e, n); D, delta_bias: (4 e,).
    Returns (b, height * width, e) float32, channels last: the callers' next steps (LayerNorm
    over channels) want that layout, so a transposed view of it costs no copy.
    """
    if x.device.type != "cpu":
        raise KernelUnavailableError(f"cross_scan_numba runs on CPU tensors, got {x.device}")
    try:
        _, kernel = _kernel()
    except Exception as err:
        raise KernelUnavailableError(f"cross_scan_numba needs numba ({err})") from err
    b, e, length = x.shape
    if height * width != length or delta.shape != (b, 4, e, length):
        raise ValueError(
            f"x must be (b, e, {height}*{width}) and delta (b, 4, e, L); got "
            f"{tuple(x.shape)}, {tuple(delta.shape)}"
        )

    def f32c(t: torch.Tensor) -> torch.Tensor:
        return t.detach().float().contiguous()

    with torch.no_grad():
        out = torch.empty(b, length, e, dtype=torch.float32)
        _set_numba_threads()
        kernel(
            f32c(x).numpy(),
            f32c(delta).numpy(),
            f32c(A.t()).numpy(),
            f32c(x_dbl).numpy(),
            dt_rank,
            f32c(D).numpy(),
            f32c(delta_bias).numpy(),
            height,
            width,
            out.numpy(),
        )
    return out
