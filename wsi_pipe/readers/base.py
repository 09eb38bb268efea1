"""The `SlideReader` protocol and the backend-independent half of every reader.

Every reader is OpenSlide-shaped: `read_region` takes the top-left corner in integer level-0
pixels, a level index and a size in pixels of that level, and returns RGB uint8 `(h, w, 3)` with
everything outside the slide (and every transparent pixel) composited onto white.

Backends implement `_read_rgb(location_l0, level, size_lvl)` plus a few metadata hooks; the
mpp validation, level choice, thumbnails and whole-level reads live here, once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from wsi_pipe.core.errors import ConfigError, MissingMppError, SlideReadError
from wsi_pipe.core.units import MPP_MAX, MPP_MIN, is_plausible_mpp

logger = logging.getLogger(__name__)

#: x and y mpp may differ by this relative amount before a slide counts as anisotropic.
MAX_ANISOTROPY = 0.02
#: whole-level reads above this many pixels are refused (use read_region on tiles instead).
MAX_LEVEL_PIXELS = 400_000_000
#: side of the blocks in which large levels are read and downscaled for thumbnails.
_BLOCK_PX = 4096

MPP_FIX_HINT = "pass --mpp-override or an `mpp` column in the manifest"


@dataclass(frozen=True)
class MppInfo:
    """Level-0 microns per pixel as found in a slide's metadata, before validation."""

    x: float
    y: float
    source: str  # e.g. "openslide.mpp-x", "aperio MPP", "tiff resolution (cm)"
    detail: str = ""  # human-readable extra (raw tag values), used in error messages


@runtime_checkable
class SlideReader(Protocol):
    """What the pipeline needs from a slide. All coordinates are level-0 px unless suffixed."""

    slide_id: str
    path: Path
    backend: str
    vendor: str | None
    mpp: float
    mpp_source: str
    objective_power: float | None

    @property
    def level_count(self) -> int: ...

    @property
    def level_dimensions(self) -> list[tuple[int, int]]: ...

    @property
    def level_downsamples(self) -> list[float]: ...

    @property
    def dimensions(self) -> tuple[int, int]: ...

    def read_region(
        self, location_l0: tuple[int, int], level: int, size_lvl: tuple[int, int]
    ) -> np.ndarray: ...

    def get_thumbnail(self, max_px: int) -> np.ndarray: ...

    def read_at_mpp(self, target_mpp: float) -> np.ndarray: ...

    def read_level_image(self, level: int) -> np.ndarray: ...

    def best_level_for_downsample(self, downsample: float) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> SlideReader: ...

    def __exit__(self, *exc: object) -> None: ...


# ----------------------------------------------------------------------------- pixel helpers
def composite_rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """Straight (non-premultiplied) RGBA uint8 `(h, w, 4)` -> RGB uint8 `(h, w, 3)` over white.

    openslide-python already un-premultiplies OpenSlide's premultiplied ARGB, so the colour
    channels here are straight; fully transparent pixels (outside the slide) become white.
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    if np.isin(alpha, (0, 255)).all():
        out = rgb.copy()
        out[alpha == 0] = 255
        return out
    a = alpha[..., None].astype(np.float32) / 255.0
    out_f = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    flat: np.ndarray = np.clip(np.rint(out_f), 0, 255).astype(np.uint8)
    return flat


def ycbcr_to_rgb(ycbcr: np.ndarray) -> np.ndarray:
    """Full-range (JFIF) YCbCr uint8 `(h, w, 3)` -> RGB uint8 `(h, w, 3)`, as libjpeg does it."""
    # OpenCV's YCrCb is the JPEG full-range transform; it wants the channels as Y, Cr, Cb.
    return cv2.cvtColor(np.ascontiguousarray(ycbcr[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)


def resize_area(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize `(h, w, c)` to `size` = (w, h) with area averaging (downscale) or linear (upscale)."""
    w, h = size
    if (rgb.shape[1], rgb.shape[0]) == (w, h):
        return rgb
    interp = cv2.INTER_AREA if w <= rgb.shape[1] and h <= rgb.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(rgb, (w, h), interpolation=interp)


