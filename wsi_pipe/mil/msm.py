"""MSM-MIL: multi-stage masked MIL -- our reading of Wang et al. (J. UCAS 2026), from its abstract.

The abstract says: a gated-attention model gives the initial bag embedding and an initial mask;
further stages mine other patterns "stage by stage through mask stacking"; an attention module
aggregates the multi-stage bag embeddings for the final classification. Everything below beyond
that is our choice:

- one instance MLP shared by all stages; each stage s has its own gated attention A_s;
- stage s attends (softmax) only over instances not masked by stages 1..s-1 (masks stack);
- after stage s, the instances it attended most are masked for the later stages, chosen on the
  detached attention by one of two rules:
    "topk": the k highest (k = ceil(mask_k * n_tiles) when mask_k < 1, else int(mask_k)),
    "mass": the fewest instances holding `mask_mass` of the stage's attention;
- small bags: a stage never masks the last unmasked instance, so every stage attends to at least
  one tile; a one-tile bag gives the same embedding at every stage;
- the S stage embeddings (S, hidden) are pooled by a second gated attention (weights beta) and
  classified linearly;
- the tile attention reported is sum_s beta_s * alpha_s (sums to 1), the weight each tile has in
  the final bag embedding.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.mil.abmil import instance_mlp
from wsi_pipe.mil.registry import Aggregator, MilOutput, register_aggregator
from wsi_pipe.nn.attention import GatedAttention


def stage_mask_count(
    alpha: torch.Tensor,
    keep: torch.Tensor,
    rule: str,
    mask_k: float,
    mask_mass: float,
    n_total: int,
) -> int:
    """How many of the kept instances a stage masks (never all of them).

    alpha: (n,) attention of this stage (zero outside `keep`); keep: (n,) bool, unmasked tiles.
    """
    remaining = int(keep.sum())
    if remaining <= 1:
        return 0
    if rule == "topk":
        want = math.ceil(mask_k * n_total) if mask_k < 1 else int(mask_k)
    else:
        # fewest instances whose attention reaches mask_mass
        sorted_alpha = torch.sort(alpha[keep], descending=True).values
        cum = torch.cumsum(sorted_alpha, 0)
        want = (
            int(
                torch.searchsorted(cum, torch.tensor(mask_mass, dtype=cum.dtype, device=cum.device))
            )
            + 1
        )
    return max(1, min(want, remaining - 1))


@register_aggregator(
    "msm",
    description="multi-stage masked MIL (our reading of MSM-MIL)",
    tiny={"hidden_dim": 16, "attn_dim": 8, "n_stages": 2},
    permutation_invariant=True,
)
class MSMMIL(Aggregator):
    """Multi-stage masked gated-attention MIL (see module doc for the exact rule set).

    n_stages: attention stages (1 = gated ABMIL with a stage-attention head);
    mask_rule: "topk" or "mass"; mask_k: fraction (< 1) of the bag or count (>= 1) masked per stage;
    mask_mass: attention mass masked per stage for the "mass" rule.
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
        n_stages: int = 3,
        mask_rule: Literal["topk", "mass"] = "topk",
        mask_k: float = 0.1,
        mask_mass: float = 0.5,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if n_stages < 1:
            raise ConfigError(f"msm: n_stages must be >= 1, got {n_stages}")
        if mask_rule not in ("topk", "mass"):
            raise ConfigError(f"msm: mask_rule must be 'topk' or 'mass', got {mask_rule!r}")
        if mask_k <= 0 or not 0 < mask_mass < 1:
            raise ConfigError(
                f"msm: need mask_k > 0 and 0 < mask_mass < 1, got {mask_k}, {mask_mass}"
            )
        attn_dim = attn_dim or max(1, hidden_dim // 2)
        self.init_kwargs = dict(
            hidden_dim=hidden_dim,
            attn_dim=attn_dim,
            n_proj_layers=n_proj_layers,
            taper=taper,
            dropout=dropout,
            n_stages=n_stages,
            mask_rule=mask_rule,
            mask_k=mask_k,
            mask_mass=mask_mass,
        )
        self.n_stages = n_stages
        self.mask_rule = mask_rule
        self.mask_k = float(mask_k)
        self.mask_mass = float(mask_mass)
        self.proj = instance_mlp(in_dim, hidden_dim, n_proj_layers, dropout, taper)
        self.stage_attention = nn.ModuleList(
            GatedAttention(hidden_dim, attn_dim, dropout=dropout) for _ in range(n_stages)
        )
        self.stage_pool = GatedAttention(hidden_dim, attn_dim, dropout=dropout)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-stage results for one bag x: (n, in_dim).

        Returns stage embeddings (S, hidden), stage attentions (S, n) (zero on masked tiles) and
        keep masks (S, n) bool (the tiles each stage could attend to).
        """
        self.check_bag(x, self.in_dim)
        n = x.shape[0]
        h = self.proj(x)
        keep = torch.ones(n, dtype=torch.bool, device=x.device)
        embeds, alphas, keeps = [], [], []
        for s, attn in enumerate(self.stage_attention):
            scores = attn(h, keep)
            alpha = torch.softmax(scores, dim=0)
            embeds.append(alpha @ h)
            alphas.append(alpha)
            keeps.append(keep)
            if s + 1 < self.n_stages:
                a = alpha.detach()
                k = stage_mask_count(a, keep, self.mask_rule, self.mask_k, self.mask_mass, n)
                if k:
                    top = torch.topk(a.masked_fill(~keep, -1.0), k).indices
                    keep = keep.clone()
                    keep[top] = False
        return torch.stack(embeds), torch.stack(alphas), torch.stack(keeps)

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, step_l0: float | None = None
    ) -> MilOutput:
        """x: (n_tiles, in_dim) -> logits (n_classes,), attention (n_tiles,) = sum_s beta_s alpha_s."""
        z, alphas, _ = self.stages(x)
        beta = torch.softmax(self.stage_pool(z), dim=0)  # (S,)
        logits = self.classifier(beta @ z)
        return MilOutput(logits, beta @ alphas)
