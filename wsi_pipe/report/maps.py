"""Heatmaps and anomaly sections: attention maps with a colour bar and top tiles; anomaly maps,
slide scores and run metrics."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.report.common import (
    Ctx,
    add_image,
    add_plot,
    label_pill,
    load_json,
    read_csv_rows,
    to_float,
)
from wsi_pipe.report.markup import esc, kpi, num, section, table
from wsi_pipe.report.mil_results import mil_runs

log = logging.getLogger(__name__)


def _attention_rows(path: Path) -> dict[int, float]:
    """rank -> attention of a heatmap's attention CSV."""
    out = {}
    for r in read_csv_rows(path):
        try:
            out[int(r["rank"])] = float(r["attention"])
        except (KeyError, ValueError):
            continue
    return out


def _choose_heatmap_slides(
    ctx: Ctx, available: list[str], preds: dict[str, dict[str, str]], classes: list[str]
) -> tuple[list[str], str]:
    if ctx.heatmap_slides:
        return list(ctx.heatmap_slides), "the slides asked for"
    conf = {}
    for sid in available:
        r = preds.get(sid)
        if r and classes:
            conf[sid] = max(to_float(r.get(f"prob_{c}")) for c in classes)
    if not conf:
        return available[: ctx.n_heatmaps], "the first slides"
    order = sorted(conf, key=lambda s: (-conf[s], s))
    k_top = (ctx.n_heatmaps + 1) // 2
    chosen = order[:k_top] + [
        s for s in order[::-1][: ctx.n_heatmaps - k_top] if s not in order[:k_top]
    ]
    return chosen, "the most and the least confident predictions"


def heatmaps(ctx: Ctx) -> str | None:
    """Attention heatmaps with a colour bar and the top tiles, per MIL run."""
    top = ctx.layout.heatmaps_root
    names = sorted(d.name for d in top.iterdir() if d.is_dir()) if top.is_dir() else []
    if ctx.heatmap_slides:
        names = sorted(set(names) | {d.name for d in mil_runs(ctx.layout)})
    parts = []
    for name in names:
        hdir = ctx.layout.heatmap_dir(name)
        mdir = ctx.layout.mil_dir(name)
        available = sorted(p.stem for p in hdir.glob("*.png")) if hdir.is_dir() else []
        preds = {r["slide_id"]: r for r in read_csv_rows(mdir / "predictions.csv")}
        info = load_json(mdir / "metrics.json", ctx) if (mdir / "metrics.json").exists() else {}
        classes = [str(c) for c in (info or {}).get("classes", [])]
        chosen, why = _choose_heatmap_slides(ctx, available, preds, classes)
        items = []
        for sid in chosen:
            png: Path | None = ctx.layout.heatmap_png(name, sid)
            if png is None or not png.exists():
                png = _make_heatmap(ctx, mdir, sid)
                if png is None:
                    items.append(
                        f'<p class="note">No heatmap of <b>{esc(sid)}</b> for {esc(name)}.</p>'
                    )
                    continue
            items.append(
                _heatmap_item(
                    ctx,
                    name,
                    hdir,
                    sid,
                    png,
                    preds.get(sid),
                    classes,
                    ctx.rel(mdir / "predictions.csv"),
                )
            )
        if items:
            parts.append(
                f'<h3>{esc(name)}</h3><p class="note">Showing {esc(why)} '
                f"({len(chosen)} of {len(available)} drawn).</p>" + "".join(items)
            )
    if not parts:
        return None
    return section(
        "heatmaps",
        "Attention heatmaps",
        "".join(parts),
        "Where the MIL model looked: each tile coloured by its attention, as a percentile "
        "rank within the slide (fold models averaged), and the most attended tiles at full "
        "resolution.",
    )


def _make_heatmap(ctx: Ctx, mdir: Path, sid: str) -> Path | None:
    if not ctx.make_missing_heatmaps or not (mdir / "model.json").exists():
        return None
    try:
        from wsi_pipe.stages.heatmap import heatmap

        return heatmap(ctx.layout.root, mdir, sid, device="cpu").png
    except Exception as e:  # the report still renders; the note says why
        ctx.notes.append(f"heatmap of {sid} could not be drawn: {type(e).__name__}: {e}")
        log.warning("heatmap of %s could not be drawn: %s", sid, e)
        return None