# ----------------------------------------------------------------------------- base reader
class BaseSlideReader:
    """Backend-independent part of a reader. Subclasses fill the metadata and `_read_rgb`."""

    backend: str = "?"

    def __init__(self, path: Path, slide_id: str) -> None:
        self.path = Path(path)
        self.slide_id = slide_id
        self.vendor: str | None = None
        self.objective_power: float | None = None
        self.mpp: float = math.nan
        self.mpp_source: str = "unset"
        #: why `open_slide(backend="auto")` picked this backend (empty when chosen explicitly)
        self.backend_reason: str = ""
        self._level_dimensions: list[tuple[int, int]] = []
        self._level_downsamples: list[float] = []
        self._closed = False

    # -- metadata ---------------------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self._level_dimensions)

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        """(width, height) in px of each level, level 0 first."""
        return list(self._level_dimensions)

    @property
    def level_downsamples(self) -> list[float]:
        """Level-0 px per level px of each level (1.0 first)."""
        return list(self._level_downsamples)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0 in px."""
        return self._level_dimensions[0]

    def raw_mpp(self) -> MppInfo | None:
        """Level-0 mpp from this backend's view of the metadata, unvalidated (None = none found)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"slide {self.slide_id!r} ({self.path})"

    def resolve_mpp(self, mpp_override: float | None = None) -> None:
        """Set `.mpp` / `.mpp_source` from the override or the metadata, validated.

        Raises MissingMppError (no mpp, implausible mpp, anisotropic pixels) or ConfigError
        (implausible override); messages name the slide and the fix.
        """
        if mpp_override is not None:
            mpp = float(mpp_override)
            if not is_plausible_mpp(mpp):
                raise ConfigError(
                    f"mpp override {mpp_override} um/px for {self.describe()} is outside the "
                    f"plausible range {MPP_MIN}-{MPP_MAX} um/px; give the true level-0 microns "
                    "per pixel (e.g. 0.25 for a 40x scan, 0.5 for 20x)"
                )
            self.mpp, self.mpp_source = mpp, "override"
            return
        info = self.raw_mpp()
        if info is None:
            raise MissingMppError(
                f"{self.describe()} has no microns-per-pixel metadata "
                f"(backend {self.backend}, vendor {self.vendor}); {MPP_FIX_HINT}"
            )
        detail = f"; {info.detail}" if info.detail else ""
        if not (is_plausible_mpp(info.x) and is_plausible_mpp(info.y)):
            raise MissingMppError(
                f"{self.describe()} reports an implausible mpp of {info.x:g} x {info.y:g} um/px "
                f"(from {info.source}{detail}); plausible is {MPP_MIN}-{MPP_MAX} um/px, so the "
                f"resolution tags are likely placeholders; {MPP_FIX_HINT}"
            )
        if abs(info.x - info.y) / min(info.x, info.y) > MAX_ANISOTROPY:
            raise MissingMppError(
                f"{self.describe()} has anisotropic pixels: mpp x {info.x:g} vs y {info.y:g} "
                f"um/px (from {info.source}), more than {MAX_ANISOTROPY:.0%} apart; wsi-pipe "
                f"tiles square pixels only; if the metadata is wrong, {MPP_FIX_HINT}"
            )
        self.mpp = 0.5 * (info.x + info.y)
        self.mpp_source = info.source

    # -- reading ----------------------------------------------------------------------------
    def _read_rgb(
        self, location_l0: tuple[int, int], level: int, size_lvl: tuple[int, int]
    ) -> np.ndarray:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise SlideReadError(f"{self.describe()} was already closed")

    def read_region(
        self, location_l0: tuple[int, int], level: int, size_lvl: tuple[int, int]
    ) -> np.ndarray:
        """Pixels of `level` starting at level-0 `location_l0` = (x, y), `size_lvl` = (w, h).

        Returns uint8 `(h, w, 3)` RGB; parts outside the slide are white (255).
        Raises SlideReadError when the backend fails (truncated data, vanished file, ...).
        """
        self._check_open()
        if not 0 <= level < self.level_count:
            raise ValueError(
                f"level {level} out of range for {self.describe()} ({self.level_count} levels)"
            )
        w, h = int(size_lvl[0]), int(size_lvl[1])
        if w < 0 or h < 0:
            raise ValueError(f"negative region size {size_lvl} for {self.describe()}")
        if w == 0 or h == 0:
            return np.full((h, w, 3), 255, np.uint8)
        loc = (int(location_l0[0]), int(location_l0[1]))
        try:
            out = self._read_rgb(loc, level, (w, h))
        except SlideReadError:
            raise
        except Exception as e:  # backends raise many types; name the slide and the cause
            gone = "" if self.path.exists() else " (the file no longer exists)"
            raise SlideReadError(
                f"reading {self.describe()} at {loc}, level {level}, size {(w, h)} failed with "
                f"{type(e).__name__}: {e}{gone}; the file may be truncated or corrupt"
            ) from e
        if out.shape != (h, w, 3) or out.dtype != np.uint8:
            raise SlideReadError(
                f"backend {self.backend} returned {out.shape} {out.dtype} for a {(w, h)} read of "
                f"{self.describe()}"
            )
        return out

    def best_level_for_downsample(self, downsample: float) -> int:
        """Coarsest level whose downsample is <= `downsample` * (1 + 1e-3); 0 if none is."""
        best = 0
        limit = float(downsample) * (1.0 + 1e-3)
        for i, ds in enumerate(self._level_downsamples):
            if ds <= limit and ds >= self._level_downsamples[best]:
                best = i
        return best

    def read_level_image(self, level: int) -> np.ndarray:
        """The whole of `level` as uint8 `(h, w, 3)` RGB (refused above MAX_LEVEL_PIXELS)."""
        w, h = self._level_dimensions[level]
        if w * h > MAX_LEVEL_PIXELS:
            raise ValueError(
                f"level {level} of {self.describe()} is {w}x{h} px, too large to read whole; "
                "read tiles with read_region or pick a coarser level"
            )
        return self.read_region((0, 0), level, (w, h))

    def read_level_resized(self, level: int, size: tuple[int, int]) -> np.ndarray:
        """All of `level` resized to `size` = (w, h) px, read in blocks so memory stays bounded.

        Area-averaged when shrinking, linear when enlarging. Returns uint8 `(h, w, 3)`.
        """
        lw, lh = self._level_dimensions[level]
        ds = self._level_downsamples[level]
        out_w, out_h = max(1, int(size[0])), max(1, int(size[1]))
        if lw * lh <= _BLOCK_PX * _BLOCK_PX:
            return resize_area(self.read_level_image(level), (out_w, out_h))
        sx, sy = out_w / lw, out_h / lh
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        # block edges are placed on the output grid so neighbouring blocks tile exactly
        step_x, step_y = max(1, int(_BLOCK_PX * sx)), max(1, int(_BLOCK_PX * sy))
        for oy0 in range(0, out_h, step_y):
            oy1 = min(out_h, oy0 + step_y)
            y0, y1 = round(oy0 / sy), min(lh, round(oy1 / sy))
            for ox0 in range(0, out_w, step_x):
                ox1 = min(out_w, ox0 + step_x)
                x0, x1 = round(ox0 / sx), min(lw, round(ox1 / sx))
                if x1 <= x0 or y1 <= y0:
                    continue
                block = self.read_region(
                    (level_px_to_l0(x0, ds), level_px_to_l0(y0, ds)), level, (x1 - x0, y1 - y0)
                )
                out[oy0:oy1, ox0:ox1] = resize_area(block, (ox1 - ox0, oy1 - oy0))
        return out

    def read_at_mpp(self, target_mpp: float) -> np.ndarray:
        """The whole slide resampled to `target_mpp` um/px (e.g. for tissue segmentation).

        Reads the coarsest level that is at least as fine as `target_mpp` and area-downsamples it
        (upsamples level 0 only when the slide itself is coarser). Returns uint8 `(h, w, 3)`
        with w = round(level-0 width x mpp / target_mpp) (same for h, at least 1): level-0 px
        per output px is exactly width_l0 / w along x and height_l0 / h along y.
        """
        ds = float(target_mpp) / self.mpp
        level = self.best_level_for_downsample(ds)
        w0, h0 = self.dimensions
        return self.read_level_resized(level, (max(1, round(w0 / ds)), max(1, round(h0 / ds))))

    def get_thumbnail(self, max_px: int) -> np.ndarray:
        """Whole slide as uint8 `(h, w, 3)` RGB, longer side `max_px` (never above level 0's)."""
        w0, h0 = self.dimensions
        ds = max(1.0, max(w0, h0) / float(max_px))
        level = self.best_level_for_downsample(ds)
        return self.read_level_resized(level, (max(1, round(w0 / ds)), max(1, round(h0 / ds))))

    # -- lifetime ---------------------------------------------------------------------------
    def _close_backend(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file handle. Idempotent."""
        if not self._closed:
            self._closed = True
            self._close_backend()

    def __enter__(self) -> BaseSlideReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(slide_id={self.slide_id!r}, backend={self.backend!r}, "
            f"vendor={self.vendor!r}, dims={self._level_dimensions[:1]}, "
            f"levels={self.level_count}, mpp={self.mpp:g} [{self.mpp_source}])"
        )


def level_px_to_l0(x_lvl: int, downsample: float) -> int:
    """Smallest level-0 px `x_l0` with floor(x_l0 / downsample) == x_lvl (int level px).

    With a non-integer downsample OpenSlide resamples at the exact fractional position
    x_l0 / downsample while tiffslide truncates to the level grid; this choice keeps both within
    one level px of `x_lvl` (and exactly on it for tiffslide and integer downsamples).
    """
    x_l0 = math.ceil(x_lvl * downsample - 1e-7)
    while math.floor(x_l0 / downsample) < x_lvl:
        x_l0 += 1
    while x_l0 > 0 and math.floor((x_l0 - 1) / downsample) >= x_lvl:
        x_l0 -= 1
    return int(x_l0)


def parse_float(value: object) -> float | None:
    """float(value) or None when missing / not a finite number."""
    if value is None:
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def tiff_resolution_mpp(x_res: object, y_res: object, unit: object) -> MppInfo | None:
    """mpp from TIFF XResolution / YResolution (px per unit) and ResolutionUnit.

    `unit` is the tag value as a name ('centimeter', 'inch', 'none', any case) or the TIFF code
    (2 = inch, 3 = cm). Unit 'none' (1) carries no physical size and gives None.
    """
    name = str(getattr(unit, "name", unit)).strip().lower()
    um_per_unit = {"3": 1e4, "centimeter": 1e4, "cm": 1e4, "2": 25400.0, "inch": 25400.0}.get(name)
    xr, yr = parse_float(x_res), parse_float(y_res)
    if um_per_unit is None or not xr or not yr or xr <= 0 or yr <= 0:
        return None
    unit_label = "cm" if um_per_unit == 1e4 else "inch"
    return MppInfo(
        um_per_unit / xr,
        um_per_unit / yr,
        f"tiff resolution ({unit_label})",
        f"XResolution {xr:g} px/{unit_label}",
    )
