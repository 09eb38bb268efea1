"""Cohort section: slides, readers, mpp and its source, tiles per grid, failures, QC."""

from __future__ import annotations

from typing import Any

from wsi_pipe.core.layout import RunLayout
from wsi_pipe.report.common import (
    Ctx,
    add_image,
    add_plot,
    label_pill,
    state_files,
    when,
)
from wsi_pipe.report.markup import esc, kpi, num, section, table


def _store_facts(layout: RunLayout, sid: str, mpps: list[float]) -> dict[str, Any]:
    """Reader, vendor, mpp and its source, level-0 size and tile counts from the coords stores."""
    from wsi_pipe.store import open_store, schema

    facts: dict[str, Any] = {"tiles": {}}
    for m in mpps:
        p = layout.find_coords_store(sid, m)
        if p is None:
            continue
        try:
            with open_store(p, validate=False) as r:
                a = r.attrs
                facts["tiles"][m] = (
                    int(r.shape(schema.COORDS)[0]) if schema.COORDS in r.names else 0
                )
                for k in (
                    "backend",
                    "vendor",
                    "mpp_source",
                    "level0_mpp",
                    "level0_width",
                    "level0_height",
                ):
                    if k in a and k not in facts:
                        facts[k] = a[k]
        except Exception as err:  # a broken store is shown, not fatal
            facts.setdefault("store_errors", []).append(f"{p.name}: {type(err).__name__}: {err}")
    return facts


def cohort(ctx: Ctx) -> str | None:
    """Slides, readers, mpp and its source, tiles per grid, failures, QC thumbnails."""
    from wsi_pipe.core.manifest import load_slide_table

    layout = ctx.layout
    states = state_files(layout)
    tile_states = states.get("tile", {})
    entries = []
    if layout.slides_table.exists():
        try:
            entries = load_slide_table(layout.slides_table)
        except Exception as err:
            ctx.notes.append(f"could not read {ctx.rel(layout.slides_table)}: {err}")
    ids = [e.slide_id for e in entries]
    qc_dir = layout.qc_dir
    extra = set(tile_states) | (
        {p.stem for p in qc_dir.glob("*.png")} if qc_dir.is_dir() else set()
    )
    ids += sorted(extra - set(ids))
    if not ids:
        return None
    by_id = {e.slide_id: e for e in entries}
    mpps = layout.tile_mpps()
    rows, row_cls, facts_of = [], [], {}
    for sid in ids:
        e = by_id.get(sid)
        st = tile_states.get(sid, {})
        info = st.get("info") or {}
        f = _store_facts(layout, sid, mpps)
        ctx.notes += [f"{sid}: unreadable coords store {msg}" for msg in f.get("store_errors", [])]
        facts_of[sid] = f
        status = st.get("status", "not tiled" if not f["tiles"] else "done")
        scls = {"done": "status-done", "failed": "status-failed"}.get(status, "status-other")
        src = ctx.rel(layout.state_file("tile", sid))
        if "level0_mpp" in info:
            mpp_html = num(info["level0_mpp"], "g", src, "info/level0_mpp")
        else:
            mpp_html = num(f.get("level0_mpp"), "g")
        cells = [
            f"<b>{esc(sid)}</b>",
            esc(e.patient_id if e else ""),
            label_pill(e.label if e else None),
            f'<span class="{scls}">{esc(status)}</span>',
            esc(f.get("backend") or info.get("backend") or ""),
            esc(f.get("vendor") or ""),
            mpp_html,
            esc(f.get("mpp_source") or ""),
            esc(f"{f['level0_width']} × {f['level0_height']}" if "level0_width" in f else ""),
        ]
        state_tiles = info.get("tiles") or {}
        for m in mpps:
            n = f["tiles"].get(m)
            key = f"{m:g}"
            if n is not None and state_tiles.get(key) == n:
                cells.append(num(n, "d", src, f"info/tiles/{key}"))
            else:
                cells.append(num(n, "d"))
        rows.append(cells)
        row_cls.append("bad" if status == "failed" else "")
    headers = [
        "slide",
        "patient",
        "label",
        "tile stage",
        "reader",
        "vendor",
        "mpp (µm/px)",
        "mpp source",
        "level-0 size (px)",
    ] + [f"tiles @ {m:g} µm/px" for m in mpps]
    numeric = [False] * 6 + [True, False, True] + [True] * len(mpps)
    n_failed_tile = sum(1 for s in tile_states.values() if s.get("status") == "failed")
    totals = {m: sum(f["tiles"].get(m, 0) for f in facts_of.values()) for m in mpps}
    kp = [
        kpi("slides", num(len(ids), "d")),
        kpi("tiled", num(sum(1 for s in tile_states.values() if s.get("status") == "done"), "d")),
        kpi(
            "failed (any stage)",
            num(
                sum(
                    1 for st in states.values() for s in st.values() if s.get("status") == "failed"
                ),
                "d",
            ),
        ),
    ]
    kp += [kpi(f"tiles @ {m:g} µm/px", num(totals[m], ",d")) for m in mpps]
    ctx.headline += [kp[0], kp[2]]
    body = [
        f'<div class="kpis">{"".join(kp)}</div>',
        table(headers, rows, numeric, row_cls, scroll=len(rows) > 14),
    ]
    body.append(_failures(ctx, states))
    body.append(_stage_counts(states))
    body.append(_qc_grid(ctx, ids, by_id, tile_states, facts_of, mpps))
    if mpps and len(ids) > 1:
        counts = [facts_of[s]["tiles"].get(mpps[0], 0) for s in ids]
        if len(ids) <= 80:
            from wsi_pipe.report.plots import tiles_per_slide

            body.append(
                add_plot(
                    ctx,
                    "cohort_tiles",
                    tiles_per_slide(ids, counts, f"{mpps[0]:g} µm/px"),
                    "tiles per slide",
                )
            )
    lead = (
        f"{len(ids)} slide(s); grids {', '.join(f'{m:g}' for m in mpps) or 'none yet'} µm/px. "
        "The mpp is the level-0 resolution the tiler used and where it came from (slide "
        "metadata, manifest or override)."
    )
    labels: dict[str, int] = {}
    for e in entries:
        if e.label:
            labels[e.label] = labels.get(e.label, 0) + 1
    if labels:
        lead += " Labels: " + ", ".join(f"{esc(k)} {v}" for k, v in sorted(labels.items())) + "."
    patients = {e.patient_id for e in entries if e.patient_id}
    if patients and len(patients) != len(entries):
        lead += f" {len(patients)} patients."
    if n_failed_tile:
        lead += f" <b>{n_failed_tile} slide(s) failed to tile</b> (reasons below)."
    return section("cohort", "Cohort", "".join(body), lead)


