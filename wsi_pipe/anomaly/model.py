"""SP-Mamba student for slide feature grids (torch).

Shapes: B canvases (windows) of S x S grid cells, L = S*S cells in row-major order,
D = teacher feature width (the scales' features concatenated, standardised), C = d_model,
E = expand * C, K scan sequences (orientations x directions), P prototypes.

- `OrderedScan`: K selective scans of a canvas, each along its own permutation of the cells
  (circular-Hilbert by default), each with its own x_proj / dt_proj / A / D, run as ONE grouped
  call of `wsi_pipe.nn.selective_scan.selective_scan` (any backend) and summed back onto the
  canvas. Like `wsi_pipe.nn.mamba.DirectionalScan`, but with arbitrary orders.
- `LSSBlock`: LayerNorm -> in_proj (x, z) -> depthwise 3x3 conv on the canvas -> SiLU ->
  OrderedScan -> LayerNorm -> * SiLU(z) -> out_proj, residual (VMamba's SS2D / MambaAD's LSS).
- `SPMambaNet`: input projection with a learnable pad token (pad and background cells are
  replaced by it, before and after every block, so their content can never reach a tissue cell),
  n LSS blocks, one reconstruction head per scale, and a bank of position-free prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_pipe.nn.mamba import init_dt_proj
from wsi_pipe.nn.selective_scan import SCAN_BACKENDS, selective_scan


class OrderedScan(nn.Module):
    """K selective scans over given cell orders: x (B, E, L), perms (K, L), inv (K, L) -> (B, E, L)."""

    def __init__(self, d_inner: int, k: int, d_state: int = 16, scan_backend: str = "auto") -> None:
        super().__init__()
        if scan_backend not in SCAN_BACKENDS:
            raise ValueError(
                f"unknown scan_backend {scan_backend!r}; choose one of {SCAN_BACKENDS}"
            )
        self.d_inner = e = d_inner
        self.k = k
        self.d_state = n = d_state
        self.dt_rank = r = max(1, math.ceil(d_inner / 16))
        self.scan_backend = scan_backend
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, e))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, e, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, e))
        for i in range(k):
            nn.init.kaiming_uniform_(self.x_proj_weight.data[i], a=math.sqrt(5))
            tmp = nn.Linear(r, e)
            init_dt_proj(tmp, r, 0.001, 0.1, 1e-4)
            self.dt_projs_weight.data[i] = tmp.weight.data
            self.dt_projs_bias.data[i] = tmp.bias.data
        a = torch.arange(1, n + 1, dtype=torch.float32).repeat(k * e, 1)
        self.A_logs = nn.Parameter(torch.log(a))  # (K*E, N)
        self.Ds = nn.Parameter(torch.ones(k * e))

    def forward(self, x: torch.Tensor, perms: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        b, e, length = x.shape
        k, n, r = self.k, self.d_state, self.dt_rank
        xs = x[:, :, perms].permute(0, 2, 1, 3)  # (B, K, E, L): sequence k in its own order
        x_dbl = torch.einsum("bkel,kce->bkcl", xs, self.x_proj_weight.to(xs.dtype))
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,ker->bkel", dts, self.dt_projs_weight.to(dts.dtype))
        y = selective_scan(
            xs.reshape(b, k * e, length),
            dts.reshape(b, k * e, length),
            -torch.exp(self.A_logs.float()),
            bs,
            cs,
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        ).reshape(b, k, e, length)
        # back to row-major canvas order, summed over the K sequences
        idx = inv[None, :, None, :].expand(b, k, e, length)
        return torch.gather(y, 3, idx).sum(1)


class LSSBlock(nn.Module):
    """Residual 2-D selective-scan block over a canvas: (B, S, S, C) -> (B, S, S, C)."""

    def __init__(self, dim: int, k: int, d_state: int, expand: float, scan_backend: str) -> None:
        super().__init__()
        self.e = e = max(1, int(expand * dim))
        self.norm = nn.LayerNorm(dim)
        self.in_proj = nn.Linear(dim, 2 * e, bias=False)
        self.conv2d = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=True)
        self.scan = OrderedScan(e, k, d_state, scan_backend)
        self.out_norm = nn.LayerNorm(e)
        self.out_proj = nn.Linear(e, dim, bias=False)

    def forward(self, x: torch.Tensor, perms: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
        b, s, _, _ = x.shape
        xi, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        xi = F.silu(self.conv2d(xi.permute(0, 3, 1, 2).contiguous()))  # (B, E, S, S)
        y = self.scan(xi.reshape(b, self.e, s * s), perms, inv)  # (B, E, L)
        y = y.transpose(1, 2).reshape(b, s, s, self.e)
        y = self.out_norm(y) * F.silu(z)
        return x + self.out_proj(y)


class SPMambaNet(nn.Module):
    """Student + prototypes. forward(x (B, L, D), mask (B, L) bool, side S, perms, inv) ->
    dict of per-cell tensors (B, L): 'recon' (K_scales, B, L) cosine distances per scale,
    'proto' (B, L) window-sliding prototype distance, plus 'proto_self' (B, L) (training loss).
    Masked cells hold 0 in every output."""

    def __init__(
        self,
        in_dim: int,
        scale_dims: list[int],
        d_model: int = 64,
        d_state: int = 16,
        expand: float = 2.0,
        n_layers: int = 2,
        k: int = 4,
        n_prototypes: int = 32,
        proto_temperature: float = 0.05,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if sum(scale_dims) != in_dim:
            raise ValueError(f"scale dims {scale_dims} do not add up to the input width {in_dim}")
        self.scale_dims = list(scale_dims)
        self.proto_temperature = proto_temperature
        self.in_proj = nn.Linear(in_dim, d_model)
        self.pad_token = nn.Parameter(torch.zeros(d_model))
        self.mask_token = nn.Parameter(torch.zeros(in_dim))
        self.blocks = nn.ModuleList(
            [LSSBlock(d_model, k, d_state, expand, scan_backend) for _ in range(n_layers)]
        )
        self.norm = nn.LayerNorm(d_model)
        self.heads = nn.ModuleList([nn.Linear(d_model, d) for d in scale_dims])
        g = torch.Generator().manual_seed(0)
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, in_dim, generator=g) * 0.1)

    def student(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        side: int,
        perms: torch.Tensor,
        inv: torch.Tensor,
        hide: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Reconstructions of each scale's teacher features: list of (B, L, D_s)."""
        b, length, _ = x.shape
        m = mask[..., None]
        x = torch.where(m, x, torch.zeros((), dtype=x.dtype))  # pad content never enters
        if hide is not None:  # training: some tissue cells are shown as the mask token
            x = torch.where(hide[..., None], self.mask_token.to(x.dtype), x)
        h = self.in_proj(x)
        h = torch.where(m, h, self.pad_token)
        h = h.view(b, side, side, -1)
        mg = m.view(b, side, side, 1)
        for blk in self.blocks:
            h = torch.where(mg, blk(h, perms, inv), self.pad_token)
        h = self.norm(h.view(b, length, -1))
        return [head(h) for head in self.heads]

    def prototype_reconstruction(self, x: torch.Tensor) -> torch.Tensor:
        """Soft nearest-prototype reconstruction of features: (..., D) -> (..., D)."""
        xn = F.normalize(x, dim=-1)
        pn = F.normalize(self.prototypes, dim=-1)
        att = torch.softmax(xn @ pn.t() / self.proto_temperature, dim=-1)
        return att @ self.prototypes

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        side: int,
        perms: torch.Tensor,
        inv: torch.Tensor,
        hide: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """x: teacher features (B, L, D); `hide` (B, L) bool and `noise` (B, L, D) corrupt only
        the student's input (training); the targets stay the clean teacher features."""
        x = torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype))
        x_in = x if noise is None else x + noise
        recs = self.student(x_in, mask, side, perms, inv, hide)
        teach = torch.split(x, self.scale_dims, dim=-1)
        recon = torch.stack(
            [1.0 - F.cosine_similarity(t, r, dim=-1, eps=1e-6) for t, r in zip(teach, recs)]
        )  # (n_scales, B, L)
        recon = recon * mask
        pr = self.prototype_reconstruction(x)  # (B, L, D)
        proto_self = (1.0 - F.cosine_similarity(x, pr, dim=-1, eps=1e-6)) * mask
        proto = window_sliding_distance(x, pr, mask, side)
        return {"recon": recon, "proto": proto, "proto_self": proto_self}


