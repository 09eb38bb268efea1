"""`wsi-pipe anomaly`: CH scan, padding, order invariance, detection, resume, malformed inputs.

Cohorts are small synthetic feature grids written straight into a run folder (no slides, no
encoder), except one end-to-end test on a tiny synthetic pyramidal slide.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipe.anomaly import grid as G
from wsi_pipe.anomaly.config import AnomalyConfig
from wsi_pipe.anomaly.data import load_slide_grid
from wsi_pipe.anomaly.metrics import aupro, auroc, region_labels, top_fraction_precision
from wsi_pipe.core.errors import EmptyInputError, StoreSchemaError
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry, save_slide_table
from wsi_pipe.store import open_store, schema, write_store

STRIDE = 64
MPP = 1.0
SET = "feat"

TINY = dict(
    d_model=16,
    d_state=4,
    expand=1.0,
    n_layers=1,
    n_prototypes=8,
    steps=30,
    batch_size=4,
    lr=3e-3,
    window_cells=24,
    checkpoint_every=10,
    bootstrap=50,
    device="cpu",
    top_k=2,
    heatmap_max_px=256,
)


# ------------------------------------------------------------------------------ cohort
def _slide_features(
    rng: np.random.Generator, shape: tuple[int, int], dim: int, anomaly: bool, centres: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tissue cells (an ellipse with a hole), smooth 'normal' features from two tissue types,
    and when `anomaly` a 3x3 block of features from elsewhere. Returns cells, feats, positive."""
    h, w = shape
    rr, cc = np.mgrid[0:h, 0:w]
    tissue = ((rr - h / 2) / (h / 2)) ** 2 + ((cc - w / 2) / (w / 2)) ** 2 <= 1.05
    tissue &= ~((rr == h // 2) & (cc == 1))  # a background hole
    cells = np.stack([cc[tissue], rr[tissue]], 1).astype(np.int64)
    kind = (np.sin(cells[:, 0] / 2.5 + rng.uniform(0, 6)) > 0).astype(int)
    feats = centres[kind] + 0.3 * rng.standard_normal((len(cells), dim))
    pos = np.zeros(len(cells), bool)
    if anomaly:
        r0, c0 = h // 2 - 1, w // 2 - 1
        pos = (
            (cells[:, 1] >= r0)
            & (cells[:, 1] < r0 + 3)
            & (cells[:, 0] >= c0)
            & (cells[:, 0] < c0 + 3)
        )
        feats[pos] = centres[2] + 0.3 * rng.standard_normal((int(pos.sum()), dim))
    return cells, feats.astype(np.float32), pos


def make_run(
    root: Path,
    n_normal: int = 4,
    n_anomalous: int = 2,
    shape: tuple[int, int] = (11, 14),
    dim: int = 12,
    seed: int = 0,
    store: str = "h5",
    one_tile_slide: bool = False,
) -> dict:
    """A run folder with feature stores only; returns {slide_id: positive tiles (n,) bool}."""
    layout = RunLayout(root)
    layout.tiles_dir(MPP).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).standard_normal((3, dim)) * 1.5
    entries, truth = [], {}
    specs = [("normal", False)] * n_normal + [("tumour", True)] * n_anomalous
    for i, (label, anom) in enumerate(specs):
        sid = f"s{i:02d}_{label}"
        cells, feats, pos = _slide_features(rng, shape, dim, anom, centres)
        if one_tile_slide and i == 0:
            cells, feats, pos = cells[:1], feats[:1], pos[:1]
        coords = (cells * STRIDE + np.array([128, 256])).astype(np.int64)
        attrs = {
            "kind": schema.KIND_FEATURES,
            "slide_id": sid,
            "level0_mpp": 0.5,
            "target_mpp": MPP,
            "tile_px": 32,
            "stride_level0": float(STRIDE),
            "tile_size_level0": STRIDE,
            "level0_width": 128 + shape[1] * STRIDE + 64,
            "level0_height": 256 + shape[0] * STRIDE + 64,
            "encoder": "synthetic",
        }
        write_store(
            layout.feature_store(SET, sid, MPP, store),
            {
                schema.COORDS: coords,
                schema.FEATURES: feats,
                schema.PARENT_INDEX: np.full(len(coords), -1, np.int64),
            },
            attrs,
        )
        entries.append(SlideEntry(sid, "", sid, label))
        truth[sid] = pos
    save_slide_table(layout.slides_table, entries)
    return truth


def _cfg(**kw) -> AnomalyConfig:
    return AnomalyConfig(**{**TINY, **kw})


# ------------------------------------------------------------------------------ CH scan
@pytest.mark.parametrize("shape", [(5, 3), (7, 12), (1, 9), (33, 20), (6, 6)])
@pytest.mark.parametrize("order", G.SCAN_ORDERS)
def test_scan_orders_are_permutations_on_odd_grids(shape: tuple[int, int], order: str) -> None:
    side = G.ch_size(max(shape))
    assert side >= max(shape) and (side - (1 << (side.bit_length() - 1))) % 2 == 0
    perms = G.scan_orders(side, order, n_orientations=4)
    assert perms.shape == (8, side * side)
    for p in perms:
        assert np.array_equal(np.sort(p), np.arange(side * side))
    inv = G.inverse_perms(perms)
    canvas = np.arange(side * side) * 10
    for p, q in zip(perms, inv):
        assert np.array_equal(canvas[p][q], canvas)
    # the placed grid: every tissue cell of the (rows, cols) grid sits on exactly one canvas cell
    s, origins, halo = G.plan_windows(shape, 64)
    cells = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[0])), -1).reshape(-1, 2)
    idx = G.window_index(G.index_grid(cells, shape), origins, s)
    got = np.sort(idx[idx >= 0])
    assert np.array_equal(got, np.arange(len(cells))) and halo == 0


