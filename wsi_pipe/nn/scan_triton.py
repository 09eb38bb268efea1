"""Selective scan in Triton (``backend="triton"``): forward and backward, no build step.

Same arguments and semantics as `wsi_pipe.nn.selective_scan.selective_scan_ref` (delta_bias,
delta_softplus, D skip, SiLU(z) gate, grouped B/C), with the float32 state of mamba-ssm's kernel
whatever the input dtype (fp32 / bf16 / fp16 in, the same dtype out).

One program owns ``BLOCK_D`` channels of one B/C group of one batch row and all n states
(padded to a power of two), and walks the sequence in chunks of ``CHUNK`` positions:

* forward: the recurrence in registers, fused with bias + softplus, D and the gate; it stores
  the state at the start of every chunk, (b, d, ceil(l / CHUNK), n) float32, and nothing else;
* backward: for each chunk from last to first, recompute its states from the stored chunk start
  into a (b, d, CHUNK + 1, n) scratch buffer, then run the adjoint recurrence
  G_t = C_t dy_t + exp(dt_{t+1} A) G_{t+1} backwards through it. Gradients of the per-group
  B, C and of the shared A, D, delta_bias are written as per-program partial sums (no atomics,
  deterministic) and reduced with torch.

Memory beyond inputs and outputs: O(b d n (l / CHUNK + CHUNK)). The kernels are compiled the
first time they run. With ``TRITON_INTERPRET=1`` (read when the kernels are first built, keyed
on its value) they run on CPU tensors through Triton's interpreter: that is how CI tests them.

This module imports triton at the top; `wsi_pipe.nn.selective_scan` imports it lazily.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

#: positions per chunk: a state is stored every CHUNK steps; the backward scratch is CHUNK long
CHUNK = 64
#: channels per program
BLOCK_D = 32


def _fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr,
    out_ptr, states_ptr,
    d, length, n, g, e, n_chunks,
    HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """u, delta, z, out: (b, d, l); A: (d, n); B, C: (b, g, n, l); D, bias: (d,) float32;
    states: (b, d, n_chunks, n) float32. Grid: (b * g * cdiv(e, BLOCK_D),)."""
    pid = tl.program_id(0)
    per_group = tl.cdiv(e, BLOCK_D)
    bi = pid // (g * per_group)
    gi = (pid // per_group) % g
    j = (pid % per_group) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = j < e
    c = gi * e + j  # (BLOCK_D,) channel index
    k = tl.arange(0, BLOCK_N)
    mask_n = k < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + c[:, None] * n + k[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    row = (bi * d + c) * length  # (BLOCK_D,) offset of position 0 of each channel
    bc_row = ((bi * g + gi) * n + k) * length  # (BLOCK_N,)
    st_row = ((bi * d + c) * n_chunks)[:, None] * n + k[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for ci in range(0, n_chunks):
        tl.store(states_ptr + st_row + ci * n, h, mask=mask_dn)
        t0 = ci * CHUNK
        m = tl.minimum(CHUNK, length - t0)
        for s in range(0, m):
            t = t0 + s
            uv = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            x = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                x = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
            Bt = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(x[:, None] * A) * h + (x * uv)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1) + Dv * uv
            if HAS_Z:
                zv = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * zv * tl.sigmoid(zv)
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)


def _bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, dout_ptr, states_ptr,
    hbuf_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    d, length, n, g, e, n_chunks,
    HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    """Backward of `_fwd_kernel`. hbuf: (b, d, CHUNK + 1, n) float32 scratch (slot 0 the
    chunk's start state, slot s + 1 the state after its step s); du, ddelta, dz:
    (b, d, l) in the input dtype; dA: (b, d, n), dD, dbias: (b, d), dB, dC:
    (b, g, per_group, n, l), all float32 partial sums (reduced over b / per_group by the caller).
    """
    pid = tl.program_id(0)
    per_group = tl.cdiv(e, BLOCK_D)
    bi = pid // (g * per_group)
    gi = (pid // per_group) % g
    blk = pid % per_group
    j = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = j < e
    c = gi * e + j
    k = tl.arange(0, BLOCK_N)
    mask_n = k < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    A = tl.load(A_ptr + c[:, None] * n + k[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    Dv = tl.load(D_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + c, mask=mask_d, other=0.0).to(tl.float32)
    row = (bi * d + c) * length
    bc_row = ((bi * g + gi) * n + k) * length
    part_row = (((bi * g + gi) * per_group + blk) * n + k) * length  # into dB / dC partials
    st_row = ((bi * d + c) * n_chunks)[:, None] * n + k[None, :]
    hb_row = ((bi * d + c) * (CHUNK + 1))[:, None] * n + k[None, :]
    carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # dL/dh_t from positions > t
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for rc in range(0, n_chunks):
        ci = n_chunks - 1 - rc
        t0 = ci * CHUNK
        m = tl.minimum(CHUNK, length - t0)
        h0 = tl.load(states_ptr + st_row + ci * n, mask=mask_dn, other=0.0)
        tl.store(hbuf_ptr + hb_row, h0, mask=mask_dn)  # slot 0: state before the chunk
        h = h0
        for s in range(0, m):  # recompute this chunk's states
            t = t0 + s
            uv = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            x = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                x = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
            Bt = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp(x[:, None] * A) * h + (x * uv)[:, None] * Bt[None, :]
            tl.store(hbuf_ptr + hb_row + (s + 1) * n, h, mask=mask_dn)
        tl.debug_barrier()
        for r in range(0, m):  # adjoint, last position first
            s = m - 1 - r
            t = t0 + s
            uv = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            xr = tl.load(delta_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32) + bias
            x = xr
            if SOFTPLUS:
                x = tl.where(xr > 20.0, xr, tl.log(1.0 + tl.exp(xr)))
            Bt = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            dy = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            ht = tl.load(hbuf_ptr + hb_row + (s + 1) * n, mask=mask_dn, other=0.0)
            hp = tl.load(hbuf_ptr + hb_row + s * n, mask=mask_dn, other=0.0)  # h_{t-1}
            if HAS_Z:
                zv = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                sz = tl.sigmoid(zv)
                y = tl.sum(ht * Ct[None, :], axis=1) + Dv * uv
                dz = dy * y * sz * (1.0 + zv * (1.0 - sz))
                tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                dy = dy * zv * sz
            dD_acc += dy * uv
            tl.store(dC_ptr + part_row + t, tl.sum(ht * dy[:, None], axis=0), mask=mask_n)
            G = carry + dy[:, None] * Ct[None, :]  # dL/dh_t
            decay = tl.exp(x[:, None] * A)
            xu = x * uv
            tl.store(dB_ptr + part_row + t, tl.sum(G * xu[:, None], axis=0), mask=mask_n)
            dxu = tl.sum(G * Bt[None, :], axis=1)  # dL/d(dt_t u_t)
            g_log = G * hp * decay  # dL/d(dt_t A)
            dx = dxu * uv + tl.sum(g_log * A, axis=1)
            dA_acc += g_log * x[:, None]
            carry = G * decay
            if SOFTPLUS:
                dx = dx * tl.sigmoid(xr)
            dbias_acc += dx
            du = dxu * x + dy * Dv
            tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            tl.store(ddelta_ptr + row + t, dx.to(ddelta_ptr.dtype.element_ty), mask=mask_d)
        tl.debug_barrier()
    tl.store(dA_ptr + (bi * d + c)[:, None] * n + k[None, :], dA_acc, mask=mask_dn)
    tl.store(dD_ptr + bi * d + c, dD_acc, mask=mask_d)
    tl.store(dbias_ptr + bi * d + c, dbias_acc, mask=mask_d)


_KERNELS: dict[bool, tuple[Any, Any]] = {}


def _kernels() -> tuple[Any, Any]:
    """(forward, backward) jitted for the current TRITON_INTERPRET mode, built on first use."""
    interpret = bool(triton.knobs.runtime.interpret)
    if interpret not in _KERNELS:
        _KERNELS[interpret] = (triton.jit(_fwd_kernel), triton.jit(_bwd_kernel))
        log.debug("triton selective-scan kernels built (interpret=%s)", interpret)
    return _KERNELS[interpret]


def _launch_dims(b: int, d: int, n: int, g: int) -> tuple[int, int, int, int]:
    e = d // g
    per_group = triton.cdiv(e, BLOCK_D)
    return e, per_group, b * g * per_group, max(triton.next_power_of_2(n), 2)


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        b, d, length = u.shape
        n, g = A.shape[1], B.shape[1]
        e, _, programs, block_n = _launch_dims(b, d, n, g)
        n_chunks = triton.cdiv(length, CHUNK)
        fwd, _ = _kernels()
        out = torch.empty_like(u)
        states = torch.empty(b, d, n_chunks, n, device=u.device, dtype=torch.float32)
        fwd[(programs,)](
            u, delta, A, B, C, D, delta_bias, z if z is not None else u, out, states,
            d, length, n, g, e, n_chunks,
            HAS_Z=z is not None, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=BLOCK_D, BLOCK_N=block_n, CHUNK=CHUNK,
        )  # fmt: skip
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, z, states)
        ctx.softplus = bool(delta_softplus)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        u, delta, A, B, C, D, delta_bias, z, states = ctx.saved_tensors
        b, d, length = u.shape
        n, g = A.shape[1], B.shape[1]
        e, per_group, programs, block_n = _launch_dims(b, d, n, g)
        _, bwd = _kernels()
        f32 = {"device": u.device, "dtype": torch.float32}
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dA = torch.empty(b, d, n, **f32)
        dD, dbias = torch.empty(b, d, **f32), torch.empty(b, d, **f32)
        dB = torch.empty(b, g, per_group, n, length, **f32)
        dC = torch.empty(b, g, per_group, n, length, **f32)
        hbuf = torch.empty(b, d, CHUNK + 1, n, **f32)
        bwd[(programs,)](
            u, delta, A, B, C, D, delta_bias, z if z is not None else u,
            dout.contiguous(), states, hbuf, du, ddelta, dz if dz is not None else du,
            dA, dD, dbias, dB, dC,
            d, length, n, g, e, states.shape[2],
            HAS_Z=z is not None, SOFTPLUS=ctx.softplus,
            BLOCK_D=BLOCK_D, BLOCK_N=block_n, CHUNK=CHUNK,
        )  # fmt: skip
        return (
            du,
            ddelta,
            dA.sum(0),
            dB.sum(2).to(B.dtype),
            dC.sum(2).to(C.dtype),
            dD.sum(0),
            dz,
            dbias.sum(0),
            None,
        )


def selective_scan_triton(
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
    """Triton selective scan with autograd; arguments and result as `selective_scan_ref`.

    u, delta, z: (b, d, l) fp32 / bf16 / fp16; A: (d, n); B, C: (b, n, l) or (b, g, n, l);
    D, delta_bias: (d,). Returns (b, d, l) in u's dtype; the state is float32. Tensors must be on
    CUDA, or on CPU with TRITON_INTERPRET=1 (tests).
    """
    from wsi_pipe.nn.selective_scan import _prepare_shapes

    _, d, _, _, _ = _prepare_shapes(u, delta, A, B, C)
    zeros = torch.zeros(d, device=u.device, dtype=torch.float32)
    B4 = B if B.dim() == 4 else B.unsqueeze(1)
    C4 = C if C.dim() == 4 else C.unsqueeze(1)
    out = _TritonScan.apply(
        u.contiguous(),
        delta.contiguous(),
        A.float().contiguous(),
        B4.contiguous(),
        C4.contiguous(),
        D.float().contiguous() if D is not None else zeros,
        z.contiguous() if z is not None else None,
        delta_bias.float().contiguous() if delta_bias is not None else zeros,
        delta_softplus,
    )
    return out
