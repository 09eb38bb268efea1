"""Tissue segmentation of a low-resolution slide image (pure numpy / OpenCV, no I/O).

`segment_tissue(rgb, mpp, cfg)` works on an image at `mpp` um/px (the caller reads a level near
`cfg.seg_mpp` and resizes it to exactly that). Every size in the config is physical (um, mm2),
converted here with the image's mpp, so results do not depend on the scanner's resolution.

Tissue is what absorbs light relative to the slide's own glass, so each slide is measured
against its own background rather than against fixed colour thresholds. Scanners differ in
illumination, white balance, tone curve and colour saturation; optical density relative to the
glass cancels the first two exactly (per-channel gains divide out) and changes only in scale
under the others. Saturation does not: pale IHC (DAB + haematoxylin) tissue is barely more
saturated than a slightly tinted glass, so Otsu on saturation kept the glass on one scanner and
split the tissue on another.

Steps:
1. pen ink (red / green / blue marker, see `pen.py`) is detected; specks under
   `MIN_PEN_AREA_MM2` are dropped (ink strokes are far larger; blue IHC nuclei at high resolution
   are not); the rest is grown by `pen_dilate_um` and treated as background;
2. background = the glass: the brightest mode of the grey-level histogram that holds at least
   `MIN_GLASS_FRACTION` of the pixels; its median RGB is the glass colour when it is nearly
   neutral (HSV saturation <= `GLASS_MAX_SATURATION`). When the brightest mode is stained (a
   field that is all tissue) there is no glass in view and the reference is white (255, 255, 255);
3. optical density relative to that reference, OD = sum over R, G, B of -log10(I / I_glass)
   (channels brighter than the glass count 0), median-filtered over `median_blur_um`;
4. threshold: `OD_FLOOR` (absolute: glass noise, dust and a slightly uneven illumination stay
   below it). Otsu refines it only where the OD histogram is bimodal (two classes of at least
   `MIN_CLASS_FRACTION` each, means apart by more than the floor, Ashman's D >=
   `MIN_BIMODAL_D`): the threshold moves to the histogram's valley between the two Otsu
   classes (where the fewest pixels lie, so a scanner that scales OD moves the fewest pixels
   across it), never above Otsu's value, clipped to [`OD_FLOOR`, `OD_CEILING`] -- the ceiling
   keeps pale stroma when the slide also has dark nuclei-rich tissue. Dark pixels that absorb
   all colours alike (coverslip edges, dust; `neutral_dark`) count as background. A fixed
   `cfg.saturation_threshold` instead thresholds HSV saturation (the method before optical
   density, kept for configurations that set it; `min_saturation`, `max_otsu_saturation` and
   `max_brightness` belonged to that method and no longer act);
5. morphological close over `close_um`;
6. contours with a two-level hierarchy (`cv2.RETR_CCOMP`): tissue pieces smaller than
   `min_tissue_area_mm2` are dropped; inside each piece the `max_n_holes` largest holes above
   `min_hole_area_mm2` stay background (e.g. glass between glands), smaller ones are filled;
7. final mask = filled pieces minus kept holes (exactly the polygons returned).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

from wsi_pipe.core.config import SegmentConfig
from wsi_pipe.core.units import mm2_to_px2, um_to_px
from wsi_pipe.imageops.pen import pen_mask as detect_pen

log = logging.getLogger(__name__)

#: the glass mode must hold at least this share of the pixels (within +-4 grey levels)
MIN_GLASS_FRACTION = 0.01
#: the glass is nearly neutral: HSV saturation (0-255) of its median colour at most this
#: (measured: 1-12 on the real slides here; the brightest stained modes are 47-70)
GLASS_MAX_SATURATION = 30
#: absolute floor of the tissue threshold, summed OD over R, G, B relative to the glass
#: (measured after the median filter: glass 0.00-0.02, the palest Ki67 tissue 0.08-0.12)
OD_FLOOR = 0.05
#: ceiling of the Otsu-refined threshold (pale H&E stroma: OD 0.25-0.4 relative to glass)
OD_CEILING = 0.15
#: OD values are filtered as uint8 on this full scale (0.004 OD per level)
OD_FULL_SCALE = 1.0
#: dark, neutral (grey-black) pixels are not stain: summed OD above this and a spread over the
#: channels below this share of it (a coverslip edge: median 0.02; stained tissue: 0.1-0.3)
NEUTRAL_MIN_OD = 0.5
NEUTRAL_MAX_SPREAD = 0.05
#: the histogram is smoothed over this many levels (0.02 OD) to find the valley between modes
VALLEY_SMOOTH_LEVELS = 5
#: bimodality: each Otsu class holds at least this share, and Ashman's D at least this
MIN_CLASS_FRACTION = 0.05
MIN_BIMODAL_D = 2.0

#: pen-coloured specks smaller than this are not ink strokes (e.g. blue IHC nuclei at high res)
MIN_PEN_AREA_MM2 = 0.0005

WHITE = (255.0, 255.0, 255.0)

Polygon = tuple[np.ndarray, list[np.ndarray]]  # (outer (k, 2), [hole (k, 2), ...]), float64 px


@dataclass(frozen=True)
class TissueMask:
    """Result of `segment_tissue`, all in the segmented image's pixels (at `mpp` um/px).

    mask: bool (h, w), True = tissue. polygons: one (outer, holes) per tissue piece; vertices
    are (x, y) centres of boundary pixels in continuous px (pixel (0, 0) covers [0, 1)^2, so
    its centre is (0.5, 0.5)). pen_mask: bool (h, w), the ink removed (after growing).
    method: "optical_density" or "saturation" (a fixed `saturation_threshold`). threshold: the
    threshold used, in OD (summed over R, G, B, relative to `background_rgb`) or in HSV
    saturation (0-255). otsu: Otsu's value in the same unit, or None when not computed.
    background_rgb: the glass colour the OD is relative to ((255, 255, 255) when no glass was
    in view); glass_found: whether a glass mode was found.
    """

    mask: np.ndarray
    polygons: list[Polygon]
    pen_mask: np.ndarray
    threshold: float
    mpp: float
    otsu: float | None = None
    notes: list[str] = field(default_factory=list)
    method: str = "optical_density"
    background_rgb: tuple[float, float, float] = WHITE
    glass_found: bool = False

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


def is_bimodal(values: np.ndarray, t: int, min_separation: float = 0.0) -> tuple[bool, float]:
    """Whether uint8 `values` split at `t` (class 0: <= t) form two real modes.

    Both classes hold >= MIN_CLASS_FRACTION of the values, their means differ by at least
    `min_separation` (in the values' unit; a quantised noise floor has a large D but no
    contrast) and Ashman's D = sqrt(2) |m1 - m0| / sqrt(s0^2 + s1^2) >= MIN_BIMODAL_D.
    Returns (bimodal, D).
    """
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        return False, 0.0
    low = v <= t
    share = float(low.mean())
    if min(share, 1.0 - share) < MIN_CLASS_FRACTION:
        return False, 0.0
    a, b = v[low], v[~low]
    spread = float(np.sqrt(a.var() + b.var()))
    d = float(np.sqrt(2.0) * abs(b.mean() - a.mean()) / max(spread, 1e-9))
    return d >= MIN_BIMODAL_D and abs(b.mean() - a.mean()) >= min_separation, d


def glass_colour(
    rgb: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[tuple[float, float, float] | None, str]:
    """The slide's background (glass) colour: uint8 RGB (h, w, 3) -> ((r, g, b) or None, why).

    The brightest mode of the grey-level histogram (smoothed over 5 levels) holding at least
    MIN_GLASS_FRACTION of the pixels; its median colour, if nearly neutral (HSV saturation <=
    GLASS_MAX_SATURATION). None when the brightest such mode is stained: no glass in view.
    `ignore` (bool (h, w)) pixels, e.g. pen ink, take no part.
    """
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    keep = ~ignore if ignore is not None else np.ones(grey.shape, bool)
    n = int(keep.sum())
    if n == 0:
        return None, "nothing to measure"
    hist = np.bincount(grey[keep], minlength=256).astype(np.float64) / n
    smooth = np.convolve(hist, np.ones(5) / 5.0, mode="same")
    # share of pixels within +-4 levels of each level (the mode's mass)
    mass = np.convolve(hist, np.ones(9), mode="same")
    padded = np.concatenate([[-1.0], smooth, [-1.0]])
    peaks = [
        v
        for v in range(255, -1, -1)
        if padded[v + 1] >= padded[v] and padded[v + 1] > padded[v + 2]
    ]
    for level in peaks:
        if mass[level] < MIN_GLASS_FRACTION:
            continue
        near = keep & (np.abs(grey.astype(np.int16) - level) <= 4)
        colour = np.median(rgb[near].reshape(-1, 3), axis=0)
        sat = int(cv2.cvtColor(colour.astype(np.uint8)[None, None], cv2.COLOR_RGB2HSV)[0, 0, 1])
        if sat <= GLASS_MAX_SATURATION:
            c = (float(colour[0]), float(colour[1]), float(colour[2]))
            return c, (
                f"glass at grey {level} ({mass[level]:.0%} of pixels), RGB "
                f"({c[0]:.0f}, {c[1]:.0f}, {c[2]:.0f})"
            )
        return None, (
            f"brightest mode (grey {level}) is stained (saturation {sat}): no glass in "
            "view, OD relative to white"
        )
    return None, "no histogram mode: OD relative to white"


def optical_density(
    rgb: np.ndarray, background: tuple[float, float, float], per_channel: bool = False
) -> np.ndarray:
    """Optical density of uint8 RGB (h, w, 3) relative to `background` RGB, per channel
    max(0, -log10((I + 1) / (I_background + 1))): float32 (h, w) summed over R, G, B, or
    (h, w, 3) with `per_channel`."""
    ref = np.asarray(background, np.float32) + 1.0
    ratio = (rgb.astype(np.float32) + 1.0) / ref
    od: np.ndarray = np.clip(-np.log10(np.clip(ratio, 1e-4, None)), 0.0, None)
    return od if per_channel else np.asarray(od.sum(axis=-1))


def neutral_dark(od_rgb: np.ndarray) -> np.ndarray:
    """bool (h, w): dark pixels that absorb all colours alike (coverslip edges, dust, debris,
    black ink), from per-channel OD (h, w, 3) relative to the glass: summed OD >
    NEUTRAL_MIN_OD and spread max - min < NEUTRAL_MAX_SPREAD x summed OD. Stains absorb
    selectively (H&E, haematoxylin, DAB: spread 8-30 % of the sum)."""
    total = od_rgb.sum(axis=-1)
    spread = od_rgb.max(axis=-1) - od_rgb.min(axis=-1)
    dark: np.ndarray = (total > NEUTRAL_MIN_OD) & (spread < NEUTRAL_MAX_SPREAD * total)
    return dark


def od_threshold(
    od_u8: np.ndarray, ignore: np.ndarray | None = None
) -> tuple[float, float | None, str]:
    """Threshold of filtered OD (uint8 on OD_FULL_SCALE): OD_FLOOR, refined by Otsu within
    [OD_FLOOR, OD_CEILING] where the histogram is bimodal. Returns (OD, Otsu OD or None, why)."""
    values = od_u8[~ignore] if ignore is not None else od_u8.ravel()
    if values.size == 0:
        return OD_FLOOR, None, "nothing to threshold; OD floor used"
    t = otsu_threshold(values)
    otsu = (t + 0.5) * OD_FULL_SCALE / 255.0  # between levels t and t + 1
    # the classes must differ by more than the floor itself to count as tissue vs glass
    bimodal, d = is_bimodal(values, t, min_separation=OD_FLOOR * 255.0 / OD_FULL_SCALE)
    if not bimodal:
        return OD_FLOOR, otsu, f"OD histogram not bimodal (D {d:.1f}); floor {OD_FLOOR} used"
    # the valley between the two modes Otsu separates: where the fewest pixels lie, so a
    # scanner that scales OD a little moves the fewest pixels across the threshold
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    smooth = np.convolve(hist, np.ones(VALLEY_SMOOTH_LEVELS) / VALLEY_SMOOTH_LEVELS, mode="same")
    m0 = int(np.argmax(smooth[: t + 1]))
    m1 = t + 1 + int(np.argmax(smooth[t + 1 :]))
    valley = m0 + int(np.argmin(smooth[m0 : m1 + 1]))
    refined = min((valley + 0.5) * OD_FULL_SCALE / 255.0, otsu)  # never above Otsu: pale tissue
    thr = float(np.clip(refined, OD_FLOOR, OD_CEILING))
    return (
        thr,
        otsu,
        (
            f"bimodal OD (D {d:.1f}): valley between the Otsu classes at "
            f"{refined:.3f} (Otsu {otsu:.3f}), clipped to {thr:.3f}"
        ),
    )


def saturation_threshold(
    sat_blur: np.ndarray, cfg: SegmentConfig, ignore: np.ndarray | None = None
) -> tuple[int, int | None, str]:
    """Threshold of blurred HSV saturation (uint8 (h, w)), the method for a fixed
    `cfg.saturation_threshold`; without one, Otsu clipped to [min_saturation,
    max_otsu_saturation]. Returns (threshold, raw Otsu or None, reason)."""
    if cfg.saturation_threshold is not None:
        return int(cfg.saturation_threshold), None, "fixed saturation threshold"
    values = sat_blur[~ignore] if ignore is not None else sat_blur.ravel()
    if values.size == 0:
        return int(cfg.min_saturation), None, "nothing to threshold; floor used"
    otsu = otsu_threshold(values)
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

    # 1. pen ink
    pen = np.zeros((h, w), bool)
    if cfg.remove_pen and h and w:
        pen = _drop_small(detect_pen(rgb), mm2_to_px2(MIN_PEN_AREA_MM2, mpp))
        k = _odd_kernel(2 * cfg.pen_dilate_um, mpp)
        if k and pen.any():
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
            pen = cv2.dilate(pen.astype(np.uint8), kernel).astype(bool)
    k_blur = _odd_kernel(cfg.median_blur_um, mpp)
    ignore = pen if pen.any() else None
    if ignore is not None and k_blur >= 3:  # the filter spreads the blanked ink: keep it out
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k_blur, k_blur))
        ignore = cv2.dilate(pen.astype(np.uint8), kernel).astype(bool)

    def blur(plane: np.ndarray) -> np.ndarray:
        return cv2.medianBlur(plane, k_blur) if k_blur >= 3 and min(h, w) > 0 else plane

    background: tuple[float, float, float] = WHITE
    glass_found = False
    if cfg.saturation_threshold is not None:
        # fixed saturation threshold: the configured, colour-based method
        method = "saturation"
        sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].copy()
        sat[pen] = 0
        sat = blur(sat)
        thr_s, otsu_s, why = saturation_threshold(sat, cfg, ignore=ignore)
        threshold, otsu = float(thr_s), (float(otsu_s) if otsu_s is not None else None)
        tissue = sat > thr_s
    else:
        method = "optical_density"
        # 2. the glass
        glass, why_glass = glass_colour(rgb, pen if pen.any() else None)
        notes.append(why_glass)
        if glass is not None:
            background, glass_found = glass, True
        # 3. OD relative to the glass, filtered
        od_rgb = optical_density(rgb, background, per_channel=True)
        od = od_rgb.sum(axis=-1)
        grey = neutral_dark(od_rgb)
        if grey.any():
            notes.append(f"{grey.mean():.1%} of pixels dark and neutral (glass edge, dust, ink)")
        od[pen | grey] = 0.0
        od_u8 = np.clip(np.round(od * (255.0 / OD_FULL_SCALE)), 0, 255).astype(np.uint8)
        od_u8 = blur(od_u8)
        # 4. threshold
        threshold, otsu, why = od_threshold(od_u8, ignore)
        tissue = od_u8.astype(np.float64) * (OD_FULL_SCALE / 255.0) > threshold
    notes.append(why)
    log.debug("segment_tissue: %s", "; ".join(notes))

    # 5. close
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

    # 6-7. pieces, holes, mask
    polygons, mask = _polygons_from_binary(binary, mpp, cfg)
    return TissueMask(
        mask,
        polygons,
        pen,
        float(threshold),
        float(mpp),
        otsu,
        notes,
        method,
        background,
        glass_found,
    )


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
    kept: np.ndarray = keep[labels]
    return kept


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
