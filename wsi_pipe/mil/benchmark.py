"""Repeated stratified k-fold CV on classic MIL benchmarks (MUSK1/2, UCSB breast cancer), the
protocol of Ilse et al. 2018: per repeat a new 10-fold split of the bags, features standardised
on each training fold, a validation share of the training bags for early stopping.

Used by `scripts/mil_benchmarks.py` (the full table) and the test suite (a fast version).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from wsi_pipe.mil.data import Bag
from wsi_pipe.mil.metrics import accuracy, auroc
from wsi_pipe.mil.splits import make_splits

log = logging.getLogger(__name__)

#: Ilse et al. 2018, Table 1 (gated attention): accuracy mean +- std over 5 x 10-fold CV.
PUBLISHED_ACCURACY = {"musk1": (0.900, 0.050), "musk2": (0.863, 0.042)}

#: file of each benchmark under ../shared/data/mil_benchmarks
DATASETS = {"musk1": "musk1.csv", "musk2": "musk2.csv", "ucsb": "ucsb_breast_cancer.csv.gz"}


@dataclass(frozen=True)
class CVSettings:
    """Protocol and optimisation settings (Adam, one bag per step)."""

    n_folds: int = 10
    repeats: int = 5
    val_fraction: float = 0.0
    epochs: int = 50
    patience: int = 20
    lr: float = 5e-4
    weight_decay: float = 5e-3
    standardize: bool = True
    monitor: str = "loss+error"
    seed: int = 0
    agg_kwargs: dict[str, Any] = field(default_factory=dict)


def benchmark_settings(method: str) -> CVSettings:
    """The settings `scripts/mil_benchmarks.py` uses for `method`.

    Shared: Adam lr 5e-4, weight decay 5e-3 (Ilse et al.), one bag per step, features
    standardised per training fold, 50 epochs on the whole training fold (no validation hold-out:
    with ~80 training bags, early stopping on a 10% hold-out cost accuracy in our runs), an instance
    layer of 128 units with dropout 0.5. msm: 2 stages masking the single most attended instance
    (MUSK1 bags hold ~5 instances); mamba: one small layer (bags have no spatial order), and one
    repeat instead of five to keep the CPU table within the hour.
    """
    kw: dict[str, Any] = {"hidden_dim": 128, "dropout": 0.5}
    if method == "msm":
        kw.update(n_stages=2, mask_rule="topk", mask_k=1)
    if method == "mamba":
        kw = {
            "hidden_dim": 64,
            "dropout": 0.5,
            "n_layers": 1,
            "d_state": 8,
            "expand": 1,
            "reorder_stride": 2,
        }
        # ~30x the step cost of the others on CPU (two scans per step): one repeat by default
        return CVSettings(agg_kwargs=kw, repeats=1)
    return CVSettings(agg_kwargs=kw)


@dataclass
class FoldResult:
    repeat: int
    fold: int
    test_ids: list[str]
    y: list[int]
    prob: list[list[float]]
    best_epoch: int
    epochs_run: int
    seconds: float

    @property
    def accuracy(self) -> float:
        return accuracy(np.array(self.y), np.array(self.prob))


def _run_fold(
    job: tuple[str, dict[str, Any], list[Bag], int, int, list[str], list[str], list[str]],
) -> FoldResult:
    import torch

    from wsi_pipe.mil.registry import create_aggregator
    from wsi_pipe.mil.train import MilModel, TrainParams, feature_stats, fit, predict_bags

    method, settings_d, bags, repeat, fold, train_ids, val_ids, test_ids = job
    s = CVSettings(**settings_d)
    t0 = time.perf_counter()
    by = {b.bag_id: b for b in bags}
    train = [by[i] for i in train_ids]
    val = [by[i] for i in val_ids]
    test = [by[i] for i in test_ids]
    n_classes = max(b.label for b in bags) + 1
    seed = s.seed + 1000 * repeat + fold
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MilModel(create_aggregator(method, bags[0].dim, max(2, n_classes), **s.agg_kwargs))
        if s.standardize:
            model.set_standardization(*feature_stats(train))
        params = TrainParams(
            epochs=s.epochs,
            patience=s.patience,
            lr=s.lr,
            weight_decay=s.weight_decay,
            max_bag_train=None,
            class_weighting=False,
            monitor=s.monitor,
            seed=seed,
        )
        res = fit(model, train, val, params, torch.device("cpu"))
        prob, _ = predict_bags(model, test, torch.device("cpu"))
    return FoldResult(
        repeat,
        fold,
        list(test_ids),
        [b.label for b in test],
        prob.tolist(),
        res.best_epoch,
        len(res.history),
        time.perf_counter() - t0,
    )


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def cross_validate(
    bags: Sequence[Bag], method: str, settings: CVSettings, workers: int = 1
) -> dict[str, Any]:
    """Run `settings.repeats` x `settings.n_folds` CV of `method` on in-memory `bags`.

    Folds run in `workers` processes (one torch thread each). Returns per-fold results and a
    summary: accuracy mean/std over all folds, AUROC of each repeat's pooled out-of-fold
    predictions (mean/std over repeats), and wall time.
    """
    ids = [b.bag_id for b in bags]
    labels = [b.label for b in bags]
    jobs = []
    for r in range(settings.repeats):
        folds = make_splits(
            ids, ids, labels, settings.n_folds, settings.val_fraction, seed=settings.seed + r
        )
        for k, f in enumerate(folds):
            jobs.append(
                (
                    method,
                    asdict(settings),
                    list(bags),
                    r,
                    k,
                    list(f.train),
                    list(f.val),
                    list(f.test),
                )
            )
    t0 = time.perf_counter()
    if workers > 1:
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            results = pool.map(_run_fold, jobs, chunksize=1)
    else:
        results = [_run_fold(j) for j in jobs]
    wall = time.perf_counter() - t0
    accs = np.array([r.accuracy for r in results])
    rep_auc, rep_acc = [], []
    for r in range(settings.repeats):
        rs = [x for x in results if x.repeat == r]
        y = np.concatenate([x.y for x in rs])
        p = np.concatenate([x.prob for x in rs])
        rep_auc.append(auroc(y, p))
        rep_acc.append(accuracy(y, p))
    return {
        "method": method,
        "settings": asdict(settings),
        "accuracy_mean": float(accs.mean()),
        "accuracy_std": float(accs.std(ddof=1)) if len(accs) > 1 else math.nan,
        "accuracy_repeat_means": [float(a) for a in rep_acc],
        "auroc_mean": float(np.nanmean(rep_auc)),
        "auroc_std": float(np.nanstd(rep_auc, ddof=1)) if len(rep_auc) > 1 else math.nan,
        "mean_epochs_run": float(np.mean([x.epochs_run for x in results])),
        "wall_seconds": wall,
        "folds": [asdict(x) for x in results],
    }