def test_circular_hilbert_starts_with_outer_ring_clockwise() -> None:
    side = G.ch_size(20)  # 20 = 16 + 2 rings of width 1 on each side
    assert side == 20
    p = G.scan_orders(side, "circular_hilbert", 1, bidirectional=False)[0]
    col, row = p % side, p // side
    ring = 4 * (side - 1)
    on_ring = (col == 0) | (row == 0) | (col == side - 1) | (row == side - 1)
    assert on_ring[:ring].all() and not on_ring[ring:].any()
    assert (col[0], row[0]) == (0, 0) and (col[1], row[1]) == (1, 0)  # clockwise along the top
    # the centre (16 x 16) is one Hilbert curve: consecutive cells are grid neighbours
    c = np.stack([col[-256:], row[-256:]], 1)
    assert np.all(np.abs(np.diff(c, axis=0)).sum(1) == 1)


def test_windows_cover_large_grids_once() -> None:
    shape = (70, 45)
    cells = np.stack(np.meshgrid(np.arange(shape[1]), np.arange(shape[0])), -1).reshape(-1, 2)
    s, origins, halo = G.plan_windows(shape, 24)
    assert s == G.ch_floor(24) and halo > 0
    idx = G.window_index(G.index_grid(cells, shape), origins, s)
    core = G.core_mask(s, halo)
    got = np.sort(idx[:, core][idx[:, core] >= 0])
    assert np.array_equal(got, np.arange(len(cells)))  # every cell in exactly one core


# ------------------------------------------------------------------------------ padding
def test_padding_never_leaks() -> None:
    from wsi_pipe.anomaly.scorers import build_net

    cfg = _cfg()
    net = build_net(cfg, [6, 4]).eval()
    side = 10
    perms = torch.from_numpy(G.scan_orders(side, "circular_hilbert", 2))
    inv = torch.from_numpy(G.inverse_perms(perms.numpy()))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, side * side, 10, generator=g)
    mask = torch.rand(2, side * side, generator=g) > 0.4
    garbage = torch.where(mask[..., None], x, 1e3 * torch.randn(x.shape, generator=g))
    with torch.no_grad():
        a, b = net(x, mask, side, perms, inv), net(garbage, mask, side, perms, inv)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert torch.all(a[k][..., ~mask] == 0) if a[k].dim() == 3 else torch.all(a[k][~mask] == 0)
    # map smoothing and slide score ignore whatever sits off tissue
    rng = np.random.default_rng(0)
    m = rng.random((9, 13)) > 0.3
    v = rng.random((9, 13))
    v2 = np.where(m, v, 1e6)
    for sig in (0.0, 1.0, 2.5):
        assert np.array_equal(G.masked_gaussian(v, m, sig), G.masked_gaussian(v2, m, sig))
    assert G.slide_score(G.masked_gaussian(v, m, 1), m) == G.slide_score(
        G.masked_gaussian(v2, m, 1), m
    )


