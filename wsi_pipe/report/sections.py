"""The report's sections, in page order. Each takes a `Ctx` and returns HTML, or None when the run
holds nothing for it (a partial run simply has fewer sections). Run facts comes last and is added
by the builder (it also reports what the other sections could not read)."""

from __future__ import annotations

from collections.abc import Callable

from wsi_pipe.report.cohort import cohort
from wsi_pipe.report.common import Ctx
from wsi_pipe.report.encoder import encoder
from wsi_pipe.report.facts import run_facts
from wsi_pipe.report.maps import anomaly, heatmaps
from wsi_pipe.report.mil_results import mil

#: section id, title, renderer
SECTIONS: tuple[tuple[str, str, Callable[[Ctx], str | None]], ...] = (
    ("cohort", "Cohort", cohort),
    ("encoder", "Encoder", encoder),
    ("mil", "MIL", mil),
    ("heatmaps", "Heatmaps", heatmaps),
    ("anomaly", "Anomaly", anomaly),
)

__all__ = ["SECTIONS", "Ctx", "run_facts"]
