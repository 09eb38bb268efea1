"""Tissue segmentation of a low-resolution slide image (pure numpy / OpenCV, no I/O).

`segment_tissue(rgb, mpp, cfg)` works on an image at `mpp` um/px (the caller reads a level near
`cfg.seg_mpp` and resizes it to exactly that). Every size in the config is physical (um, mm2),
converted here with the image's mpp, so results do not depend on the scanner's resolution.

Steps:
1. pen ink (red / green / blue marker, see `pen.py`) is detected; specks under
   `MIN_PEN_AREA_MM2` are dropped (ink strokes are far larger; blue IHC nuclei at high resolution
   are not); the rest is grown by `pen_dilate_um` and treated as background;
2. HSV saturation, median-filtered over `median_blur_um`;
3. threshold: `cfg.saturation_threshold` if set, else Otsu clipped to
   [`min_saturation`, `max_otsu_saturation`] -- the floor keeps a blank slide blank, the ceiling
   keeps pale stroma when the slide also has dark nuclei-rich tissue. When nothing in view looks
   like glass (fewer than 0.5 % of pixels at or below `min_saturation`, e.g. a crop that is all
   tissue) there is no background class for Otsu to find, and the floor is used;
4. very bright, barely saturated pixels (value > `max_brightness`, saturation below twice the
   floor) are background;
5. morphological close over `close_um`;
6. contours with a two-level hierarchy (`cv2.RETR_CCOMP`): tissue pieces smaller than
   `min_tissue_area_mm2` are dropped; inside each piece the `max_n_holes` largest holes above
   `min_hole_area_mm2` stay background, smaller ones are filled;
7. final mask = filled pieces minus kept holes (exactly the polygons returned).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from wsi_pipe.core.config import SegmentConfig
from wsi_pipe.core.units import mm2_to_px2, um_to_px
from wsi_pipe.imageops.pen import pen_mask as detect_pen

#: below this share of glass-like pixels an image is taken to be all tissue (see module doc)
MIN_GLASS_FRACTION = 0.005

#: pen-coloured specks smaller than this are not ink strokes (e.g. blue IHC nuclei at high res)
MIN_PEN_AREA_MM2 = 0.0005

Polygon = tuple[np.ndarray, list[np.ndarray]]  # (outer (k, 2), [hole (k, 2), ...]), float64 px


@dataclass(frozen=True)
class TissueMask:
    """Result of `segment_tissue`, all in the segmented image's pixels (at `mpp` um/px).

    mask: bool (h, w), True = tissue. polygons: one (outer, holes) per tissue piece; vertices
    are (x, y) centres of boundary pixels in continuous px (pixel (0, 0) covers [0, 1)^2, so
    its centre is (0.5, 0.5)). pen_mask: bool (h, w), the ink removed (after growing).
    threshold: saturation threshold used (0-255).
    """

    mask: np.ndarray
    polygons: list[Polygon]
    pen_mask: np.ndarray
    threshold: int
    mpp: float
    otsu: int | None = None  # the raw Otsu value before clipping (None for a fixed threshold)
    notes: list[str] = field(default_factory=list)

    @property
    def tissue_fraction(self) -> float:
        """Share of the image that is tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def area_mm2(self) -> float:
        """Tissue area in mm2 (pixel count x pixel area)."""
        return float(self.mask.sum()) * (self.mpp * 1e-3) ** 2


