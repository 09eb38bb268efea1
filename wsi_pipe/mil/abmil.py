"""Gated attention MIL (Ilse, Tomczak & Welling, ICML 2018).

h_i = MLP(x_i)                                    instance embeddings (n, hidden)
a_i = w^T (tanh(V h_i) * sigmoid(U h_i))          gated attention scores
alpha = softmax_i(a)                              over the bag
z = sum_i alpha_i h_i                             bag embedding
logits = classifier(z)
"""

from __future__ import annotations

import torch
from torch import nn

from wsi_pipe.mil.registry import Aggregator, MilOutput, register_aggregator
from wsi_pipe.nn.attention import GatedAttention


def proj_widths(hidden_dim: int, n_layers: int, taper: bool) -> list[int]:
    """Widths of the instance MLP: all `hidden_dim`, or halving per layer when `taper` (the last
    layer is `hidden_dim`, e.g. 256 -> 128 -> 64 for hidden_dim=64, n_layers=3, as in Ilse et
    al.'s MUSK network)."""
    if not taper:
        return [hidden_dim] * n_layers
    return [hidden_dim * 2 ** (n_layers - 1 - i) for i in range(n_layers)]


def instance_mlp(
    in_dim: int, hidden_dim: int, n_layers: int, dropout: float, taper: bool = False
) -> nn.Sequential:
    """`n_layers` of Linear -> ReLU -> Dropout from `in_dim`, ending `hidden_dim` wide."""
    layers: list[nn.Module] = []
    d = in_dim
    for w in proj_widths(hidden_dim, n_layers, taper):
        layers += [nn.Linear(d, w), nn.ReLU(), nn.Dropout(dropout)]
        d = w
    return nn.Sequential(*layers)


@register_aggregator(
    "abmil",
    description="gated attention MIL (Ilse et al. 2018)",
    tiny={"hidden_dim": 16, "attn_dim": 8},
    permutation_invariant=True,
)
class ABMIL(Aggregator):
    """Gated attention MIL: instance MLP, gated attention pooling, linear classifier.

    hidden_dim: instance embedding width; attn_dim: width of V and U (None = hidden_dim // 2);
    n_proj_layers: depth of the instance MLP; taper: MLP widths double per layer towards the
    input (see `proj_widths`); dropout: after each MLP layer and in the attention.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        attn_dim: int | None = None,
        n_proj_layers: int = 1,
        taper: bool = False,
        dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, n_classes)
        attn_dim = attn_dim or max(1, hidden_dim // 2)
        self.init_kwargs = dict(
            hidden_dim=hidden_dim,
            attn_dim=attn_dim,
            n_proj_layers=n_proj_layers,
            taper=taper,
            dropout=dropout,
        )
        self.proj = instance_mlp(in_dim, hidden_dim, n_proj_layers, dropout, taper)
        self.attention = GatedAttention(hidden_dim, attn_dim, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, step_l0: float | None = None
    ) -> MilOutput:
        """x: (n_tiles, in_dim) -> logits (n_classes,), attention (n_tiles,)."""
        self.check_bag(x, self.in_dim)
        h = self.proj(x)  # (n, hidden)
        alpha = torch.softmax(self.attention(h), dim=0)  # (n,)
        z = alpha @ h  # (hidden,)
        return MilOutput(self.classifier(z), alpha)