def colour_bar(kind: str, low: str, high: str, caption: str) -> str:
    """A CSS colour bar (no image needed) matching the heatmap colour map."""
    return (
        f'<div class="colourbar"><div class="bar {kind}"></div><div class="ticks">'
        f"<span>{esc(low)}</span><span>{esc(high)}</span></div>{esc(caption)}</div>"
    )


def _heatmap_item(
    ctx: Ctx,
    name: str,
    hdir: Path,
    sid: str,
    png: Path,
    pred: dict[str, str] | None,
    classes: list[str],
    pred_src: str,
) -> str:
    im = add_image(ctx, png, f"heat_{name}_{sid}", 900, f"attention heatmap of {sid}", "map")
    bar = colour_bar(
        "jet",
        "lowest attention (rank 0)",
        "highest (rank 1)",
        "Colour = percentile rank of the tile's attention within this slide.",
    )
    desc = []
    if pred:
        right = pred.get("label") == pred.get("pred")
        desc.append(
            f"label {label_pill(pred.get('label'))} → predicted {label_pill(pred.get('pred'))} "
            + ("✓" if right else '<span class="status-failed">✗ wrong</span>')
        )
        desc.append(
            ", ".join(
                f"P({esc(c)}) = {num(to_float(pred.get(f'prob_{c}')), '.3f', pred_src, f'{sid}/prob_{c}')}"
                for c in classes
            )
        )
        if pred.get("fold"):
            desc.append(
                f"out-of-fold: test slide of fold {esc(pred.get('fold'))} (the map and its "
                "legend average every fold model)"
            )
    atts = _attention_rows(ctx.layout.heatmap_attention_csv(name, sid))
    tiles = []
    for t in sorted(ctx.layout.heatmap_top_tiles_dir(name, sid).glob("rank*.png"))[:8]:
        mt = re.match(r"rank(\d+)_x(\d+)_y(\d+)", t.stem)
        rank = int(mt.group(1)) if mt else 0
        tim = add_image(ctx, t, f"top_{name}_{sid}_{t.stem}", 192, f"rank {rank} tile of {sid}")
        where = f"x {mt.group(2)}, y {mt.group(3)}" if mt else ""
        att = f"att. {atts[rank]:.4f}" if rank in atts else ""
        tiles.append(
            f"<figure>{tim}<figcaption>#{rank} {esc(att)}<br>{esc(where)}</figcaption></figure>"
        )
    tiles_html = (
        f'<h4>Most attended tiles</h4><div class="tiles">{"".join(tiles)}</div>'
        '<p class="note">Level-0 pixel position of each tile\'s top-left corner.</p>'
        if tiles
        else ""
    )
    return (
        f'<div class="heat" id="heat-{esc(name)}-{esc(sid)}"><div>{im}{bar}</div><div>'
        f'<h4 style="color:inherit;font-size:1rem">{esc(sid)}</h4><p>{"<br>".join(desc)}</p>{tiles_html}</div></div>'
    )