def window_sliding_distance(
    x: torch.Tensor, pr: torch.Tensor, mask: torch.Tensor, side: int
) -> torch.Tensor:
    """Window-sliding prototype distance: 1 - the best cosine similarity between a cell's feature
    and the prototype reconstructions of the tissue cells in its 3 x 3 neighbourhood.

    x, pr: (B, L, D); mask: (B, L) bool; L = side * side (row-major). Returns (B, L), 0 off tissue.
    The 9 offsets are a fixed loop; every cell and prototype is computed at once.
    """
    b, length, d = x.shape
    xg = F.normalize(x, dim=-1).view(b, side, side, d)
    pg = F.normalize(pr, dim=-1).view(b, side, side, d)
    mg = mask.view(b, side, side)
    pp = F.pad(pg, (0, 0, 1, 1, 1, 1))
    mp = F.pad(mg, (1, 1, 1, 1), value=False)
    best = torch.full((b, side, side), -2.0, dtype=x.dtype, device=x.device)
    for dy in range(3):
        for dx in range(3):
            sim = (xg * pp[:, dy : dy + side, dx : dx + side]).sum(-1)
            ok = mp[:, dy : dy + side, dx : dx + side]
            best = torch.maximum(best, torch.where(ok, sim, torch.full_like(sim, -2.0)))
    return ((1.0 - best) * mg).view(b, length)
