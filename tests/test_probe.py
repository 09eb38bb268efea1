"""Grouped tile-level splits and `scripts/bench_probe.py` at tiny size on the real Kather 2016 tiles."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_pipe.core.errors import ConfigError
from wsi_pipe.data.images import groups_from_regex, scan_image_folder
from wsi_pipe.mil.splits import check_groups_disjoint, grouped_holdout, grouped_stratified_folds
from wsi_pipe.stages.finetune import three_way_split

REPO = Path(__file__).resolve().parents[1]
SLIDE_RE = r"CRC-Prim-HE-\d+"


@pytest.fixture(scope="module")
def kather(shared_data):
    root = shared_data / "patches" / "kather2016_texture"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    return root


def _groups_of(idx, groups):
    return {groups[i] for i in idx}


def test_grouped_folds_keep_each_slide_on_one_side(kather):
    items = scan_image_folder(kather)
    classes = sorted({it.label for it in items})
    y = np.array([classes.index(it.label) for it in items])
    groups = groups_from_regex([it.path for it in items], SLIDE_RE)
    assert len(set(groups)) == 6 and len(items) == 640
    for n_folds in (2, 3, 6):
        folds = grouped_stratified_folds(y, groups, n_folds, seed=0)
        assert sorted(np.concatenate(folds).tolist()) == list(range(len(y)))  # each tile once
        seen = [_groups_of(f, groups) for f in folds]
        for a in range(n_folds):
            for b in range(a + 1, n_folds):
                assert not seen[a] & seen[b], "a slide in the test side of two folds"
        for f in folds:
            train = np.setdiff1d(np.arange(len(y)), f)
            assert not _groups_of(train, groups) & _groups_of(f, groups)
            check_groups_disjoint(groups, train, f)
    # 08_EMPTY comes from slide 06 alone: in its fold the training side cannot hold that class,
    # and the search keeps that the only such loss (stratified as far as the groups allow)
    folds = grouped_stratified_folds(y, groups, 3, seed=0)
    lost = set()
    for f in folds:
        train = np.setdiff1d(np.arange(len(y)), f)
        lost |= {classes[c] for c in set(y[f]) - set(y[train])}
    assert lost == {"08_EMPTY"}


def test_three_way_split_is_grouped_and_deterministic():
    rng = np.random.default_rng(0)
    groups = [f"g{i // 10}" for i in range(120)]  # 12 groups of 10 tiles
    y = rng.integers(0, 3, 120).tolist()
    tr, va, te = three_way_split(y, groups, 0.2, 0.2, seed=3)
    assert sorted(tr + va + te) == list(range(120)) and va and te
    sides = [_groups_of(s, groups) for s in (tr, va, te)]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert (tr, va, te) == three_way_split(y, groups, 0.2, 0.2, seed=3)
    rest, held = grouped_holdout(y, groups, 0.25, seed=1)
    assert 0.1 <= len(held) / 120 <= 0.4 and not _groups_of(rest, groups) & _groups_of(held, groups)
    tr, va, te = three_way_split(y, None, 0.2, 0.2, seed=3)  # stratified, ungrouped
    assert sorted(tr + va + te) == list(range(120)) and len(te) == pytest.approx(24, abs=3)
    with pytest.raises(ConfigError, match="below 0.9"):
        three_way_split(y, groups, 0.5, 0.45, seed=0)
    with pytest.raises(ConfigError, match="two sides"):
        check_groups_disjoint(groups, [0, 1], [2])  # g0 on both sides
    with pytest.raises(ConfigError, match="at least 4 groups"):
        grouped_stratified_folds([0, 1, 0], ["a", "b", "c"], 4)


def test_group_regex_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not match the file name of .*x.png"):
        groups_from_regex([str(tmp_path / "x.png")], SLIDE_RE)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        groups_from_regex(["a.png"], "(")
    assert groups_from_regex(["1_CRC-Prim-HE-03_x.tif"], r"(HE-\d+)") == ["HE-03"]


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_probe", REPO / "scripts" / "bench_probe.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_probe"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_bench_probe_runs_at_tiny_size(kather, tmp_path):
    bench = _load_bench()
    out = tmp_path / "probe.json"
    args = ["--train", str(kather), "--group-regex", SLIDE_RE, "--json", str(out), "--tiny",
            "--max-per-class", "2", "--px", "32", "--folds", "2", "--n-boot", "20", "--threads", "2"]  # fmt: skip
    report = bench.main(args)
    saved = json.loads(out.read_text())
    assert saved["partial"] is False and saved["results"].keys() == report["results"].keys()
    assert set(saved["results"]) == {arm for arm, _ in bench.ARMS}
    for arm, m in saved["results"].items():
        for k in ("accuracy", "balanced_accuracy", "macro_f1"):
            v = m[k]
            assert 0 <= v["value"] <= 1, (arm, k)
            assert math.isnan(v["ci_low"]) or 0 <= v["ci_low"] <= v["ci_high"] <= 1
        assert m["seconds"] >= 0 and m["per_class_recall"]
    assert len(saved["folds"]) == 2 and saved["paired_differences"]
    # no slide is on both sides of a fold
    tests = [set(f["test_groups"]) for f in saved["folds"]]
    assert not tests[0] & tests[1]
    # per-tile predictions are saved for every arm, with the source slide of each scored tile
    npz = np.load(out.with_suffix(".predictions.npz"))
    n_scored = sum(f["n_test_scored"] for f in saved["folds"])
    assert npz["y"].shape == (n_scored,) and npz["group"].shape == (n_scored,)
    assert {k for k in npz.files if k.startswith("prob/")} == {f"prob/{a}" for a, _ in bench.ARMS}
    for m in saved["results"].values():
        lo, hi = m["accuracy"]["ci_slides"]
        assert math.isnan(lo) or 0 <= lo <= hi <= 1


def test_group_bootstrap_resamples_whole_slides():
    bench = _load_bench()
    # slide a: 30 tiles all right, slide b: 10 tiles all wrong. Resampling whole slides gives only
    # accuracies 1 (aa), 0.75 (ab/ba) and 0 (bb); a tile bootstrap would give values in between.
    y = np.zeros(40, dtype=int)
    prob = np.zeros((40, 2))
    prob[:30, 0] = 1
    prob[30:, 1] = 1
    groups = np.array(["a"] * 30 + ["b"] * 10)
    lo, hi = bench.group_bootstrap_ci(y, prob, groups, bench._acc, 400, seed=0)
    assert lo == 0.0 and hi == 1.0
    assert math.isnan(bench.group_bootstrap_ci(y, prob, np.array(["a"] * 40), bench._acc, 50, 0)[0])


def test_bench_probe_train_then_test_folder(kather, tmp_path):
    """`--test DIR`: train on all of --train, score on the other folder (here: two slides held out
    by copying their tiles into a second ImageFolder)."""
    import shutil

    bench = _load_bench()
    train, test = tmp_path / "train", tmp_path / "test"
    for it in scan_image_folder(kather):
        held = any(s in Path(it.path).name for s in ("CRC-Prim-HE-05", "CRC-Prim-HE-06"))
        if it.label not in ("01_TUMOR", "02_STROMA", "04_LYMPHO"):
            continue
        dst = (test if held else train) / it.label
        dst.mkdir(parents=True, exist_ok=True)
        if len(list(dst.iterdir())) < 3:
            shutil.copy(it.path, dst)
    out = tmp_path / "probe_test.json"
    report = bench.main(["--train", str(train), "--test", str(test), "--json", str(out), "--tiny",
                         "--px", "32", "--n-boot", "10", "--threads", "2", "--arms", "classical,probes"])  # fmt: skip
    assert report["scheme"].startswith("train on") and len(report["folds"]) == 1
    assert report["folds"][0]["n_test_scored"] == 9 and report["folds"][0]["n_train"] == 9
    probes = {f"{p}/{e}" for p in ("linear", "knn20") for e in ("random", "pretrained")}
    assert set(report["results"]) == {"classical"} | probes  # no SFT arms were asked for
    assert "ci_slides" not in report["results"]["classical"]["accuracy"]
