"""Hierarchical channels-last backbone shared by the Mamba encoder families.

    x (B, 3, H, W) -> patch embed (conv p x p, stride p) + LayerNorm -> tokens (B, H/p, W/p, C0)
    -> stage 1 blocks -> patch merging (2x2 -> 1, C -> C') -> stage 2 ... -> stage 4 blocks
    -> LayerNorm -> feature map (B, H/(p*8), W/(p*8), C3) -> mean over tokens -> (B, C3)

`forward_tokens(x, mask, mask_token)` exposes the token grid for masked image modelling: masked
positions of the patch-embedding grid are replaced by a learned mask token and stay in the
sequence (so every scan still sees a full 2-D grid).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability p (rescaled)."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p, W/p, dim): non-overlapping p x p conv, then LayerNorm."""

    def __init__(self, patch: int, dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"input {h}x{w} px is not a multiple of the patch size {self.patch}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Downsampling: each 2x2 group of tokens -> one token. (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat((x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]), -1)
        return self.reduction(self.norm(x))


BlockFactory = Callable[[int, float], nn.Module]  # (dim, drop_path) -> block on (B, H, W, dim)


class HierarchicalBackbone(nn.Module):
    """Patch embedding, four stages with patch merging in between, pooled embedding.

    dims: channels of each stage; depths: blocks per stage; patch: patch-embedding px;
    make_block(dim, drop_path): one block mapping (B, H, W, dim) to itself.
    """

    def __init__(
        self,
        dims: Sequence[int],
        depths: Sequence[int],
        make_block: BlockFactory,
        patch: int = 4,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        if len(dims) != len(depths):
            raise ValueError(f"dims {dims} and depths {depths} must have the same length")
        self.dims = list(dims)
        self.depths = list(depths)
        self.patch = patch
        self.embed_dim = dims[-1]
        #: input px per token of the final feature map
        self.total_stride = patch * 2 ** (len(dims) - 1)
        self.patch_embed = PatchEmbed(patch, dims[0])
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        k = 0
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            self.stages.append(
                nn.Sequential(*(make_block(dim, rates[k + j]) for j in range(depth)))
            )
            k += depth
            if i + 1 < len(dims):
                self.downsamples.append(PatchMerging(dim, dims[i + 1]))
        self.norm = nn.LayerNorm(dims[-1])
        self.apply(_init_weights)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens (B, H/p, W/p, C0)."""
        return self.patch_embed(x)

    def forward_stages(self, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, C0) -> normalised final feature map (B, h/8, w/8, C3)."""
        for i, stage in enumerate(self.stages):
            t = stage(t)
            if i < len(self.downsamples):
                t = self.downsamples[i](t)
        return self.norm(t)

    def forward_tokens(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final feature map (B, H/s, W/s, embed_dim), s = `total_stride`.

        mask: (B, H/p, W/p) bool on the patch-embedding grid, True = masked; masked tokens are
        replaced by `mask_token` (C0,) and stay in the sequence.
        """
        t = self.embed(x)
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs a mask_token")
            if mask.shape != t.shape[:3]:
                raise ValueError(f"mask must be {tuple(t.shape[:3])}, got {tuple(mask.shape)}")
            t = torch.where(mask[..., None], mask_token.to(t.dtype), t)
        return self.forward_stages(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised -> embedding (B, embed_dim) (mean of the final tokens)."""
        return self.forward_tokens(x).mean(dim=(1, 2))


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None and not getattr(m.bias, "_no_reinit", False):
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
