"""Pen-ink detection on RGB slide images (pure numpy / OpenCV).

Marker ink is far more saturated than H&E and, for green and blue ink, of a hue H&E never has:

- red ink: hue 343-360 or 0-20 deg, HSV saturation >= 130/255 and R - G >= 60.
  Eosin is magenta-pink (hue ~310-340 deg, saturation ~40-100) and stays below these bounds;
  only the most intensely eosin-stained spots at high magnification come close.
- green ink: hue 120-200 deg, saturation >= 40 and G - R >= 15; or hue 200-215 deg when dark
  (value < 150) and saturated (>= 100): teal ink over tissue. The light-blue haematoxylin
  counterstain of IHC slides (~205-215 deg) is bright and stays out.
- blue ink: hue 195-230 deg, saturation >= 90, B - R >= 80 and B - G >= 40 (H&E haematoxylin is
  purple-blue, ~235-300 deg).

Measured on the HistoQC pen examples (`pen_red.png`, `pen_green.png` with their masks): IoU 0.90
and 0.93 against the hand-made masks; < 0.1 % of pixels flagged on pen-free H&E and Ki67 slides at
8 um/px. Tuned for H&E: on IHC slides with a strong blue counterstain, set
`SegmentConfig.remove_pen=False` if tissue goes missing. Black ink is not detected
(indistinguishable from dense haematoxylin by colour alone).
"""

from __future__ import annotations

import cv2
import numpy as np

PEN_COLOURS = ("red", "green", "blue")


def _hsv_planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees (float32), saturation and value (int16, 0-255) of uint8 RGB."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0].astype(np.float32) * (360.0 / 256.0)
    return hue, hsv[..., 1].astype(np.int16), hsv[..., 2].astype(np.int16)


def pen_masks(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Per-colour pen masks of uint8 RGB `(h, w, 3)`: {"red"|"green"|"blue": bool (h, w)}."""
    if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.dtype != np.uint8:
        raise ValueError(f"pen detection needs uint8 RGB (h, w, 3), got {rgb.shape} {rgb.dtype}")
    rgb = rgb[..., :3]
    hue, sat, value = _hsv_planes(rgb)
    r, g, b = (rgb[..., i].astype(np.int16) for i in range(3))
    red = ((hue >= 343.0) | (hue < 20.0)) & (sat >= 130) & (r - g >= 60)
    green = ((hue >= 120.0) & (hue < 200.0) & (sat >= 40) & (g - r >= 15)) | (
        # teal ink over tissue turns darker and bluer; light-blue IHC counterstain is not dark
        (hue >= 200.0) & (hue < 215.0) & (sat >= 100) & (value < 150) & (g - r >= 10)
    )
    blue = (hue >= 195.0) & (hue < 230.0) & (sat >= 90) & (b - r >= 80) & (b - g >= 40)
    return {"red": red, "green": green, "blue": blue}


def pen_mask(rgb: np.ndarray, colours: tuple[str, ...] = PEN_COLOURS) -> np.ndarray:
    """bool `(h, w)`: True where uint8 RGB `(h, w, 3)` shows red, green or blue marker ink."""
    unknown = set(colours) - set(PEN_COLOURS)
    if unknown:
        raise ValueError(f"unknown pen colours {sorted(unknown)}; known: {PEN_COLOURS}")
    masks = pen_masks(rgb)
    out = np.zeros(rgb.shape[:2], bool)
    for c in colours:
        out |= masks[c]
    return out