# -------------------------------------------------------------------------------- anomaly
def _flat_numbers(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _flat_numbers(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) or obj is None:
        out.append((prefix, obj))
    return out


def anomaly(ctx: Ctx) -> str | None:
    """Per fitted anomaly model: run metrics, slide score distribution and table, anomaly maps."""
    from wsi_pipe.report.plots import score_histogram

    layout = ctx.layout
    parts = []
    for name in layout.anomaly_models():
        scores_path = layout.anomaly_slide_scores(name)
        rows = read_csv_rows(scores_path)
        metrics_path = layout.anomaly_metrics(name)
        metrics = load_json(metrics_path, ctx) if metrics_path.exists() else None
        block = [f"<h3>{esc(name)}</h3>"]
        if isinstance(metrics, dict):
            msrc = ctx.rel(metrics_path)
            sa = metrics.get("slide_auroc")
            if isinstance(sa, dict) and "value" in sa:
                ctx.headline.append(
                    kpi(
                        f"{name}: anomaly slide AUROC",
                        num(sa.get("value"), ".3f", msrc, "slide_auroc/value"),
                    )
                )
            flat = [(k, v) for k, v in _flat_numbers(metrics) if k]
            mrows = [
                [esc(k), num(v, ".4g" if isinstance(v, float) else "d", msrc, k)] for k, v in flat
            ]
            if metrics.get("method"):
                block.append(f'<p class="note">method <b>{esc(metrics.get("method"))}</b></p>')
            if mrows:
                block.append("<h4>Metrics</h4>" + table(["metric", "value"], mrows, [False, True]))
        if not rows:
            block.append(
                f'<p class="note">No slide scores yet (<code>{esc(ctx.rel(scores_path))}</code>).</p>'
            )
            parts.append("".join(block))
            continue
        src = ctx.rel(scores_path)
        cols = [c for c in rows[0] if c not in ("slide_id", "label")]
        rows.sort(
            key=lambda r: (
                -to_float(r.get("score")) if math.isfinite(to_float(r.get("score"))) else math.inf,
                r["slide_id"],
            )
        )
        hist = score_histogram(
            np.array([to_float(r.get("score")) for r in rows]),
            [r.get("label", "") for r in rows],
            f"slide anomaly scores ({name})",
            "slide score (higher = more anomalous)",
        )
        block.append(
            add_plot(ctx, f"anomaly_{name}_hist", hist, f"anomaly score histogram of {name}")
        )
        trows = []
        for r in rows:
            sid = r["slide_id"]
            cells = [f"<b>{esc(sid)}</b>", label_pill(r.get("label"))]
            for c in cols:
                v = to_float(r.get(c))
                fmt = "d" if c.startswith("n_") and math.isfinite(v) and v == int(v) else ".4g"
                cells.append(num(int(v) if fmt == "d" else v, fmt, src, f"{sid}/{c}"))
            trows.append(cells)
        block.append(
            "<h4>Slide scores (most anomalous first)</h4>"
            + table(
                ["slide", "label"] + cols,
                trows,
                [False, False] + [True] * len(cols),
                scroll=len(trows) > 14,
            )
        )
        shown = [
            r["slide_id"] for r in rows if layout.anomaly_heatmap(name, r["slide_id"]).exists()
        ]
        k = max(1, ctx.n_heatmaps)
        pick = shown[: (k + 1) // 2] + [
            s for s in shown[::-1][: k // 2] if s not in shown[: (k + 1) // 2]
        ]
        for sid in pick:
            r = next(x for x in rows if x["slide_id"] == sid)
            im = add_image(
                ctx,
                layout.anomaly_heatmap(name, sid),
                f"anom_{name}_{sid}",
                900,
                f"anomaly map of {sid}",
                "map",
            )
            tiles = []
            tdir = layout.anomaly_top_tiles_dir(name, sid)
            for t in sorted(tdir.glob("*.png"))[:8] if tdir.is_dir() else []:
                tim = add_image(
                    ctx,
                    t,
                    f"anomtop_{name}_{sid}_{t.stem}",
                    192,
                    f"anomalous tile {t.stem} of {sid}",
                )
                tiles.append(f"<figure>{tim}<figcaption>{esc(t.stem)}</figcaption></figure>")
            tiles_html = (
                f'<h4>Most anomalous tiles</h4><div class="tiles">{"".join(tiles)}</div>'
                if tiles
                else ""
            )
            block.append(
                f'<div class="heat"><div>{im}<p class="note">Colour bar and scale are drawn in the '
                f'map itself.</p></div><div><h4 style="color:inherit;font-size:1rem">{esc(sid)}</h4>'
                f"<p>score {num(to_float(r.get('score')), '.4g', src, f'{sid}/score')} "
                f"{label_pill(r.get('label'))}</p>{tiles_html}</div></div>"
            )
        parts.append("".join(block))
    if not parts:
        return None
    return section(
        "anomaly",
        "Anomaly detection",
        "".join(parts),
        "Tile-level anomaly scores against a model of normal tissue, summarised per slide.",
    )
