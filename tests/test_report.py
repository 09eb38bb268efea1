"""`wsi-pipe report`: the HTML page of a run, checked in a real browser (headless Chromium).

One small demo run (every stage, seconds-sized settings) is made once per module. The page is
loaded in Chromium through the DevTools protocol: no broken images, every section the run holds
is rendered, and every number the page traces to a file (`data-src`) equals that file's value.
Without Chromium the browser checks skip, except under CI (`CI=true`), where they fail.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_pipe.core.layout import RunLayout
from wsi_pipe.report import build_report

DEMO_ARGS = [
    "--slides",
    "4",
    "--size-px",
    "1536",
    "--pretrain-epochs",
    "1",
    "--pretrain-steps",
    "2",
    "--mil-epochs",
    "5",
    "--bootstrap",
    "20",
    "--workers",
    "1",
]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def chromium() -> str:
    from wsi_pipe.report.browser import find_chromium

    exe = find_chromium()
    if exe is None:
        reason = "Chromium not installed (apt-get install chromium): browser checks of the report skipped"
        if _in_ci():
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return exe


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`wsi-pipe demo` at its smallest settings that still run every stage (once per module)."""
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    res = CliRunner().invoke(app, ["-q", "demo", "--out", str(out), *DEMO_ARGS])
    assert res.exit_code == 0, res.output
    return {
        "out": out,
        "run": out / "run",
        "output": res.output,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------- helpers
def expected_sections(run: Path) -> set[str]:
    """Sections a run must show, judged from its files (independently of the report code)."""
    la = RunLayout(run)
    want = {"facts"}
    if la.slides_table.exists() or (run / "state" / "tile").is_dir():
        want.add("cohort")
    if list(la.models_dir.glob("*.pretrain.json")) or any(
        "val" in json.loads(p.read_text()) for p in la.models_dir.glob("*.metrics.json")
    ):
        want.add("encoder")
    if list(run.glob("mil/*/metrics.json")):
        want.add("mil")
    if list(run.glob("heatmaps/*/*.png")):
        want.add("heatmaps")
    if la.anomaly_models():
        want.add("anomaly")
    return want


def _lookup(run: Path, src: str, key: str, cache: dict[str, Any]) -> Any:
    path = run / src
    if src not in cache:
        if path.suffix == ".csv":
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            first = next(iter(rows[0])) if rows else ""
            cache[src] = {r[first]: r for r in rows}
        else:
            cache[src] = json.loads(path.read_text())
    data = cache[src]
    if path.suffix == ".csv":
        row, col = key.rsplit("/", 1)
        return data[row][col]
    for part in key.split("/"):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def check_numbers(run: Path, numbers: list[dict[str, str]]) -> int:
    """Every traced number: the value equals the file's, and the text shown is that value
    formatted as declared. Returns how many were checked."""
    cache: dict[str, Any] = {}
    for n in numbers:
        truth = _lookup(run, n["src"], n["key"], cache)
        fmt = n["fmt"]
        if isinstance(truth, str) and fmt not in ("s",):
            truth = float(truth) if fmt not in ("d", ",d") else int(float(truth))
        shown = n["text"].strip()
        if truth is None or (isinstance(truth, float) and math.isnan(truth)):
            assert shown == "–", n
            continue
        assert shown == format(truth, fmt), (n, truth)
        if isinstance(truth, (int, float)):
            assert float(n["value"]) == pytest.approx(float(truth), rel=1e-12, abs=0), (n, truth)
    return len(numbers)


class _Numbers(HTMLParser):
    """Traced numbers and section ids of a report, read from its HTML source (no browser)."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: list[dict[str, str]] = []
        self.sections: list[str] = []
        self.images: list[str] = []
        self.scripts = 0
        self._open: dict[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section" and "data-section" in a:
            self.sections.append(a["data-section"])
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        if "data-src" in a:
            self._open = {
                "src": a["data-src"],
                "key": a["data-key"],
                "fmt": a["data-fmt"],
                "value": a["data-value"],
                "text": "",
            }

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._open["text"] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "span" and self._open is not None:
            self.numbers.append(self._open)
            self._open = None


def parse_report(html: Path) -> _Numbers:
    p = _Numbers()
    p.feed(html.read_text(encoding="utf-8"))
    return p


def browser_check(run: Path, html: Path, shot: Path | None) -> Any:
    """Load `html` in Chromium; assert the page is whole and its numbers are the run's."""
    from wsi_pipe.report.browser import inspect_page

    page = inspect_page(html, shot)
    assert page.images, "no images rendered"
    assert not page.broken_images, page.broken_images
    assert page.scripts == 0, "the report must not need JavaScript"
    assert not page.console_errors, page.console_errors
    shown = {s["id"] for s in page.sections}
    assert shown == expected_sections(run), (shown, expected_sections(run))
    assert all(s["height"] > 50 for s in page.sections), page.sections
    assert page.width <= 1290, f"page scrolls sideways ({page.width} px)"
    assert check_numbers(run, page.numbers) > 0
    if shot is not None:
        import cv2

        im = cv2.imread(str(shot))
        assert im is not None and im.shape[1] == 1280 and im.shape[0] > 600
        assert float(im.std()) > 10.0, "blank screenshot"
    return page


# ---------------------------------------------------------------------------------- tests
def test_demo_ends_by_printing_the_report_path(demo: dict[str, Any]) -> None:
    last = demo["output"].strip().splitlines()[-1].strip()
    html = RunLayout(demo["run"]).report_html
    assert Path(last) == html.resolve() and html.exists()
    p = parse_report(html)
    assert (
        set(p.sections)
        == expected_sections(demo["run"])
        == {"cohort", "encoder", "mil", "heatmaps", "facts"}
    )
    assert p.scripts == 0
    assert all(src.startswith("data:image/") for src in p.images), "the page must be self-contained"
    assert "http://" not in html.read_text() and "https://" not in html.read_text()
    assert check_numbers(demo["run"], p.numbers) > 30


def test_demo_report_in_a_real_browser(demo: dict[str, Any], chromium: str, tmp_path: Path) -> None:
    run = demo["run"]
    page = browser_check(run, RunLayout(run).report_html, tmp_path / "demo_report.png")
    keys = {(n["src"], n["key"]) for n in page.numbers}
    mil_name = next(run.glob("mil/*/metrics.json")).parent.name
    # the headline numbers are on the page and traced to their files
    assert (f"mil/{mil_name}/metrics.json", "pooled/auroc/value") in keys
    assert (f"mil/{mil_name}/metrics.json", "per_fold/1/metrics/balanced_accuracy/value") in keys
    assert ("models/ssmamba.pretrain.json", "last_loss") in keys
    n_pred = len(list(csv.DictReader(open(run / "mil" / mil_name / "predictions.csv"))))
    assert (
        sum(1 for s, k in keys if s.endswith("predictions.csv") and k.endswith("/n_tiles"))
        == n_pred
    )
    qc = [i for i in page.images if i["alt"].startswith("QC thumbnail")]
    assert len(qc) == 4 and all(i["naturalWidth"] > 50 for i in qc)
    heat = [i for i in page.images if i["alt"].startswith("attention heatmap")]
    assert len(heat) == 4


def test_report_regenerates_in_seconds_with_assets_beside_it(
    demo: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "r.html"
    res = build_report(demo["run"], out, embed=False, n_boot=0)
    assert res.assets_dir == tmp_path / "r_files" and res.n_images > 10
    p = parse_report(out)
    files = [s for s in p.images if not s.startswith("data:")]
    assert files and all((tmp_path / s).is_file() for s in files)
    assert res.seconds < 60, res.seconds  # ~3 s CPU; generous for a loaded machine
    again = build_report(demo["run"], out, embed=False, n_boot=0)  # overwrites cleanly
    assert sorted(p.name for p in again.assets_dir.iterdir()) == sorted(
        p.name for p in res.assets_dir.iterdir()
    )


def test_heatmap_pngs_carry_a_colour_bar(demo: dict[str, Any]) -> None:
    import cv2

    pngs = sorted(demo["run"].glob("heatmaps/*/*.png"))
    assert pngs
    im = cv2.cvtColor(cv2.imread(str(pngs[0])), cv2.COLOR_BGR2RGB).astype(int)
    h = im.shape[0]
    # a row in the bottom legend runs from JET blue (left) to JET red (right)
    found = False
    for y in range(int(h * 0.6), h):
        row = im[y]
        sat = (row.max(1) - row.min(1)) > 120
        if sat.sum() < im.shape[1] * 0.3:
            continue
        xs = np.flatnonzero(sat)
        left, right = row[xs[0] + 2], row[xs[-1] - 2]
        if left[2] > 100 and left[0] < 60 and right[0] > 100 and right[2] < 60:
            found = True
            break
    assert found, "no colour bar under the heatmap"


def _add_second_method_and_anomaly(run: Path) -> None:
    """A second MIL run (a copy with other numbers), an anomaly folder as the anomaly stage
    writes it (RunLayout.anomaly_*: model.pt, slide_scores.csv, metrics.json, heatmaps, top tiles),
    a fine-tuned encoder's metrics and a Slurm job record."""
    import cv2

    first = next(run.glob("mil/*/metrics.json")).parent
    second = run / "mil" / "meanmil_ssmamba"
    shutil.copytree(first, second)
    m = json.loads((second / "metrics.json").read_text())
    m["method"] = "mean"
    m["pooled"]["auroc"] = {"value": 0.6251, "ci_low": 0.31, "ci_high": 0.93}
    m["summary"]["auroc"]["std"] = float("nan")  # undefined values are shown as a dash
    (second / "metrics.json").write_text(json.dumps(m))
    la = RunLayout(run)
    ids = [p.stem for p in sorted(la.qc_png("x").parent.glob("*.png"))]
    name = "maha"
    la.anomaly_dir(name).mkdir(parents=True)
    la.anomaly_model(name).write_bytes(b"not a real checkpoint: the report never loads it")
    rows = ["slide_id,score,max,dog,concentration,n_tiles,label"]
    for i, sid in enumerate(ids):
        rows.append(
            f"{sid},{1.5 + i * 0.75:.8g},{3 + i:.8g},{0.1 * i:.8g},{0.25:.8g},{40 + i},"
            f"{'tumour' if 'tumour' in sid else 'normal'}"
        )
    la.anomaly_slide_scores(name).write_text("\n".join(rows) + "\n")
    la.anomaly_metrics(name).write_text(
        json.dumps(
            {
                "model": name,
                "method": "mahalanobis",
                "slide_auroc": {"value": 0.875, "ci_low": 0.5, "ci_high": 1.0},
                "slide_auroc_max": 0.75,
                "tile_auroc": None,
                "n_tiles": 170,
            }
        )
    )
    # a fine-tuned encoder (as wsi-pipe finetune writes it) and a Slurm job record
    (la.models_dir / "ssmamba_ft.metrics.json").write_text(
        json.dumps(
            {
                "classes": ["stroma", "tumour", "fat"],
                "best_epoch": 3,
                "train_backbone": False,
                "seconds": 4.5,
                "val": {
                    "accuracy": 0.8125,
                    "balanced_accuracy": 0.7777777777777778,
                    "macro_f1": 0.75,
                    "n": 16,
                    "confusion_matrix": [[5, 1, 0], [1, 4, 1], [0, 0, 4]],
                },
            }
        )
    )
    job = la.slurm_job_record("4242")
    job.parent.mkdir(parents=True)
    job.write_text(
        json.dumps(
            {
                "job_id": "4242",
                "stage": "tile",
                "script": str(la.slurm_dir / "t.sbatch"),
                "array_size": 4,
                "after_ok": [],
                "argv": ["tile"],
                "submitted": 1.7e9,
            }
        )
    )
    for sid in ids[:2]:
        p = la.anomaly_heatmap(name, sid)
        p.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(
            str(p), cv2.cvtColor(np.full((120, 160, 3), (200, 60, 90), np.uint8), cv2.COLOR_RGB2BGR)
        )
        t = la.anomaly_top_tiles_dir(name, sid)
        t.mkdir(parents=True)
        cv2.imwrite(str(t / "rank01_x0_y0.png"), np.full((32, 32, 3), 128, np.uint8))


def test_several_methods_and_an_anomaly_model(
    demo: dict[str, Any], tmp_path: Path, chromium: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(demo["run"], run, ignore=shutil.ignore_patterns("features", "report*"))
    _add_second_method_and_anomaly(run)
    res = build_report(run, n_boot=20)
    assert {"mil", "anomaly"} <= set(res.sections)
    html = res.html.read_text()
    assert "Comparison of methods" in html and "meanmil_ssmamba" in html
    page = browser_check(run, res.html, tmp_path / "two_methods.png")
    keys = {(n["src"], n["key"]): n["text"] for n in page.numbers}
    assert keys[("mil/meanmil_ssmamba/metrics.json", "pooled/auroc/value")] == "0.625"
    assert keys[("mil/meanmil_ssmamba/metrics.json", "summary/auroc/std")] == "–"
    assert keys[("anomaly/maha/metrics.json", "slide_auroc/value")] == "0.875"
    assert sum(1 for s, _ in keys if s == "anomaly/maha/slide_scores.csv") >= 4 * 5
    assert [i for i in page.images if i["alt"].startswith("anomaly map")]
    assert keys[("models/ssmamba_ft.metrics.json", "val/balanced_accuracy")] == "0.778"
    assert keys[("models/ssmamba_ft.metrics.json", "val/confusion_matrix/1/2")] == "1"
    assert keys[("slurm/jobs/4242.json", "job_id")] == "4242"


def _tile_only_run(demo: dict[str, Any], tmp_path: Path) -> Path:
    """Tiles of two demo slides plus a file that is not a slide (it fails)."""
    from wsi_pipe.core.config import TileConfig
    from wsi_pipe.stages.tile import run_tile

    slides = tmp_path / "slides"
    slides.mkdir()
    for p in sorted((demo["out"] / "slides").glob("*.tiff"))[:2]:
        os.symlink(p, slides / p.name)
    (slides / "broken_slide.svs").write_bytes(b"this is not a slide")
    run = tmp_path / "run"
    summary = run_tile(
        [str(slides)], run, TileConfig(target_mpps=(1.0,), tile_px=64), progress=False
    )
    assert summary.n_failed == 1
    return run


def test_partial_run_only_tiles_and_a_failed_slide(demo: dict[str, Any], tmp_path: Path) -> None:
    run = _tile_only_run(demo, tmp_path)
    res = build_report(run)
    assert res.sections == ("cohort", "facts")
    p = parse_report(res.html)
    assert set(p.sections) == expected_sections(run)
    html = res.html.read_text()
    assert "broken_slide" in html and "SlideReadError" in html  # the failure and its reason
    assert check_numbers(run, p.numbers) > 0
    st = json.loads(RunLayout(run).state_file("tile", "broken_slide").read_text())
    assert st["status"] == "failed"


def test_partial_run_in_a_real_browser(demo: dict[str, Any], tmp_path: Path, chromium: str) -> None:
    run = _tile_only_run(demo, tmp_path)
    res = build_report(run)
    browser_check(run, res.html, None)


def test_report_of_the_shared_slides(wsi_dir: Path, tmp_path: Path, chromium: str) -> None:
    """Real slides of every flavour: Aperio SVS, generic TIFF (placeholder mpp: fails at 0.5),
    OME-TIFFs (mpp from tiffslide), a DICOM folder and a 16 x 16 slide."""
    from wsi_pipe.core.config import TileConfig
    from wsi_pipe.stages.tile import run_tile

    if not wsi_dir.is_dir():
        pytest.skip(f"shared slides not found at {wsi_dir}")
    run = tmp_path / "run"
    summary = run_tile(
        [str(wsi_dir)], run, TileConfig(target_mpps=(1.0,), tile_px=128), progress=False
    )
    assert len(summary.results) >= 5
    res = build_report(run)
    page = browser_check(run, res.html, tmp_path / "shared.png")
    text_keys = {n["key"] for n in page.numbers}
    assert "info/level0_mpp" in text_keys
    html = res.html.read_text()
    for r in summary.results:
        assert r.slide_id in html
        if r.status == "failed":
            assert r.error and r.error.split(":")[0] in html


def test_cli_report(demo: dict[str, Any], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    out = tmp_path / "x.html"
    r = CliRunner().invoke(
        app,
        [
            "-q",
            "report",
            str(demo["run"]),
            "--out",
            str(out),
            "--heatmaps",
            "2",
            "--bootstrap",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == str(out.resolve()) and out.exists()
    assert parse_report(out).images
    r = CliRunner().invoke(app, ["report", str(tmp_path / "empty_folder_that_is_missing")])
    assert r.exit_code == 2 and "not a folder" in " ".join(r.output.split())
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(app, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no run outputs" in " ".join(r.output.split())


def test_multiclass_mil_run_alone(tmp_path: Path) -> None:
    """A folder holding only a 3-class train-mil output: curves micro-averaged, numbers traced."""
    rng = np.random.default_rng(0)
    d = tmp_path / "run" / "mil" / "abmil_x"
    d.mkdir(parents=True)
    classes = ["a", "b", "c"]
    rows = []
    for i in range(24):
        y = i % 3
        p = rng.dirichlet([1.0, 1.0, 1.0])
        p[y] += 0.5
        p /= p.sum()
        rows.append(
            {
                "slide_id": f"s{i:02d}",
                "patient_id": f"p{i}",
                "fold": i % 2,
                "label": classes[y],
                "pred": classes[int(p.argmax())],
                "n_tiles": 10 + i,
            }
            | {f"prob_{c}": float(v) for c, v in zip(classes, p)}
        )
    with open(d / "predictions.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    m = {
        n: {"value": 0.75, "ci_low": 0.5, "ci_high": 0.9}
        for n in ("auroc", "auprc", "balanced_accuracy", "f1", "accuracy")
    }
    per_fold = [
        {"fold": k, "n_train": 10, "n_val": 2, "n_test": 12, "best_epoch": 3, "metrics": m}
        for k in range(2)
    ]
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "method": "abmil",
                "feature_set": "x",
                "mpp": 0.5,
                "classes": classes,
                "pooled": m,
                "summary": {n: {"mean": 0.75, "std": 0.05, "n_folds": 2} for n in m},
                "per_fold": per_fold,
            }
        )
    )
    res = build_report(tmp_path / "run", n_boot=20)
    assert res.sections == ("mil", "facts")
    p = parse_report(res.html)
    assert check_numbers(tmp_path / "run", p.numbers) >= 24 * 4
    assert "pred. c" in res.html.read_text()
