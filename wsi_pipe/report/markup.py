"""Small HTML building blocks of the report: escaping, traceable numbers, tables, images.

Every number the report takes from a file of the run is written with `num()`, which records where
it came from (`data-src`: the file relative to the run folder; `data-key`: the '/'-separated path inside it;
`data-value`: the exact value; `data-fmt`: the format spec of the shown text). The browser test
reads these back and checks each shown number against the file.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def esc(text: Any) -> str:
    """HTML-escaped text of any value."""
    return html.escape("" if text is None else str(text), quote=True)


def fmt_value(value: Any, fmt: str) -> str:
    """`value` formatted with `fmt` ('.3f', 'd', ...); missing / NaN -> an en dash."""
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def num(
    value: Any, fmt: str = ".3f", src: str | None = None, key: str | None = None, cls: str = ""
) -> str:
    """A number as a <span>, with its provenance in data- attributes when `src` is given.

    src: the file it comes from, relative to the run folder (e.g. 'mil/abmil/metrics.json');
    key: '/'-separated path inside it ('pooled/auroc/value', 'per_fold/0/n_test'); for a CSV
    '<value of its first column>/<column>' ('slide_7/prob_tumour').
    """
    text = fmt_value(value, fmt)
    attrs = f' class="num {cls}"' if cls else ' class="num"'
    if src is not None and key is not None:
        attrs += (
            f' data-src="{esc(src)}" data-key="{esc(key)}" data-fmt="{esc(fmt)}"'
            f' data-value="{esc(repr(value))}"'
        )
    return f"<span{attrs}>{esc(text)}</span>"


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Sequence[bool] | None = None,
    row_classes: Sequence[str] | None = None,
    scroll: bool = False,
    cls: str = "data",
) -> str:
    """An HTML table. Cells are HTML already (escape text with `esc`)."""
    numeric = list(numeric) if numeric is not None else [False] * len(headers)
    head = "".join(
        f'<th class="n">{esc(h)}</th>' if n else f"<th>{esc(h)}</th>"
        for h, n in zip(headers, numeric)
    )
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = []
    for i, r in enumerate(rows):
        rc = row_classes[i] if row_classes and i < len(row_classes) and row_classes[i] else ""
        cells = "".join(
            f'<td class="n">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(r, numeric)
        )
        body.append(f'<tr class="{rc}">{cells}</tr>' if rc else f"<tr>{cells}</tr>")
    out = f'<table class="{cls}">{thead}<tbody>{"".join(body)}</tbody></table>'
    return f'<div class="scroll">{out}</div>' if scroll else out


def kpi(label: str, value_html: str, sub: str = "") -> str:
    """A headline number box."""
    sub_html = f'<div class="ci">{sub}</div>' if sub else ""
    return f'<div class="kpi"><div class="k">{esc(label)}</div><div class="v">{value_html}</div>{sub_html}</div>'


_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


@dataclass
class Assets:
    """Images of the report: embedded as data URIs, or written into a folder beside the page.

    folder: where to write them (None: embed), a temporary folder the caller commits atomically;
    href_prefix: how the page refers to the final folder (its name, relative to the HTML file).
    """

    folder: Path | None = None
    href_prefix: str = ""
    written: list[Path] = field(default_factory=list)
    n_bytes: int = 0
    _names: set[str] = field(default_factory=set)

    def add(self, name: str, data: bytes) -> str:
        """Store image bytes under `name` (suffix gives the type); returns the src to use."""
        suffix = Path(name).suffix.lower()
        self.n_bytes += len(data)
        if self.folder is None:
            return (
                f"data:{_MIME.get(suffix, 'application/octet-stream')};base64,"
                + base64.b64encode(data).decode("ascii")
            )
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        base, k = safe, 1
        while safe in self._names:
            k += 1
            safe = f"{Path(base).stem}_{k}{suffix}"
        self._names.add(safe)
        path = self.folder / safe
        # a plain write: the folder is a temporary one that `build_report` commits atomically
        # as a whole (fsync of every file, then one rename)
        path.write_bytes(data)
        self.written.append(path)
        return f"{self.href_prefix}/{safe}"


def img(
    src: str, alt: str, cls: str = "", width: int | None = None, height: int | None = None
) -> str:
    """An <img> with alt text (and intrinsic size, so the layout does not jump while loading)."""
    size = f' width="{width}" height="{height}"' if width and height else ""
    c = f' class="{cls}"' if cls else ""
    return f'<img{c} src="{src}" alt="{esc(alt)}"{size} loading="eager">'


def section(sid: str, title: str, body: str, lead: str = "") -> str:
    """A top-level report section (`id` is what the table of contents and the tests look for)."""
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return (
        f'<section class="report-section" id="{esc(sid)}" data-section="{esc(sid)}">'
        f"<h2>{esc(title)}</h2>{lead_html}{body}</section>"
    )
