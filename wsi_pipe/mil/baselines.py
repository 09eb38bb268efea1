"""Simple pooling baselines: mean and max of instance embeddings (Ilse et al. 2018, Table 1).

Neither has attention weights; each returns its own per-tile relevance in `attention` so the
heatmap and the key-instance tests treat every family alike (see each class).
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_pipe.mil.abmil import instance_mlp
from wsi_pipe.mil.registry import Aggregator, MilOutput, register_aggregator


@register_aggregator(
    "mean",
    description="mean of instance embeddings (baseline)",
    tiny={"hidden_dim": 16},
    permutation_invariant=True,
)
class MeanPool(Aggregator):
    """Instance MLP, mean over the bag, linear classifier.

    The logit of class c is the mean of per-instance logits `W_c h_i + b_c`, so a tile's relevance
    is its share of the predicted class: `attention = softmax_i(W_c h_i)` for the arg-max class c.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        n_proj_layers: int = 1,
        taper: bool = False,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.init_kwargs = dict(
            hidden_dim=hidden_dim, n_proj_layers=n_proj_layers, taper=taper, dropout=dropout
        )
        self.proj = instance_mlp(in_dim, hidden_dim, n_proj_layers, dropout, taper)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, step_l0: float | None = None
    ) -> MilOutput:
        """x: (n_tiles, in_dim) -> logits (n_classes,), attention (n_tiles,)."""
        self.check_bag(x, self.in_dim)
        h = self.proj(x)
        logits = self.classifier(h.mean(dim=0))
        with torch.no_grad():
            c = int(logits.argmax())
            attention = torch.softmax(h @ self.classifier.weight[c], dim=0)
        return MilOutput(logits, attention)


@register_aggregator(
    "max",
    description="max of instance embeddings (baseline)",
    tiny={"hidden_dim": 16},
    permutation_invariant=True,
)
class MaxPool(Aggregator):
    """Instance MLP, element-wise max over the bag, linear classifier.

    A tile's relevance is the share of the predicted logit carried by the embedding dimensions it
    wins: `attention_i = sum_{d: argmax_d = i} |W_cd z_d| / sum_d |W_cd z_d|`.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        n_proj_layers: int = 1,
        taper: bool = False,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, n_classes)
        self.init_kwargs = dict(
            hidden_dim=hidden_dim, n_proj_layers=n_proj_layers, taper=taper, dropout=dropout
        )
        self.proj = instance_mlp(in_dim, hidden_dim, n_proj_layers, dropout, taper)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, step_l0: float | None = None
    ) -> MilOutput:
        """x: (n_tiles, in_dim) -> logits (n_classes,), attention (n_tiles,)."""
        self.check_bag(x, self.in_dim)
        h = self.proj(x)
        z, winner = h.max(dim=0)  # (hidden,), (hidden,) row index of each dimension's max
        logits = self.classifier(z)
        with torch.no_grad():
            c = int(logits.argmax())
            share = (self.classifier.weight[c] * z).abs()
            attention = torch.zeros(x.shape[0], dtype=h.dtype, device=h.device)
            attention.scatter_add_(0, winner, share)
            total = attention.sum()
            if float(total) > 0:
                attention = attention / total
            else:
                attention = torch.full_like(attention, 1.0 / x.shape[0])
        return MilOutput(logits, attention)