def _odd_kernel(length_um: float, mpp: float) -> int:
    """Odd kernel size in px for a physical length (0 or 1 means 'no filtering')."""
    k = int(round(um_to_px(length_um, mpp)))
    if k <= 1:
        return 0
    return k if k % 2 == 1 else k + 1


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (any shape): class 0 is values <= t. 0 when constant."""
    hist = np.bincount(np.asarray(values, np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - total * m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return int(np.argmax(between)) if between.max() > 0 else 0


def saturation_threshold(
    sat_blur: np.ndarray, cfg: SegmentConfig, ignore: np.ndarray | None = None
) -> tuple[int, int | None, str]:
    """Threshold for blurred saturation (uint8 (h, w)); `ignore` (bool) pixels (pen) take no
    part. Returns (threshold, raw Otsu or None, reason)."""
    if cfg.saturation_threshold is not None:
        return int(cfg.saturation_threshold), None, "fixed threshold"
    values = sat_blur[~ignore] if ignore is not None else sat_blur.ravel()
    if values.size == 0:
        return int(cfg.min_saturation), None, "nothing to threshold; floor used"
    glass = float((values <= cfg.min_saturation).mean())
    otsu = otsu_threshold(values)
    if glass < MIN_GLASS_FRACTION:
        return int(cfg.min_saturation), otsu, f"no glass in view ({glass:.2%}); floor used"
    thr = int(np.clip(otsu, cfg.min_saturation, max(cfg.min_saturation, cfg.max_otsu_saturation)))
    return thr, otsu, f"Otsu {otsu} clipped to {thr}"


def segment_tissue(rgb: np.ndarray, mpp: float, cfg: SegmentConfig | None = None) -> TissueMask:
    """Tissue mask and polygons of uint8 RGB `(h, w, 3)` at `mpp` um/px (see module doc)."""
    cfg = cfg if cfg is not None else SegmentConfig()
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"segment_tissue needs uint8 RGB (h, w, 3), got {rgb.shape} {rgb.dtype}")
    if not mpp > 0:
        raise ValueError(f"segment_tissue needs mpp > 0 um/px, got {mpp}")
    h, w = rgb.shape[:2]
    rgb = np.ascontiguousarray(rgb)
    notes: list[str] = []

    pen = np.zeros((h, w), bool)
    if cfg.remove_pen and h and w:
        pen = _drop_small(detect_pen(rgb), mm2_to_px2(MIN_PEN_AREA_MM2, mpp))
        k = _odd_kernel(2 * cfg.pen_dilate_um, mpp)
        if k and pen.any():
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            pen = cv2.dilate(pen.astype(np.uint8), kernel).astype(bool)

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat, val = hsv[..., 1].copy(), hsv[..., 2].copy()
    sat[pen] = 0
    val[pen] = 255
    k = _odd_kernel(cfg.median_blur_um, mpp)
    ignore = pen if pen.any() else None
    if k >= 3 and min(h, w) > 0:
        sat = cv2.medianBlur(sat, k)
        val = cv2.medianBlur(val, k)
        if ignore is not None:  # the blur spreads the blanked ink: keep it out of the statistics
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            ignore = cv2.dilate(pen.astype(np.uint8), kernel).astype(bool)
    thr, otsu, why = saturation_threshold(sat, cfg, ignore=ignore)
    notes.append(why)

    tissue = sat > thr
    tissue &= ~((val > cfg.max_brightness) & (sat < 2 * cfg.min_saturation))
    tissue &= ~pen
    binary = tissue.astype(np.uint8)
    k = _odd_kernel(cfg.close_um, mpp)
    if k >= 3:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        # pad so closing does not pull tissue off the image border
        pad = k
        padded = cv2.copyMakeBorder(binary, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)[pad:-pad, pad:-pad]
        binary = np.ascontiguousarray(closed, dtype=np.uint8)

    polygons, mask = _polygons_from_binary(binary, mpp, cfg)
    return TissueMask(mask, polygons, pen, thr, float(mpp), otsu, notes)


def _polygons_from_binary(
    binary: np.ndarray, mpp: float, cfg: SegmentConfig
) -> tuple[list[Polygon], np.ndarray]:
    """Pieces and holes of a 0/1 uint8 image, filtered by area; returns polygons and the mask."""
    h, w = binary.shape
    mask_u8 = np.zeros((h, w), np.uint8)
    if not binary.any():
        return [], mask_u8.astype(bool)
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    hier = hierarchy[0]  # (n, 4): next, previous, first child, parent
    min_piece_px = mm2_to_px2(cfg.min_tissue_area_mm2, mpp)
    min_hole_px = mm2_to_px2(cfg.min_hole_area_mm2, mpp)

    polygons: list[Polygon] = []
    kept_outer: list[np.ndarray] = []
    kept_holes: list[np.ndarray] = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1:
            continue  # a hole; handled with its parent
        area = _pixel_area(c)
        if area < min_piece_px:
            continue
        holes: list[tuple[float, np.ndarray]] = []
        child = hier[i][2]
        while child != -1:
            hole = contours[child]
            hole_area = _hole_pixel_area(hole)
            if hole_area > min_hole_px:
                holes.append((hole_area, hole))
            child = hier[child][0]
        holes.sort(key=lambda t: -t[0])
        holes = holes[: cfg.max_n_holes]
        kept_outer.append(c)
        kept_holes.extend(hc for _, hc in holes)
        polygons.append((_to_xy(c), [_to_xy(hc) for _, hc in holes]))
    if kept_outer:
        cv2.drawContours(mask_u8, kept_outer, -1, 1, thickness=cv2.FILLED)
    if kept_holes:
        cv2.drawContours(mask_u8, kept_holes, -1, 0, thickness=cv2.FILLED)
        # a hole contour runs over the tissue pixels around the hole: give them back
        cv2.drawContours(mask_u8, kept_holes, -1, 1, thickness=1)
    return polygons, mask_u8.astype(bool)


def _drop_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """bool mask without its 8-connected components of fewer than `min_px` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _pixel_area(contour: np.ndarray) -> float:
    """Area in px of the pixels a contour encloses (polygon area + half the perimeter + 1)."""
    return float(cv2.contourArea(contour)) + 0.5 * float(cv2.arcLength(contour, True)) + 1.0


