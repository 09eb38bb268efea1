"""Slide readers: `open_slide(path, backend="auto")` -> an OpenSlide-shaped `SlideReader`.

Backends: OpenSlide (`openslide`) and tiffslide (`tiffslide`). With `backend="auto"`, OpenSlide is
tried first; tiffslide is used when OpenSlide cannot open the file, or when OpenSlide opens it but
finds no plausible mpp while tiffslide does (OME-TIFF). The choice and the reason are logged per
slide and kept in `reader.backend_reason`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from wsi_pipe.core.errors import SlideReadError
from wsi_pipe.core.manifest import slide_stem
from wsi_pipe.core.units import is_plausible_mpp
from wsi_pipe.readers.base import (
    MPP_FIX_HINT,
    BaseSlideReader,
    MppInfo,
    SlideReader,
    composite_rgba_on_white,
    level_px_to_l0,
    ycbcr_to_rgb,
)
from wsi_pipe.readers.diagnose import explain_unreadable, file_kind, tiff_truncation
from wsi_pipe.readers.openslide_reader import OpenSlideReader
from wsi_pipe.readers.tiffslide_reader import TiffSlideReader

__all__ = [
    "BACKENDS",
    "MPP_FIX_HINT",
    "BaseSlideReader",
    "MppInfo",
    "OpenSlideReader",
    "SlideReader",
    "TiffSlideReader",
    "composite_rgba_on_white",
    "default_slide_id",
    "level_px_to_l0",
    "open_slide",
    "ycbcr_to_rgb",
]

logger = logging.getLogger(__name__)

BACKENDS: dict[str, type[BaseSlideReader]] = {
    "openslide": OpenSlideReader,
    "tiffslide": TiffSlideReader,
}


def default_slide_id(path: str | Path) -> str:
    """Slide id of a path: file name without slide extension; a DICOM file -> its folder name."""
    p = Path(path)
    if p.is_dir() or p.name.lower().endswith(".dcm"):
        return (p if p.is_dir() else p.parent).name
    return slide_stem(p)


def _resolve_path(path: Path, slide_id: str) -> Path:
    if not path.exists():
        raise SlideReadError(f"slide {slide_id!r} ({path}): {explain_unreadable(path)}")
    if path.is_dir():
        dcm = sorted(path.glob("*.dcm"))
        if not dcm:
            raise SlideReadError(f"slide {slide_id!r} ({path}): {explain_unreadable(path)}")
        return dcm[0]  # OpenSlide opens a DICOM WSI series from any one of its files
    return path


def open_slide(
    path: str | Path,
    backend: str = "auto",
    mpp_override: float | None = None,
    slide_id: str | None = None,
) -> BaseSlideReader:
    """Open a whole-slide image and validate its level-0 mpp.

    path: a slide file, or a DICOM WSI folder (one .dcm per level).
    backend: "auto", "openslide" or "tiffslide".
    mpp_override: level-0 um/px that wins over any metadata (e.g. from the manifest).
    Returns a reader with `.mpp` (um/px) and `.mpp_source` set.
    Raises SlideReadError (missing, corrupt, truncated, not a slide: the message names the file
    and the likely cause), MissingMppError (no / implausible / anisotropic mpp, naming the
    override), ConfigError (implausible override) and ValueError (unknown backend).
    """
    path = Path(path)
    sid = slide_id or default_slide_id(path)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"unknown reader backend {backend!r}; use auto, openslide or tiffslide")
    file = _resolve_path(path, sid)
    if file.is_file() and file_kind(file) == "tiff":
        cut = tiff_truncation(file)
        if cut:
            raise SlideReadError(f"slide {sid!r} ({file}): {cut}")

    if backend != "auto":
        try:
            reader = BACKENDS[backend](file, sid)
        except SlideReadError as e:
            raise SlideReadError(f"{e}. Likely cause: {explain_unreadable(file, backend)}") from e
        reader.backend_reason = f"backend {backend!r} requested"
    else:
        reader = _open_auto(file, sid, mpp_override)
    logger.info("slide %s: backend %s (%s)", sid, reader.backend, reader.backend_reason)
    try:
        reader.resolve_mpp(mpp_override)
    except Exception:
        reader.close()
        raise
    logger.info("slide %s: mpp %.6g um/px from %s", sid, reader.mpp, reader.mpp_source)
    return reader


def _plausible(info: MppInfo | None) -> bool:
    return info is not None and is_plausible_mpp(info.x) and is_plausible_mpp(info.y)


def _open_auto(file: Path, sid: str, mpp_override: float | None) -> BaseSlideReader:
    try:
        os_reader: BaseSlideReader | None = OpenSlideReader(file, sid)
        os_error = ""
    except SlideReadError as e:
        os_reader, os_error = None, str(e)

    if os_reader is not None:
        if mpp_override is not None:
            os_reader.backend_reason = "OpenSlide opened it; mpp comes from the override"
            return os_reader
        os_mpp = os_reader.raw_mpp()
        if _plausible(os_mpp):
            os_reader.backend_reason = "OpenSlide opened it and reports a plausible mpp"
            return os_reader
        why_not = "no mpp" if os_mpp is None else f"implausible mpp {os_mpp.x:g} um/px"
        try:
            ts_reader = TiffSlideReader(file, sid)
        except SlideReadError:
            os_reader.backend_reason = f"OpenSlide opened it ({why_not}); tiffslide cannot open it"
            return os_reader
        ts_mpp = ts_reader.raw_mpp()
        if _plausible(ts_mpp):
            assert ts_mpp is not None
            os_reader.close()
            ts_reader.backend_reason = (
                f"OpenSlide finds {why_not}; tiffslide reads mpp from {ts_mpp.source}"
            )
            return ts_reader
        ts_reader.close()
        os_reader.backend_reason = f"OpenSlide opened it ({why_not}); tiffslide finds none either"
        return os_reader

    try:
        ts_reader = TiffSlideReader(file, sid)
    except SlideReadError as e:
        raise SlideReadError(
            f"slide {sid!r} ({file}) cannot be opened: {explain_unreadable(file)}. "
            f"[{os_error}] [{e}]"
        ) from e
    short = os_error.split(": ", 2)[-1] if os_error else "unknown error"
    ts_reader.backend_reason = f"OpenSlide cannot open it ({short})"
    return ts_reader
