"""Does the SSMamba encoder learn tissue? Five arms on labelled ROI tiles, one run, one table.

    python scripts/bench_probe.py --train DIR --group-regex 'CRC-Prim-HE-\\d+' --json out.json
    python scripts/bench_probe.py --train DIR --test DIR2 --json out.json    # train all, test DIR2
    python scripts/bench_probe.py --train DIR --group-regex RE --json o.json --tiny   # seconds

DIR is an ImageFolder tree (one sub-folder per class). Scoring: grouped cross-validation on
`--train` (`--folds` folds of whole groups, stratified as far as the groups allow; a test tile
counts only in a fold whose training side holds its class; predictions pooled over folds), or,
with `--test`, training on all of `--train` and testing on `--test`.

Arms (all in the same run, same folds, same tiles resized once to `--px`):
  1 `ssl+sft`     SSMamba: MAMIM pretraining on the fold's training tiles (labels unused), then
                  supervised fine-tuning of the whole network (SFT)
  2 `sft`         the same architecture and SFT recipe from the same random initialisation
  3 probes        logistic-regression and 20-NN (cosine) probes on frozen embeddings of the
                  pretrained and of the random encoder
  4 `medmamba`    MedMamba blocks, same size and recipe as arm 1
  5 `classical`   HSV / HED histograms and statistics, LBP histograms, GLCM (Haralick)
                  properties + logistic regression
No arm uses the test fold for anything but scoring: SFT runs a fixed schedule (`--sft-epochs`,
last epoch kept, no model selection) and the probes' hyperparameters are fixed.

Metrics: accuracy, balanced accuracy (mean recall over the classes scored) and macro-F1 (same
classes), each with two percentile-bootstrap 95 % CIs: over tiles (`ci_low`/`ci_high`,
`wsi_pipe.mil.metrics.bootstrap_ci`) and, in grouped CV, over source slides (`ci_slides`: whole
slides resampled, the CI that speaks about new slides; wide with 6 slides). Also per-class
recall, paired-bootstrap CIs of the differences that test "pretraining helps", and the wall time
of each arm. Per-tile predictions are saved beside the JSON (`<json stem>.predictions.npz`).

Budget: `--budget-min` (default 45, meant for an idle 2-core machine) sets the MAMIM and SFT
epochs; `--pretrain-epochs` / `--sft-epochs` override. The JSON is rewritten after every arm of
every fold, so a run cut short still leaves its finished arms.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ARMS = [
    ("ssl+sft", "1 SSMamba: MAMIM then SFT"),
    ("sft", "2 SSMamba: SFT from random init"),
    ("linear/pretrained", "3 linear probe, frozen MAMIM encoder"),
    ("linear/random", "3 linear probe, frozen random encoder"),
    ("knn20/pretrained", "3 20-NN probe, frozen MAMIM encoder"),
    ("knn20/random", "3 20-NN probe, frozen random encoder"),
    ("medmamba", "4 MedMamba: MAMIM then SFT"),
    ("classical", "5 colour/texture stats + LR"),
]
PAIRS = [
    ("ssl+sft", "sft"),
    ("linear/pretrained", "linear/random"),
    ("knn20/pretrained", "knn20/random"),
]
PAPER_ACCURACY = 0.874  # Kather et al. 2016, 8 classes, texture features + SVM, random split


# --------------------------------------------------------------------------------- metrics
def _acc(y: np.ndarray, prob: np.ndarray) -> float:
    return float(np.mean(prob.argmax(1) == y))


def _bacc(y: np.ndarray, prob: np.ndarray) -> float:
    pred = prob.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def _mf1(y: np.ndarray, prob: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, prob.argmax(1), labels=np.unique(y), average="macro", zero_division=0))


METRIC_FNS = {"accuracy": _acc, "balanced_accuracy": _bacc, "macro_f1": _mf1}


def group_bootstrap_ci(
    y: np.ndarray, prob: np.ndarray, groups: np.ndarray, fn, n_boot: int, seed: int
) -> tuple[float, float]:
    """Percentile 95 % CI resampling whole groups (source slides) with replacement.

    Tiles of one slide are correlated, so this is the CI that speaks about new slides. With few
    slides (6 here) it is wide and coarse; NaN when fewer than two groups are scored.
    """
    uniq = np.unique(groups)
    if len(uniq) < 2 or n_boot <= 0:
        return math.nan, math.nan
    rows = [np.flatnonzero(groups == g) for g in uniq]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = np.concatenate([rows[j] for j in rng.integers(0, len(uniq), len(uniq))])
        vals.append(fn(y[i], prob[i]))
    lo, hi = np.quantile(vals, [0.025, 0.975])
    return float(lo), float(hi)


def score(
    y: np.ndarray,
    prob: np.ndarray,
    classes: list[str],
    n_boot: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> dict:
    """Metrics with a tile-bootstrap CI, plus a slide-bootstrap CI (`ci_slides`) with groups."""
    from wsi_pipe.mil.metrics import bootstrap_ci

    out: dict = {"n": int(len(y))}
    for k, (name, fn) in enumerate(METRIC_FNS.items()):
        lo, hi = bootstrap_ci(y, prob, fn, n_boot, seed + k)
        out[name] = {"value": fn(y, prob), "ci_low": lo, "ci_high": hi}
        if groups is not None:
            out[name]["ci_slides"] = list(group_bootstrap_ci(y, prob, groups, fn, n_boot, seed + k))
    pred = prob.argmax(1)
    out["per_class_recall"] = {
        classes[c]: {"recall": float(np.mean(pred[y == c] == c)), "n": int((y == c).sum())}
        for c in np.unique(y)
    }
    return out


def paired_diff(y: np.ndarray, pa: np.ndarray, pb: np.ndarray, n_boot: int, seed: int) -> dict:
    """Accuracy and balanced accuracy of a minus b on the same tiles, paired bootstrap 95 % CI."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("accuracy", "balanced_accuracy"):
        fn = METRIC_FNS[name]
        vals = []
        for _ in range(n_boot):
            i = rng.integers(0, len(y), len(y))
            vals.append(fn(y[i], pa[i]) - fn(y[i], pb[i]))
        lo, hi = np.quantile(vals, [0.025, 0.975]) if vals else (math.nan, math.nan)
        out[name] = {"value": fn(y, pa) - fn(y, pb), "ci_low": float(lo), "ci_high": float(hi)}
    return out


