"""train-mil / predict / heatmap on feature stores: outputs, reproducibility, patient-level
splits without leakage, clear errors on malformed manifests, the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_pipe.core.config import MilConfig
from wsi_pipe.core.errors import ConfigError, WsiPipeError
from wsi_pipe.core.fsutil import read_json
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.mil.data import Bag, bags_from_entries, synthetic_bags
from wsi_pipe.mil.metrics import auroc, compute_metrics
from wsi_pipe.mil.splits import Fold, check_no_leakage, load_splits, make_splits
from wsi_pipe.mil.train import load_checkpoint, predict_bags
from wsi_pipe.stages.train_mil import predict, train_mil
from wsi_pipe.store import write_store

FEATURES, MPP = "toyenc", 0.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: intra-op threads only add contention on a shared 2-core box
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_feature_store(layout: RunLayout, bag: Bag, slide_path: str = "") -> Path:
    p = layout.feature_store(FEATURES, bag.bag_id, MPP, "h5")
    feats, coords = bag.load()
    write_store(
        p,
        {"features": feats.astype(np.float32), "coords": coords.astype(np.int64)},
        {
            "kind": "features",
            "slide_id": bag.bag_id,
            "level0_mpp": 0.25,
            "target_mpp": MPP,
            "tile_px": 256,
            "tile_size_level0": 512,
            "stride_level0": 512.0,
            "slide_path": slide_path,
            "encoder": "toy",
        },
    )
    return p


def make_run(
    tmp: Path, n_patients: int = 36, n_classes: int = 2, seed: int = 0, two_slide_every: int = 4
) -> tuple[Path, Path, dict[str, str]]:
    """A run folder with feature stores of a synthetic key-instance task and its manifest.
    Every `two_slide_every`-th patient has two slides (same label)."""
    run = tmp / "run"
    layout = RunLayout(run)
    bags, _ = synthetic_bags(n_patients * 3, dim=16, n_classes=n_classes, seed=seed)
    pool: dict[int, list[Bag]] = {}
    for b in bags:
        pool.setdefault(b.label, []).append(b)
    rows, patient_of = [], {}
    for i in range(n_patients):
        label = i % n_classes
        for j in range(2 if i % two_slide_every == 0 else 1):
            b = pool[label].pop()
            sid, pid = f"S{i:03d}_{j}", f"P{i:03d}"
            write_feature_store(
                layout, Bag(sid, label, pid, b.n_tiles, b.dim, features=b.features, coords=b.coords)
            )
            rows.append((sid, pid, f"class{label}"))
            patient_of[sid] = pid
    manifest = tmp / "cohort.csv"
    manifest.write_text(
        "slide_id,patient_id,label\n" + "".join(f"{s},{p},{y}\n" for s, p, y in rows)
    )
    return run, manifest, patient_of


def small_cfg(**kw) -> MilConfig:
    base = dict(
        method="abmil",
        n_folds=3,
        epochs=8,
        patience=8,
        lr=1e-3,
        hidden_dim=16,
        dropout=0.0,
        bootstrap=50,
        device="cpu",
        val_fraction=0.2,
    )
    return MilConfig(**{**base, **kw})


# ------------------------------------------------------------------------------ training
def test_train_mil_writes_everything_and_learns(tmp_path: Path) -> None:
    run, manifest, patient_of = make_run(tmp_path)
    res = train_mil(run, manifest, small_cfg())
    out = RunLayout(run).mil_dir(f"abmil_{FEATURES}")
    assert res.out_dir == out and res.n_folds == 3 and res.classes == ["class0", "class1"]
    for f in ("config.yaml", "model.json", "splits.json", "predictions.csv", "metrics.json"):
        assert (out / f).is_file(), f
    assert "MilConfig hash" in (out / "config.yaml").read_text().splitlines()[0]
    for k in range(3):
        assert (out / f"fold_{k}" / "model.pt").is_file()
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in rows) == sorted(
        patient_of
    )  # every slide once, out of fold
    m = read_json(out / "metrics.json")
    for name in ("auroc", "auprc", "balanced_accuracy", "f1"):
        assert set(m["pooled"][name]) == {"value", "ci_low", "ci_high"}
        assert (
            m["pooled"][name]["ci_low"]
            <= m["pooled"][name]["value"]
            <= m["pooled"][name]["ci_high"]
        )
        assert len(m["per_fold"]) == 3 and name in m["per_fold"][0]["metrics"]
    assert m["pooled"]["auroc"]["value"] > 0.9


def test_multiclass_msm_and_resume(tmp_path: Path) -> None:
    run, manifest, _ = make_run(tmp_path, n_patients=60, n_classes=3)
    cfg = small_cfg(method="msm", n_stages=2, mask_k=2, epochs=12, patience=12, hidden_dim=32)
    res = train_mil(run, manifest, cfg)
    assert res.classes == ["class0", "class1", "class2"]
    assert res.pooled["auroc"]["value"] > 0.85  # macro one-vs-rest
    fold0 = res.out_dir / "fold_0" / "model.pt"
    mtime = fold0.stat().st_mtime_ns
    res2 = train_mil(run, manifest, cfg)  # finished folds are reused, not retrained
    assert fold0.stat().st_mtime_ns == mtime
    assert res2.pooled["auroc"]["value"] == pytest.approx(res.pooled["auroc"]["value"])
    with pytest.raises(ConfigError, match="other slides or settings"):
        train_mil(run, manifest, cfg.model_copy(update={"n_folds": 4}))


def test_saved_models_reproduce_fold_predictions_and_predict(tmp_path: Path) -> None:
    run, manifest, _ = make_run(tmp_path)
    res = train_mil(run, manifest, small_cfg(method="mean"))
    layout = RunLayout(run)
    with open(res.out_dir / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    fold0 = [r for r in rows if r["fold"] == "0"]
    model, meta = load_checkpoint(res.out_dir / "fold_0" / "model.pt")
    assert meta["classes"] == ["class0", "class1"]
    from wsi_pipe.core.manifest import SlideEntry

    bags, _ = bags_from_entries(
        layout,
        [SlideEntry(r["slide_id"], "", r["patient_id"]) for r in fold0],
        FEATURES,
        MPP,
        classes=meta["classes"],
        require_labels=False,
    )
    assert {b.stride_l0 for b in bags} == {512.0}  # the stored grid stride reaches the model
    prob, _ = predict_bags(model, bags, torch.device("cpu"))
    np.testing.assert_allclose(
        prob[:, 1], [float(r["prob_class1"]) for r in fold0], rtol=1e-5, atol=1e-6
    )
    # predict = mean of the fold models, by slide id or by manifest
    ids = [r["slide_id"] for r in fold0[:4]]
    out = predict(run, res.out_dir, ids, device="cpu")
    with open(out) as fh:
        pred = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(pred) == set(ids)
    folds = [load_checkpoint(res.out_dir / f"fold_{k}" / "model.pt")[0] for k in range(3)]
    expected = np.mean([predict_bags(m, bags[:4], torch.device("cpu"))[0] for m in folds], axis=0)
    np.testing.assert_allclose(
        [float(pred[i]["prob_class1"]) for i in ids], expected[:, 1], rtol=1e-5
    )
    again = predict(run, res.out_dir, ids, out=tmp_path / "again.csv", device="cpu")
    assert again.read_text() == out.read_text()
    via_manifest = predict(
        run, res.out_dir, [str(manifest)], out=tmp_path / "all.csv", device="cpu"
    )
    assert (tmp_path / "all.metrics.json").is_file()
    with open(via_manifest) as fh:
        assert len(list(csv.DictReader(fh))) == len(rows)


def test_fixed_split_column(tmp_path: Path) -> None:
    run, manifest, _ = make_run(tmp_path, n_patients=24)
    lines = manifest.read_text().splitlines()
    out = [lines[0] + ",split"]
    for line in lines[1:]:
        pid = int(line.split(",")[1][1:])
        out.append(line + "," + ("test" if pid % 4 == 0 else "val" if pid % 4 == 1 else "train"))
    manifest.write_text("\n".join(out) + "\n")
    res = train_mil(run, manifest, small_cfg(epochs=3))
    assert res.n_folds == 1
    folds, meta = load_splits(res.out_dir / "splits.json")
    assert meta["kind"] == "fixed"
    assert all(int(s[1:4]) % 4 == 0 for s in folds[0].test)


# -------------------------------------------------------------------------------- splits
@pytest.mark.parametrize("seed", range(5))
def test_patient_leakage_across_folds_is_impossible(seed: int) -> None:
    rng = np.random.default_rng(seed)
    slides, patients, labels = [], [], []
    for p in range(60):
        y = int(rng.integers(0, 3))
        for j in range(int(rng.integers(1, 5))):  # 1-4 slides per patient
            slides.append(f"p{p}_s{j}")
            patients.append(f"p{p}")
            labels.append(y)
    folds = make_splits(slides, patients, labels, n_folds=5, val_fraction=0.2, seed=seed)
    patient_of = dict(zip(slides, patients, strict=True))
    test_fold_of: dict[str, int] = {}
    for k, f in enumerate(folds):
        parts = {
            name: {patient_of[s] for s in getattr(f, name)} for name in ("train", "val", "test")
        }
        assert not (parts["train"] & parts["val"]) and not (parts["train"] & parts["test"])
        assert not (parts["val"] & parts["test"])
        assert sorted(f.train + f.val + f.test) == sorted(slides)  # every slide used once per fold
        for p in parts["test"]:
            assert p not in test_fold_of
            test_fold_of[p] = k
        assert len({labels[slides.index(s)] for s in f.test}) == 3  # stratified
    assert set(test_fold_of) == set(patients)


def test_check_no_leakage_catches_a_leaky_split() -> None:
    patient_of = {"a1": "A", "a2": "A", "b1": "B", "c1": "C"}
    with pytest.raises(ConfigError, match="patient.*A.*train and test"):
        check_no_leakage([Fold(("a1", "b1"), (), ("a2", "c1"))], patient_of)
    with pytest.raises(ConfigError, match="test sets of folds 0 and 1"):
        check_no_leakage([Fold(("b1",), (), ("a1",)), Fold(("c1",), (), ("a2",))], patient_of)


def test_persisted_splits_keep_patients_together(tmp_path: Path) -> None:
    run, manifest, patient_of = make_run(tmp_path, two_slide_every=2)
    res = train_mil(run, manifest, small_cfg(epochs=1))
    folds, meta = load_splits(res.out_dir / "splits.json")
    assert meta["seed"] == 0 and meta["n_folds"] == 3
    check_no_leakage(folds, patient_of)
    for f in folds:
        pats = {patient_of[s] for s in f.test}
        assert set(f.test) == {s for s, p in patient_of.items() if p in pats}


# -------------------------------------------------------------------- malformed manifests
def _no_training_happened(run: Path) -> bool:
    return not list((run / "mil").glob("*/fold_*")) if (run / "mil").exists() else True


@pytest.mark.parametrize(
    "header,body,match",
    [
        ("slide_id,patient_id\n", "S000_0,P000\n", "no 'label' column"),
        ("patient_id,label\n", "P000,class0\n", "slide_id"),
        ("slide_id,patient_id,label\n", "S000_0,P000,class0\nS001_0,P001,class0\n", "two classes"),
        (
            "slide_id,patient_id,label\n",
            "S000_0,P000,class0\nGHOST,P999,class1\n",
            "GHOST.*extract",
        ),
        ("slide_id,patient_id,label\n", "S000_0,P000,class0\nS001_0,P001,\n", "S001_0"),
    ],
    ids=["no-label-column", "no-id-column", "one-class", "no-features", "empty-label"],
)
def test_malformed_manifests_fail_before_training(
    tmp_path: Path, header: str, body: str, match: str
) -> None:
    run, _, _ = make_run(tmp_path, n_patients=8)
    bad = tmp_path / "bad.csv"
    bad.write_text(header + body)
    with pytest.raises(WsiPipeError, match=match):
        train_mil(run, bad, small_cfg())
    assert _no_training_happened(run)


def test_too_few_patients_per_class_and_unknown_method(tmp_path: Path) -> None:
    run, manifest, _ = make_run(tmp_path, n_patients=8)
    with pytest.raises(ConfigError, match="patients per class"):
        train_mil(run, manifest, small_cfg(n_folds=6))
    with pytest.raises(ConfigError, match="unknown MIL method"):
        train_mil(run, manifest, small_cfg(method="transmil"))
    with pytest.raises(ConfigError, match="no feature set 'other'"):
        train_mil(run, manifest, small_cfg(features="other"))
    # an option the chosen family does not take is an error, not silently dropped
    with pytest.raises(ConfigError, match=r"'abmil' takes no option\(s\) \['n_stages'\]"):
        train_mil(run, manifest, small_cfg(n_stages=2))
    assert _no_training_happened(run)
    # a resolved config written in full (config/, Slurm stage configs) reads back as it was
    from wsi_pipe.stages.train_mil import aggregator_kwargs

    full = MilConfig(**small_cfg().model_dump())
    assert aggregator_kwargs(full) == {"hidden_dim": 16, "dropout": 0.0}


def test_empty_feature_store_is_reported(tmp_path: Path) -> None:
    run, manifest, _ = make_run(tmp_path, n_patients=8)
    layout = RunLayout(run)
    empty = Bag(
        "EMPTY",
        0,
        "PE",
        0,
        16,
        features=np.zeros((0, 16), np.float32),
        coords=np.zeros((0, 2), np.int64),
    )
    write_feature_store(layout, empty)
    manifest.write_text(manifest.read_text() + "EMPTY,PE,class0\n")
    with pytest.raises(ConfigError, match="no tiles.*EMPTY"):
        train_mil(run, manifest, small_cfg())


# ------------------------------------------------------------------------------ metrics
def test_metrics_values_and_bootstrap() -> None:
    y = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.7, 0.6])
    prob = np.stack([1 - p1, p1], 1)
    m = compute_metrics(y, prob, n_boot=200, seed=1)
    assert m["auroc"]["value"] == pytest.approx(14 / 16)
    assert m["accuracy"]["value"] == pytest.approx(6 / 8)
    assert m["balanced_accuracy"]["value"] == pytest.approx(0.75)
    assert m["f1"]["value"] == pytest.approx(0.75)
    assert 0 < m["auroc"]["ci_low"] < m["auroc"]["value"] < m["auroc"]["ci_high"] <= 1
    # multi-class: macro one-vs-rest
    y3 = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y3] * 0.9 + 0.05
    assert auroc(y3, perfect) == pytest.approx(1.0)
    assert np.isnan(auroc(np.zeros(4, int), np.full((4, 2), 0.5)))


# ---------------------------------------------------------------------------------- CLI
def test_cli_train_predict(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    run, manifest, _ = make_run(tmp_path, n_patients=18)
    cfg = tmp_path / "mil.yaml"
    cfg.write_text("hidden_dim: 16\nbootstrap: 20\ndropout: 0.0\nlr: 0.001\n")
    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "train-mil",
            str(run),
            "--manifest",
            str(manifest),
            "--method",
            "max",
            "--folds",
            "3",
            "--epochs",
            "2",
            "--config",
            str(cfg),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "auroc" in r.output
    model_dir = RunLayout(run).mil_dir(f"max_{FEATURES}")
    assert json.loads((model_dir / "model.json").read_text())["method"] == "max"
    r = runner.invoke(
        app,
        [
            "predict",
            str(run),
            "--model",
            str(model_dir),
            "--slides",
            "S001_0",
            "--slides",
            "S002_0",
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train-mil", str(run), "--manifest", str(tmp_path / "missing.csv")])
    assert r.exit_code != 0 and "does not exist" in " ".join(r.output.split())  # rich wraps


# ------------------------------------------------------------------------------ heatmap
def test_render_heatmap_colours_only_tiles() -> None:
    from wsi_pipe.stages.heatmap import render_heatmap

    thumb = np.full((100, 200, 3), 255, np.uint8)
    coords = np.array([[0, 0], [1000, 0], [0, 1000]], np.int64)  # level-0 px, slide 4000 x 2000
    img = render_heatmap(thumb, coords, 1000, np.array([0.1, 0.9, 0.5]), (4000, 2000), alpha=1.0)
    assert img.shape == thumb.shape
    hot, cold = img[20, 70], img[20, 20]  # tile 2 (highest) vs tile 1 (lowest)
    assert hot[0] > 100 and hot[1] < 50 and hot[2] < 50  # red end of JET
    assert cold[2] > 100 and cold[0] < 50 and cold[1] < 50  # blue end
    assert (img[80, 150] == 255).all()  # no tile there: untouched


def test_heatmap_on_a_real_slide(tmp_path: Path, wsi_dir: Path) -> None:
    pytest.importorskip("openslide")
    from wsi_pipe.readers import open_slide
    from wsi_pipe.stages.heatmap import heatmap

    run, manifest, _ = make_run(tmp_path)
    res = train_mil(run, manifest, small_cfg(epochs=10, patience=10))
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    with open_slide(slide) as r:
        w, h = r.dimensions
    cols, rows = np.meshgrid(np.arange(w // 512), np.arange(h // 512))
    coords = np.stack([cols.ravel(), rows.ravel()], 1).astype(np.int64) * 512
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(coords), 16)).astype(np.float32)
    key = [len(coords) // 2, 3]
    feats[np.ix_(key, np.arange(8))] += 2.5  # class-1 key instances (see synthetic_bags)
    write_feature_store(
        RunLayout(run),
        Bag("CMU1", -1, "CMU1", len(coords), 16, features=feats, coords=coords),
        slide_path=str(slide),
    )
    hm = heatmap(run, res.out_dir, "CMU1", top_k=2, max_px=512, device="cpu")
    assert hm.png == RunLayout(run).heatmap_dir(res.out_dir.name) / "CMU1.png"
    import cv2

    img = cv2.imread(str(hm.png))
    assert max(img.shape[:2]) == 512
    assert hm.probabilities["class1"] > 0.5
    tops = {
        (int(p.stem.split("_x")[1].split("_")[0]), int(p.stem.split("_y")[1])) for p in hm.top_tiles
    }
    assert tops == {tuple(coords[k]) for k in key}
    tile = cv2.imread(str(hm.top_tiles[0]))
    assert tile.shape == (256, 256, 3)
    lines = hm.attention_csv.read_text().splitlines()
    assert lines[0] == "x,y,attention,rank" and len(lines) == len(coords) + 1
