"""Baseline tile encoders: ResNet-50 and ViT-S/16, built by timm (`timm_models.build_timm`).

timm's `resnet50` has torchvision's parameter names, so a torchvision ResNet-50 state-dict file
(`torchvision.models.resnet50().state_dict()`, or a downloaded `resnet50-*.pth`) and a timm one
both load with `load_encoder("resnet50", weights=FILE)`; `vit_s16` is timm's
`vit_small_patch16_224` (a timm ViT-S/16 file loads as is). The classifier `fc.*` / `head.*`
entries of such files are dropped: the encoders return pooled features (global average / class
token). Nothing is ever downloaded.

Options: those of timm's `ResNet` / `VisionTransformer` constructors, and the option names of the
earlier hand-written models (`layers`/`widths`; `img_px`, `patch`, `dim`, `heads`), which older
checkpoints carry in `arch_kwargs`. The tiny variants `resnet_tiny`, `vit_tiny` (tests) are the
same timm classes at toy widths, declared on `resnet50` / `vit_s16`.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from wsi_pipe.encoders.registry import register_encoder
from wsi_pipe.encoders.timm_models import build_timm, resnet_options, vit_options

_VIT_OLD_NAMES = {
    "img_px": "img_size",
    "patch": "patch_size",
    "dim": "embed_dim",
    "heads": "num_heads",
}


def _resnet(defaults: dict[str, Any], kw: dict[str, Any], empty: bool) -> nn.Module:
    args = {**defaults, **kw}
    if "widths" in args:  # the hand-written ResNet's name: stage widths, stem = first width
        widths = tuple(int(w) for w in args.pop("widths"))
        args["channels"] = widths
        args.setdefault("stem_width", widths[0])
    if "layers" in args:
        args["layers"] = tuple(int(n) for n in args["layers"])
    return build_timm("resnet50", args, pool="head", empty=empty)


def _vit(defaults: dict[str, Any], kw: dict[str, Any], empty: bool) -> nn.Module:
    args = {**defaults, **{_VIT_OLD_NAMES.get(k, k): v for k, v in kw.items()}}
    return build_timm("vit_small_patch16_224", args, pool="head", empty=empty)


#: the option names of the earlier hand-written models, accepted beside timm's
_RESNET_OLD_NAMES = frozenset({"widths"})


def _resnet_options() -> frozenset[str]:
    return resnet_options() | _RESNET_OLD_NAMES


def _vit_options() -> frozenset[str]:
    return vit_options() | frozenset(_VIT_OLD_NAMES)


@register_encoder(
    "resnet50",
    embed_dim=2048,
    family="resnet",
    description="ResNet-50 (timm resnet50, torchvision parameter names)",
    options=_resnet_options,
    tiny={"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16)},
    tiny_spec={"input_px": 64, "embed_dim": 64},
)
def resnet50(empty: bool = False, **options: Any) -> nn.Module:
    return _resnet({}, options, empty)


#: a ViT takes tiles of any multiple of its patch (position embeddings interpolated by timm)
_VIT_DYNAMIC = {"dynamic_img_size": True}


@register_encoder(
    "vit_s16",
    embed_dim=384,
    family="vit",
    description="ViT-S/16 (timm vit_small_patch16_224), class token",
    options=_vit_options,
    tiny={"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    tiny_spec={"input_px": 64, "embed_dim": 32},
)
def vit_s16(empty: bool = False, **options: Any) -> nn.Module:
    return _vit({"img_size": 224, **_VIT_DYNAMIC}, options, empty)
