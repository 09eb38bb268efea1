"""Pure image functions (numpy / OpenCV, no I/O, no torch): pen ink, tissue masks, polygons."""

from wsi_pipe.imageops.contours import to_geojson
from wsi_pipe.imageops.pen import pen_mask, pen_masks
from wsi_pipe.imageops.tissue import (
    TissueMask,
    box_fractions,
    saturation_threshold,
    segment_tissue,
)

__all__ = [
    "TissueMask",
    "box_fractions",
    "pen_mask",
    "pen_masks",
    "saturation_threshold",
    "segment_tissue",
    "to_geojson",
]
