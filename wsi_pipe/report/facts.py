"""Run facts section: config hashes, versions, timings, Slurm jobs, notes."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from wsi_pipe.core.layout import EncoderSideFiles
from wsi_pipe.report.common import (
    Ctx,
    human_seconds,
    load_json,
    state_files,
    to_float,
    when,
)
from wsi_pipe.report.markup import esc, num, section, table
from wsi_pipe.report.mil_results import mil_runs

_HASH_LINE = re.compile(r"#\s*(\w+)\s+hash\s+([0-9a-f]+)")


def _config_rows(ctx: Ctx) -> list[list[str]]:
    lay = ctx.layout
    paths = sorted(lay.config_root.rglob("*.yaml")) if lay.config_root.is_dir() else []
    paths += [r.config for r in lay.mil_runs() if r.config.is_file()]
    paths += [p for p in map(lay.anomaly_config, lay.anomaly_models()) if p.is_file()]
    paths += sorted(ctx.layout.slurm_dir.glob("*.yaml")) if ctx.layout.slurm_dir.is_dir() else []
    rows = []
    for p in paths:
        try:
            first = p.read_text().splitlines()[0] if p.stat().st_size else ""
        except OSError:
            first = ""
        mt = _HASH_LINE.match(first)
        rows.append(
            [
                f"<code>{esc(ctx.rel(p))}</code>",
                esc(mt.group(1) if mt else ""),
                f"<code>{esc(mt.group(2))}</code>" if mt else "–",
                esc(when(p.stat().st_mtime)),
            ]
        )
    for summ in (
        sorted(ctx.layout.models_dir.glob("*.json")) if ctx.layout.models_dir.is_dir() else []
    ):
        s = load_json(summ, ctx)
        if isinstance(s, dict):
            h = (s.get("provenance") or {}).get("config_hash") or s.get("config_hash")
            if h:
                src = ctx.rel(summ)
                key = (
                    "provenance/config_hash"
                    if (s.get("provenance") or {}).get("config_hash")
                    else "config_hash"
                )
                rows.append(
                    [
                        f"<code>{esc(src)}</code>",
                        "encoder provenance",
                        f"<code>{num(h, 's', src, key)}</code>",
                        esc(when(summ.stat().st_mtime)),
                    ]
                )
    return rows


def _timing_rows(ctx: Ctx, states: dict[str, dict[str, dict[str, Any]]]) -> list[list[str]]:
    rows = []
    for stage, per in states.items():
        secs = [to_float(s.get("seconds")) for s in per.values() if s.get("status") == "done"]
        secs = [s for s in secs if math.isfinite(s)]
        starts = [to_float(s.get("started")) for s in per.values()]
        ends = [to_float(s.get("finished")) for s in per.values()]
        starts = [s for s in starts if math.isfinite(s)]
        ends = [s for s in ends if math.isfinite(s)]
        wall = max(ends) - min(starts) if starts and ends else math.nan
        hosts = sorted({str(s.get("host")) for s in per.values() if s.get("host")})
        rows.append(
            [
                esc(stage),
                num(len(secs), "d"),
                esc(human_seconds(sum(secs)) if secs else "–"),
                esc(human_seconds(statistics.median(secs)) if secs else "–"),
                esc(human_seconds(wall)),
                esc(", ".join(hosts[:4]) + (" …" if len(hosts) > 4 else "")),
            ]
        )
    md = ctx.layout.models_dir
    for summ in sorted(md.glob("*" + EncoderSideFiles.SUMMARY_SUFFIX)) if md.is_dir() else []:
        s = load_json(summ, ctx) or {}
        rows.append(
            [
                esc(f"pretrain ({summ.name[: -len(EncoderSideFiles.SUMMARY_SUFFIX)]})"),
                "",
                esc(human_seconds(to_float(s.get("seconds")))),
                "",
                "",
                esc(s.get("device", "")),
            ]
        )
    for mp in sorted(md.glob("*.metrics.json")) if md.is_dir() else []:
        s = load_json(mp, ctx) or {}
        if "val" in s:
            rows.append(
                [
                    esc(f"finetune ({mp.name[:-13]})"),
                    "",
                    esc(human_seconds(to_float(s.get("seconds")))),
                    "",
                    "",
                    "",
                ]
            )
    for d in mil_runs(ctx.layout):
        folds = [load_json(p, ctx) or {} for p in sorted(d.glob("fold_*/fold.json"))]
        secs = [to_float(f.get("seconds")) for f in folds]
        secs = [s for s in secs if math.isfinite(s)]
        if secs:
            rows.append(
                [
                    esc(f"train-mil ({d.name})"),
                    num(len(secs), "d"),
                    esc(human_seconds(sum(secs))),
                    esc(human_seconds(statistics.median(secs))),
                    "",
                    "folds",
                ]
            )
    return rows


def run_facts(ctx: Ctx, version: str, build_info: dict[str, str]) -> str | None:
    """Config hashes, versions, timings and Slurm jobs of the run."""
    from wsi_pipe.runner.slurm import submitted_jobs

    states = state_files(ctx.layout)
    body = [
        '<h3>Configs</h3><p class="note">Every resolved config saved in the run, with the hash '
        "each output records (a changed config makes a stage redo its work).</p>"
    ]
    crow = _config_rows(ctx)
    body.append(
        table(["file", "config", "hash", "written"], crow)
        if crow
        else '<p class="note">No config saved yet.</p>'
    )
    body.append("<h3>Timings</h3>")
    trows = _timing_rows(ctx, states)
    body.append(
        table(
            [
                "stage",
                "items done",
                "total compute",
                "median per item",
                "wall (first start → last end)",
                "hosts / device",
            ],
            trows,
            [False, True, True, True, True, False],
        )
        if trows
        else '<p class="note">No timings recorded.</p>'
    )
    body.append("<h3>Slurm jobs</h3>")
    jobs = []
    try:
        jobs = submitted_jobs(ctx.layout)
    except Exception as e:
        ctx.notes.append(f"Slurm job records unreadable: {e}")
    if jobs:
        jrows = []
        for j in jobs:
            src = ctx.rel(ctx.layout.slurm_job_record(j.job_id))
            jrows.append(
                [
                    f"<code>{num(j.job_id, 's', src, 'job_id')}</code>",
                    esc(j.stage),
                    esc(f"array of {j.array_size}" if j.array_size else "single job"),
                    esc(", ".join(j.after_ok) or "–"),
                    esc(when(j.submitted)),
                    f"<code>{esc(ctx.rel(Path(j.script)))}</code>",
                ]
            )
        body.append(
            table(["job id", "stage", "kind", "after (afterok)", "submitted", "script"], jrows)
        )
    else:
        body.append(
            '<p class="note">No Slurm jobs were submitted for this run (it ran locally).</p>'
        )
    facts = [["wsi-pipe version", esc(version)]] + [[esc(k), esc(v)] for k, v in build_info.items()]
    body.append("<h3>Environment</h3>" + table(["", ""], facts))
    if ctx.notes:
        body.append(
            "<h3>Notes</h3><ul>" + "".join(f"<li>{esc(n)}</li>" for n in ctx.notes) + "</ul>"
        )
    return section("facts", "Run facts", "".join(body))
