"""Tile encoders built by timm: `timm:<arch>`, pathology foundation models, and the baselines.

Weights ALWAYS come from a local file (`load_encoder(name, weights=FILE)`): every model here is
built with `pretrained=False`; hub names (`hf-hub:` / `hf_hub:`) are refused, so nothing is
ever downloaded.

Building one encoder:
1. `timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)`; the kwargs of a named
   entry are those of its model card (`FOUNDATION_MODELS`). `empty=True` builds on the meta
   device (no random initialisation: a 1.1 B-parameter ViT-g takes 0.3 s instead of ~35 s) for
   weights that are assigned next (`checkpoint.py`).
2. The instance's class becomes a subclass of its timm class that adds the wsi-pipe encoder
   interface (`_TimmEncoder`, `_TimmViTEncoder`); parameter names, and so state dicts, stay
   timm's: a file written for `timm.create_model(arch, **kwargs)` loads as is, and ours loads
   there.
3. `forward(x: (B, 3, H, W)) -> (B, embed_dim)` pools by the entry's `pool`:
   "head"            timm's own head with `num_classes=0` (pre-logits): the class token of a
                     ViT with `global_pool="token"`, the global average of a ResNet;
   "cls+mean_patch"  concat(class token, mean of the patch tokens; register tokens excluded),
                     Virchow / Virchow2 (the model is built with `global_pool=""`).
   ViTs also expose the token grid (`embed`, `forward_stages`, `forward_tokens(x, mask,
   mask_token)`, `patch`, `total_stride`) for MAMIM pretraining.

A generic `timm:<arch>[.<tag>]` takes its spec from timm's `pretrained_cfg` (input px,
mean/std) and the model (pooled width, read off a meta-device forward); its target mpp is
unknown and set to 0.5 um/px.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.encoders.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderSpec,
    register_encoder,
)

log = logging.getLogger(__name__)

TIMM_PREFIX = "timm:"
#: poolings of the pooled embedding (see the module docstring)
POOLS = ("head", "cls+mean_patch")
#: timm layer classes named in the kwargs tables below (resolved when a model is built)
_LAYER_NAMES = {"mlp_layer", "act_layer"}


def _resolve_layers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor kwargs with the layer classes named by string resolved."""
    import timm.layers

    table = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": nn.SiLU, "GELU": nn.GELU}
    out = dict(kwargs)
    for k in _LAYER_NAMES & set(out):
        if isinstance(out[k], str):
            out[k] = table[out[k]]
    return out


# ------------------------------------------------------------------------ encoder interface
class _TimmEncoder:
    """Mixed in front of a timm model class: the wsi-pipe encoder `forward`."""

    wsi_pool: str

    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> pooled embedding (B, embed_dim)."""
        if self.wsi_pool == "cls+mean_patch":
            t = self.forward_features(x)  # (B, prefix + patches, C)
            return torch.cat((t[:, 0], t[:, self.num_prefix_tokens :].mean(dim=1)), dim=-1)
        # a mixin: `forward` is the timm class's, after this one in the MRO; mypy sees only object
        return super().forward(x)  # type: ignore[misc]


class _TimmViTEncoder(_TimmEncoder):
    """A timm VisionTransformer with the token-grid methods MAMIM uses."""

    @property
    def patch(self: Any) -> int:
        return int(self.patch_embed.patch_size[0])

    @property
    def total_stride(self: Any) -> int:
        return int(self.patch_embed.patch_size[0])

    def embed(self: Any, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens (B, H/p, W/p, C), before position embeddings."""
        b, _, h, w = x.shape
        t = self.patch_embed(x)
        if t.ndim == 3:  # a fixed-size model flattens the grid
            p = self.patch
            t = t.reshape(b, h // p, w // p, t.shape[-1])
        return t

    def forward_stages(self: Any, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, C) -> normalised token grid (B, h, w, C) (prefix tokens out)."""
        b, h, w, c = t.shape
        x = self._pos_embed(t if self.dynamic_img_size else t.reshape(b, h * w, c))
        x = self.norm(self.blocks(self.norm_pre(self.patch_drop(x))))
        return x[:, self.num_prefix_tokens :].reshape(b, h, w, c)

    def forward_tokens(
        self: Any,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token grid (B, H/p, W/p, C); masked patches (B, H/p, W/p) become `mask_token`."""
        t = self.embed(x)
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask needs a mask_token")
            t = torch.where(mask[..., None], mask_token.to(t.dtype), t)
        return self.forward_stages(t)


_CLASSES: dict[type, type] = {}


def _as_encoder(model: nn.Module, pool: str) -> nn.Module:
    """Give `model` the encoder interface (its class becomes a cached subclass of its own)."""
    from timm.models.vision_transformer import VisionTransformer

    if pool not in POOLS:
        raise ConfigError(f"unknown pooling {pool!r}; choose one of {POOLS}")
    base = type(model)
    if base not in _CLASSES:
        mixin = _TimmViTEncoder if issubclass(base, VisionTransformer) else _TimmEncoder
        _CLASSES[base] = type(f"Encoder{base.__name__}", (mixin, base), {"__module__": __name__})
    if pool == "cls+mean_patch" and not isinstance(model, VisionTransformer):
        raise ConfigError(f"pooling {pool!r} needs a ViT, not a {base.__name__}")
    model.__class__ = _CLASSES[base]
    # a plain attribute (declared on _TimmEncoder); `Module.__setattr__` is typed for
    # Tensor | Module values only
    model.wsi_pool = pool  # type: ignore[assignment]
    return model


def build_timm(
    arch: str, kwargs: Mapping[str, Any], pool: str = "head", empty: bool = False
) -> nn.Module:
    """`timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)` as an encoder.

    empty: build on the meta device, uninitialised (the caller assigns weights).
    """
    import timm

    _check_arch(arch)
    kw = {"num_classes": 0, **_resolve_layers(kwargs)}
    try:
        if empty:
            with torch.device("meta"):
                model = timm.create_model(arch, pretrained=False, **kw)
        else:
            model = timm.create_model(arch, pretrained=False, **kw)
    except TypeError as e:
        raise ConfigError(
            f"timm model {arch!r} does not accept options {sorted(kw)}: {e}"
        ) from None
    return _as_encoder(model, pool)


def _check_arch(arch: str) -> None:
    import timm

    if arch.startswith(("hf-hub:", "hf_hub:")) or "/" in arch:
        raise ConfigError(
            f"{arch!r} is a Hugging Face hub name: wsi-pipe never downloads weights. Give a timm "
            "architecture (e.g. timm:vit_large_patch16_224) or a named entry (e.g. uni) with "
            "--weights FILE, the model's file saved on this machine"
        )
    if not timm.is_model(arch):
        raise ConfigError(
            f"timm has no architecture {arch!r} (timm {timm.__version__}); list them with "
            "`python -c 'import timm; print(timm.list_models(\"vit_*\"))'`"
        )


# ------------------------------------------------------------------------- generic timm:arch
def is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX)


