"""Mamba aggregator in the spirit of MambaMIL (Yang et al., MICCAI 2024).

    x (n, in_dim) --[optional tile order from coords]--> Linear + ReLU -> (n, hidden)
    repeat n_layers:  h = h + Mamba_fwd(LN(h)) + P^-1 Mamba_sr(P LN(h))
        P: MambaMIL's sequence reordering, a strided permutation [0, s, 2s, ..., 1, 1+s, ...]
        so the second scan sees tiles s apart as neighbours (long-range mixing);
    LN -> gated attention pooling -> linear classifier.

The two scans of a layer have their own Mamba mixers (our choice). The tile order
("store", "hilbert", "circular_hilbert"; see `wsi_pipe.mil.ordering`) is computed from the
level-0 coords given to `forward`; the attention returned is mapped back to the input rows. Every
operation is linear in the number of tiles; long training bags run each layer under activation
checkpointing so a 100k-tile bag trains in a few GiB. The selective scan is
`wsi_pipe.nn.selective_scan` (CUDA kernel or pure torch, chosen by `scan_backend`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.mil.ordering import TILE_ORDERS, strided_permutation, tile_order
from wsi_pipe.mil.registry import Aggregator, MilOutput, register_aggregator
from wsi_pipe.nn.attention import GatedAttention
from wsi_pipe.nn.mamba import Mamba


class SRMambaLayer(nn.Module):
    """Pre-norm residual layer with a forward scan and a strided-reordered scan: (n, d) -> (n, d)."""

    def __init__(
        self, dim: int, d_state: int, expand: int, stride: int, scan_backend: str, dropout: float
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fwd = Mamba(dim, d_state=d_state, expand=expand, scan_backend=scan_backend)
        self.sr = Mamba(dim, d_state=d_state, expand=expand, scan_backend=scan_backend)
        self.stride = stride
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """h: (n, d) -> (n, d). `checkpointed`: recompute each scan branch in backward (activation
        memory of one branch at a time instead of all, for long training bags)."""
        n = h.shape[0]
        u = self.norm(h)[None]  # (1, n, d)

        def run(mixer: Mamba, seq: torch.Tensor) -> torch.Tensor:
            if checkpointed:
                return checkpoint(mixer, seq, use_reentrant=False)
            return mixer(seq)

        y = run(self.fwd, u)[0]
        if self.stride > 1 and n > 1:
            perm = torch.from_numpy(strided_permutation(n, self.stride)).to(h.device)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(n, device=h.device)
            y = y + run(self.sr, u[:, perm])[0][inv]
        else:
            y = y + run(self.sr, u)[0]
        return h + self.drop(y)


@register_aggregator(
    "mamba",
    description="Mamba MIL with sequence reordering (in the spirit of MambaMIL)",
    tiny={"hidden_dim": 16, "n_layers": 1, "d_state": 4, "expand": 1},
    permutation_invariant=False,
    uses_coords=True,
)
class MambaMIL(Aggregator):
    """Projection, `n_layers` SR-Mamba layers over the tile sequence, gated attention pooling.

    hidden_dim: model width; n_layers: layers; d_state, expand: Mamba sizes; reorder_stride:
    stride of the second (reordered) scan; tile_order: "store" | "hilbert" | "circular_hilbert"
    (the latter two need coords in forward); scan_backend: "auto" | "torch" | "cuda" |
    "sequential"; checkpoint_tiles: bags of at least this many tiles run each scan branch under
    activation checkpointing when gradients are on (0 = never).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        n_layers: int = 2,
        d_state: int = 16,
        expand: int = 2,
        reorder_stride: int = 10,
        tile_order: str = "store",
        scan_backend: str = "auto",
        dropout: float = 0.25,
        attn_dim: int | None = None,
        checkpoint_tiles: int = 16384,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if tile_order not in TILE_ORDERS:
            raise ConfigError(f"mamba: tile_order must be one of {TILE_ORDERS}, got {tile_order!r}")
        if n_layers < 1 or reorder_stride < 1:
            raise ConfigError("mamba: n_layers and reorder_stride must be >= 1")
        attn_dim = attn_dim or max(1, hidden_dim // 2)
        self.init_kwargs = dict(
            hidden_dim=hidden_dim,
            n_layers=n_layers,
            d_state=d_state,
            expand=expand,
            reorder_stride=reorder_stride,
            tile_order=tile_order,
            scan_backend=scan_backend,
            dropout=dropout,
            attn_dim=attn_dim,
            checkpoint_tiles=checkpoint_tiles,
        )
        self.tile_order = tile_order
        self.checkpoint_tiles = checkpoint_tiles
        self.proj = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.layers = nn.ModuleList(
            SRMambaLayer(hidden_dim, d_state, expand, reorder_stride, scan_backend, dropout)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.attention = GatedAttention(hidden_dim, attn_dim, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, step_l0: float | None = None
    ) -> MilOutput:
        """x: (n_tiles, in_dim); coords: (n_tiles, 2) int64 level-0 px (needed unless
        tile_order == "store"); step_l0: the grid stride the store recorded (None: inferred from
        the coords, `ordering.infer_stride_l0`). Returns logits (n_classes,), attention (n_tiles,)
        in input order."""
        self.check_bag(x, self.in_dim)
        n = x.shape[0]
        order = None
        if self.tile_order != "store":
            if coords is None:
                raise ValueError(
                    f"mamba with tile_order={self.tile_order!r} needs the tiles' coords"
                )
            perm = tile_order(coords.detach().cpu().numpy(), self.tile_order, step_l0)
            assert perm is not None
            order = torch.from_numpy(np.ascontiguousarray(perm)).to(x.device)
            x = x[order]
        h = self.proj(x)
        use_ckpt = (
            self.checkpoint_tiles > 0 and n >= self.checkpoint_tiles and torch.is_grad_enabled()
        )
        for layer in self.layers:
            h = layer(h, checkpointed=use_ckpt)
        h = self.norm(h)
        alpha = torch.softmax(self.attention(h).float(), dim=0).to(h.dtype)
        logits = self.classifier(alpha @ h)
        if order is not None:
            alpha = torch.empty_like(alpha).scatter_(0, order, alpha)
        return MilOutput(logits, alpha)