# ------------------------------------------------------------------------------ invariance
@pytest.mark.parametrize("method", ["spmamba", "knn", "mahalanobis"])
def test_scores_invariant_to_store_row_order(tmp_path: Path, method: str) -> None:
    from wsi_pipe.anomaly.scorers import score_grid
    from wsi_pipe.stages.anomaly import fit_anomaly, load_anomaly_model

    make_run(tmp_path, n_normal=3, n_anomalous=1)
    fit_anomaly(tmp_path, _cfg(method=method, steps=5), name=method)
    m = load_anomaly_model(RunLayout(tmp_path), method)
    layout = RunLayout(tmp_path)
    g = load_slide_grid(layout, SET, SlideEntry("s03_tumour", "", "s03_tumour"), (MPP,))
    perm = np.random.default_rng(1).permutation(len(g))
    g2 = load_slide_grid(layout, SET, SlideEntry("s03_tumour", "", "s03_tumour"), (MPP,))
    g2.coords, g2.feats, g2.cells = g.coords[perm], g.feats[perm], g.cells[perm]
    a, b = score_grid(m.scorer, m.calib, g, m.cfg), score_grid(m.scorer, m.calib, g2, m.cfg)
    assert np.array_equal(a.parts[perm], b.parts)
    assert np.array_equal(a.tile_map[perm], b.tile_map)
    assert a.score == b.score and a.score_parts == b.score_parts


# ------------------------------------------------------------------------------ detection
def test_inserted_anomaly_outranks_normal_all_methods(tmp_path: Path) -> None:
    from wsi_pipe.stages.anomaly import fit_anomaly, read_score_store, score_anomaly

    truth = make_run(tmp_path, n_normal=3, n_anomalous=2, store="zarr")
    layout = RunLayout(tmp_path)
    for method in ("spmamba", "knn", "mahalanobis"):
        fit_anomaly(tmp_path, _cfg(method=method, store="zarr"), name=method)
        res = score_anomaly(tmp_path, model=method, progress=False)
        assert res.summary.ok, [r.error for r in res.summary.results]
        ys, ss = [], []
        for sid, pos in truth.items():
            st = read_score_store(layout.find_anomaly_score_store(method, sid, MPP))
            assert len(st["score"]) == len(pos) and st["attrs"]["kind"] == schema.KIND_ANOMALY
            ys.append(pos)
            ss.append(st["score"])
        tile_auc = auroc(np.concatenate(ys), np.concatenate(ss))
        assert tile_auc > 0.9, (method, tile_auc)
        assert res.metrics["slide_auroc"]["value"] >= 0.9, (method, res.metrics)
        rows = (layout.anomaly_slide_scores(method)).read_text().splitlines()
        assert rows[0].startswith("slide_id,score,max,dog,concentration") and len(rows) == 1 + len(
            truth
        )
        assert layout.anomaly_heatmap(method, "s03_tumour").exists()


# ------------------------------------------------------------------------------ resume
_FIT_SCRIPT = """
import sys
from wsi_pipe.anomaly.config import AnomalyConfig
from wsi_pipe.stages.anomaly import fit_anomaly, score_anomaly
cfg = AnomalyConfig(**{cfg!r})
fit_anomaly(sys.argv[1], cfg, name=sys.argv[2])
score_anomaly(sys.argv[1], model=sys.argv[2], progress=False)
"""


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(
                f"process ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
            )
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("kill point not reached in time")
        time.sleep(0.02)


