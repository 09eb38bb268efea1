"""Mamba mixers: the 1-D selective-state-space mixer and its 2-D four-direction variant (SS2D).

`Mamba` follows the layout of mamba-ssm's `mamba_simple.Mamba` (in_proj -> causal depthwise
conv1d -> SiLU -> x_proj -> (dt, B, C) -> dt_proj -> selective scan with D skip and SiLU(z) gate
-> out_proj) so parameter names and initialisation match; the scan runs on any backend of
`wsi_pipe.nn.selective_scan` and the weights do not depend on which one.

`SS2D` is the VMamba-style 2-D selective scan used by the image encoders: one input projection,
a depthwise 3x3 conv, then K=4 scans of the token grid (row-major, column-major, and both
reversed), each with its own x_proj / dt_proj / A / D, run as one grouped scan and summed back
onto the grid. For CPU inference (the scan backend resolves to ``numba``) `DirectionalScan` runs a
fused kernel instead that walks the four directions in place (`scan_cpu.cross_scan_numba`): same
result, no direction copies.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_pipe.nn.selective_scan import (
    PROFILE_LABEL,
    SCAN_BACKENDS,
    resolve_scan_backend,
    selective_scan,
)

log = logging.getLogger(__name__)


def _check_backend(name: str) -> str:
    if name not in SCAN_BACKENDS:
        raise ValueError(f"unknown scan_backend {name!r}; choose one of {SCAN_BACKENDS}")
    return name


def init_dt_proj(
    dt_proj: nn.Linear,
    dt_rank: int,
    dt_min: float,
    dt_max: float,
    dt_init_floor: float,
    dt_scale: float = 1.0,
) -> None:
    """Mamba's dt initialisation: weights ~ U(+-dt_rank^-0.5), bias = softplus^-1(dt), dt log-uniform."""
    std = dt_rank**-0.5 * dt_scale
    nn.init.uniform_(dt_proj.weight, -std, std)
    d = dt_proj.out_features
    dt = torch.exp(torch.rand(d) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    with torch.no_grad():
        dt_proj.bias.copy_(inv_dt)
    # marker attributes on Parameters (read by the init / weight-decay code); Tensor's stubs
    # declare no such attributes
    dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]


def causal_depthwise_conv1d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_kernel: bool = True
) -> torch.Tensor:
    """Causal depthwise conv over the sequence followed by SiLU.

    x: (b, d, l); weight: (d, 1, k); bias: (d,) or None. Returns (b, d, l).
    Uses causal-conv1d's CUDA kernel when `use_kernel`, x is on CUDA and the package imports;
    otherwise a padded `F.conv1d` (identical maths).
    """
    if use_kernel and x.is_cuda:
        try:
            from causal_conv1d import causal_conv1d_fn
        except Exception:  # optional extra; the torch path below is always correct
            causal_conv1d_fn = None
        if causal_conv1d_fn is not None:
            return causal_conv1d_fn(x.contiguous(), weight.squeeze(1), bias, activation="silu")
    k = weight.shape[-1]
    y = F.conv1d(F.pad(x, (k - 1, 0)), weight, bias, groups=x.shape[1])
    return F.silu(y)


