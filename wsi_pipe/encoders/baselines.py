"""Baseline tile encoders: ResNet-50 and ViT-S/16, written out in plain PyTorch.

Parameter names follow torchvision (`resnet50`) and timm (`vit_small_patch16_224`) so that a
local state-dict file of either loads with `load_encoder(name, weights=FILE)` (the classifier
`fc.*` / `head.*` entries are dropped; the encoders return pooled features). Nothing is ever
downloaded.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from wsi_pipe.encoders.registry import register_encoder

# ------------------------------------------------------------------------------- ResNet-50


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with bottlenecks; (B, 3, H, W) -> (B, 4 * widths[-1]) global-average-pooled."""

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        scan_backend: str = "auto",  # accepted for a uniform factory signature; unused
    ) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        for i, (n, w) in enumerate(zip(layers, widths, strict=True)):
            setattr(self, f"layer{i + 1}", self._make_layer(w, n, stride=1 if i == 0 else 2))
        self.fc = nn.Identity()  # torchvision's classifier slot; features are returned instead
        self.embed_dim = widths[-1] * Bottleneck.expansion
        self.total_stride = 32
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * 4),
            )
        mods = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        mods += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward_tokens(self, x: torch.Tensor, mask=None, mask_token=None) -> torch.Tensor:
        """Final feature map, channels-last (B, H/32, W/32, embed_dim). No masking support."""
        if mask is not None:
            raise ValueError("ResNet does not support masked image modelling (no token grid)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_tokens(x).mean(dim=(1, 2)))


@register_encoder("resnet50", embed_dim=2048, family="resnet")
def resnet50(**kw) -> ResNet:
    return ResNet(**{"layers": (3, 4, 6, 3), **kw})


@register_encoder("resnet_tiny", input_px=64, embed_dim=64, family="resnet", tiny=True)
def resnet_tiny(**kw) -> ResNet:
    return ResNet(**{"layers": (1, 1, 1, 1), "widths": (8, 8, 16, 16), **kw})


# ------------------------------------------------------------------------------------ ViT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbedViT(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)


class VisionTransformer(nn.Module):
    """ViT with a class token (timm parameter names); (B, 3, H, W) -> class token (B, dim).

    Position embeddings are learned for `img_px` and interpolated (bicubic) for other sizes.
    """

    def __init__(
        self,
        img_px: int = 224,
        patch: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        scan_backend: str = "auto",  # accepted for a uniform factory signature; unused
    ) -> None:
        super().__init__()
        self.patch = patch
        self.total_stride = patch
        self.embed_dim = dim
        self.patch_embed = PatchEmbedViT(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_px // patch) ** 2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _pos(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed[:, 1:]
        side = int(math.isqrt(pos.shape[1]))
        if (h, w) != (side, side):
            grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return pos

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens (B, H/p, W/p, dim) (before position embeddings)."""
        return self.patch_embed.proj(x).permute(0, 2, 3, 1)

    def forward_stages(self, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, dim) -> normalised token grid (B, h, w, dim)."""
        b, h, w, c = t.shape
        x = t.reshape(b, h * w, c) + self._pos(h, w)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = self.norm(self.blocks(torch.cat((cls, x), dim=1)))
        return x[:, 1:].reshape(b, h, w, c)

    def forward_tokens(self, x: torch.Tensor, mask=None, mask_token=None) -> torch.Tensor:
        """Token grid (B, H/p, W/p, dim); masked patches (B, H/p, W/p) become `mask_token`."""
        t = self.embed(x)
        if mask is not None:
            t = torch.where(mask[..., None], mask_token.to(t.dtype), t)
        return self.forward_stages(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        t = self.embed(x)
        gh, gw = t.shape[1:3]
        tokens = t.reshape(b, gh * gw, -1) + self._pos(gh, gw)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = self.norm(self.blocks(torch.cat((cls, tokens), dim=1)))
        return self.head(x[:, 0])


@register_encoder("vit_s16", embed_dim=384, family="vit")
def vit_s16(**kw) -> VisionTransformer:
    return VisionTransformer(
        **{"img_px": 224, "patch": 16, "dim": 384, "depth": 12, "heads": 6, **kw}
    )


@register_encoder("vit_tiny", input_px=64, embed_dim=32, family="vit", tiny=True)
def vit_tiny(**kw) -> VisionTransformer:
    return VisionTransformer(**{"img_px": 64, "patch": 8, "dim": 32, "depth": 2, "heads": 2, **kw})