def test_kill9_then_rerun_gives_identical_outputs(tmp_path: Path) -> None:
    from wsi_pipe.stages.anomaly import fit_anomaly, resume_path, score_anomaly

    cfg = _cfg(steps=40, checkpoint_every=5, threads=1)
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    make_run(run_a, n_normal=3, n_anomalous=3)
    make_run(run_b, n_normal=3, n_anomalous=3)
    # reference: uninterrupted, in this process
    fit_anomaly(run_b, cfg, name="m")
    score_anomaly(run_b, model="m", progress=False)
    la, lb = RunLayout(run_a), RunLayout(run_b)
    script = _FIT_SCRIPT.format(cfg=cfg.model_dump(mode="json"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # 1) killed during training, after a resume checkpoint
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(run_a), "m"], stderr=subprocess.PIPE, env=env
    )
    _wait_for(lambda: resume_path(la, "m").exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not la.anomaly_model("m").exists()
    # 2) killed during scoring, after the first slide
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(run_a), "m"], stderr=subprocess.PIPE, env=env
    )
    _wait_for(lambda: la.anomaly_heatmap("m", "s00_normal").exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = fit_anomaly(run_a, cfg, name="m")
    assert res.skipped
    score_anomaly(run_a, model="m", progress=False)
    ca = torch.load(la.anomaly_model("m"), weights_only=False)
    cb = torch.load(lb.anomaly_model("m"), weights_only=False)
    for k, v in cb["state"]["state_dict"].items():
        assert torch.equal(ca["state"]["state_dict"][k], v), k
    # the interrupted fit resumed from its checkpoint and still ended on the same weights
    assert ca["train"]["resumed_from"] > 0 and cb["train"]["resumed_from"] == 0
    assert ca["train"]["final_loss"] == cb["train"]["final_loss"]
    for sid in [f"s{i:02d}_{lab}" for i, lab in enumerate(["normal"] * 3 + ["tumour"] * 3)]:
        with (
            open_store(la.find_anomaly_score_store("m", sid, MPP)) as ra,
            open_store(lb.find_anomaly_score_store("m", sid, MPP)) as rb,
        ):
            assert np.array_equal(ra.read(schema.ANOMALY_SCORE), rb.read(schema.ANOMALY_SCORE))
    assert la.anomaly_slide_scores("m").read_text() == lb.anomaly_slide_scores("m").read_text()
    assert not list(la.anomaly_dir("m").rglob(".*.tmp-*"))


# ------------------------------------------------------------------------------ errors
def test_malformed_inputs_give_clear_errors(tmp_path: Path) -> None:
    from wsi_pipe.stages.anomaly import fit_anomaly, score_anomaly

    make_run(tmp_path / "r", n_normal=2, n_anomalous=1, one_tile_slide=True)
    with pytest.raises(StoreSchemaError, match=r"feature set 'nope' is missing.*wsi-pipe extract"):
        fit_anomaly(tmp_path / "r", _cfg(features="nope"))
    with pytest.raises(EmptyInputError, match=r"no normal slides.*'benign'.*--normal-label"):
        fit_anomaly(tmp_path / "r", _cfg(normal_label="benign"))
    with pytest.raises(EmptyInputError, match=r"slide s00_normal has a grid of 1 tile"):
        fit_anomaly(tmp_path / "r", _cfg())
    # scoring records the bad slide and carries on
    fit_anomaly(tmp_path / "r", _cfg(method="knn"), slides=["s01_normal"], name="knn")
    res = score_anomaly(tmp_path / "r", model="knn", progress=False)
    bad = [r for r in res.summary.results if r.status == "failed"]
    assert [r.slide_id for r in bad] == ["s00_normal"] and "1 tile" in bad[0].error
    with pytest.raises(EmptyInputError, match="no fitted anomaly model"):
        score_anomaly(tmp_path / "empty", progress=False)


# ------------------------------------------------------------------------------ metrics
def test_aupro_and_auroc_on_known_cases() -> None:
    cells = np.stack(np.meshgrid(np.arange(6), np.arange(4)), -1).reshape(-1, 2)
    pos = np.zeros(24, bool)
    pos[[0, 1, 6]] = True  # one region of 3 tiles
    pos[[22]] = True  # a second, single-tile region
    reg = region_labels(cells, (4, 6), pos)
    assert set(np.unique(reg[pos])) == {1, 2} and np.all(reg[~pos] == 0)
    perfect = pos.astype(float) + 0.01 * np.arange(24) / 24
    assert aupro([perfect], [reg]) == pytest.approx(1.0)
    assert auroc(pos, perfect) == 1.0
    assert aupro([-perfect], [reg]) < 0.05
    rng = np.random.default_rng(0)
    many = [rng.random(24) for _ in range(200)]
    assert 0.05 < np.mean([aupro([m], [reg]) for m in many]) < 0.25  # random ~ max_fpr / 2
    assert top_fraction_precision(perfect, pos, 0.1) == 1.0


def test_geojson_annotations_label_tiles() -> None:
    from wsi_pipe.imageops.annotations import class_fractions, label_tiles, parse_geojson

    square = [[[100, 100], [300, 100], [300, 300], [100, 300], [100, 100]]]
    hole = [[150, 150], [250, 150], [250, 250], [150, 250], [150, 150]]
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [square[0], hole]},
            "properties": {"classification": {"name": "Tumor", "color": [200, 0, 0]}},
        },
        {
            "type": "Feature",
            "geometry": {
                "type": "MultiPolygon",
                "coordinates": [[[[400, 0], [500, 0], [500, 100], [400, 100]]]],
            },
            "properties": {"classification": "Pen"},
        },
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1]}, "properties": {}},
    ]
    polys = parse_geojson({"type": "FeatureCollection", "features": feats})
    assert [p.cls for p in polys] == ["Tumor", "Pen"] and len(polys[0].holes) == 1
    assert len(parse_geojson(feats)) == 2  # a plain list of features, as QuPath also writes
    coords = np.array([[100, 100], [150, 150], [400, 0], [0, 400]])
    fr = class_fractions(coords, 100, polys)
    assert fr["Tumor"][0] == pytest.approx(0.75, abs=0.05) and fr["Tumor"][1] == pytest.approx(
        0.0, abs=0.05
    )
    assert label_tiles(coords, 100, polys).tolist() == [True, False, True, False]
    assert label_tiles(coords, 100, polys, classes=["Pen"]).tolist() == [False, False, True, False]


