"""What every report section shares: the context (`Ctx`), readers of run files that never raise,
image and plot embedding, and small HTML pieces used by several sections.

Sections read the run folder through `RunLayout` and the files the stages write (state JSON,
coords store attributes, side files of the encoders, train-mil and anomaly outputs). A file that
cannot be read becomes a note on the page, never a crash: a report of a broken run is still useful.
"""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.fsutil import read_json
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.report.markup import Assets, esc, img, num

log = logging.getLogger(__name__)

#: Pretty names of the metrics train-mil writes (wsi_pipe.mil.metrics.METRICS)
MIL_METRICS = (
    ("auroc", "AUROC"),
    ("auprc", "AUPRC"),
    ("balanced_accuracy", "balanced accuracy"),
    ("f1", "F1"),
    ("accuracy", "accuracy"),
)


@dataclass
class Ctx:
    """What every section needs: the run, where images go, and the user's choices."""

    layout: RunLayout
    assets: Assets
    heatmap_slides: tuple[str, ...] = ()
    n_heatmaps: int = 4
    max_thumbnails: int = 60
    n_boot: int = 200
    make_missing_heatmaps: bool = True
    notes: list[str] = field(default_factory=list)
    #: headline boxes for the overview at the top of the page, filled by the sections
    headline: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        """`path` relative to the run folder (POSIX), as written in data-src."""
        try:
            return path.relative_to(self.layout.root).as_posix()
        except ValueError:
            return str(path)


# ------------------------------------------------------------------------------- helpers
def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV with a header ([] when missing or empty)."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def load_json(path: Path, ctx: Ctx) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        ctx.notes.append(f"could not read {ctx.rel(path)}: {e}")
        return None


def to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def image_bytes(path: Path, max_px: int, jpeg: bool = True) -> tuple[bytes, int, int] | None:
    """The image at `path` scaled to at most `max_px` on its longest side, as JPEG (photos) or
    PNG bytes, with its width and height. None when unreadable."""
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        return None
    h, w = im.shape[:2]
    f = min(1.0, max_px / max(h, w))
    if f < 1.0:
        im = cv2.resize(
            im, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA
        )
    ok, buf = cv2.imencode(
        ".jpg" if jpeg else ".png", im, [cv2.IMWRITE_JPEG_QUALITY, 88] if jpeg else []
    )
    if not ok:
        return None
    return buf.tobytes(), im.shape[1], im.shape[0]


def add_image(
    ctx: Ctx, path: Path, name: str, max_px: int, alt: str, cls: str = "", jpeg: bool = True
) -> str:
    """An <img> of a run image (downscaled), or a visible note when it cannot be read."""
    got = image_bytes(path, max_px, jpeg)
    if got is None:
        ctx.notes.append(f"image {ctx.rel(path)} could not be read")
        return f'<p class="note">image {esc(ctx.rel(path))} could not be read</p>'
    data, w, h = got
    src = ctx.assets.add(name + (".jpg" if jpeg else ".png"), data)
    return img(src, alt, cls, w, h)


def add_plot(ctx: Ctx, name: str, png: bytes, alt: str, caption: str = "") -> str:
    """A matplotlib figure as a <figure>."""
    src = ctx.assets.add(name + ".png", png)
    cap = f"<figcaption>{caption}</figcaption>" if caption else ""
    return f'<figure class="plot">{img(src, alt)}{cap}</figure>'


def when(ts: Any) -> str:
    try:
        return _dt.datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OSError, OverflowError):
        return ""


def human_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def state_files(layout: RunLayout) -> dict[str, dict[str, dict[str, Any]]]:
    """{stage (e.g. 'tile', 'extract/ssmamba'): {slide id: state}} from RUN_DIR/state/."""
    top = layout.state_root
    out: dict[str, dict[str, dict[str, Any]]] = {}
    if not top.is_dir():
        return out
    for p in sorted(top.rglob("*.json")):
        if p.name.startswith("."):
            continue
        stage = p.parent.relative_to(top).as_posix()
        try:
            st = dict(read_json(p))
        except (OSError, ValueError):
            st = {"status": "unreadable", "error": f"state file {p.name} is not valid JSON"}
        out.setdefault(stage, {})[p.stem] = st
    return out


def label_pill(label: str | None) -> str:
    if not label:
        return ""
    cls = "pos" if label.lower() in ("tumour", "tumor", "positive", "malignant", "1") else "neg"
    return f'<span class="pill {cls}">{esc(label)}</span>'


def confusion_table(
    classes: list[str],
    cm: np.ndarray,
    src: str | None = None,
    key: str | None = None,
    unit: str = "slides",
) -> str:
    """A confusion matrix as a shaded table (rows true class, columns predicted)."""
    cm = np.asarray(cm, dtype=np.int64)
    row_tot = cm.sum(1, keepdims=True).clip(min=1)
    head = "".join(f"<th>pred. {esc(c)}</th>" for c in classes)
    body = []
    for i, c in enumerate(classes):
        cells = []
        for j in range(len(classes)):
            share = cm[i, j] / row_tot[i, 0]
            colour = (
                f"rgba(31,122,61,{0.12 + 0.6 * share:.2f})"
                if i == j
                else f"rgba(179,38,30,{0.6 * share:.2f})"
            )
            cell = (
                num(int(cm[i, j]), "d", src, f"{key}/{i}/{j}")
                if src and key
                else num(int(cm[i, j]), "d")
            )
            cells.append(f'<td class="cm" style="background:{colour}">{cell}</td>')
        body.append(
            f'<tr><th>true {esc(c)}</th>{"".join(cells)}<td class="n">{int(cm[i].sum())}</td></tr>'
        )
    return (
        f'<table class="data"><thead><tr><th></th>{head}<th class="n">{esc(unit)}</th></tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )
