"""tiffslide backend (tiffslide 3, tifffile + imagecodecs underneath).

Used for files OpenSlide cannot open or reads without an mpp (OME-TIFF). The mpp is taken, in
order, from the Aperio `MPP` field, OME `PhysicalSizeX/Y` (with units), the TIFF resolution tags
(cm or inch; unit 'none' is not a physical size), and finally tiffslide's own `tiffslide.mpp-x`.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from wsi_pipe.core.errors import SlideReadError
from wsi_pipe.readers.base import BaseSlideReader, MppInfo, parse_float, tiff_resolution_mpp

logger = logging.getLogger(__name__)

#: OME length units -> micrometres
_OME_UNIT_UM = {
    "µm": 1.0,
    "um": 1.0,
    "micrometer": 1.0,
    "micron": 1.0,
    "\u03bcm": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "mm": 1e3,
    "millimeter": 1e3,
    "cm": 1e4,
    "centimeter": 1e4,
    "m": 1e6,
    "meter": 1e6,
    "å": 1e-4,
    "\u212b": 1e-4,
    "angstrom": 1e-4,
    "pm": 1e-6,
}


class TiffSlideReader(BaseSlideReader):
    """SlideReader over `tiffslide.TiffSlide`. Raises SlideReadError when it cannot open."""

    backend = "tiffslide"

    def __init__(self, path: str | Path, slide_id: str) -> None:
        super().__init__(Path(path), slide_id)
        import tiffslide  # local: keeps `import wsi_pipe.readers` cheap

        try:
            self._slide = tiffslide.TiffSlide(str(self.path))
        except Exception as e:  # TiffFileError, ValueError, KeyError, OSError, ...
            raise SlideReadError(
                f"tiffslide cannot open {self.describe()}: {type(e).__name__}: {e}"
            ) from e
        try:
            props = dict(self._slide.properties)
            dims = [(int(d[0]), int(d[1])) for d in self._slide.level_dimensions]
            dss = [float(d) for d in self._slide.level_downsamples]
        except Exception as e:
            self._slide.close()
            raise SlideReadError(
                f"tiffslide cannot read the image levels of {self.describe()}: "
                f"{type(e).__name__}: {e}"
            ) from e
        if not dims or min(min(d) for d in dims) < 1:
            self._slide.close()
            raise SlideReadError(
                f"tiffslide found no image levels in {self.describe()} "
                "(truncated file, or a TIFF without a slide image)"
            )
        axes = props.get("tiffslide.series-axes")
        if axes not in ("YXS", "CYX"):
            self._slide.close()
            raise SlideReadError(
                f"{self.describe()} is not an RGB slide (image axes {axes!r}); wsi-pipe reads "
                "brightfield RGB slides only"
            )
        self.properties = props
        self.vendor = props.get("tiffslide.vendor")
        self.objective_power = parse_float(props.get("tiffslide.objective-power"))
        self._level_dimensions = dims
        self._level_downsamples = dss

    # -- metadata -----------------------------------------------------------------------------
    def raw_mpp(self) -> MppInfo | None:
        props = self.properties
        if self.vendor == "aperio":
            x = parse_float(props.get("aperio.MPP"))
            if x and x > 0:
                return MppInfo(x, x, "aperio MPP")
        ome = self._ome_mpp()
        if ome is not None:
            return ome
        res = tiff_resolution_mpp(
            props.get("tiff.XResolution"),
            props.get("tiff.YResolution"),
            props.get("tiff.ResolutionUnit"),
        )
        if res is not None:
            return res
        x, y = parse_float(props.get("tiffslide.mpp-x")), parse_float(props.get("tiffslide.mpp-y"))
        if x and y and x > 0 and y > 0:
            return MppInfo(x, y, "tiffslide.mpp-x")
        return None

    def _ome_mpp(self) -> MppInfo | None:
        tf = self._slide.ts_tifffile
        if not tf.is_ome:
            return None
        try:
            root = ET.fromstring(tf.ome_metadata or "")
        except ET.ParseError as e:
            logger.warning("slide %s: unparsable OME-XML (%s); ignoring it", self.slide_id, e)
            return None
        pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
        if pixels is None:
            return None
        vals = []
        for axis in ("X", "Y"):
            size = parse_float(pixels.get(f"PhysicalSize{axis}"))
            unit = pixels.get(f"PhysicalSize{axis}Unit", "µm").strip()
            factor = _OME_UNIT_UM.get(unit, _OME_UNIT_UM.get(unit.lower()))
            if size is None or size <= 0 or factor is None:
                return None
            vals.append(size * factor)
        return MppInfo(
            vals[0],
            vals[1],
            "ome PhysicalSizeX",
            f"PhysicalSizeX {pixels.get('PhysicalSizeX')} {pixels.get('PhysicalSizeXUnit', 'µm')}",
        )

    # -- pixels -------------------------------------------------------------------------------
    def _read_rgb(
        self, location_l0: tuple[int, int], level: int, size_lvl: tuple[int, int]
    ) -> np.ndarray:
        lw, lh = self._level_dimensions[level]
        ds = self._level_downsamples[level]
        # same mapping tiffslide uses (int() truncation of level-0 / downsample)
        x_lvl, y_lvl = int(location_l0[0] / ds), int(location_l0[1] / ds)
        w, h = size_lvl
        if x_lvl >= lw or y_lvl >= lh or x_lvl + w <= 0 or y_lvl + h <= 0:
            return np.full((h, w, 3), 255, np.uint8)  # wholly outside (tiffslide would warn)
        arr = self._slide.read_region(location_l0, level, size_lvl, as_array=True, padding=True)
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            raise SlideReadError(
                f"{self.describe()} stores {arr.dtype} pixels; wsi-pipe reads 8-bit RGB slides"
            )
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            arr = arr[..., :3]
        # tiffslide pads the outside with zeros: paint it white, like OpenSlide's transparency
        if x_lvl < 0 or y_lvl < 0 or x_lvl + w > lw or y_lvl + h > lh:
            arr = np.array(arr, copy=True)
            in_x0, in_x1 = _clip(-x_lvl, 0, w), _clip(lw - x_lvl, 0, w)
            in_y0, in_y1 = _clip(-y_lvl, 0, h), _clip(lh - y_lvl, 0, h)
            arr[:in_y0] = 255
            arr[in_y1:] = 255
            arr[:, :in_x0] = 255
            arr[:, in_x1:] = 255
        return np.ascontiguousarray(arr)

    def _close_backend(self) -> None:
        self._slide.close()


def _clip(v: int, lo: int, hi: int) -> int:
    return int(min(max(v, lo), hi))
