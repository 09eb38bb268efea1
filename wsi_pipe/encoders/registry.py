"""Encoder registry: `@register_encoder` factories, each with the `EncoderSpec` it expects.

A registered factory builds a tile encoder `forward(x: (B, 3, H, W) float, normalised with the
spec's mean/std) -> (B, embed_dim)`. `create_encoder(name, **kw)` builds one and records on it
what is needed to save it again (`arch`, `arch_kwargs`, `spec`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch.nn as nn

from wsi_pipe.core.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder expects and returns.

    name: registry name. input_px: side of the input tile in px. mpp: target um/px of the tiles
    it was designed for. mean, std: per-channel RGB normalisation on the [0, 1] scale.
    embed_dim: size of the pooled embedding. weights_hash: content hash of loaded weights
    (None for random weights).
    """

    name: str
    input_px: int
    mpp: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    weights_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderSpec:
        return cls(
            name=str(d["name"]),
            input_px=int(d["input_px"]),
            mpp=float(d["mpp"]),
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            embed_dim=int(d["embed_dim"]),
            weights_hash=d.get("weights_hash"),
        )


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    spec: EncoderSpec
    family: str
    tiny: bool


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(
    name: str,
    *,
    input_px: int = 224,
    mpp: float = 0.5,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    embed_dim: int,
    family: str,
    tiny: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering `factory(**kw) -> nn.Module` under `name`. A duplicate name raises.

    tiny: a small variant meant for tests (every family has one).
    """

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        spec = EncoderSpec(name, input_px, mpp, tuple(mean), tuple(std), embed_dim)  # type: ignore[arg-type]
        _REGISTRY[name] = _Entry(factory, spec, family, tiny)
        return factory

    return deco


def list_encoders(family: str | None = None, tiny: bool | None = None) -> list[str]:
    """Registered encoder names (optionally one family, or only tiny / only full variants)."""
    _ensure_builtin()
    return sorted(
        n
        for n, e in _REGISTRY.items()
        if (family is None or e.family == family) and (tiny is None or e.tiny == tiny)
    )


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered with `name`; ConfigError naming the choices if unknown."""
    return _entry(name).spec


def encoder_family(name: str) -> str:
    return _entry(name).family


def _entry(name: str) -> _Entry:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown encoder {name!r}; registered encoders: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def create_encoder(name: str, scan_backend: str = "auto", **kwargs: Any) -> nn.Module:
    """Build the registered encoder `name` with random weights.

    scan_backend: selective-scan backend of Mamba-based encoders (ignored by the others; never
    part of the saved config). kwargs: architecture options of the family (saved in checkpoints).
    The model gets attributes `arch` (name), `arch_kwargs` (kwargs) and `spec` (EncoderSpec).
    """
    entry = _entry(name)
    try:
        model = entry.factory(scan_backend=scan_backend, **kwargs)
    except TypeError as e:
        raise ConfigError(
            f"encoder {name!r} does not accept options {sorted(kwargs)}: {e}"
        ) from None
    model.arch = name
    model.arch_kwargs = dict(kwargs)
    model.spec = entry.spec
    return model


def _ensure_builtin() -> None:
    # the built-in families register themselves on import
    from wsi_pipe.encoders import baselines, medmamba, ssmamba  # noqa: F401
