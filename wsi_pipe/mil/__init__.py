"""Slide-level multiple instance learning: aggregators (a registry), data, splits, training.

from wsi_pipe.mil import create_aggregator, list_aggregators
agg = create_aggregator("msm", in_dim=768, n_classes=2, n_stages=3)
logits, attention = agg(features)     # (n_tiles, 768) -> (2,), (n_tiles,)
"""

from __future__ import annotations

# importing the families registers them
from wsi_pipe.mil import abmil, baselines, mamba_mil, msm  # noqa: F401
from wsi_pipe.mil.registry import (
    Aggregator,
    AggregatorSpec,
    MilOutput,
    create_aggregator,
    get_spec,
    list_aggregators,
    register_aggregator,
)

__all__ = [
    "Aggregator",
    "AggregatorSpec",
    "MilOutput",
    "create_aggregator",
    "get_spec",
    "list_aggregators",
    "register_aggregator",
]