def _failures(ctx: Ctx, states: dict[str, dict[str, dict[str, Any]]]) -> str:
    rows = []
    for stage, per in states.items():
        for sid, st in sorted(per.items()):
            if st.get("status") in ("failed", "unreadable"):
                rows.append(
                    [
                        esc(stage),
                        f"<b>{esc(sid)}</b>",
                        num(st.get("attempts"), "d"),
                        f'<span class="err">{esc(st.get("error"))}</span>',
                        esc(when(st.get("finished"))),
                        esc(st.get("job") or st.get("host") or ""),
                    ]
                )
    if not rows:
        return '<h3>Failures</h3><p class="note">No slide failed in any stage.</p>'
    return (
        '<h3>Failures</h3><p class="note">Each failed slide with the error its stage raised '
        "(full traceback in its state file under <code>state/</code>); the run went on without it. "
        "Re-running the stage retries them.</p>"
        + table(
            ["stage", "slide", "attempts", "error", "when", "job / host"],
            rows,
            [False, False, True, False, False, False],
            ["bad"] * len(rows),
        )
    )


def _stage_counts(states: dict[str, dict[str, dict[str, Any]]]) -> str:
    if not states:
        return ""
    rows = []
    for stage, per in states.items():
        c: dict[str, int] = {}
        for st in per.values():
            c[str(st.get("status"))] = c.get(str(st.get("status")), 0) + 1
        other = sum(v for k, v in c.items() if k not in ("done", "failed"))
        rows.append(
            [
                esc(stage),
                num(c.get("done", 0), "d"),
                num(c.get("failed", 0), "d"),
                num(other, "d"),
                num(len(per), "d"),
            ]
        )
    return "<h4>Per-slide stages</h4>" + table(
        ["stage", "done", "failed", "other (running / interrupted)", "slides"],
        rows,
        [False, True, True, True, True],
    )


def _qc_grid(
    ctx: Ctx,
    ids: list[str],
    by_id: dict,
    tile_states: dict,
    facts_of: dict,  # type: ignore[type-arg]
    mpps: list[float],
) -> str:
    cards = []
    shown = ids[: ctx.max_thumbnails]
    for sid in shown:
        st = tile_states.get(sid, {})
        e = by_id.get(sid)
        qc = ctx.layout.qc_png(sid)
        tiles = ", ".join(
            f"{facts_of[sid]['tiles'][m]:,} tiles @ {m:g} µm/px"
            for m in mpps
            if m in facts_of[sid]["tiles"]
        )
        if qc.exists():
            im = add_image(ctx, qc, f"qc_{sid}", 420, f"QC thumbnail of {sid}")
            cap = f"<b>{esc(sid)}</b> {label_pill(e.label if e else None)}<br>{esc(tiles or 'no tiles')}"
            cards.append(f'<figure class="thumb">{im}<figcaption>{cap}</figcaption></figure>')
        elif st.get("status") == "failed":
            cards.append(
                f'<figure class="thumb failed"><figcaption><b>{esc(sid)}</b> '
                f'<span class="pill bad">failed</span><br><span class="err">'
                f"{esc(str(st.get('error'))[:300])}</span></figcaption></figure>"
            )
    if not cards:
        return ""
    more = (
        f'<p class="note">Showing {len(shown)} of {len(ids)} slides (<code>--max-thumbnails</code>).</p>'
        if len(ids) > len(shown)
        else ""
    )
    legend = (
        '<div class="legend-inline">'
        '<span><span class="swatch" style="border-color:#00c800"></span>tissue contour</span>'
        '<span><span class="swatch" style="border-color:#0000ff"></span>hole in tissue</span>'
        '<span><span class="swatch" style="border-color:#dc0000"></span>kept tile (finest grid)</span>'
        '<span><span class="swatch" style="border-color:#ff00ff;background:#ff00ff80"></span>pen mark</span>'
        "</div>"
    )
    return f'<h3>Quality control</h3>{legend}<div class="grid">{"".join(cards)}</div>{more}'
