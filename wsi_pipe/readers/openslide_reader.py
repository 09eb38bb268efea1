"""OpenSlide backend (openslide-python 1.4 + openslide-bin 4).

DICOM caveat: some converters (e.g. Google's wsi2dcm) store JFIF/YCbCr JPEG frames while the
DICOM header says PhotometricInterpretation `RGB`. OpenSlide 4.0.1 believes the header and hands
back the raw YCbCr samples as if they were RGB (white paper comes out as (255, 128, 128)). This
reader detects that once per slide -- it decodes one frame with pydicom + Pillow (which honour the
JFIF marker) and compares it with what OpenSlide returns for the same pixels -- and, when
OpenSlide's pixels match the YCbCr interpretation, converts every read back to RGB.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.errors import SlideReadError
from wsi_pipe.readers.base import (
    BaseSlideReader,
    MppInfo,
    composite_rgba_on_white,
    parse_float,
    tiff_resolution_mpp,
    ycbcr_to_rgb,
)

logger = logging.getLogger(__name__)

#: DICOM transfer syntaxes of JPEG baseline / extended (the ones that carry JFIF markers)
_JPEG_TRANSFER_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
#: mean abs difference (0-255) under which two decodes of the same frame count as equal
_COLOUR_MATCH_TOL = 4.0


class OpenSlideReader(BaseSlideReader):
    """SlideReader over `openslide.OpenSlide`. Raises SlideReadError when it cannot open."""

    backend = "openslide"

    def __init__(self, path: str | Path, slide_id: str) -> None:
        super().__init__(Path(path), slide_id)
        import openslide  # local: keeps `import wsi_pipe.readers` cheap

        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except Exception as e:  # OpenSlideUnsupportedFormatError, OpenSlideError, OSError
            raise SlideReadError(
                f"OpenSlide cannot open {self.describe()}: {type(e).__name__}: {e}"
            ) from e
        props = self._slide.properties
        self.properties: dict[str, str] = dict(props)
        self.vendor = props.get("openslide.vendor")
        self.objective_power = parse_float(props.get("openslide.objective-power"))
        self._level_dimensions = [(int(d[0]), int(d[1])) for d in self._slide.level_dimensions]
        self._level_downsamples = [float(d) for d in self._slide.level_downsamples]
        if not self._level_dimensions or min(min(d) for d in self._level_dimensions) < 1:
            self._slide.close()
            raise SlideReadError(f"OpenSlide found no readable image levels in {self.describe()}")
        #: True when OpenSlide's pixels are JFIF YCbCr mislabelled as RGB (see module doc)
        self.ycbcr_as_rgb = False
        if self.vendor == "dicom":
            try:
                self.ycbcr_as_rgb = self._detect_dicom_ycbcr()
            except SlideReadError:
                self._slide.close()
                raise

    # -- metadata -----------------------------------------------------------------------------
    def raw_mpp(self) -> MppInfo | None:
        props = self.properties
        x, y = parse_float(props.get("openslide.mpp-x")), parse_float(props.get("openslide.mpp-y"))
        if x and y and x > 0 and y > 0:
            detail = ""
            if "tiff.XResolution" in props:
                detail = (
                    f"TIFF XResolution {props.get('tiff.XResolution')} px per "
                    f"{props.get('tiff.ResolutionUnit', '?')}"
                )
            return MppInfo(x, y, "openslide.mpp-x", detail)
        # OpenSlide derives mpp from the TIFF resolution only for some vendors; try it ourselves
        return tiff_resolution_mpp(
            props.get("tiff.XResolution"),
            props.get("tiff.YResolution"),
            props.get("tiff.ResolutionUnit"),
        )

    # -- pixels -------------------------------------------------------------------------------
    def _read_rgb(
        self, location_l0: tuple[int, int], level: int, size_lvl: tuple[int, int]
    ) -> np.ndarray:
        rgba = np.asarray(self._slide.read_region(location_l0, level, size_lvl))
        if self.ycbcr_as_rgb:
            # un-premultiplied colour channels hold YCbCr here; convert before compositing so
            # transparent (outside) pixels still end up white
            rgba = rgba.copy()
            rgba[..., :3] = ycbcr_to_rgb(rgba[..., :3])
        return composite_rgba_on_white(rgba)

    def _close_backend(self) -> None:
        self._slide.close()

    # -- DICOM colour check -------------------------------------------------------------------
    def _detect_dicom_ycbcr(self) -> bool:
        """True when OpenSlide returns a JPEG DICOM's YCbCr samples unconverted (see module doc)."""
        import pydicom

        probe = _pick_probe_instance(self.path)
        if probe is None:
            return False
        ds, level_size = probe
        if str(ds.file_meta.TransferSyntaxUID) not in _JPEG_TRANSFER_SYNTAXES:
            return False
        if str(ds.get("PhotometricInterpretation", "")).upper() != "RGB":
            return False  # YBR_* is labelled honestly; OpenSlide converts those itself
        try:
            n_frames = int(ds.get("NumberOfFrames", 1))
            frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=n_frames)
        except Exception as e:
            raise SlideReadError(
                f"cannot read the first JPEG frame of {ds.filename} for {self.describe()}: {e}; "
                "the DICOM file may be truncated"
            ) from e
        has_jfif = b"JFIF\x00" in frame[:64]
        try:
            level = self._level_dimensions.index(level_size)
        except ValueError:
            level = -1
        tiled_full = str(ds.get("DimensionOrganizationType", "TILED_FULL")).upper() == "TILED_FULL"
        if level < 0 or not tiled_full:
            logger.info(
                "slide %s: DICOM JPEG frames labelled RGB%s; frame position unknown, deciding "
                "the colour conversion from the JFIF marker alone",
                self.slide_id,
                " with a JFIF marker" if has_jfif else "",
            )
            return has_jfif
        truth = _decode_jpeg_rgb(frame)  # Pillow honours JFIF -> correct RGB
        w = min(truth.shape[1], level_size[0])
        h = min(truth.shape[0], level_size[1])
        truth = truth[:h, :w].astype(np.float32)
        raw = np.asarray(self._slide.read_region((0, 0), level, (w, h)))[..., :3]
        diff_raw = float(np.abs(raw.astype(np.float32) - truth).mean())
        diff_conv = float(np.abs(ycbcr_to_rgb(raw).astype(np.float32) - truth).mean())
        if diff_conv < _COLOUR_MATCH_TOL and diff_conv < diff_raw:
            decision = True
        elif diff_raw < _COLOUR_MATCH_TOL:
            decision = False
        else:
            decision = has_jfif
            logger.warning(
                "slide %s: neither OpenSlide's pixels (mean abs diff %.1f) nor their YCbCr->RGB "
                "conversion (%.1f) match pydicom/Pillow's decode of frame 0 of %s; converting "
                "colours: %s (from the JFIF marker)",
                self.slide_id,
                diff_raw,
                diff_conv,
                ds.filename,
                decision,
            )
            return decision
        logger.info(
            "slide %s: DICOM frames are JFIF YCbCr labelled RGB; OpenSlide pixels vs Pillow decode "
            "of frame 0: as-is %.2f, YCbCr->RGB %.2f mean abs diff -> %s",
            self.slide_id,
            diff_raw,
            diff_conv,
            "converting YCbCr->RGB on read" if decision else "no conversion needed",
        )
        return decision