@functools.lru_cache(maxsize=64)
def timm_spec(name: str) -> EncoderSpec:
    """Spec of `timm:<arch>` from timm's pretrained_cfg and a meta-device forward."""
    arch = name[len(TIMM_PREFIX) :]
    if not arch:
        raise ConfigError("encoder 'timm:' names no architecture; e.g. timm:vit_base_patch16_224")
    model = build_timm(arch, {}, empty=True)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    px = int(tuple(cfg.get("input_size", (3, 224, 224)))[-1])
    try:
        with torch.no_grad():
            dim = int(model(torch.empty(1, 3, px, px, device="meta")).shape[-1])
    except Exception:  # an op without a meta kernel: the documented attributes
        # num_features is a plain int attribute of timm models; mypy reads it through
        # `Module.__getattr__` (Tensor | Module)
        dim = int(getattr(model, "head_hidden_size", None) or model.num_features)  # type: ignore[arg-type]
    mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in cfg.get("std", IMAGENET_STD))
    # mean/std: tuple() of a generator is tuple[float, ...] to mypy; timm's are RGB triples
    return EncoderSpec(name, px, 0.5, mean, std, dim)  # type: ignore[arg-type]


def create_timm_named(name: str, empty: bool = False, **kwargs: Any) -> nn.Module:
    """Build `timm:<arch>`; kwargs go to timm (JSON types only, they are saved in checkpoints)."""
    return build_timm(name[len(TIMM_PREFIX) :], kwargs, empty=empty)


#: constructor arguments of timm classes that are not encoder options: the encoders are built
#: headless (`num_classes=0`) and placed by the caller (`device`, `dtype`)
_NOT_OPTIONS = frozenset({"self", "num_classes", "device", "dtype"})


