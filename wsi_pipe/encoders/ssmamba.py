"""SSMamba: a reconstruction of the hybrid state-space tile encoder from its abstract.

Public facts (the abstract only): a hybrid state-space model for pathology images, pretrained
with Mamba masked image modelling (MAMIM, see `wsi_pipe.encoders.mamim`) on the target data and
then fine-tuned; a Directional Multi-scale (DMS) module for balanced local-global modelling;
a Local Perception Residual (LPR) module for fine-grained sensitivity. Everything below that is
not in that sentence is our design choice, stated here so it can be judged:

* Backbone: hierarchical, `HierarchicalBackbone` (4x4 patch embedding, four stages with 2x2
  patch merging, final LayerNorm, mean-pooled embedding), channels-last tokens.
* Block (pre-norm):  h = LN(x);  x = x + DropPath(DMS(h) + LPR(h));  x = x + DropPath(MLP(LN(x)))
* DMS: in_proj -> (u, z); u = SiLU(depthwise 3x3 conv(u)); for each scale s in (1, 2): pool the
  grid s x s (average, ceil), run four directional selective scans over it (row-major,
  column-major and both reversed; each direction and scale has its own x_proj / dt_proj / A / D),
  upsample back (nearest: each pooled token returns to the block it summarises); fuse the
  scales with learned per-channel softmax weights; LayerNorm; gate with SiLU(z); out_proj.
  Scale 1 sees fine structure, scale 2 halves the sequence so information travels twice as far
  per step (the "global" half of the balance) at a quarter of the cost.
* LPR: a depthwise 3x3 convolution of the normalised input added beside the scan branch, i.e.
  a residual path that sees exactly the 3x3 neighbourhood, which a 1-D scan of a flattened grid
  only sees through long detours (vertical neighbours are W steps apart in row-major order).
* MLP: Linear(dim, 4 dim) - GELU - Linear.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_pipe.encoders.backbone import DropPath, HierarchicalBackbone
from wsi_pipe.encoders.registry import register_encoder
from wsi_pipe.nn.mamba import DirectionalScan


class DMS(nn.Module):
    """Directional Multi-scale selective scan: (B, H, W, dim) -> (B, H, W, dim)."""

    def __init__(
        self,
        dim: int,
        d_state: int = 8,
        expand: float = 1.0,
        scales: tuple[int, ...] = (1, 2),
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if scales[0] != 1:
            raise ValueError(f"the first DMS scale must be 1 (the stage grid), got {scales}")
        self.scales = tuple(int(s) for s in scales)
        e = self.d_inner = int(expand * dim)
        dt_rank = math.ceil(dim / 16)
        self.in_proj = nn.Linear(dim, 2 * e, bias=False)
        self.conv2d = nn.Conv2d(e, e, 3, padding=1, groups=e)
        self.scans = nn.ModuleList(
            DirectionalScan(e, d_state, dt_rank, scan_backend=scan_backend) for _ in self.scales
        )
        self.scale_logits = nn.Parameter(torch.zeros(len(self.scales), e))  # softmax over scales
        self.out_norm = nn.LayerNorm(e)
        self.out_proj = nn.Linear(e, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv2d(u.permute(0, 3, 1, 2).contiguous()))  # (B, E, H, W)
        weights = torch.softmax(self.scale_logits.float(), dim=0).to(u.dtype)  # (S, E)
        y = None
        for i, (s, scan) in enumerate(zip(self.scales, self.scans, strict=True)):
            if s == 1:
                ys = scan(u)
            else:
                pooled = F.avg_pool2d(u, s, s, ceil_mode=True)
                ys = F.interpolate(scan(pooled), size=(h, w), mode="nearest")
            ys = ys * weights[i][:, None, None]
            y = ys if y is None else y + ys
        assert y is not None  # scales is non-empty (__init__ reads scales[0])
        y = self.out_norm(y.permute(0, 2, 3, 1).to(x.dtype)) * F.silu(z)
        return self.out_proj(y)


class SSMambaBlock(nn.Module):
    """x + DropPath(DMS(LN x) + LPR(LN x)), then x + DropPath(MLP(LN x)); (B, H, W, dim)."""

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        d_state: int = 8,
        expand: float = 1.0,
        mlp_ratio: float = 4.0,
        scales: tuple[int, ...] = (1, 2),
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dms = DMS(dim, d_state, expand, scales, scan_backend)
        self.lpr = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)  # Local Perception Residual
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        local = self.lpr(h.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.dms(h) + local)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SSMamba(HierarchicalBackbone):
    """SSMamba encoder: (B, 3, H, W) normalised -> (B, dims[-1]). See the module docstring."""

    def __init__(
        self,
        dims: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (2, 2, 4, 2),
        d_state: int = 8,
        expand: float = 1.0,
        mlp_ratio: float = 4.0,
        scales: tuple[int, ...] = (1, 2),
        patch: int = 4,
        drop_path_rate: float = 0.1,
        scan_backend: str = "auto",
    ) -> None:
        def make_block(dim: int, dp: float) -> nn.Module:
            return SSMambaBlock(dim, dp, d_state, expand, mlp_ratio, tuple(scales), scan_backend)

        super().__init__(dims, depths, make_block, patch, drop_path_rate)


# The sizes. Options of every entry: `SSMamba`'s constructor arguments; the family's tiny variant
# `ssmamba_tiny` (tests) is declared on `ssmamba_t`.
register_encoder(
    "ssmamba_t",
    embed_dim=768,
    family="ssmamba",
    description="SSMamba-T, depths 2-2-4-2",
    tiny={"dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "d_state": 4, "mlp_ratio": 2.0},
    tiny_spec={"input_px": 64, "embed_dim": 64},
)(partial(SSMamba, dims=(96, 192, 384, 768), depths=(2, 2, 4, 2)))
register_encoder(
    "ssmamba_s", embed_dim=768, family="ssmamba", description="SSMamba-S, depths 2-2-8-2"
)(partial(SSMamba, dims=(96, 192, 384, 768), depths=(2, 2, 8, 2)))
register_encoder(
    "ssmamba_b", embed_dim=1024, family="ssmamba", description="SSMamba-B, depths 2-2-12-2"
)(partial(SSMamba, dims=(128, 256, 512, 1024), depths=(2, 2, 12, 2)))
#: the size recommended for CPU-only training (`scripts/bench_probe.py`, docs/encoder_quality.md):
#: 160 px input = 150-px tiles at ~0.495 um/px resampled once to ~0.464 um/px; 160 is 5 x the
#: total stride 32, so MAMIM's mask grid and every stage's token grid are whole (144 is not).
#: Patch 8 (3.7 um per token, about half a nucleus) over three stages: 20x20 -> 10x10 -> 5x5 tokens.
register_encoder(
    "ssmamba_cpu", input_px=160, embed_dim=128, family="ssmamba", description="SSMamba at CPU size"
)(partial(SSMamba, dims=(32, 64, 128), depths=(1, 1, 1), patch=8, d_state=8, mlp_ratio=2.0))