def _decode_jpeg_rgb(frame: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(frame)) as im:
        return np.asarray(im.convert("RGB"))


def _pick_probe_instance(path: Path) -> tuple[Any, tuple[int, int]] | None:
    """A small pyramid-level instance of the DICOM series `path` belongs to, with its level size.

    Picks the smallest VOLUME instance of at least 256 x 256 px (or the largest one if none is),
    so only a small file's pixel data is loaded. Returns (dataset with pixels, (w, h)).
    """
    import pydicom

    files = [path] if path.is_file() else []
    folder = path.parent if path.is_file() else path
    files += sorted(p for p in folder.glob("*.dcm") if p != path)
    try:
        first = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    except Exception:
        return None
    series = first.get("SeriesInstanceUID")
    candidates: list[tuple[int, Path, tuple[int, int]]] = []
    for f in files:
        try:
            hdr = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue
        image_type = [str(t).upper() for t in hdr.get("ImageType", [])]
        if hdr.get("SeriesInstanceUID") != series or "VOLUME" not in image_type:
            continue
        size = (int(hdr.get("TotalPixelMatrixColumns", 0)), int(hdr.get("TotalPixelMatrixRows", 0)))
        if min(size) > 0:
            candidates.append((size[0] * size[1], f, size))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[0])
    big_enough = [c for c in candidates if min(c[2]) >= 256]
    _, chosen, size = big_enough[0] if big_enough else candidates[-1]
    return pydicom.dcmread(str(chosen)), size