# ------------------------------------------------------------------------------ end to end
def test_cli_fit_score_on_a_real_slide_with_heatmap_and_top_tiles(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app
    from wsi_pipe.synth import RectPainter, write_pyramidal_tiff

    slides = tmp_path / "slides"
    slides.mkdir()
    write_pyramidal_tiff(
        slides / "a.tiff", 1024, 768, 0.5, levels=2, painter=RectPainter([(64, 64, 960, 704)])
    )
    run = tmp_path / "run"
    make_run(run, n_normal=3, n_anomalous=1, shape=(9, 12))
    layout = RunLayout(run)
    table = json.loads(layout.slides_table.read_text())
    table[0]["path"] = str(slides / "a.tiff")
    layout.slides_table.write_text(json.dumps(table))
    cli = CliRunner()
    r = cli.invoke(
        app,
        [
            "anomaly",
            "fit",
            str(run),
            "--features",
            SET,
            "--method",
            "mahalanobis",
            "--name",
            "maha",
        ],
    )
    assert r.exit_code == 0, r.output
    ann = tmp_path / "ann"
    ann.mkdir()
    r = cli.invoke(app, ["anomaly", "score", str(run), "--annotations", str(ann), "--top-k", "3"])
    assert r.exit_code == 0, r.output
    assert len(list(layout.anomaly_top_tiles_dir("maha", "s00_normal").glob("*.png"))) == 3
    import cv2

    heat = cv2.imread(str(layout.anomaly_heatmap("maha", "s00_normal")))
    assert heat is not None and heat.shape[1] > heat.shape[0]  # thumbnail + colour bar
    metrics = json.loads(layout.anomaly_metrics("maha").read_text())
    assert metrics["slide_auroc"]["value"] is not None and "tile_auroc" in metrics
    r = cli.invoke(app, ["anomaly", "fit", str(run), "--features", "missing"])
    assert r.exit_code == 2 and "missing" in r.output


def test_composite_painter_insertions_and_their_geojson() -> None:
    from wsi_pipe.imageops.annotations import label_tiles, parse_geojson
    from wsi_pipe.synth import (
        CompositePainter,
        Disc,
        Insertion,
        PatchMosaicTexture,
        Rect,
        insertions_geojson,
        pen_transmission,
    )

    rng = np.random.default_rng(0)
    pink = [
        np.clip(rng.normal((230, 160, 200), 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        for _ in range(4)
    ]
    purple = [
        np.clip(rng.normal((110, 60, 150), 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        for _ in range(4)
    ]
    ink_img = np.full((20, 20, 3), 230, np.uint8)
    ink_img[8:12] = (40, 140, 60)
    ink_mask = np.zeros((20, 20), bool)
    ink_mask[8:12] = True
    ins = [
        Insertion(
            Disc(100, 100, 40), "tissue", texture=PatchMosaicTexture(purple, 1.0, 1), label="tumour"
        ),
        Insertion(Disc(250, 100, 40), "blur", sigma_l0=6),
        Insertion(Rect(40, 200, 160, 230), "pen", ink=pen_transmission(ink_img, ink_mask)),
        Insertion(Disc(250, 250, 40), "fold"),
        Insertion(Disc(100, 330, 40), "bubble"),
    ]
    p = CompositePainter([Rect(10, 10, 390, 390)], PatchMosaicTexture(pink, 1.0, 0), ins)
    full, half = p(0, 0, 400, 400, 1.0), p(0, 0, 200, 200, 2.0)
    assert full.shape == (400, 400, 3) and half.shape == (200, 200, 3) and full.dtype == np.uint8
    assert (full[395:, 395:] == 255).all()  # background outside the tissue
    for i in range(len(ins)):
        m = p.insertion_mask(i, 0, 0, 400, 400, 1.0)
        clean = CompositePainter([Rect(10, 10, 390, 390)], PatchMosaicTexture(pink, 1.0, 0))(
            0, 0, 400, 400, 1.0
        )
        assert m.any() and np.abs(full[m].astype(int) - clean[m]).mean() > 5, ins[
            i
        ].cls  # visible change
    polys = parse_geojson(insertions_geojson(ins, "x"))
    assert [q.cls for q in polys] == ["tumour", "blur", "pen", "fold", "bubble"]
    coords = np.array([[80, 80], [300, 300], [60, 200]])
    assert label_tiles(coords, 40, polys).tolist() == [True, False, True]
