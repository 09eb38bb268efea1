"""`build_report`: one HTML page of whatever a run folder holds.

The page is plain HTML + CSS from `templates/` (no JavaScript, nothing fetched from the network).
Images are embedded as data URIs (one self-contained file, the default) or written into a folder
beside the page (`embed=False`: `report_files/` for the run's own report.html, else
`<page stem>_files/`), which keeps the HTML small for large cohorts.
"""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import string
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.fsutil import atomic_path, atomic_write_text
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.report.markup import Assets, esc, section
from wsi_pipe.report.sections import SECTIONS, Ctx, run_facts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportResult:
    """Where the page went, what it holds and how long it took."""

    html: Path
    assets_dir: Path | None
    sections: tuple[str, ...]
    n_images: int
    n_bytes: int
    seconds: float


def _template(name: str) -> str:
    return (
        resources.files("wsi_pipe.report")
        .joinpath("templates")
        .joinpath(name)
        .read_text(encoding="utf-8")
    )


def _run_name(root: Path) -> str:
    """A readable name of the run: its folder, with the parent when the folder is just 'run'."""
    generic = {"run", "out", "output", "outputs", "results"}
    return (
        f"{root.parent.name}/{root.name}"
        if root.name.lower() in generic and root.parent.name
        else root.name
    )


def _looks_like_run(layout: RunLayout) -> bool:
    return layout.has_outputs()


def build_report(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    embed: bool = True,
    heatmap_slides: tuple[str, ...] | list[str] = (),
    n_heatmaps: int = 4,
    max_thumbnails: int = 60,
    n_boot: int = 200,
    make_missing_heatmaps: bool = True,
    title: str | None = None,
) -> ReportResult:
    """Write the report of `run_dir` to `out` (default `RunLayout.report_html`) and return it.

    heatmap_slides: slides whose attention heatmaps to show (drawn now when missing and a MIL
    model exists); empty: the most and the least confident predictions, `n_heatmaps` in all.
    max_thumbnails: QC thumbnails shown at most. n_boot: bootstrap resamples of the ROC / PR
    bands. Raises ConfigError when `run_dir` is not a run folder.
    """
    from wsi_pipe import __version__

    t0 = time.perf_counter()
    layout = RunLayout(Path(run_dir).resolve())
    if not layout.root.is_dir():
        raise ConfigError(
            f"{layout.root} is not a folder: give the run folder a stage wrote (--out)"
        )
    if not _looks_like_run(layout):
        raise ConfigError(
            f"{layout.root} holds no run outputs (no slides.json, state/, tiles/, models/, "
            "mil/): give the folder passed as --out to `wsi-pipe tile` / `run` / `demo`"
        )
    html_path = Path(out).resolve() if out else layout.report_html
    if html_path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--out {html_path} should end in .html")
    if embed:
        assets_final = None
    elif html_path == layout.report_html:
        assets_final = layout.report_assets_dir
    else:
        assets_final = html_path.with_name(html_path.stem + "_files")

    def render(assets: Assets) -> tuple[str, list[str]]:
        ctx = Ctx(
            layout,
            assets,
            tuple(heatmap_slides),
            n_heatmaps,
            max_thumbnails,
            n_boot,
            make_missing_heatmaps,
        )
        parts, present = [], []
        for sid, _title, fn in SECTIONS:
            ts = time.perf_counter()
            try:
                html = fn(ctx)
            except Exception as e:  # one unreadable part must not cost the whole page
                log.exception("report section %s failed", sid)
                ctx.notes.append(f"section {sid} could not be rendered: {type(e).__name__}: {e}")
                html = section(
                    sid,
                    _title,
                    f'<p class="err">This section could not be rendered: '
                    f"{esc(type(e).__name__)}: {esc(e)}</p>",
                )
            log.debug("report section %s: %.2f s", sid, time.perf_counter() - ts)
            if html:
                parts.append(html)
                present.append(sid)
        info = {
            "report generated": _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(),
            "host": platform.node(),
            "report build time": f"{time.perf_counter() - t0:.1f} s (before this table)",
        }
        parts.append(run_facts(ctx, __version__, info) or "")
        present.append("facts")
        if ctx.headline:
            parts.insert(
                0,
                '<div class="overview"><div class="kpis">' + "".join(ctx.headline) + "</div></div>",
            )
        return "".join(parts), present

    titles = {sid: t for sid, t, _ in SECTIONS} | {"facts": "Run facts"}
    if assets_final is None:
        assets = Assets()
        body, present = render(assets)
        tmp_assets = None
    else:
        with atomic_path(assets_final) as tmp_dir:
            tmp_dir.mkdir(parents=True)
            assets = Assets(tmp_dir, assets_final.name)
            body, present = render(assets)
            (tmp_dir / "README.txt").write_text(f"Images of {html_path.name} (wsi-pipe report).\n")
        tmp_assets = assets_final
    nav = "".join(f'<a href="#{sid}">{esc(titles[sid])}</a>' for sid in present)
    page = string.Template(_template("report.html")).substitute(
        title=esc(title or f"wsi-pipe report: {_run_name(layout.root)}"),
        css=_template("report.css"),
        nav=nav,
        body=body,
        run_dir=esc(layout.root),
        version=esc(__version__),
        generated=esc(_dt.datetime.now().strftime("%Y-%m-%d %H:%M")),
    )
    atomic_write_text(html_path, page)
    secs = time.perf_counter() - t0
    res = ReportResult(
        html_path,
        tmp_assets,
        tuple(present),
        len(assets.written) if not embed else page.count("data:image/"),
        len(page.encode()) + assets.n_bytes * (not embed),
        secs,
    )
    log.info(
        "report of %s: %d sections (%s), %.1f MB, %.1f s -> %s",
        layout.root,
        len(present),
        ", ".join(present),
        res.n_bytes / 1e6,
        secs,
        html_path,
    )
    return res
