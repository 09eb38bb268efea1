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
