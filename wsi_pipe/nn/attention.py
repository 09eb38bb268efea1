"""Gated attention pooling (Ilse et al. 2018, ABMIL): the attention score of each instance."""

from __future__ import annotations

import torch
import torch.nn as nn


class GatedAttention(nn.Module):
    """Gated attention scorer: a_i = w^T (tanh(V h_i) * sigmoid(U h_i)).

    dim: instance feature size; hidden: size of V and U; n_heads: independent score heads;
    dropout: applied to the gated hidden layer.
    """

    def __init__(self, dim: int, hidden: int = 128, n_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, hidden)
        self.U = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, n_heads)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.n_heads = n_heads

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention logits (before softmax).

        h: (N, dim) or (B, N, dim). mask: (N,) or (B, N) bool, True = a real instance; padded
        instances get -inf. Returns (N,) / (B, N) for one head, (N, heads) / (B, N, heads) for more.
        """
        gated = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))
        logits = self.w(self.drop(gated))  # (..., N, heads)
        if mask is not None:
            if mask.shape != h.shape[:-1]:
                raise ValueError(f"mask must be {tuple(h.shape[:-1])}, got {tuple(mask.shape)}")
            logits = logits.masked_fill(~mask.bool()[..., None], float("-inf"))
        return logits.squeeze(-1) if self.n_heads == 1 else logits

    @staticmethod
    def pool(h: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax over instances and the weighted mean.

        h: (N, dim) or (B, N, dim); logits: (N,) or (B, N) from `forward`.
        Returns pooled (dim,) / (B, dim) and weights shaped like `logits`.
        """
        weights = torch.softmax(logits.float(), dim=-1).to(h.dtype)
        return (weights.unsqueeze(-1) * h).sum(-2), weights