# ------------------------------------------------------------------------ classical features
def classical_features(tiles: np.ndarray) -> np.ndarray:
    """(n, px, px, 3) uint8 RGB -> (n, d) float64 colour and texture statistics."""
    import cv2
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    feats = []
    for t in tiles:
        f: list[np.ndarray] = []
        hsv = cv2.cvtColor(t, cv2.COLOR_RGB2HSV)
        for ch, bins, top in ((0, 18, 180), (1, 8, 256), (2, 8, 256)):
            h = np.histogram(hsv[..., ch], bins=bins, range=(0, top))[0]
            f.append(h / h.sum())
        f.append(hsv.reshape(-1, 3).mean(0) / 255)
        f.append(hsv.reshape(-1, 3).std(0) / 255)
        hed = rgb2hed(t).reshape(-1, 3)
        f.append(hed.mean(0))
        f.append(hed.std(0))
        f.append(np.percentile(hed, [10, 50, 90], axis=0).ravel())
        for ch in (0, 1):
            h = np.histogram(hed[:, ch], bins=16, range=(-0.1, 0.3))[0]
            f.append(h / h.sum())
        grey = cv2.cvtColor(t, cv2.COLOR_RGB2GRAY)
        for p, r in ((8, 1), (16, 2)):
            lbp = local_binary_pattern(grey, p, r, "uniform")
            h = np.histogram(lbp, bins=p + 2, range=(0, p + 2))[0]
            f.append(h / h.sum())
        q = (grey // 8).astype(np.uint8)  # 32 grey levels
        glcm = graycomatrix(q, [1, 2, 4], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], 32, True, True)
        for prop in ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM"):
            f.append(graycoprops(glcm, prop).mean(1))
        feats.append(np.concatenate(f))
    return np.nan_to_num(np.asarray(feats, dtype=np.float64))


