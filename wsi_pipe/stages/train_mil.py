"""`wsi-pipe train-mil` and `wsi-pipe predict`: slide-level MIL on a run's feature stores.

Output folder `RunLayout(run).mil_dir(name)` (name defaults to f"{method}_{feature_set}"):

    config.yaml          resolved MilConfig (hash on the first line)
    model.json           method, feature set, grid mpp, classes, feature width, fold count
    splits.json          the patient-level folds (reused when training is resumed or repeated)
    fold_<k>/model.pt    checkpoint of fold k (best validation epoch)
    fold_<k>/fold.json   fold k's test predictions, metrics and training history (resume marker)
    predictions.csv      out-of-fold prediction of every slide
    metrics.json         per-fold metrics with bootstrap 95% CIs, their mean/std, pooled metrics

`predict` averages the fold models' probabilities (an ensemble) on new slides' feature stores.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipe.core.config import MilConfig, dump_config
from wsi_pipe.core.errors import ConfigError
from wsi_pipe.core.fsutil import atomic_write_json, atomic_write_text, read_json
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry, load_slide_table, read_manifest
from wsi_pipe.mil import get_spec
from wsi_pipe.mil.data import (
    Bag,
    bags_from_entries,
    feature_set_label,
    is_foreign_set,
    resolve_feature_source,
)
from wsi_pipe.mil.metrics import compute_metrics, summarise_folds
from wsi_pipe.mil.registry import create_aggregator
from wsi_pipe.mil.splits import (
    Fold,
    check_no_leakage,
    fixed_split,
    load_splits,
    make_splits,
    save_splits,
)
from wsi_pipe.mil.train import (
    MilModel,
    TrainParams,
    feature_stats,
    fit,
    predict_bags,
    save_checkpoint,
)
from wsi_pipe.mil.trained import ensemble_predict, load_trained
from wsi_pipe.torchutil import resolve_device

log = logging.getLogger(__name__)

SPLIT_COLUMN = "split"


@dataclass(frozen=True)
class TrainMilResult:
    """Where the outputs went and the headline numbers."""

    out_dir: Path
    n_slides: int
    n_folds: int
    classes: list[str]
    summary: dict[str, dict[str, float]]
    pooled: dict[str, dict[str, float]]
    seconds: float


def default_name(method: str, feature_set: str) -> str:
    """Name of a MIL run folder: f"{method}_{feature_set}"."""
    return f"{method}_{feature_set}"


#: MilConfig fields that are options of some aggregator family (its constructor's keywords).
AGGREGATOR_OPTIONS = (
    "hidden_dim",
    "dropout",
    "n_stages",
    "mask_rule",
    "mask_k",
    "mask_mass",
    "n_layers",
    "tile_order",
    "reorder_stride",
    "scan_backend",
)
#: Runtime choices every family may be given without error (not architecture options).
_RUNTIME_OPTIONS = ("scan_backend",)


def aggregator_kwargs(cfg: MilConfig) -> dict[str, Any]:
    """The MilConfig options of the chosen aggregator family, checked by its own schema.

    An option the chosen family does not take, set (on the command line or in YAML) to
    anything but its default, is a ConfigError naming it and the family's options: it is never
    silently dropped. At their defaults such options are simply not passed, so a resolved config
    written in full (`config/`, the Slurm stage configs) reads back as it was.
    """
    spec = get_spec(cfg.method)
    defaults = type(cfg).model_fields
    stray = sorted(
        k
        for k in cfg.model_fields_set & set(AGGREGATOR_OPTIONS)
        if k not in spec.options
        and k not in _RUNTIME_OPTIONS
        and getattr(cfg, k) != defaults[k].default
    )
    if stray:
        raise ConfigError(
            f"MIL method {cfg.method!r} takes no option(s) {stray}; its options are "
            f"{sorted(k for k in AGGREGATOR_OPTIONS if k in spec.options)}: drop them or choose "
            "the method they belong to"
        )
    return {k: getattr(cfg, k) for k in AGGREGATOR_OPTIONS if k in spec.options}


def _folds_for(
    entries: Sequence[SlideEntry],
    bags: Sequence[Bag],
    cfg: MilConfig,
    splits_path: Path,
    overwrite: bool,
) -> list[Fold]:
    ids = [b.bag_id for b in bags]
    patient_of = {b.bag_id: b.patient_id for b in bags}
    if any(SPLIT_COLUMN in e.extra for e in entries):
        folds = fixed_split(ids, [e.extra.get(SPLIT_COLUMN, "") for e in entries])
        meta: dict[str, Any] = {"kind": "fixed", "column": SPLIT_COLUMN}
    else:
        meta = {
            "kind": "patient_stratified_kfold",
            "n_folds": cfg.n_folds,
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
        }
        if splits_path.exists() and not overwrite:
            folds, old = load_splits(splits_path)
            old_ids = sorted({s for f in folds for part in (f.train, f.val, f.test) for s in part})
            same = old_ids == sorted(ids) and all(old.get(k) == v for k, v in meta.items())
            if not same:
                raise ConfigError(
                    f"{splits_path} was made for other slides or settings ({old}); use another "
                    "--name, --overwrite, or delete the file"
                )
            check_no_leakage(folds, patient_of)
            return folds
        folds = make_splits(
            ids,
            [b.patient_id for b in bags],
            [b.label for b in bags],
            cfg.n_folds,
            cfg.val_fraction,
            cfg.seed,
        )
    check_no_leakage(folds, patient_of)
    save_splits(splits_path, folds, {**meta, "patients": patient_of})
    return folds


def _check_fold_classes(folds: Sequence[Fold], by_id: dict[str, Bag], n_classes: int) -> None:
    for k, f in enumerate(folds):
        present = {by_id[s].label for s in f.train}
        if len(present) < 2:
            raise ConfigError(f"fold {k}: the training set holds a single class: lower --folds")
        if len(present) < n_classes:
            log.warning(
                "fold %d: training set lacks %d of %d classes",
                k,
                n_classes - len(present),
                n_classes,
            )


def _prediction_rows(
    bags: Sequence[Bag], prob: np.ndarray, classes: Sequence[str], fold: int | None
) -> list[dict[str, Any]]:
    rows = []
    for b, p in zip(bags, prob, strict=True):
        row: dict[str, Any] = {"slide_id": b.bag_id, "patient_id": b.patient_id}
        if fold is not None:
            row["fold"] = fold
        row["label"] = classes[b.label] if b.label >= 0 else ""
        row["pred"] = classes[int(np.argmax(p))]
        row["n_tiles"] = b.n_tiles
        row.update({f"prob_{c}": float(v) for c, v in zip(classes, p, strict=True)})
        rows.append(row)
    return rows


def _csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def labelled_entries(layout: RunLayout, manifest: str | Path | None) -> list[SlideEntry]:
    """The labelled slides to train on: `manifest`'s rows, or, without one, the slide table of
    the manifest the run was tiled from, when every slide there has a label."""
    if manifest is not None:
        return read_manifest(manifest, require_labels=True)
    if not layout.slides_table.exists():
        raise ConfigError(
            f"{layout.root} is not a tiled wsi-pipe run (no {layout.slides_table.name}): pass "
            "--manifest CSV with slide_id and label (CLAM's dataset CSV case_id, slide_id, label "
            "works as is)"
        )
    entries = load_slide_table(layout.slides_table)
    unlabeled = [e.slide_id for e in entries if e.label is None]
    if unlabeled:
        what = (
            "without labels"
            if len(unlabeled) == len(entries)
            else (f"without a label for {len(unlabeled)} slide(s) ({', '.join(unlabeled[:5])})")
        )
        raise ConfigError(
            f"run {layout.root} was tiled {what}: pass --manifest CSV with slide_id, patient_id "
            "and a label column"
        )
    return entries


def prepare_training(
    run_dir: str | Path, manifest: str | Path | None, cfg: MilConfig
) -> tuple[RunLayout, list[SlideEntry], list[Bag], list[str], str, float]:
    """Every check that can fail before training: config, manifest, labels, feature stores.

    `manifest` None: the labels of the run's own slide table (see `labelled_entries`).
    Returns (layout, entries, bags, classes, feature_set, mpp).
    """
    layout = RunLayout(run_dir)
    get_spec(cfg.method)  # unknown method -> ConfigError naming the known ones
    entries = labelled_entries(layout, manifest)
    feature_set, mpp = resolve_feature_source(layout, cfg.features, cfg.mpp)
    bags, classes = bags_from_entries(layout, entries, feature_set, mpp)
    return layout, entries, bags, classes, feature_set, mpp


def train_mil(
    run_dir: str | Path,
    manifest: str | Path | None,
    cfg: MilConfig,
    name: str | None = None,
    overwrite: bool = False,
) -> TrainMilResult:
    """Cross-validated training of `cfg.method` on the run's feature stores for `manifest`'s slides.

    manifest: CSV with slide_id, patient_id, label (and optionally a `split` column of
    train/val/test for one fixed split); None takes the labels of the run's slide table. Folds already finished with the same config are reused
    unless `overwrite`. Raises ConfigError / StoreSchemaError before any training on bad input.
    """
    t0 = time.perf_counter()
    layout, entries, bags, classes, feature_set, mpp = prepare_training(run_dir, manifest, cfg)
    paths = layout.mil_run(name or default_name(cfg.method, feature_set_label(feature_set)))
    out = paths.root
    by_id = {b.bag_id: b for b in bags}
    folds = _folds_for(entries, bags, cfg, paths.splits, overwrite)
    _check_fold_classes(folds, by_id, len(classes))
    device = resolve_device(cfg.device)
    in_dim = bags[0].dim
    kwargs = aggregator_kwargs(cfg)
    create_aggregator(cfg.method, in_dim, len(classes), **kwargs)  # option errors before training
    if sum(b.nbytes for b in bags) <= cfg.cache_gb * 2**30:
        for b in bags:
            b.materialize()
    chash = cfg.config_hash()
    atomic_write_text(paths.config, dump_config(cfg))
    atomic_write_json(
        paths.model_json,
        {
            "method": cfg.method,
            "feature_set": feature_set,
            "mpp": mpp,
            "classes": classes,
            "in_dim": in_dim,
            "n_folds": len(folds),
            "config_hash": chash,
            "manifest": str(
                Path(manifest if manifest is not None else layout.slides_table).resolve()
            ),
            "aggregator_kwargs": kwargs,
        },
    )
    log.info(
        "train-mil %s: %d slides, %d classes, %d folds, device %s -> %s",
        cfg.method,
        len(bags),
        len(classes),
        len(folds),
        device,
        out,
    )
    params = TrainParams(
        epochs=cfg.epochs,
        patience=cfg.patience,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_bag_train=cfg.max_bag_train,
        class_weighting=cfg.class_weighting,
        seed=cfg.seed,
    )
    fold_records, all_rows = [], []
    for k, f in enumerate(folds):
        marker = paths.fold_record(k)
        if marker.exists() and paths.fold_model(k).exists() and not overwrite:
            rec = read_json(marker)
            if rec.get("config_hash") == chash and rec.get("test") == list(f.test):
                log.info("fold %d already done, reusing %s", k, marker)
                fold_records.append(rec)
                all_rows.extend(rec["predictions"])
                continue
        train = [by_id[s] for s in f.train]
        val = [by_id[s] for s in f.val]
        test = [by_id[s] for s in f.test]
        tf = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed + k)
            model = MilModel(create_aggregator(cfg.method, in_dim, len(classes), **kwargs))
            if cfg.standardize:
                model.set_standardization(*feature_stats(train))
            res = fit(
                model, train, val, TrainParams(**{**params.__dict__, "seed": cfg.seed + k}), device
            )
            prob, _ = predict_bags(model, test, device)
        save_checkpoint(
            paths.fold_model(k),
            model,
            {"fold": k, "classes": classes, "feature_set": feature_set, "mpp": mpp},
        )
        y = np.array([b.label for b in test])
        rows = _prediction_rows(test, prob, classes, k)
        rec = {
            "fold": k,
            "config_hash": chash,
            "test": list(f.test),
            "n_train": len(train),
            "n_val": len(val),
            "n_test": len(test),
            "best_epoch": res.best_epoch,
            "best_val_loss": res.best_val_loss,
            "seconds": time.perf_counter() - tf,
            "history": res.history,
            "metrics": compute_metrics(y, prob, cfg.bootstrap, cfg.seed + k),
            "predictions": rows,
        }
        atomic_write_json(marker, rec)
        log.info(
            "fold %d: best epoch %d, test AUROC %.3f, balanced accuracy %.3f (%.0f s)",
            k,
            res.best_epoch,
            rec["metrics"]["auroc"]["value"],
            rec["metrics"]["balanced_accuracy"]["value"],
            rec["seconds"],
        )
        fold_records.append(rec)
        all_rows.extend(rows)
    y_all = np.array([classes.index(r["label"]) for r in all_rows])
    p_all = np.array([[r[f"prob_{c}"] for c in classes] for r in all_rows])
    summary = summarise_folds([r["metrics"] for r in fold_records])
    pooled = compute_metrics(y_all, p_all, cfg.bootstrap, cfg.seed)
    atomic_write_text(paths.predictions, _csv_text(all_rows))
    atomic_write_json(
        paths.metrics,
        {
            "method": cfg.method,
            "feature_set": feature_set,
            "mpp": mpp,
            "classes": classes,
            "summary": summary,
            "pooled": pooled,
            "per_fold": [
                {k: r[k] for k in ("fold", "n_train", "n_val", "n_test", "best_epoch", "metrics")}
                for r in fold_records
            ],
        },
    )
    return TrainMilResult(
        out, len(bags), len(folds), classes, summary, pooled, time.perf_counter() - t0
    )


# ------------------------------------------------------------------------------- predict
def with_feature_source(
    layout: RunLayout, info: dict[str, Any], features: str | None
) -> dict[str, Any]:
    """A trained model's info with `feature_set` (and `mpp`) replaced by `features` when given:
    a feature set of `layout`'s run (at the model's grid) or a CLAM/TRIDENT feature folder."""
    if features is None:
        return info
    mpp = float(info["mpp"])
    fset, fmpp = resolve_feature_source(layout, features, None if is_foreign_set(features) else mpp)
    return {**info, "feature_set": fset, "mpp": fmpp}


def entries_from_args(slides: Sequence[str]) -> list[SlideEntry]:
    """Slide entries from slide ids, or from one manifest CSV (labels optional)."""
    if len(slides) == 1 and slides[0].lower().endswith(".csv"):
        return read_manifest(slides[0])
    if not slides:
        raise ConfigError("give slide ids or a manifest CSV to predict on")
    return [SlideEntry(s, "", s) for s in slides]


def predict(
    run_dir: str | Path,
    model_dir: str | Path,
    slides: Sequence[str],
    out: str | Path | None = None,
    device: str = "auto",
    features: str | None = None,
) -> Path:
    """Apply a trained MIL run to slides of `run_dir` (ids, or a manifest CSV); writes a CSV of
    ensemble probabilities and returns its path (default RUN_DIR/mil/<model name>/inference/
    predictions.csv). `features`: another feature set or CLAM/TRIDENT feature folder made with
    the model's encoder (default: the model's own)."""
    layout = RunLayout(run_dir)
    dev = resolve_device(device)
    trained = load_trained(model_dir, dev)
    info = with_feature_source(layout, trained.info, features)
    entries = entries_from_args(slides)
    classes = trained.classes
    entries = [
        e
        if (e.label is None or e.label in classes)
        else SlideEntry(e.slide_id, e.path, e.patient_id, None, e.mpp, e.extra)
        for e in entries
    ]
    bags, _ = bags_from_entries(
        layout,
        entries,
        info["feature_set"],
        float(info["mpp"]),
        classes=classes,
        require_labels=False,
    )
    if bags[0].dim != int(info["in_dim"]):
        raise ConfigError(
            f"features of {info['feature_set']!r} in {run_dir} are {bags[0].dim}-wide, "
            f"the model expects {info['in_dim']}: extract with the same encoder"
        )
    prob, _ = ensemble_predict(trained, bags, dev)
    rows = _prediction_rows(bags, prob, classes, None)
    out_path = Path(out) if out else layout.mil_run(Path(model_dir).name).inference_predictions
    atomic_write_text(out_path, _csv_text(rows))
    labelled = [i for i, b in enumerate(bags) if b.label >= 0]
    if labelled and len({bags[i].label for i in labelled}) > 1:
        y = np.array([bags[i].label for i in labelled])
        atomic_write_text(
            out_path.with_suffix(".metrics.json"),
            json.dumps(compute_metrics(y, prob[labelled]), indent=2) + "\n",
        )
    return out_path
