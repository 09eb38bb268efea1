"""Physical units: microns per pixel (mpp) <-> downsample, microns <-> pixels.

Magnification labels (20x, 40x) are for humans only; arithmetic always uses true mpp.
"""

from __future__ import annotations

import math

#: Accepted range of level-0 mpp. Real scanners are 0.1-1.0 um/px; 1000 um/px comes from
#: placeholder TIFF resolution tags (10 px/cm) and is rejected.
MPP_MIN = 0.05
MPP_MAX = 20.0

#: Conventional objective power of a 1.0 um/px ... used only for CLAM-compatible attributes.
_MPP_AT_10X = 1.0


def is_plausible_mpp(mpp: float | None) -> bool:
    """True when `mpp` (um/px) is a finite value scanners actually produce."""
    return mpp is not None and math.isfinite(mpp) and MPP_MIN <= mpp <= MPP_MAX


def downsample_for(target_mpp: float, level0_mpp: float) -> float:
    """Downsample factor (level-0 px per target px) to go from `level0_mpp` to `target_mpp`."""
    return target_mpp / level0_mpp


def px_to_um(n_px: float, mpp: float) -> float:
    """Length in um of `n_px` pixels at `mpp` um/px."""
    return n_px * mpp


def um_to_px(length_um: float, mpp: float) -> float:
    """Length in pixels at `mpp` um/px of `length_um` microns (not rounded)."""
    return length_um / mpp


def mm2_to_px2(area_mm2: float, mpp: float) -> float:
    """Area in pixels^2 at `mpp` um/px of `area_mm2` square millimetres."""
    return area_mm2 * 1e6 / (mpp * mpp)


def magnification_label(mpp: float) -> float:
    """Nominal objective power for `mpp` (10x ~ 1.0 um/px, 20x ~ 0.5, 40x ~ 0.25). For labels only."""
    return round(10.0 * _MPP_AT_10X / mpp, 2)


def tile_size_level0(tile_px: int, target_mpp: float, level0_mpp: float) -> int:
    """Side in level-0 px of a `tile_px` tile at `target_mpp` (rounded to the nearest pixel)."""
    return max(1, int(round(tile_px * target_mpp / level0_mpp)))
