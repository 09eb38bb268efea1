"""Aggregator registry: `@register_aggregator`, `create_aggregator`, `list_aggregators`.

Every aggregator maps one bag `(n_tiles, in_dim)` to `MilOutput(logits (n_classes,), attention
(n_tiles,))`. Each family registers a spec with a tiny variant (keyword arguments small enough for
contract tests that loop over the registry: forward, backward, save, load).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import torch
from torch import nn

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.registry import Registry


class MilOutput(NamedTuple):
    """Output of an aggregator for one bag.

    logits: (n_classes,) float, unnormalised class scores.
    attention: (n_tiles,) float >= 0 summing to 1, in the order of the input rows: how much each
        tile contributes to the bag prediction (attention weights, or the family's equivalent).
    """

    logits: torch.Tensor
    attention: torch.Tensor


class Aggregator(nn.Module):
    """Base class: `forward(x: (n_tiles, in_dim), coords: (n_tiles, 2) int64 level-0 px | None,
    step_l0: grid stride in level-0 px | None)`.

    Subclasses store their constructor arguments in `self.init_kwargs` (JSON-able) so a
    checkpoint can rebuild them with `create_aggregator(name, in_dim, n_classes, **init_kwargs)`.
    """

    name: str = ""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 2:
            raise ConfigError(
                f"aggregator needs in_dim >= 1 and n_classes >= 2, got {in_dim}, {n_classes}"
            )
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.init_kwargs: dict[str, Any] = {}

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, step_l0: float | None = None
    ) -> MilOutput:  # pragma: no cover
        """step_l0: the bag's grid stride in level-0 px as its store recorded it
        (`stride_level0`), for families that order tiles on the grid; the others ignore it."""
        raise NotImplementedError

    @staticmethod
    def check_bag(x: torch.Tensor, in_dim: int) -> None:
        if x.ndim != 2 or x.shape[1] != in_dim:
            raise ValueError(f"a bag must be (n_tiles, {in_dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("a bag must hold at least one tile")


@dataclass(frozen=True)
class AggregatorSpec:
    """What the registry knows of one family (a view of its `core.registry.Entry`).

    options: the family's own option schema (its constructor's keyword arguments).
    """

    name: str
    cls: type[Aggregator]
    description: str
    tiny: dict[str, Any] = field(default_factory=dict)
    permutation_invariant: bool = False
    uses_coords: bool = False
    options: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Flags:
    permutation_invariant: bool
    uses_coords: bool


def _load_builtins() -> None:
    # the built-in families register themselves on import
    from wsi_pipe.mil import abmil, baselines, mamba_mil, msm  # noqa: F401


AGGREGATORS: Registry[Aggregator] = Registry(
    "MIL method", positional=("in_dim", "n_classes"), load_builtins=_load_builtins
)

A = TypeVar("A", bound=type[Aggregator])


def register_aggregator(
    name: str,
    *,
    description: str = "",
    tiny: dict[str, Any] | None = None,
    permutation_invariant: bool = False,
    uses_coords: bool = False,
) -> Callable[[A], A]:
    """Class decorator adding an aggregator family to the registry (a duplicate name raises)."""

    def deco(cls: A) -> A:
        cls.name = name
        AGGREGATORS.add(
            name,
            cls,
            description=description,
            tiny=tiny,
            info=_Flags(permutation_invariant, uses_coords),
        )
        return cls

    return deco


def list_aggregators() -> list[str]:
    """Names of the registered aggregator families, sorted."""
    return AGGREGATORS.names(tiny=False)


def get_spec(name: str) -> AggregatorSpec:
    """The spec of a registered family; ConfigError naming the known ones otherwise."""
    e = AGGREGATORS.get(name)
    return AggregatorSpec(
        e.name,
        e.build,  # type: ignore[arg-type]
        e.description,
        dict(e.tiny),
        e.info.permutation_invariant,
        e.info.uses_coords,
        e.options,
    )


def create_aggregator(name: str, in_dim: int, n_classes: int, **kw: Any) -> Aggregator:
    """Build aggregator `name` for bags of `in_dim` features and `n_classes` classes.

    Keyword arguments are the family's options (e.g. `hidden_dim`, `dropout`); unknown ones raise
    ConfigError naming them and the accepted ones.
    """
    return AGGREGATORS.create(name, in_dim, n_classes, **kw)
