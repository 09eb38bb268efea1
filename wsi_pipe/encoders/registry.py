"""Encoder registry: every tile encoder family on the one registry type (`core.registry`).

A registered builder makes a tile encoder `forward(x: (B, 3, H, W) float, normalised with the
spec's mean/std) -> (B, embed_dim)`; its entry carries the `EncoderSpec` it expects (`info`).
`create_encoder(name, **options)` builds one and records on it what is needed to save it again
(`arch`, `arch_kwargs`, `spec`).

1. Names: the registered ones (`list_encoders()`), each family's tiny variant `<family>_tiny`
   (declared once, by `tiny=` options and `tiny_spec=` on one entry of the family), and
   `timm:<arch>` for any timm architecture (entries made on demand; spec from timm's
   pretrained_cfg, `timm_models.py`). `is_known_encoder(name)` accepts all of them.
2. Options: each family's own schema (`encoder_options(name)`): the keyword arguments of its
   model class (SSMamba, MedMamba, timm's ResNet / VisionTransformer / the class of a
   `timm:<arch>`). Any other option is a ConfigError naming it and the accepted ones. Options
   are saved in checkpoints (`arch_kwargs`).
3. Controls, not options (never saved): `scan_backend` (the selective-scan backend of Mamba
   families; the others ignore it) and `empty` (build on the meta device, for weights assigned
   next, where the family can: `can_build_empty`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import torch.nn as nn

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.registry import TINY_SUFFIX, Entry, Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: keyword arguments `create_encoder` passes to the builders that take them (not options)
CONTROLS = ("scan_backend", "empty")


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
            # tuple() of a generator is tuple[float, ...] to mypy; the file holds RGB triples
            mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
            embed_dim=int(d["embed_dim"]),
            weights_hash=d.get("weights_hash"),
        )


def _load_builtins() -> None:
    # the built-in families register themselves on import
    from wsi_pipe.encoders import baselines, medmamba, ssmamba, timm_models  # noqa: F401


def _timm_entry(name: str) -> Entry[nn.Module] | None:
    """The entry of `timm:<arch>` (ConfigError for an unknown or hub architecture); None for
    other names."""
    from wsi_pipe.encoders.timm_models import (
        create_timm_named,
        is_timm_name,
        timm_name_options,
        timm_spec,
    )

    if not is_timm_name(name):
        return None
    spec = timm_spec(name)
    return ENCODERS.make_entry(
        name,
        functools.partial(create_timm_named, name),
        family="timm",
        description=f"timm architecture {name.split(':', 1)[1]}",
        options=functools.partial(timm_name_options, name),
        info=spec,
    )


ENCODERS: Registry[nn.Module] = Registry(
    "encoder",
    controls=CONTROLS,
    load_builtins=_load_builtins,
    dynamic=_timm_entry,
    dynamic_help="or timm:<arch> for a timm architecture (e.g. timm:vit_base_patch16_224)",
)

B = TypeVar("B", bound=Callable[..., nn.Module])


def register_encoder(
    name: str,
    *,
    embed_dim: int,
    family: str,
    input_px: int = 224,
    mpp: float = 0.5,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    description: str = "",
    options: Iterable[str] | Callable[[], Iterable[str]] | None = None,
    tiny: Mapping[str, Any] | None = None,
    tiny_spec: Mapping[str, Any] | None = None,
) -> Callable[[B], B]:
    """Decorator registering `build(**options) -> nn.Module` under `name` (a duplicate raises).

    options: the family's schema when `build` passes its keywords on (default: its signature,
    minus the controls `scan_backend`, `empty`). tiny: the options of the family's tiny variant,
    registered as `<family>_tiny` (one per family); tiny_spec: the EncoderSpec fields in which
    the tiny variant differs (e.g. `{"input_px": 64, "embed_dim": 64}`).
    """

    def deco(build: B) -> B:
        # tuple(mean) is tuple[float, ...] to mypy; mean/std are typed as RGB triples above
        spec = EncoderSpec(name, input_px, mpp, tuple(mean), tuple(std), embed_dim)  # type: ignore[arg-type]
        small = replace(spec, name=f"{family}{TINY_SUFFIX}", **dict(tiny_spec or {}))
        ENCODERS.add(
            name,
            build,
            family=family,
            description=description,
            options=options,
            tiny=tiny,
            tiny_info=small if tiny else None,
            info=spec,
        )
        return build

    return deco


def list_encoders(family: str | None = None, tiny: bool | None = None) -> list[str]:
    """Registered encoder names (optionally one family, or only tiny / only full variants)."""
    return ENCODERS.names(family=family, tiny=tiny)


def is_known_encoder(name: str) -> bool:
    """A registered name, or `timm:<arch>` of an architecture this timm has (no hub names)."""
    return name in ENCODERS


def get_encoder_spec(name: str) -> EncoderSpec:
    """The spec registered with `name` (or read off timm for `timm:<arch>`); ConfigError naming
    the choices if unknown."""
    spec: EncoderSpec = ENCODERS.get(name).info
    return spec


def encoder_options(name: str) -> frozenset[str]:
    """The option schema of `name`'s family (what `create_encoder(name, **options)` accepts)."""
    return ENCODERS.get(name).options


def can_build_empty(name: str) -> bool:
    """`create_encoder(name, empty=True)` builds on the meta device (no weight initialisation)."""
    return "empty" in ENCODERS.get(name).controls


def encoder_family(name: str) -> str:
    return ENCODERS.get(name).family


def create_encoder(
    name: str, scan_backend: str = "auto", *, empty: bool = False, **options: Any
) -> nn.Module:
    """Build the encoder `name` (registered, tiny variant, or `timm:<arch>`) with random weights.

    options: architecture options of the family's schema (saved in checkpoints); any other is a
    ConfigError naming it and the accepted ones. scan_backend: selective-scan backend of
    Mamba-based encoders (ignored by the others; never saved). empty: build on the meta device
    without initialising, where the family can (weights are assigned next;
    `checkpoint.load_encoder`); otherwise a normal build.
    The model gets attributes `arch` (name), `arch_kwargs` (options) and `spec` (EncoderSpec).
    """
    entry = ENCODERS.get(name)
    entry.check_options(options)
    try:
        model = entry.build_with((), options, {"scan_backend": scan_backend, "empty": empty})
    except TypeError as e:  # a value of the wrong type for an accepted option
        raise ConfigError(f"encoder {name!r}: bad option values {options}: {e}") from None
    # plain attributes on any nn.Module (timm's classes too): setattr, as `Module.__setattr__`
    # is typed for Tensor | Module values only
    setattr(model, "arch", name)  # noqa: B010
    setattr(model, "arch_kwargs", dict(options))  # noqa: B010
    setattr(model, "spec", entry.info)  # noqa: B010
    return model
