"""Tile pixels: the one resize every stage uses, and the one PNG encoder.

Pretrain, finetune, extract, heatmap and anomaly all resize tiles here, so training and
inference see the same interpolation; every PNG the pipeline writes is encoded here.
"""

from __future__ import annotations

import cv2
import numpy as np


def resize_tile(region: np.ndarray, out_px: int) -> np.ndarray:
    """Resize an RGB region (h, w, 3) uint8 to (out_px, out_px, 3) uint8.

    Only when the sizes differ: INTER_AREA to shrink (no aliasing), INTER_LINEAR to enlarge.
    """
    h, w = region.shape[:2]
    if h == out_px and w == out_px:
        return region
    interp = cv2.INTER_AREA if max(h, w) > out_px else cv2.INTER_LINEAR
    out: np.ndarray = cv2.resize(region, (out_px, out_px), interpolation=interp)
    return out


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (h, w, 3). Raises OSError when encoding fails."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"PNG encoding failed for an image of shape {rgb.shape}")
    return bytes(buf.tobytes())