class Mamba(nn.Module):
    """Mamba (S6) mixer: (B, L, d_model) -> (B, L, d_model).

    d_state: SSM state size n; d_conv: causal conv width; expand: d_inner = expand * d_model;
    dt_rank: 'auto' = ceil(d_model / 16). scan_backend: one of SCAN_BACKENDS (see selective_scan)
    (may be changed at any time; it never changes the parameters).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = _check_backend(scan_backend)

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        init_dt_proj(self.dt_proj, self.dt_rank, dt_min, dt_max, dt_init_floor)
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # (d_inner, n); A = -exp(A_log)
        # marker attributes on Parameters (read by the init / weight-decay code); Tensor's stubs
        # declare no such attributes
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (B, L, d_model) -> (B, L, d_model)."""
        _, length, _ = hidden.shape
        xz = self.in_proj(hidden).transpose(1, 2)  # (B, 2E, L)
        x, z = xz.chunk(2, dim=1)
        x = causal_depthwise_conv1d(x, self.conv1d.weight, self.conv1d.bias)[..., :length]
        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (B, E, L); bias goes in as delta_bias
        A = -torch.exp(self.A_log.float())
        y = selective_scan(
            x,
            dt,
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return self.out_proj(y.transpose(1, 2))


def grid_sequences(x: torch.Tensor) -> torch.Tensor:
    """The four scan orders of a token grid.

    x: (B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, reversed row-major,
    reversed column-major.
    """
    b, c, h, w = x.shape
    row = x.reshape(b, c, h * w)
    col = x.transpose(2, 3).reshape(b, c, h * w)
    fwd = torch.stack((row, col), dim=1)
    return torch.cat((fwd, fwd.flip(-1)), dim=1)


def merge_grid_sequences(y: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `grid_sequences`, summing the four directions: (B, 4, C, H*W) -> (B, C, H, W)."""
    b, _, c, _ = y.shape
    y = y[:, :2] + y[:, 2:].flip(-1)
    row = y[:, 0].reshape(b, c, h, w)
    col = y[:, 1].reshape(b, c, w, h).transpose(2, 3)
    return row + col


class DirectionalScan(nn.Module):
    """The K=4 directional selective scans of a feature grid, each direction with its own
    x_proj, dt_proj, A_log and D (VMamba's cross-scan / cross-merge):
    (B, E, H, W) -> (B, E, H, W), the four directions summed back onto the grid.
    """

    K = 4

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_inner = e = d_inner
        self.d_state = n = d_state
        self.dt_rank = r = math.ceil(d_inner / 32) if dt_rank == "auto" else int(dt_rank)
        self.scan_backend = _check_backend(scan_backend)
        k = self.K
        # per-direction projections, stored stacked: (K, R + 2N, E), (K, E, R) and (K, E)
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, e))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, e, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, e))
        for i in range(k):
            nn.init.kaiming_uniform_(self.x_proj_weight.data[i], a=math.sqrt(5))
            tmp = nn.Linear(r, e)
            init_dt_proj(tmp, r, dt_min, dt_max, dt_init_floor)
            self.dt_projs_weight.data[i] = tmp.weight.data
            self.dt_projs_bias.data[i] = tmp.bias.data
        A = torch.arange(1, n + 1, dtype=torch.float32).repeat(k * e, 1)
        self.A_logs = nn.Parameter(torch.log(A))  # (K*E, N)
        self.Ds = nn.Parameter(torch.ones(k * e))
        # marker attributes on Parameters (read by the init / weight-decay code); Tensor's stubs
        # declare no such attributes
        self.A_logs._no_weight_decay = True  # type: ignore[attr-defined]
        self.Ds._no_weight_decay = True  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, E, H, W) -> (B, E, H, W)."""
        b, e, h, w = x.shape
        length = h * w
        n, r, k = self.d_state, self.dt_rank, self.K
        if resolve_scan_backend(self.scan_backend, x.device) == "numba":
            return self._forward_fused_cpu(x)
        xs = grid_sequences(x)  # (B, K, E, L)
        x_dbl = torch.einsum("bkel,kce->bkcl", xs, self.x_proj_weight.to(xs.dtype))
        dts, Bs, Cs = torch.split(x_dbl, [r, n, n], dim=2)  # (B, K, R|N|N, L)
        dts = torch.einsum("bkrl,ker->bkel", dts, self.dt_projs_weight.to(dts.dtype))
        y = selective_scan(
            xs.reshape(b, k * e, length),
            dts.reshape(b, k * e, length),
            -torch.exp(self.A_logs.float()),
            Bs,  # (B, K, N, L): group i = direction i
            Cs,
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return merge_grid_sequences(y.reshape(b, k, e, length), h, w)

    def _forward_fused_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """CPU inference: the projections on the row-major grid, then one fused numba kernel
        that walks the four directions in place (no direction copies). Same result as the
        generic path; (B, E, H, W) -> (B, E, H, W) in x's dtype."""
        from wsi_pipe.nn.scan_cpu import cross_scan_numba

        b, e, h, w = x.shape
        r, k = self.dt_rank, self.K
        xg = x.reshape(b, e, h * w).float()
        # per-position projections of all four directions, as plain contiguous matmuls:
        # (K (R + 2N), E) @ (B, E, L) -> (B, K, R + 2N, L); (K, E, R) @ (B, K, R, L) -> (B, K, E, L)
        x_dbl = torch.matmul(self.x_proj_weight.float().reshape(-1, e), xg).view(b, k, -1, h * w)
        dts = torch.matmul(self.dt_projs_weight.float(), x_dbl[:, :, :r])
        with torch.profiler.record_function(f"{PROFILE_LABEL}.numba_cross"):
            y = cross_scan_numba(
                xg,
                dts,
                -torch.exp(self.A_logs.float()),
                x_dbl,
                r,
                self.Ds.float(),
                self.dt_projs_bias.reshape(-1).float(),
                h,
                w,
            )
        # (B, L, E) channels last -> a (B, E, H, W) view with channels-last strides, no copy
        return y.view(b, h, w, e).permute(0, 3, 1, 2).to(x.dtype)


class SS2D(nn.Module):
    """Four-direction 2-D selective scan (VMamba's SS2D): (B, H, W, dim) -> (B, H, W, dim).

    in_proj -> (x, z); x: depthwise 3x3 conv + SiLU -> `DirectionalScan` -> LayerNorm
    -> * SiLU(z) -> out_proj.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        dropout: float = 0.0,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.d_inner = e = int(expand * dim)
        if dt_rank == "auto":
            dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * e, bias=False)
        self.conv2d = nn.Conv2d(e, e, d_conv, padding=(d_conv - 1) // 2, groups=e, bias=True)
        self.scan = DirectionalScan(e, d_state, dt_rank, scan_backend=scan_backend)
        self.out_norm = nn.LayerNorm(e)
        self.out_proj = nn.Linear(e, dim, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, dim) channels-last -> (B, H, W, dim)."""
        xi, z = self.in_proj(x).chunk(2, dim=-1)
        xi = F.silu(self.conv2d(xi.permute(0, 3, 1, 2).contiguous()))  # (B, E, H, W)
        y = self.scan(xi).permute(0, 2, 3, 1)  # (B, H, W, E)
        y = self.out_norm(y.to(x.dtype)) * F.silu(z)
        return self.dropout(self.out_proj(y))


def set_scan_backend(module: nn.Module, backend: str) -> nn.Module:
    """Set `scan_backend` on every mixer inside `module` (returns it). Weights are untouched."""
    _check_backend(backend)
    for m in module.modules():
        if hasattr(m, "scan_backend"):
            setattr(m, "scan_backend", backend)  # noqa: B010  (a plain attribute, not a submodule)
    return module
