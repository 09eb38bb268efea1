"""Histology augmentations on batches of tiles, in plain torch (run on the training device).

* dihedral: random horizontal flip, vertical flip and 90-degree rotation per tile (tissue has
  no canonical orientation);
* HED stain jitter: RGB -> optical density -> haematoxylin/eosin/DAB concentrations (Ruifrok &
  Johnston's stain matrix), each scaled by U(1-s, 1+s) and shifted by U(-s, s) per tile, back to
  RGB (Tellez et al. 2018);
* brightness / contrast jitter.
"""

from __future__ import annotations

import torch

# Ruifrok & Johnston H&E-DAB optical-density vectors (rows: H, E, DAB), normalised
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x: (B, C, H, W) square tiles -> each tile flipped / rotated by a random dihedral element."""
    b = x.shape[0]
    ops = torch.randint(0, 8, (b,), generator=generator).tolist()
    out = []
    for i, op in enumerate(ops):
        t = x[i]
        if op & 1:
            t = t.flip(-1)
        if op & 2:
            t = t.flip(-2)
        if op & 4:
            t = t.transpose(-1, -2)
        out.append(t)
    return torch.stack(out)


def hed_jitter(
    rgb: torch.Tensor, sigma: float = 0.05, generator: torch.Generator | None = None
) -> torch.Tensor:
    """rgb: (B, 3, H, W) float in [0, 1] -> stain-jittered rgb in [0, 1] (see module doc)."""
    if sigma <= 0:
        return rgb
    b = rgb.shape[0]
    dev, dt = rgb.device, torch.float32
    od = -torch.log(rgb.float().clamp_min(1.0 / 255.0))  # (B, 3, H, W)
    hed = torch.einsum("bchw,cs->bshw", od, _HED_FROM_RGB.to(dev))
    alpha = 1 + (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * sigma
    hed = hed * alpha.to(dev, dt) + beta.to(dev, dt)
    od = torch.einsum("bshw,sc->bchw", hed, _RGB_FROM_HED.to(dev))
    return torch.exp(-od).clamp(0, 1).to(rgb.dtype)


def brightness_contrast(
    rgb: torch.Tensor, strength: float = 0.1, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-tile brightness shift and contrast scale, both within +-strength; stays in [0, 1]."""
    if strength <= 0:
        return rgb
    b = rgb.shape[0]
    shift = ((torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(rgb)
    scale = (1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(rgb)
    mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
    return ((rgb - mean) * scale + mean + shift).clamp(0, 1)


def augment_batch(
    tiles_u8: torch.Tensor,
    stain_sigma: float = 0.05,
    bc_strength: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 tiles (B, 3, H, W) -> augmented float tiles in [0, 1] (B, 3, H, W)."""
    x = random_dihedral(tiles_u8, generator).float() / 255.0
    x = hed_jitter(x, stain_sigma, generator)
    return brightness_contrast(x, bc_strength, generator)