def fit_lr(f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray, n_classes: int) -> np.ndarray:
    """Standardised features -> multinomial logistic regression (C=1); (n_te, n_classes) probs."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    clf.fit(f_tr, y_tr)
    return _full_proba(clf.predict_proba(f_te), clf.classes_, n_classes)


def fit_knn(
    f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray, n_classes: int, k: int = 20
) -> np.ndarray:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(k, len(y_tr)), metric="cosine").fit(f_tr, y_tr)
    return _full_proba(knn.predict_proba(f_te), knn.classes_, n_classes)


def _full_proba(p: np.ndarray, present: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(p), n_classes))
    out[:, present] = p
    return out


# ------------------------------------------------------------------------------------ data
def load_folder(root: str, px: int, max_per_class: int | None, regex: str | None):
    from wsi_pipe.data.images import groups_from_regex, load_tiles, scan_image_folder

    items = scan_image_folder(root)
    if max_per_class:
        by: dict[str, list] = defaultdict(list)
        for it in items:
            by[it.label].append(it)
        # spread the subset over the file list so that it spans several groups
        items = [
            it
            for lab in sorted(by)
            for it in by[lab][:: max(1, len(by[lab]) // max_per_class)][:max_per_class]
        ]
    paths = [it.path for it in items]
    groups = groups_from_regex(paths, regex) if regex else None
    return paths, [it.label for it in items], groups, load_tiles(paths, px)


# ------------------------------------------------------------------------------- the bench
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--train", required=True, help="ImageFolder of labelled tiles")
    ap.add_argument("--test", help="optional ImageFolder scored after training on all of --train")
    ap.add_argument("--group-regex", help="group (source slide) from file names, for grouped CV")
    ap.add_argument("--json", required=True, help="output JSON (rewritten after every arm)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--budget-min", type=float, default=45.0, help="minutes on an idle 2-core CPU")
    ap.add_argument("--pretrain-epochs", type=float, help="MAMIM epochs over the training tiles")
    ap.add_argument("--sft-epochs", type=int, help="SFT epochs")
    ap.add_argument("--arch", default="ssmamba_cpu")
    ap.add_argument("--medmamba-arch", default="medmamba_cpu")
    ap.add_argument("--px", type=int, default=160, help="input px (tiles resized once)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-per-class", type=int, help="use a subset (spread over the files)")
    ap.add_argument(
        "--arms", default="all", help="comma list of: ssl,sft,probes,medmamba,classical"
    )
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="tiny encoders at 64 px, 1 epoch: seconds")
    ap.add_argument(
        "--random-split-too",
        action="store_true",
        help="also score the classical arm by ungrouped stratified 5-fold CV (the paper's setting)",
    )
    a = ap.parse_args(argv)

    import torch

    from wsi_pipe.core.config import FinetuneConfig, PretrainConfig
    from wsi_pipe.encoders import create_encoder, get_encoder_spec, load_encoder
    from wsi_pipe.mil.splits import check_groups_disjoint, grouped_stratified_folds
    from wsi_pipe.stages.finetune import ArrayTiles, embed_dataset, fit_classifier, predict_proba
    from wsi_pipe.stages.pretrain import pretrain_images

    if a.tiny:
        a.arch, a.medmamba_arch = "ssmamba_tiny", "medmamba_tiny"
        a.px = a.px if a.px != 160 else 64
        a.max_per_class = a.max_per_class or 8
        a.n_boot = min(a.n_boot, 50)
    scale = a.budget_min / 45.0
    pre_epochs = (
        a.pretrain_epochs
        if a.pretrain_epochs is not None
        else (0.2 if a.tiny else max(0.5, 4 * scale))
    )
    sft_epochs = a.sft_epochs or (1 if a.tiny else max(1, round(4 * scale)))
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    arms = (
        {"ssl", "sft", "probes", "medmamba", "classical"}
        if a.arms == "all"
        else set(a.arms.split(","))
    )
    t_all = time.time()
    load_before = os.getloadavg()

    paths, labels, groups, tiles = load_folder(a.train, a.px, a.max_per_class, a.group_regex)
    classes = sorted(set(labels))
    y = np.array([classes.index(v) for v in labels])
    if a.test:
        t_paths, t_labels, _, t_tiles = load_folder(a.test, a.px, a.max_per_class, None)
        unknown = sorted(set(t_labels) - set(classes))
        if unknown:
            sys.exit(f"--test has classes {unknown} that --train lacks")
        t_y = np.array([classes.index(v) for v in t_labels])
        all_tiles = np.concatenate([tiles, t_tiles])
        all_y = np.concatenate([y, t_y])
        folds = [(np.arange(len(y)), len(y) + np.arange(len(t_y)))]
        scheme = f"train on {a.train} ({len(y)}), test on {a.test} ({len(t_y)})"
    else:
        if not groups:
            sys.exit("grouped cross-validation needs --group-regex (or give --test)")
        all_tiles, all_y = tiles, y
        test_sets = grouped_stratified_folds(y, groups, a.folds, a.seed)
        folds = []
        for te in test_sets:
            tr = np.setdiff1d(np.arange(len(y)), te)
            check_groups_disjoint(groups, tr, te)
            folds.append((tr, te))
        scheme = f"{a.folds}-fold grouped CV on {a.train} by {a.group_regex!r}"
    n_classes = len(classes)

    wall: dict[str, float] = defaultdict(float)
    preds: dict[str, list] = defaultdict(list)  # arm -> per-fold probs on the scored test tiles
    y_scored: list[np.ndarray] = []
    g_scored: list[np.ndarray] = []  # source slide of each scored tile (grouped CV only)
    fold_info = []
    out_path = Path(a.json)

    def finish(partial: bool) -> dict:
        yt = np.concatenate(y_scored) if y_scored else np.array([], dtype=np.int64)
        gt = np.concatenate(g_scored) if g_scored else None
        results = {}
        saved = {"y": yt}
        for arm, _ in ARMS:
            if arm in preds and len(preds[arm]) == len(y_scored) and len(yt):
                p = np.concatenate(preds[arm])
                saved[f"prob/{arm}"] = p
                results[arm] = {
                    **score(yt, p, classes, a.n_boot, a.seed, gt),
                    "seconds": round(wall[arm], 1),
                }
        diffs = {}
        for x, z in PAIRS:
            if x in results and z in results:
                diffs[f"{x} - {z}"] = paired_diff(
                    yt, np.concatenate(preds[x]), np.concatenate(preds[z]), a.n_boot, a.seed
                )
        report = {
            "partial": partial,
            "scheme": scheme,
            "classes": classes,
            "n_tiles": int(len(all_y)),
            "folds": fold_info,
            "recipe": {"arch": a.arch, "medmamba_arch": a.medmamba_arch, "px": a.px,
                       "pretrain_epochs": pre_epochs, "sft_epochs": sft_epochs,
                       "batch_size": a.batch_size, "budget_min": a.budget_min, "seed": a.seed},
            "results": results,
            "paired_differences": diffs,
            "classical_random_split_5fold": random_split,
            "paper_accuracy": PAPER_ACCURACY,
            "wall_seconds": round(time.time() - t_all, 1),
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "loadavg_start": load_before, "loadavg_end": os.getloadavg(),
                        "python": platform.python_version(), "torch": torch.__version__},
        }  # fmt: skip
        out_path.parent.mkdir(parents=True, exist_ok=True)
        if gt is not None:
            saved["group"] = gt
        # per-tile predictions beside the JSON, so any CI can be recomputed without rerunning
        npz = out_path.with_suffix(".predictions.npz")
        with open(npz.with_name(npz.name + ".tmp"), "wb") as fh:
            np.savez_compressed(fh, **saved)
        os.replace(npz.with_name(npz.name + ".tmp"), npz)
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out_path)
        return report

    if "classical" in arms:
        t = time.time()
        cfeat = classical_features(all_tiles)
        wall["classical"] += time.time() - t
    px_spec = get_encoder_spec(a.arch)
    sft_cfg = FinetuneConfig(
        epochs=sft_epochs, batch_size=a.batch_size, lr=2e-3, backbone_lr=5e-4,
        train_backbone=True, input_px=a.px, device="cpu", scan_backend="torch", seed=a.seed,
    )  # fmt: skip

    def random_encoder(arch: str):
        torch.manual_seed(a.seed)  # the start of MAMIM pretraining uses the same seed
        return create_encoder(arch, scan_backend="torch")

    def mamim(arch: str, tr: np.ndarray, tmp: str, tag: str):
        n = len(tr)
        steps = max(2, int(round(pre_epochs * n / a.batch_size)))
        cfg = PretrainConfig(
            arch=arch, input_px=a.px, epochs=1, steps_per_epoch=steps, batch_size=a.batch_size,
            lr=1.5e-3, warmup_steps=max(1, steps // 10), workers=0, device="cpu",
            scan_backend="torch", seed=a.seed, max_tiles=n, checkpoint_every=10**6,
        )  # fmt: skip
        out = Path(tmp) / f"{tag}.pt"
        r = pretrain_images(all_tiles[tr], cfg, out, progress=False)
        enc, _ = load_encoder(out, scan_backend="torch")
        return enc, {
            "steps": r.steps,
            "first_loss": r.first_loss,
            "last_loss": r.last_loss,
        }

    def sft(enc, spec, tr: np.ndarray, te: np.ndarray) -> np.ndarray:
        clf, _, _ = fit_classifier(enc, spec, n_classes, ArrayTiles(all_tiles[tr], all_y[tr]), None,
                                   sft_cfg, torch.device("cpu"))  # fmt: skip
        return predict_proba(clf, ArrayTiles(all_tiles[te], all_y[te]), spec, torch.device("cpu"))[
            1
        ]

    def embed(enc, spec) -> np.ndarray:
        return embed_dataset(enc, ArrayTiles(all_tiles, all_y), spec, torch.device("cpu"), 64)[
            0
        ].numpy()

    random_split = None
    fold_data = []
    for k, (tr, te) in enumerate(folds):
        train_classes = set(all_y[tr].tolist())
        te = te[np.isin(all_y[te], list(train_classes))]  # a test tile counts only if learnable
        info = {"fold": k, "n_train": int(len(tr)), "n_test_scored": int(len(te))}
        if groups is not None and not a.test:
            info["test_groups"] = sorted({groups[i] for i in np.setdiff1d(np.arange(len(y)), tr)})
            info["classes_not_scored"] = sorted(
                classes[c] for c in set(range(n_classes)) - train_classes
            )
        fold_info.append(info)
        print(f"fold {k}: {info}", flush=True)
        y_scored.append(all_y[te])
        if groups is not None and not a.test:
            g_scored.append(np.asarray([groups[i] for i in te]))
        fold_data.append((tr, te, info))

    # arms outer, folds inner: a run cut short loses whole (late, costly) arms, not folds
    if "classical" in arms and a.random_split_too:
        from sklearn.model_selection import StratifiedKFold

        probs = np.zeros((len(all_y), n_classes))
        for tr, te in StratifiedKFold(5, shuffle=True, random_state=a.seed).split(cfeat, all_y):
            probs[te] = fit_lr(cfeat[tr], all_y[tr], cfeat[te], n_classes)
        random_split = score(all_y, probs, classes, a.n_boot, a.seed)
    if "classical" in arms:
        for tr, te, _ in fold_data:
            t = time.time()
            preds["classical"].append(fit_lr(cfeat[tr], all_y[tr], cfeat[te], n_classes))
            wall["classical"] += time.time() - t
        finish(True)
        print(f"classical done at {time.time() - t_all:.0f} s", flush=True)
    if "probes" in arms:
        t = time.time()
        random_feats = embed(random_encoder(a.arch).eval(), px_spec)
        for tr, te, _ in fold_data:
            preds["linear/random"].append(
                fit_lr(random_feats[tr], all_y[tr], random_feats[te], n_classes)
            )
            preds["knn20/random"].append(
                fit_knn(random_feats[tr], all_y[tr], random_feats[te], n_classes)
            )
        wall["linear/random"] = wall["knn20/random"] = (time.time() - t) / 2
        finish(True)
        print(f"random probes done at {time.time() - t_all:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        if arms & {"ssl", "probes"}:
            for k, (tr, te, info) in enumerate(fold_data):
                t = time.time()
                enc, pre = mamim(a.arch, tr, tmp, f"ssmamba_fold{k}")
                t_pre = time.time() - t
                info["mamim_ssmamba"] = {**pre, "seconds": round(t_pre, 1)}
                print(f"  fold {k} MAMIM {a.arch}: {pre} in {t_pre:.0f} s", flush=True)
                if "probes" in arms:
                    t = time.time()
                    f = embed(enc, px_spec)
                    preds["linear/pretrained"].append(fit_lr(f[tr], all_y[tr], f[te], n_classes))
                    preds["knn20/pretrained"].append(fit_knn(f[tr], all_y[tr], f[te], n_classes))
                    dt = time.time() - t + t_pre  # the probes' cost includes pretraining
                    wall["linear/pretrained"] += dt / 2
                    wall["knn20/pretrained"] += dt / 2
                    finish(True)
                if "ssl" in arms:
                    t = time.time()
                    preds["ssl+sft"].append(sft(enc, px_spec, tr, te))
                    wall["ssl+sft"] += time.time() - t + t_pre
                    finish(True)
                print(f"  fold {k} MAMIM+SFT done at {time.time() - t_all:.0f} s", flush=True)
        if "sft" in arms:
            for k, (tr, te, _) in enumerate(fold_data):
                t = time.time()
                preds["sft"].append(sft(random_encoder(a.arch), px_spec, tr, te))
                wall["sft"] += time.time() - t
                finish(True)
                print(f"  fold {k} SFT done at {time.time() - t_all:.0f} s", flush=True)
        if "medmamba" in arms:
            for k, (tr, te, info) in enumerate(fold_data):
                t = time.time()
                enc, pre = mamim(a.medmamba_arch, tr, tmp, f"medmamba_fold{k}")
                info["mamim_medmamba"] = pre
                preds["medmamba"].append(sft(enc, get_encoder_spec(a.medmamba_arch), tr, te))
                wall["medmamba"] += time.time() - t
                finish(True)
                print(f"  fold {k} MedMamba done at {time.time() - t_all:.0f} s", flush=True)
    report = finish(False)
    print_table(report)
    return report


def print_table(r: dict) -> None:
    def ci(m: dict) -> str:
        return f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"

    print(f"\n{r['scheme']}; {r['n_tiles']} tiles; recipe {r['recipe']}")
    print(f"{'arm':<44} {'accuracy':>22} {'balanced acc.':>22} {'macro-F1':>22} {'s':>7}")
    for arm, desc in ARMS:
        m = r["results"].get(arm)
        if m:
            print(f"{desc:<44} {ci(m['accuracy']):>22} {ci(m['balanced_accuracy']):>22} "
                  f"{ci(m['macro_f1']):>22} {m['seconds']:>7.0f}")  # fmt: skip
    for name, d in r["paired_differences"].items():
        print(f"paired {name}: accuracy {ci(d['accuracy'])}, balanced {ci(d['balanced_accuracy'])}")
    print(f"paper (random split, SVM on texture features): accuracy {r['paper_accuracy']}")
    print(
        f"wall {r['wall_seconds']:.0f} s; load {r['machine']['loadavg_start']} -> {r['machine']['loadavg_end']}"
    )


if __name__ == "__main__":
    main()
