"""MAMIM: Mamba masked image modelling (the self-supervised stage of SSMamba).

The abstract says only "Mamba masked image modelling against cross-magnification domain shift".
Our reconstruction, in the SimMIM style that suits a hierarchical backbone whose scans need the
full 2-D grid:

* the image is cut into mask units of `mask_px` px (a multiple of the patch px); a random
  `mask_ratio` of the units of each image is masked;
* masked patch tokens are replaced by one learned mask token and STAY in the sequence, so every
  directional scan runs over the complete grid (nothing is dropped as in MAE);
* a light decoder (LayerNorm + one linear layer per final token, i.e. a 1x1 conv, and a pixel
  shuffle) predicts the normalised pixels of the `total_stride` x `total_stride` area under each
  final token;
* the loss is the mean squared error on the pixels of masked units only, against the
  normalised input, optionally normalised again per mask unit (MAE's `norm_pix_loss`).

Cross-magnification: the pretraining stage samples tiles from every mpp grid of the run, so one
model sees the same tissue at several scales.
"""

from __future__ import annotations

from typing import Protocol, cast, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F


@runtime_checkable
class TokenGridEncoder(Protocol):
    """The token-grid interface MAMIM needs of its encoder.

    `HierarchicalBackbone` (SSMamba, MedMamba) and the timm ViT encoders
    (`timm_models._TimmViTEncoder`) have it; a ResNet has not.
    """

    @property
    def total_stride(self) -> int:
        """Input px per token of the final feature map."""
        ...

    @property
    def embed_dim(self) -> int:
        """Channels of the final feature map."""
        ...

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> patch tokens (B, H/p, W/p, C0)."""
        ...

    def forward_stages(self, t: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, h, w, C0) -> final feature map."""
        ...

    def forward_tokens(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final feature map (B, H/s, W/s, embed_dim); masked patch tokens -> `mask_token`."""
        ...


class MAMIM(nn.Module):
    """Encoder + mask token + light pixel decoder.

    encoder: a registry encoder with the token grid (`TokenGridEncoder`: SSMamba, MedMamba,
    ViT), optionally `patch`. mask_px: side of a mask unit in input px.
    """

    encoder: nn.Module  # a TokenGridEncoder (checked in __init__)

    def __init__(self, encoder: nn.Module, mask_px: int = 32, norm_pix_loss: bool = False) -> None:
        super().__init__()
        if not isinstance(encoder, TokenGridEncoder):
            raise ValueError(
                f"encoder {getattr(encoder, 'arch', type(encoder).__name__)} has no token grid for MAMIM"
            )
        self.encoder = encoder
        self.patch = int(getattr(encoder, "patch", 1))
        self.stride = int(encoder.total_stride)
        if mask_px % self.patch:
            raise ValueError(f"mask_px {mask_px} must be a multiple of the patch size {self.patch}")
        self.mask_px = mask_px
        self.norm_pix_loss = norm_pix_loss
        with torch.no_grad():
            c0 = encoder.embed(torch.zeros(1, 3, self.stride, self.stride)).shape[-1]
        self.mask_token = nn.Parameter(torch.zeros(c0))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        dim = int(encoder.embed_dim)
        self.decoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, self.stride**2 * 3))

    def random_mask(
        self,
        batch: int,
        h_px: int,
        w_px: int,
        ratio: float,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """(B, h_px/mask_px, w_px/mask_px) bool, exactly round(ratio * units) True per image."""
        if h_px % self.mask_px or w_px % self.mask_px:
            raise ValueError(f"input {h_px}x{w_px} px is not a multiple of mask_px {self.mask_px}")
        gh, gw = h_px // self.mask_px, w_px // self.mask_px
        n = gh * gw
        k = min(n - 1, max(1, round(ratio * n)))
        noise = torch.rand(batch, n, generator=generator)
        ranks = noise.argsort(dim=1).argsort(dim=1)
        return (ranks < k).view(batch, gh, gw).to(device)

    def forward(
        self, x: torch.Tensor, unit_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, H, W) normalised; unit_mask: (B, H/mask_px, W/mask_px) bool, True = masked.

        Returns (loss: scalar, prediction (B, 3, H, W) of normalised pixels).
        """
        b, _, h, w = x.shape
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"MAMIM input {h}x{w} px must be a multiple of the encoder stride {self.stride}"
            )
        per = self.mask_px // self.patch
        token_mask = unit_mask.repeat_interleave(per, 1).repeat_interleave(per, 2)
        grid = cast(TokenGridEncoder, self.encoder)  # checked in __init__
        feats = grid.forward_tokens(x, token_mask, self.mask_token)  # (B, h/s, w/s, C)
        pred = self.decoder(feats)  # (B, h/s, w/s, s*s*3)
        pred = F.pixel_shuffle(pred.permute(0, 3, 1, 2), self.stride)  # (B, 3, H, W)
        pixel_mask = unit_mask.repeat_interleave(self.mask_px, 1).repeat_interleave(self.mask_px, 2)
        target = x
        if self.norm_pix_loss:
            target = self._unit_normalise(x)
        err = (pred.float() - target.float()).square().mean(dim=1)  # (B, H, W)
        m = pixel_mask.to(err.dtype)
        loss = (err * m).sum() / m.sum().clamp_min(1.0)
        return loss, pred

    def _unit_normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each mask unit's pixels to zero mean, unit variance (per channel)."""
        b, c, h, w = x.shape
        p = self.mask_px
        u = x.float().reshape(b, c, h // p, p, w // p, p)
        mean = u.mean(dim=(3, 5), keepdim=True)
        var = u.var(dim=(3, 5), keepdim=True)
        return ((u - mean) / (var + 1e-6).sqrt()).reshape(b, c, h, w)