def class_options(cls: type) -> frozenset[str]:
    """The named constructor arguments of a timm model class, as an option schema.

    A few timm classes also take `**kwargs` (ByobNet, RegNet, ...); only their named arguments
    are accepted, so a misspelt option fails here instead of deep inside timm.
    """
    # mypy refuses `__init__` read off a class object as unsound; here it is only inspected
    params = inspect.signature(cls.__init__).parameters  # type: ignore[misc]
    named = {n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return frozenset(named - _NOT_OPTIONS)


def vit_options() -> frozenset[str]:
    """Options of timm's VisionTransformer (the ViT baselines and the foundation models)."""
    from timm.models.vision_transformer import VisionTransformer

    return class_options(VisionTransformer)


def resnet_options() -> frozenset[str]:
    """Options of timm's ResNet (the ResNet baselines)."""
    from timm.models.resnet import ResNet

    return class_options(ResNet)


@functools.lru_cache(maxsize=64)
def timm_name_options(name: str) -> frozenset[str]:
    """Options of `timm:<arch>`: the constructor arguments of the arch's timm class."""
    model = build_timm(name[len(TIMM_PREFIX) :], {}, empty=True)
    base = next(c for c in type(model).__mro__ if c.__module__.startswith("timm."))
    return class_options(base)


# ------------------------------------------------------------------ pathology foundation models
@dataclass(frozen=True)
class FoundationModel:
    """A published pathology tile encoder that is a timm model (weights: a local file).

    arch, kwargs: `timm.create_model(arch, pretrained=False, **kwargs)` as on the model card
    (layer classes named by string). pool: see POOLS. input_px, mean, std, embed_dim, mpp: the
    card's preprocessing and output. card: where the configuration was taken from; checked:
    what of it could be verified (docs/encoders.md).
    """

    name: str
    title: str
    arch: str
    kwargs: Mapping[str, Any]
    pool: str
    embed_dim: int
    card: str
    checked: str
    input_px: int = 224
    mpp: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    params_m: float = 0.0
    notes: tuple[str, ...] = field(default=())

    def timm_kwargs(self) -> dict[str, Any]:
        """The constructor kwargs with layer classes resolved (for `timm.create_model`)."""
        return {"num_classes": 0, **_resolve_layers(self.kwargs)}


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

FOUNDATION_MODELS: dict[str, FoundationModel] = {
    m.name: m
    for m in (
        FoundationModel(
            name="uni",
            title="UNI (MahmoodLab), ViT-L/16",
            arch="vit_large_patch16_224",
            kwargs={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "dynamic_img_size": True,
            },
            pool="head",
            embed_dim=1024,
            params_m=303.35,
            card="https://huggingface.co/MahmoodLab/UNI",
            checked="kwargs and ImageNet mean/std as quoted from the card by several public "
            "repositories; the card itself was not readable here",
        ),
        FoundationModel(
            name="uni2_h",
            title="UNI2-h (MahmoodLab), ViT-H/14 SwiGLU, 8 registers",
            arch="vit_giant_patch14_224",
            kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "no_embed_class": True,
                **_SWIGLU,
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            pool="head",
            embed_dim=1536,
            params_m=681.39,
            card="https://huggingface.co/MahmoodLab/UNI2-h",
            checked="timm_kwargs verbatim in public code citing the card; ImageNet mean/std",
        ),
        FoundationModel(
            name="virchow2",
            title="Virchow2 (Paige), ViT-H/14 SwiGLU, 4 registers",
            arch="vit_huge_patch14_224",
            kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                **_SWIGLU,
                "reg_tokens": 4,
            },
            pool="cls+mean_patch",
            embed_dim=2560,
            params_m=631.24,
            card="https://huggingface.co/paige-ai/Virchow2",
            checked="config.json model_args and pretrained_cfg (ImageNet mean/std, 224 px) as "
            "quoted by public code; embedding = concat(class token, mean of tokens 5:) per the card",
        ),
        FoundationModel(
            name="h_optimus_0",
            title="H-optimus-0 (Bioptimus), ViT-g/14, 4 registers",
            arch="vit_giant_patch14_reg4_dinov2",
            kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
            pool="head",
            embed_dim=1536,
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
            params_m=1134.77,
            card="https://huggingface.co/bioptimus/H-optimus-0",
            checked="config.json read (architecture, 224 px, mean/std, global_pool token, 1536 "
            "features); init_values/dynamic_img_size from the card as quoted by public code",
        ),
        FoundationModel(
            name="prov_gigapath",
            title="Prov-GigaPath tile encoder, ViT-g/16 SwiGLU",
            arch="vit_giant_patch14_dinov2",
            kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
            },
            pool="head",
            embed_dim=1536,
            params_m=1134.95,
            card="https://huggingface.co/prov-gigapath/prov-gigapath",
            checked="kwargs as quoted by several public repositories (the card's config.json "
            "was not readable here); card preprocessing: resize 256 bicubic, centre crop 224, "
            "ImageNet mean/std",
        ),
    )
}


def _build_foundation(m: FoundationModel, empty: bool = False, **options: Any) -> nn.Module:
    return build_timm(m.arch, {**m.kwargs, **options}, pool=m.pool, empty=empty)


#: the family's tiny variant `foundation_tiny` (tests): Virchow2 at test size, plus UNI2-h's
#: position embeddings without the prefix tokens: SwiGLU, LayerScale, 4 registers, Virchow
#: pooling (2 x 32)
FOUNDATION_TINY_OF = "virchow2"
FOUNDATION_TINY: dict[str, Any] = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.66667 * 2,
    "no_embed_class": True,
}

for _m in FOUNDATION_MODELS.values():
    _tiny = _m.name == FOUNDATION_TINY_OF
    register_encoder(
        _m.name,
        input_px=_m.input_px,
        mpp=_m.mpp,
        mean=_m.mean,
        std=_m.std,
        embed_dim=_m.embed_dim,
        family="foundation",
        description=_m.title,
        options=vit_options,
        tiny=FOUNDATION_TINY if _tiny else None,
        tiny_spec={"input_px": 64, "embed_dim": 64} if _tiny else None,
    )(functools.partial(_build_foundation, _m))
