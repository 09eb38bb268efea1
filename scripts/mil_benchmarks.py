#!/usr/bin/env python
"""Reproduce the classic MIL benchmark table (Ilse et al. 2018, Table 1) for every aggregator.

    python scripts/mil_benchmarks.py                         # full: 5 x 10-fold CV, all methods
    python scripts/mil_benchmarks.py --repeats 1 --methods abmil --datasets musk1

Data: ../shared/data/mil_benchmarks (MUSK1, MUSK2, UCSB breast cancer CSVs; see SOURCES.md).
Protocol and settings: `wsi_pipe.mil.benchmark` (`benchmark_settings`): per repeat a new
stratified 10-fold split of the bags, features standardised per training fold, Adam lr 5e-4,
weight decay 5e-3, 50 epochs, one bag per step.
Accuracy: mean +- std over the test folds, and the std of the repeats' means;
AUROC: each repeat's pooled out-of-fold predictions, mean +- std over repeats.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from wsi_pipe.mil import list_aggregators
from wsi_pipe.mil.benchmark import (
    DATASETS,
    PUBLISHED_ACCURACY,
    CVSettings,
    benchmark_settings,
    cross_validate,
)
from wsi_pipe.mil.data import load_benchmark_csv

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mil_benchmarks"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CV repeats (default 5; mamba 1, see benchmark_settings)",
    )
    ap.add_argument("--folds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None, help="default 50")
    ap.add_argument("--workers", type=int, default=2, help="folds trained in parallel processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write every fold's result here")
    a = ap.parse_args()
    methods = a.methods or list_aggregators()
    t_all = time.perf_counter()
    rows, dump = [], []
    for ds in a.datasets:
        bags = load_benchmark_csv(a.data / DATASETS[ds])
        for m in methods:
            base = benchmark_settings(m)
            s = CVSettings(
                **{
                    **base.__dict__,
                    "n_folds": a.folds,
                    "repeats": a.repeats or base.repeats,
                    "epochs": a.epochs or base.epochs,
                    "seed": a.seed,
                }
            )
            r = cross_validate(bags, m, s, workers=a.workers)
            dump.append({"dataset": ds, **r})
            pub = PUBLISHED_ACCURACY.get(ds)
            ref = f"{pub[0]:.3f} ± {pub[1]:.3f}" if pub and m == "abmil" else ""
            rows.append(
                (
                    ds,
                    m,
                    s.repeats,
                    r["accuracy_mean"],
                    r["accuracy_std"],
                    r["accuracy_repeat_means"],
                    r["auroc_mean"],
                    r["auroc_std"],
                    r["wall_seconds"],
                    ref,
                )
            )
            auc_sd = f" ± {r['auroc_std']:.3f}" if s.repeats > 1 else ""
            print(
                f"{ds:6} {m:6} accuracy {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}  "
                f"AUROC {r['auroc_mean']:.3f}{auc_sd}  {r['wall_seconds']:.0f} s"
                + (f"  (Ilse et al.: {ref})" if ref else ""),
                flush=True,
            )
    total = time.perf_counter() - t_all
    print()
    print(
        "| dataset | method | repeats | accuracy (folds) | accuracy sd (repeats) | AUROC | seconds | Ilse et al. |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for ds, m, reps, am, asd, rep_means, um, usd, sec, ref in rows:
        rsd = f"{np.std(rep_means, ddof=1):.3f}" if len(rep_means) > 1 else "-"
        usd_s = f" ± {usd:.3f}" if reps > 1 else ""
        print(
            f"| {ds} | {m} | {reps} | {am:.3f} ± {asd:.3f} | {rsd} | {um:.3f}{usd_s} | {sec:.0f} | {ref} |"
        )
    print(f"\n{a.folds}-fold CV, {a.workers} worker(s): total {total:.0f} s")
    if a.json:
        a.json.write_text(json.dumps(dump, indent=2))


if __name__ == "__main__":
    main()
