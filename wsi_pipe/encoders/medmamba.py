"""MedMamba (Yue & Li, 2024): hierarchical encoder of SS-Conv-SSM blocks.

SS-Conv-SSM block on (B, H, W, C): split the channels in half; the left half goes through a
conv branch (BN, 3x3 conv, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv, ReLU), the right half through
LayerNorm + SS2D (four-direction selective scan); concatenate, shuffle channels (2 groups) and add
the block input. Stages: 4x4 patch embedding, patch merging between four stages, LayerNorm,
mean-pooled embedding. T/S/B follow the paper's depths (2,2,4,2)/(2,2,8,2)/(2,2,12,2) and
widths 96/96/128; `scripts/bench_encoder.py` prints our parameter counts (the paper reports
14.5M / 18.6M / 39.9M including its classifier head).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from wsi_pipe.encoders.backbone import DropPath, HierarchicalBackbone
from wsi_pipe.encoders.registry import register_encoder
from wsi_pipe.nn.mamba import SS2D


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channel groups of a channels-last tensor (B, H, W, C)."""
    b, h, w, c = x.shape
    return x.view(b, h, w, groups, c // groups).transpose(3, 4).reshape(b, h, w, c)


class SSConvSSM(nn.Module):
    """MedMamba's SS-Conv-SSM block: (B, H, W, dim) -> (B, H, W, dim)."""

    def __init__(
        self, dim: int, drop_path: float = 0.0, d_state: int = 16, scan_backend: str = "auto"
    ) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"SS-Conv-SSM needs an even width, got {dim}")
        half = dim // 2
        self.ln_1 = nn.LayerNorm(half)
        self.ss2d = SS2D(half, d_state=d_state, expand=2.0, scan_backend=scan_backend)
        self.drop_path = DropPath(drop_path)
        self.conv = nn.Sequential(
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 3, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=-1)
        right = self.drop_path(self.ss2d(self.ln_1(right)))
        left = self.conv(left.permute(0, 3, 1, 2).contiguous()).permute(0, 2, 3, 1)
        return channel_shuffle(torch.cat((left, right), dim=-1), 2) + x


class MedMamba(HierarchicalBackbone):
    """MedMamba encoder: (B, 3, H, W) normalised -> (B, dims[-1])."""

    def __init__(
        self,
        dims: tuple[int, ...] = (96, 192, 384, 768),
        depths: tuple[int, ...] = (2, 2, 4, 2),
        d_state: int = 16,
        patch: int = 4,
        drop_path_rate: float = 0.1,
        scan_backend: str = "auto",
    ) -> None:
        def make_block(dim: int, dp: float) -> nn.Module:
            return SSConvSSM(dim, dp, d_state, scan_backend)

        super().__init__(dims, depths, make_block, patch, drop_path_rate)


# The sizes. Options of every entry: `MedMamba`'s constructor arguments; the family's tiny variant
# `medmamba_tiny` (tests) is declared on `medmamba_t`.
register_encoder(
    "medmamba_t",
    embed_dim=768,
    family="medmamba",
    description="MedMamba-T, depths 2-2-4-2",
    tiny={"dims": (16, 32, 48, 64), "depths": (1, 1, 1, 1), "d_state": 4},
    tiny_spec={"input_px": 64, "embed_dim": 64},
)(partial(MedMamba, dims=(96, 192, 384, 768), depths=(2, 2, 4, 2)))
register_encoder(
    "medmamba_s", embed_dim=768, family="medmamba", description="MedMamba-S, depths 2-2-8-2"
)(partial(MedMamba, dims=(96, 192, 384, 768), depths=(2, 2, 8, 2)))
register_encoder(
    "medmamba_b", embed_dim=1024, family="medmamba", description="MedMamba-B, depths 2-2-12-2"
)(partial(MedMamba, dims=(128, 256, 512, 1024), depths=(2, 2, 12, 2)))
#: MedMamba blocks at the size of `ssmamba_cpu` (same widths, depths, patch, input px), for a
#: like-for-like comparison on CPU; MedMamba-T itself (~14M parameters) is too slow to train there.
register_encoder(
    "medmamba_cpu",
    input_px=160,
    embed_dim=128,
    family="medmamba",
    description="MedMamba at CPU size",
)(partial(MedMamba, dims=(32, 64, 128), depths=(1, 1, 1), patch=8, d_state=8))
