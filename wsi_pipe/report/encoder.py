"""Encoder section: pretraining loss curves, fine-tuning metrics and confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from wsi_pipe.core.layout import EncoderSideFiles
from wsi_pipe.report.common import (
    Ctx,
    add_plot,
    confusion_table,
    human_seconds,
    load_json,
    read_csv_rows,
    to_float,
)
from wsi_pipe.report.markup import esc, kpi, num, section


def encoder(ctx: Ctx) -> str | None:
    """Pretraining loss curves and fine-tuning metrics of the encoders under models/."""
    from wsi_pipe.report.plots import loss_curve

    d = ctx.layout.models_dir
    if not d.is_dir():
        return None
    parts = []
    for summ in sorted(d.glob("*" + EncoderSideFiles.SUMMARY_SUFFIX)):
        s = load_json(summ, ctx)
        if not isinstance(s, dict):
            continue
        stem = summ.name[: -len(EncoderSideFiles.SUMMARY_SUFFIX)]
        src = ctx.rel(summ)
        prov = s.get("provenance") or {}
        cfg = prov.get("config") or {}
        kp = [
            kpi("steps", num(s.get("steps"), "d", src, "steps")),
            kpi("tiles sampled", num(s.get("n_tiles"), ",d", src, "n_tiles")),
            kpi(
                "loss first → last",
                num(s.get("first_loss"), ".4f", src, "first_loss")
                + " → "
                + num(s.get("last_loss"), ".4f", src, "last_loss"),
                f"mean of {esc((prov.get('loss') or {}).get('window', ''))} steps at each end",
            ),
            kpi(
                "training time",
                esc(human_seconds(to_float(s.get("seconds")))),
                esc(s.get("device", "")),
            ),
        ]
        loss_csv = EncoderSideFiles.from_summary(summ).loss_csv
        rows = read_csv_rows(loss_csv)
        if rows:
            step = np.array([to_float(r["step"]) for r in rows])
            loss = np.array([to_float(r["loss"]) for r in rows])
            lr = np.array([to_float(r.get("lr")) for r in rows]) if "lr" in rows[0] else None
        else:
            curve = np.array(s.get("loss_curve") or [], dtype=float).reshape(-1, 3)
            step, loss, lr = curve[:, 0], curve[:, 1], curve[:, 2]
        plot = ""
        if len(step):
            title = f"{prov.get('method', 'pretraining')} of {cfg.get('arch', stem)}"
            plot = add_plot(
                ctx,
                f"loss_{stem}",
                loss_curve(step, loss, lr, title),
                f"pretraining loss of {stem}",
                f"Loss per step from <code>{esc(ctx.rel(loss_csv))}</code>.",
            )
        data = prov.get("data") or {}
        facts = (
            f'<p class="note">{esc(cfg.get("arch", ""))}, input {esc(cfg.get("input_px", ""))} px, '
            f"batch {esc(cfg.get('batch_size', ''))}, lr {esc(cfg.get('lr', ''))}, "
            f"{esc(len(data.get('slides', [])))} slide(s) at "
            f"{esc(', '.join(f'{m:g}' for m in data.get('mpps', [])))} µm/px; config hash "
            f"<code>{esc(prov.get('config_hash', ''))}</code></p>"
        )
        ctx.headline.append(kp[2])
        parts.append(
            f"<h3>Pretraining: <code>{esc(stem)}.pt</code></h3>"
            f'<div class="kpis">{"".join(kp)}</div>{facts}{plot}'
        )
    for mpath in sorted(d.glob("*.metrics.json")):
        m = load_json(mpath, ctx)
        if not isinstance(m, dict) or "val" not in m:
            continue
        parts.append(_finetune(ctx, mpath, m))
    if not parts:
        return None
    return section(
        "encoder",
        "Encoder",
        "".join(parts),
        "Self-supervised pretraining (masked image modelling) and supervised fine-tuning "
        "of the tile encoder.",
    )


def _finetune(ctx: Ctx, mpath: Path, m: dict[str, Any]) -> str:
    src = ctx.rel(mpath)
    stem = mpath.name[: -len(".metrics.json")]
    val = m.get("val") or {}
    kp = [
        kpi("held-out accuracy", num(val.get("accuracy"), ".3f", src, "val/accuracy")),
        kpi(
            "balanced accuracy",
            num(val.get("balanced_accuracy"), ".3f", src, "val/balanced_accuracy"),
        ),
        kpi("macro F1", num(val.get("macro_f1"), ".3f", src, "val/macro_f1")),
        kpi("held-out tiles", num(val.get("n"), "d", src, "val/n")),
        kpi("best epoch", num(m.get("best_epoch"), "d", src, "best_epoch")),
    ]
    classes = [str(c) for c in m.get("classes", [])]
    cm = val.get("confusion_matrix")
    cm_html = ""
    if cm:
        cm_html = "<h4>Confusion matrix (held-out; rows = true class)</h4>" + confusion_table(
            classes, np.array(cm), src, "val/confusion_matrix", unit="tiles"
        )
    mode = "whole network" if m.get("train_backbone") else "linear probe (frozen backbone)"
    return (
        f'<h3>Fine-tuning: <code>{esc(stem)}.pt</code></h3><p class="note">{esc(mode)}; '
        f"{esc(len(classes))} classes: {esc(', '.join(classes))}</p>"
        f'<div class="kpis">{"".join(kp)}</div>{cm_html}'
    )