def _hole_pixel_area(contour: np.ndarray) -> float:
    """Area in px of the background pixels inside a hole contour (which runs over tissue)."""
    return max(
        0.0, float(cv2.contourArea(contour)) - 0.5 * float(cv2.arcLength(contour, True)) + 1.0
    )


def box_fractions(mask: np.ndarray, boxes_mask: np.ndarray) -> np.ndarray:
    """Tissue fraction of each box, exactly, from a summed-area table of `mask`.

    mask: bool (h, w). boxes_mask: (n, 4) float [x0, y0, x1, y1] in mask px, continuous
    coordinates (pixel (i, j) covers [j, j + 1) x [i, i + 1)). Returns (n,) float32 in [0, 1].

    Fractional box edges are rounded half-up to the mask pixel grid (a box edge at 10.5 counts
    pixel 10 as outside on the left side, inside on the right side); a box narrower than one
    pixel after rounding becomes the one pixel holding its centre. Parts of a box outside the
    mask count as background, so the fraction is tissue px / rounded box px.
    """
    boxes = np.asarray(boxes_mask, dtype=np.float64).reshape(-1, 4)
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
        raise ValueError("box_fractions needs boxes as [x0, y0, x1, y1] with x1 >= x0, y1 >= y0")
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    if h and w:
        sat[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    x0 = np.floor(boxes[:, 0] + 0.5).astype(np.int64)
    y0 = np.floor(boxes[:, 1] + 0.5).astype(np.int64)
    x1 = np.floor(boxes[:, 2] + 0.5).astype(np.int64)
    y1 = np.floor(boxes[:, 3] + 0.5).astype(np.int64)
    cx = np.floor(0.5 * (boxes[:, 0] + boxes[:, 2])).astype(np.int64)
    cy = np.floor(0.5 * (boxes[:, 1] + boxes[:, 3])).astype(np.int64)
    thin_x, thin_y = x1 <= x0, y1 <= y0
    x0, x1 = np.where(thin_x, cx, x0), np.where(thin_x, cx + 1, x1)
    y0, y1 = np.where(thin_y, cy, y0), np.where(thin_y, cy + 1, y1)
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    inside = sat[cy1, cx1] - sat[cy0, cx1] - sat[cy1, cx0] + sat[cy0, cx0]
    return (inside / np.maximum(area, 1)).astype(np.float32)


def _to_xy(contour: np.ndarray) -> np.ndarray:
    """OpenCV contour (k, 1, 2) int -> (k, 2) float64 pixel-centre coordinates."""
    return contour.reshape(-1, 2).astype(np.float64) + 0.5
