"""Slide-level MIL section: metrics with CIs, ROC / PR / calibration, confusion matrix,
per-slide predictions, and a comparison table of several MIL runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.layout import RunLayout
from wsi_pipe.report.common import (
    MIL_METRICS,
    Ctx,
    add_plot,
    confusion_table,
    label_pill,
    load_json,
    read_csv_rows,
    to_float,
)
from wsi_pipe.report.markup import esc, kpi, num, section, table


def mil_runs(layout: RunLayout) -> list[Path]:
    """train-mil output folders of the run (those holding metrics.json), by name."""
    return [r.root for r in layout.mil_runs()]


def mil(ctx: Ctx) -> str | None:
    """Per MIL run: headline metrics, per-fold table, ROC/PR/calibration, confusion matrix,
    per-slide predictions; a comparison table when there are several."""
    runs = mil_runs(ctx.layout)
    if not runs:
        return None
    parts = []
    loaded = []
    for d in runs:
        m = load_json(d / "metrics.json", ctx)
        if isinstance(m, dict):
            loaded.append((d, m))
    if len(loaded) > 1:
        parts.append(_comparison(ctx, loaded))
    for d, m in loaded:
        src = ctx.rel(d / "metrics.json")
        ctx.headline.append(kpi(f"{d.name}: pooled AUROC", _metric_cell(m, src, "auroc")))
        parts.append(_mil_run(ctx, d, m))
    return section(
        "mil",
        "Slide-level MIL",
        "".join(parts),
        "Patient-level cross-validation: every slide is predicted by the fold model that "
        "did not train on its patient. Bands are bootstrap 95% intervals over slides; "
        "bracketed numbers are bootstrap 95% CIs from <code>metrics.json</code>.",
    )


def _metric_cell(m: dict[str, Any], src: str, name: str) -> str:
    p = (m.get("pooled") or {}).get(name) or {}
    ci = ""
    if p.get("ci_low") is not None and not (
        isinstance(p.get("ci_low"), float) and math.isnan(p["ci_low"])
    ):
        ci = (
            f" <small>[{num(p.get('ci_low'), '.2f', src, f'pooled/{name}/ci_low')}, "
            f"{num(p.get('ci_high'), '.2f', src, f'pooled/{name}/ci_high')}]</small>"
        )
    return num(p.get("value"), ".3f", src, f"pooled/{name}/value") + ci


def _comparison(ctx: Ctx, loaded: list[tuple[Path, dict[str, Any]]]) -> str:
    rows = []
    best = {}
    for name, _ in MIL_METRICS:
        vals = [to_float(((m.get("pooled") or {}).get(name) or {}).get("value")) for _, m in loaded]
        finite = [v for v in vals if math.isfinite(v)]
        best[name] = max(finite) if finite else math.nan
    for d, m in loaded:
        src = ctx.rel(d / "metrics.json")
        n = sum(int(f.get("n_test", 0)) for f in m.get("per_fold", []))
        cells = [
            f'<a href="#mil-{esc(d.name)}"><b>{esc(d.name)}</b></a>',
            esc(m.get("method")),
            esc(m.get("feature_set")),
            num(m.get("mpp"), "g", src, "mpp"),
            num(n, "d"),
        ]
        for name, _ in MIL_METRICS:
            v = to_float(((m.get("pooled") or {}).get(name) or {}).get("value"))
            c = _metric_cell(m, src, name)
            cells.append(
                f"<b>{c}</b>" if math.isfinite(v) and v == best[name] and len(loaded) > 1 else c
            )
        s = (m.get("summary") or {}).get("auroc") or {}
        cells.append(
            num(s.get("mean"), ".3f", src, "summary/auroc/mean")
            + " ± "
            + num(s.get("std"), ".3f", src, "summary/auroc/std")
        )
        rows.append(cells)
    headers = (
        ["run", "method", "features", "mpp", "slides"]
        + [f"pooled {t}" for _, t in MIL_METRICS]
        + ["AUROC fold mean ± sd"]
    )
    return (
        '<h3>Comparison of methods</h3><p class="note">Pooled out-of-fold metrics of every '
        "MIL run in this folder; the best value per column is bold.</p>"
        + table(headers, rows, [False, False, False, True, True] + [True] * (len(MIL_METRICS) + 1))
    )


def _mil_run(ctx: Ctx, d: Path, m: dict[str, Any]) -> str:
    from wsi_pipe.report.plots import Scored, mil_curves

    src = ctx.rel(d / "metrics.json")
    classes = [str(c) for c in m.get("classes", [])]
    kp = [kpi(f"pooled {t}", _metric_cell(m, src, name)) for name, t in MIL_METRICS[:4]]
    per_fold = m.get("per_fold") or []
    rows = []
    for i, f in enumerate(per_fold):
        fm = f.get("metrics") or {}
        rows.append(
            [
                num(f.get("fold"), "d", src, f"per_fold/{i}/fold"),
                num(f.get("n_train"), "d", src, f"per_fold/{i}/n_train"),
                num(f.get("n_val"), "d", src, f"per_fold/{i}/n_val"),
                num(f.get("n_test"), "d", src, f"per_fold/{i}/n_test"),
                num(f.get("best_epoch"), "d", src, f"per_fold/{i}/best_epoch"),
            ]
            + [
                num(
                    (fm.get(name) or {}).get("value"),
                    ".3f",
                    src,
                    f"per_fold/{i}/metrics/{name}/value",
                )
                for name, _ in MIL_METRICS
            ]
        )
    summ = m.get("summary") or {}
    rows.append(
        ["<b>mean ± sd</b>", "", "", "", ""]
        + [
            num((summ.get(name) or {}).get("mean"), ".3f", src, f"summary/{name}/mean")
            + " ± "
            + num((summ.get(name) or {}).get("std"), ".3f", src, f"summary/{name}/std")
            for name, _ in MIL_METRICS
        ]
    )
    fold_table = table(
        ["fold", "train", "val", "test", "best epoch"] + [t for _, t in MIL_METRICS],
        rows,
        [True] * (5 + len(MIL_METRICS)),
    )
    preds = read_csv_rows(d / "predictions.csv")
    plots, cm_html, pred_html = "", "", ""
    if preds and classes:
        pos = classes[-1]
        prob_cols = [f"prob_{c}" for c in classes]
        y_idx = np.array(
            [classes.index(r["label"]) if r.get("label") in classes else -1 for r in preds]
        )
        probs = np.array([[to_float(r.get(c)) for c in prob_cols] for r in preds])
        ok = y_idx >= 0
        if len(classes) == 2:
            groups = []
            folds = sorted({r.get("fold", "") for r in preds}, key=lambda v: (len(v), v))
            for fv in folds:
                sel = np.array([r.get("fold", "") == fv for r in preds]) & ok
                groups.append(Scored(f"fold {fv}", y_idx[sel] == 1, probs[sel, 1]))
            pooled = Scored("pooled", y_idx[ok] == 1, probs[ok, 1])
            title = pos
        else:  # every (slide, class) pair one-vs-rest: a micro-average
            onehot = np.zeros_like(probs, dtype=bool)
            onehot[np.flatnonzero(ok), y_idx[ok]] = True
            groups = []
            for fv in sorted({r.get("fold", "") for r in preds}, key=lambda v: (len(v), v)):
                sel = np.array([r.get("fold", "") == fv for r in preds]) & ok
                groups.append(Scored(f"fold {fv}", onehot[sel].ravel(), probs[sel].ravel()))
            pooled = Scored("pooled", onehot[ok].ravel(), probs[ok].ravel())
            title = ""
        png = mil_curves(groups, pooled, title, ctx.n_boot, seed=0, micro=len(classes) > 2)
        plots = add_plot(
            ctx,
            f"mil_{d.name}",
            png,
            f"ROC, precision-recall and calibration of {d.name}",
            "Thin lines: each fold's test slides; thick line: all out-of-fold predictions "
            "pooled. Shaded: bootstrap 95% band. Calibration: pooled slides in ten "
            "probability bins (numbers = slides per bin).",
        )
        cm = np.zeros((len(classes), len(classes)), np.int64)
        for yi, r in zip(y_idx, preds):
            if yi >= 0 and r.get("pred") in classes:
                cm[yi, classes.index(r["pred"])] += 1
        cm_html = (
            "<h4>Confusion matrix (pooled out-of-fold, arg-max prediction)</h4>"
            + confusion_table(classes, cm)
        )
        pred_html = _prediction_table(ctx, d, preds, classes)
    head = (
        f'<h3 id="mil-{esc(d.name)}">{esc(d.name)}</h3><p class="note">method '
        f"<b>{esc(m.get('method'))}</b> on features <code>{esc(m.get('feature_set'))}</code> at "
        f"{num(m.get('mpp'), 'g', src, 'mpp')} µm/px; classes {esc(', '.join(classes))}; "
        f"{len(per_fold)} fold(s).</p>"
    )
    return (
        head
        + f'<div class="kpis">{"".join(kp)}</div>'
        + plots
        + f'<div class="cols2"><div><h4>Per fold (test slides)</h4>{fold_table}</div>'
        f"<div>{cm_html}</div></div>" + pred_html
    )


def _prediction_table(ctx: Ctx, d: Path, preds: list[dict[str, str]], classes: list[str]) -> str:
    src = ctx.rel(d / "predictions.csv")
    rows, cls = [], []
    for r in sorted(preds, key=lambda r: (r.get("fold", ""), r["slide_id"])):
        sid = r["slide_id"]
        right = r.get("label") == r.get("pred")
        cells = [
            f"<b>{esc(sid)}</b>",
            esc(r.get("patient_id", "")),
            esc(r.get("fold", "")),
            label_pill(r.get("label")),
            label_pill(r.get("pred")),
            "✓" if right else '<span class="status-failed">✗</span>',
            num(
                int(to_float(r.get("n_tiles"))) if r.get("n_tiles") else None,
                "d",
                src,
                f"{sid}/n_tiles",
            ),
        ]
        cells += [num(to_float(r.get(f"prob_{c}")), ".3f", src, f"{sid}/prob_{c}") for c in classes]
        rows.append(cells)
        cls.append("" if right else "wrong")
    headers = ["slide", "patient", "fold", "label", "prediction", "", "tiles"] + [
        f"P({c})" for c in classes
    ]
    return "<h4>Per-slide predictions (out-of-fold)</h4>" + table(
        headers, rows, [False] * 6 + [True] * (1 + len(classes)), cls, scroll=len(rows) > 14
    )
