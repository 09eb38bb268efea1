"""`wsi-pipe finetune`: supervised fine-tuning of an encoder on labelled ROIs (SSMamba stage 2).

Labelled data, one of three layouts (CSV paths relative to the CSV's folder or absolute):

    DIR/<class>/<image>                  ImageFolder: one sub-folder per class
    image,label[,group]                  ROI image files (PNG/JPEG/TIFF), resized to the input px
    slide,x,y,level,size_px,label[,group]  regions of slides: level-0 top-left (x, y), read
                                         size_px x size_px at `level`, resized to the input px

or the tiles of a run tiled with QuPath annotations (`wsi-pipe tile --annotations`,
`finetune_from_annotations`): every tile whose stored `annotation_class` is not -1, read as the
tile stage defines it (`read_level`, `read_size_px`), labelled by the class name, grouped by
slide; `max_tiles_per_class` samples (seeded) that many tiles per class.

Three splits: train, validation (model selection: the epoch with the best validation balanced
accuracy is kept) and test, which selection never sees and which is scored once at the end.
With groups (a `group` column, or `group_regex` matched on file names, e.g. the source slide) the
splits keep every group on one side, stratified as far as the groups allow
(`wsi_pipe.mil.splits.grouped_holdout`); otherwise they are stratified per class. Test examples
whose class is absent from the training split are left out of the test metrics (and counted).

With a frozen backbone (default) the embeddings are computed once and a linear head is trained
on them (a linear probe); with `train_backbone` the whole network trains (backbone at
`backbone_lr`, head at `lr`) with dihedral and stain augmentations. Metrics (test, validation,
train) go to `<out stem>.metrics.json`; the backbone + head to `out_path` (loadable by
`load_encoder` and `load_classifier`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from wsi_pipe.core.config import FinetuneConfig
from wsi_pipe.core.errors import ConfigError, EmptyInputError, MissingMppError
from wsi_pipe.core.fsutil import atomic_write_json
from wsi_pipe.data.images import check_classes, groups_from_regex, read_rgb, scan_image_folder
from wsi_pipe.encoders import EncoderClassifier, load_encoder, save_encoder
from wsi_pipe.encoders.augment import augment_batch
from wsi_pipe.imageops.tiles import resize_tile
from wsi_pipe.torchutil import make_loader, preprocess, resolve_device

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "label")
SLIDE_COLUMNS = ("slide", "x", "y", "level", "size_px", "label")


@dataclass(frozen=True)
class LabelledRegion:
    """One labelled example: an image file, or a region of a slide (level-0 px (x, y)).
    `group`: what must stay on one side of a split (source slide, patient); None if unknown."""

    path: str
    label: str
    x: int | None = None
    y: int | None = None
    level: int | None = None
    size_px: int | None = None
    group: str | None = None

    @property
    def is_slide_region(self) -> bool:
        return self.x is not None


def read_labels(labels_csv: str | Path) -> list[LabelledRegion]:
    """Parse a labels CSV (either layout, see module doc). Raises ConfigError naming the row."""
    p = Path(labels_csv)
    if not p.is_file():
        raise ConfigError(f"labels file {p} does not exist")
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = tuple(c.strip() for c in (reader.fieldnames or ()))
        rows = list(reader)
    if set(SLIDE_COLUMNS) <= set(cols):
        kind = "slide"
    elif set(IMAGE_COLUMNS) <= set(cols):
        kind = "image"
    else:
        raise ConfigError(
            f"labels file {p} has columns {list(cols)}; need {','.join(IMAGE_COLUMNS)} or "
            f"{','.join(SLIDE_COLUMNS)} (optionally a group column)"
        )
    has_group = "group" in cols
    out = []
    for i, r in enumerate(rows, start=2):
        r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
        src = r["slide" if kind == "slide" else "image"]
        if not src or not r["label"]:
            raise ConfigError(f"{p} line {i}: empty path or label")
        group = r.get("group") or None
        if has_group and group is None:
            raise ConfigError(
                f"{p} line {i}: empty group (every row needs one when the column exists)"
            )
        path = Path(src) if Path(src).is_absolute() else p.parent / src
        if not path.exists():
            raise ConfigError(
                f"{p} line {i}: {path} does not exist (paths are relative to the CSV)"
            )
        if kind == "image":
            out.append(LabelledRegion(str(path), r["label"], group=group))
            continue
        try:
            x, y, level, size = int(r["x"]), int(r["y"]), int(r["level"]), int(r["size_px"])
        except ValueError:
            raise ConfigError(f"{p} line {i}: x, y, level, size_px must be integers") from None
        if size <= 0 or level < 0:
            raise ConfigError(f"{p} line {i}: size_px must be > 0 and level >= 0")
        out.append(LabelledRegion(str(path), r["label"], x, y, level, size, group))
    if not out:
        raise EmptyInputError(f"labels file {p} has no rows")
    return out


def read_labelled(source: str | Path, group_regex: str | None = None) -> list[LabelledRegion]:
    """Labelled examples from an ImageFolder tree or a labels CSV, with groups from the CSV's
    `group` column or from `group_regex` on file names (the regex wins). ConfigError on a single
    class; EmptyInputError on an empty class folder."""
    src = Path(source)
    if src.is_dir():
        items = [LabelledRegion(it.path, it.label) for it in scan_image_folder(src)]
    else:
        items = read_labels(src)
        check_classes([it.label for it in items], f"labels file {src}")
    if group_regex:
        groups = groups_from_regex([it.path for it in items], group_regex)
        items = [
            LabelledRegion(it.path, it.label, it.x, it.y, it.level, it.size_px, g)
            for it, g in zip(items, groups, strict=True)
        ]
    return items


def annotation_labelled(
    run_dir: str | Path,
    mpp: float | None = None,
    classes: Sequence[str] | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[list[LabelledRegion], float]:
    """Labelled tiles of a run tiled with annotations, grouped by slide, and the grid's mpp.

    mpp: which grid (None = the finest). classes: keep only these class names (None = all).
    Slides whose store has no `annotation_class` (tiled without --annotations) are skipped.
    """
    from wsi_pipe.core.layout import RunLayout
    from wsi_pipe.core.manifest import load_slide_table, resolve_slide_path
    from wsi_pipe.store import open_store, schema

    layout = RunLayout(run_dir)
    grids = layout.tile_mpps()
    if not grids:
        raise EmptyInputError(
            f"{layout.root} has no tiles: run `wsi-pipe tile --annotations DIR` there first"
        )
    if mpp is None:
        mpp = grids[0]
    match = [m for m in grids if math.isclose(m, mpp, rel_tol=1e-6)]
    if not match:
        raise ConfigError(
            f"mpp {mpp:g} is not a grid of {layout.root} (it has "
            f"{', '.join(f'{m:g}' for m in grids)}): pick one with --mpp"
        )
    mpp = match[0]
    items: list[LabelledRegion] = []
    unlabelled = []
    for e in load_slide_table(layout.slides_table):
        store = layout.find_coords_store(e.slide_id, mpp)
        if store is None:
            unlabelled.append(e.slide_id)
            continue
        with open_store(store) as r:
            if schema.ANNOTATION_CLASS not in r.names:
                unlabelled.append(e.slide_id)
                continue
            names = list(r.array_attrs(schema.ANNOTATION_CLASS)[schema.CLASS_NAMES])
            cls = r.read(schema.ANNOTATION_CLASS)
            coords = r.read(schema.COORDS)
            a = r.attrs
        grid = schema.GridAttrs.from_attrs(a, str(store))
        path = resolve_slide_path(
            e.slide_id, e.path, grid.slide_path, fix="put it back or fix the run's slide table"
        )
        level, size = grid.read_level, grid.read_size_px
        for i in np.flatnonzero(cls >= 0):
            name = names[int(cls[i])]
            if classes is None or name in classes:
                x, y = int(coords[i, 0]), int(coords[i, 1])
                items.append(LabelledRegion(path, name, x, y, level, size, e.slide_id))
    if unlabelled:
        log.warning(
            "%d slide(s) of %s have no annotation labels at mpp %g (tiled without "
            "--annotations, or not tiled): %s",
            len(unlabelled), layout.root, mpp, ", ".join(unlabelled[:10]),
        )  # fmt: skip
    if not items:
        raise EmptyInputError(
            f"no annotated tiles in {layout.root} at mpp {mpp:g}"
            + (f" of classes {list(classes)}" if classes else "")
            + ": tile the slides with `wsi-pipe tile --annotations DIR` (label mode)"
        )
    if max_per_class is not None:
        rng = np.random.default_rng(seed)
        labels = np.array([it.label for it in items])
        keep: list[int] = []
        for c in sorted(set(labels.tolist())):
            idx = np.flatnonzero(labels == c)
            keep += sorted(rng.choice(idx, size=min(max_per_class, len(idx)), replace=False))
        items = [items[i] for i in sorted(keep)]
    check_classes([it.label for it in items], f"annotation labels of {layout.root}")
    return items, float(mpp)


def read_region_rgb(item: LabelledRegion, out_px: int, readers: dict[str, Any]) -> np.ndarray:
    """The example's pixels as (out_px, out_px, 3) uint8 RGB. `readers` caches slide handles."""
    if item.is_slide_region:
        from wsi_pipe.readers import open_slide

        r = readers.get(item.path)
        if r is None:
            try:
                r = open_slide(item.path)
            except MissingMppError:
                # the region is given in px, so the physical scale is not needed here
                r = open_slide(item.path, mpp_override=1.0)
            readers[item.path] = r
        assert item.x is not None and item.y is not None  # is_slide_region: all four are set
        assert item.level is not None and item.size_px is not None
        region = np.asarray(
            r.read_region((item.x, item.y), item.level, (item.size_px, item.size_px))
        )
    else:
        region = read_rgb(item.path)
    return np.ascontiguousarray(resize_tile(np.ascontiguousarray(region[..., :3]), out_px))


class RegionDataset(Dataset):
    """`ds[i] -> (tile (3, px, px) uint8, class index)`; each worker opens its own slides."""

    def __init__(self, items: list[LabelledRegion], targets: list[int], out_px: int) -> None:
        self.items, self.targets, self.out_px = items, targets, out_px
        self._readers: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        tile = read_region_rgb(self.items[i], self.out_px, self._readers)
        return torch.from_numpy(tile).permute(2, 0, 1).contiguous(), int(self.targets[i])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": {}}


class ArrayTiles(Dataset):
    """In-memory tiles: `ds[i] -> (tile (3, px, px) uint8, class index)` from (n, px, px, 3) uint8."""

    def __init__(self, tiles_u8: np.ndarray, targets: Sequence[int]) -> None:
        self.tiles = torch.from_numpy(np.ascontiguousarray(tiles_u8)).permute(0, 3, 1, 2)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.tiles[i], int(self.targets[i])


def stratified_split(
    targets: list[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices (train, val): per class round(val_fraction * n) held out, at least one each."""
    rng = np.random.default_rng(seed)
    y = np.asarray(targets)
    train, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < 2:
            raise ConfigError(
                f"class {int(c)} has {len(idx)} example(s): a held-out split needs at least 2 per class"
            )
        k = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def three_way_split(
    targets: Sequence[int],
    groups: Sequence[str] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[list[int], list[int], list[int]]:
    """Indices (train, val, test). Grouped (whole groups per side) when `groups` is given, else
    stratified per class. `test_fraction` 0 gives an empty test split."""
    from wsi_pipe.mil.splits import check_groups_disjoint, grouped_holdout

    if val_fraction + test_fraction >= 0.9:
        raise ConfigError(
            f"val_fraction {val_fraction} + test_fraction {test_fraction} leave (almost) nothing "
            "to train on: keep their sum below 0.9"
        )
    idx = np.arange(len(targets))
    y = np.asarray(targets)
    if groups is None:
        if test_fraction > 0:
            rest, test = stratified_split(y.tolist(), test_fraction, seed)
        else:
            rest, test = idx.tolist(), []
        tr, va = stratified_split(y[rest].tolist(), val_fraction / (1 - test_fraction), seed + 1)
        return sorted(rest[i] for i in tr), sorted(rest[i] for i in va), sorted(test)
    g = list(groups)
    rest_rows: np.ndarray
    test_rows: np.ndarray
    if test_fraction > 0:
        rest_rows, test_rows = grouped_holdout(y.tolist(), g, test_fraction, seed)
    else:
        rest_rows, test_rows = idx, np.array([], dtype=np.int64)
    tr_rows, va_rows = grouped_holdout(
        y[rest_rows].tolist(),
        [g[i] for i in rest_rows],
        val_fraction / (1 - test_fraction),
        seed + 1,
    )
    train, val = rest_rows[tr_rows].tolist(), rest_rows[va_rows].tolist()
    check_groups_disjoint(g, train, val, test_rows.tolist())
    return sorted(train), sorted(val), sorted(test_rows.tolist())


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """accuracy, balanced accuracy and macro-F1 over the classes present in `y_true` (a class
    that has no example cannot be scored), per-class recall, confusion matrix (rows = true)."""
    from sklearn.metrics import confusion_matrix, f1_score

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    labels = list(range(n_classes))
    if len(y_true) == 0:
        nan = float("nan")
        return {"accuracy": nan, "balanced_accuracy": nan, "macro_f1": nan, "per_class_recall": {},
                "confusion_matrix": [], "n": 0}  # fmt: skip
    present = np.unique(y_true)
    recall = {int(c): float(np.mean(y_pred[y_true == c] == c)) for c in present}
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": float(np.mean(list(recall.values()))),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present.tolist(), average="macro", zero_division=0)
        ),
        "per_class_recall": recall,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def _loader(ds: Dataset, cfg: FinetuneConfig, shuffle: bool, seed: int) -> DataLoader:
    return make_loader(
        ds, batch_size=cfg.batch_size, workers=cfg.workers, seed=seed, shuffle=shuffle
    )


def prepare(tiles_u8: torch.Tensor, spec: Any, device: torch.device) -> torch.Tensor:
    """uint8 tiles (B, 3, H, W) -> normalised float input on `device` (`torchutil.preprocess`,
    the one preprocessing of training and inference, with the spec's mean/std)."""
    return preprocess(tiles_u8, spec.mean, spec.std, device)


@torch.no_grad()
def embed_dataset(
    encoder: nn.Module, ds: Dataset, spec: Any, device: torch.device, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (n, embed_dim) float32 CPU, targets (n,)) of a frozen encoder, in eval mode."""
    encoder.eval()
    feats, ys = [], []
    for tiles, y in make_loader(ds, batch_size=batch_size, workers=0, seed=0):
        feats.append(encoder(prepare(tiles, spec, device)).float().cpu())
        ys.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(ys)


@torch.no_grad()
def predict_proba(
    clf: nn.Module, ds: Dataset, spec: Any, device: torch.device, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(targets (n,), class probabilities (n, n_classes)) of a classifier in eval mode."""
    clf.eval()
    ys, probs = [], []
    for tiles, y in make_loader(ds, batch_size=batch_size, workers=0, seed=0):
        probs.append(torch.softmax(clf(prepare(tiles, spec, device)).float(), 1).cpu())
        ys.append(torch.as_tensor(y))
    return torch.cat(ys).numpy(), torch.cat(probs).numpy()


def class_weights(targets: Sequence[int], n_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (n_classes,) float32; absent classes get the weight of one."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=n_classes)
    return torch.tensor(len(targets) / (n_classes * np.maximum(counts, 1)), dtype=torch.float32)


def fit_classifier(
    encoder: nn.Module,
    spec: Any,
    n_classes: int,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: FinetuneConfig,
    device: torch.device,
    progress: bool = False,
    feature_cache: dict[str, torch.Tensor | None] | None = None,
) -> tuple[EncoderClassifier, int, list[dict[str, Any]]]:
    """Train a linear head (frozen backbone) or the whole network (`cfg.train_backbone`).

    With `val_ds` the epoch with the best validation balanced accuracy is kept (ties: the later
    epoch); without it the last epoch is kept (a fixed schedule, no model selection).
    Returns (classifier on `device`, kept epoch, per-epoch history). With a frozen backbone,
    `feature_cache` (a dict) receives the "train" and "val" embeddings, so that callers can score
    the head without running the encoder again.
    """
    from tqdm.auto import trange

    targets = [int(train_ds[i][1]) for i in range(len(cast(Sized, train_ds)))]
    class_w = class_weights(targets, n_classes)
    clf = EncoderClassifier(encoder, n_classes, spec.embed_dim).to(device)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def keep(epoch: int, m: dict[str, Any] | None, module: nn.Module) -> None:
        nonlocal best
        score = m["balanced_accuracy"] if m is not None else float(epoch)
        if best is None or score >= best[0]:
            best = (
                score,
                epoch,
                {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
            )

    if not cfg.train_backbone:
        encoder.requires_grad_(False)
        f_tr, y_tr = embed_dataset(encoder, train_ds, spec, device, cfg.batch_size)
        f_va, y_va = (
            embed_dataset(encoder, val_ds, spec, device, cfg.batch_size) if val_ds else (None, None)
        )
        if feature_cache is not None:
            feature_cache.update(train=f_tr, val=f_va)
        head = clf.head.cpu()
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(cfg.seed)
        for epoch in trange(cfg.epochs, disable=not progress, desc="finetune (linear probe)"):
            head.train()
            perm = torch.randperm(len(f_tr), generator=gen)
            for s in range(0, len(perm), cfg.batch_size):
                b = perm[s : s + cfg.batch_size]
                loss = F.cross_entropy(head(f_tr[b]), y_tr[b], weight=class_w)
                opt.zero_grad()
                loss.backward()
                opt.step()
            m = None
            if f_va is not None and y_va is not None:
                head.eval()
                with torch.no_grad():
                    m = classification_metrics(
                        y_va.numpy(), head(f_va).argmax(1).numpy(), n_classes
                    )
            history.append({"epoch": epoch + 1, "loss": float(loss.item()), **(m or {})})
            keep(epoch + 1, m, head)
        assert best is not None
        head.load_state_dict(best[2])
        clf.head = head.to(device)
        encoder.requires_grad_(True)
        return clf, best[1], history

    opt = torch.optim.AdamW(
        [
            {"params": clf.encoder.parameters(), "lr": cfg.backbone_lr},
            {"params": clf.head.parameters(), "lr": cfg.lr},
        ],
        weight_decay=0.05,
    )
    train_loader = _loader(train_ds, cfg, True, cfg.seed)
    total = cfg.epochs * max(1, len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    class_w = class_w.to(device)
    for epoch in trange(cfg.epochs, disable=not progress, desc="finetune"):
        clf.train()
        for tiles, y in train_loader:
            x = preprocess(augment_batch(tiles, generator=aug_gen), spec.mean, spec.std, device)
            loss = F.cross_entropy(clf(x), y.to(device), weight=class_w)
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            opt.step()
            sched.step()
        m = None
        if val_ds is not None:
            yv, pv = predict_proba(clf, val_ds, spec, device, cfg.batch_size)
            m = classification_metrics(yv, pv.argmax(1), n_classes)
        history.append({"epoch": epoch + 1, "loss": float(loss.item()), **(m or {})})
        keep(epoch + 1, m, clf)
    assert best is not None
    clf.load_state_dict(best[2])
    return clf, best[1], history


def _scored_test(
    y: np.ndarray, prob: np.ndarray, train_classes: set[int], n_classes: int
) -> dict[str, Any]:
    """Test metrics over the examples whose class the training split holds (others counted)."""
    keep = np.array([int(c) in train_classes for c in y], dtype=bool)
    m = classification_metrics(y[keep], prob[keep].argmax(1), n_classes)
    m["n_excluded_class_not_in_train"] = int((~keep).sum())
    return m


def finetune(
    encoder_path: str | Path,
    labels: str | Path,
    out_path: str | Path,
    cfg: FinetuneConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `encoder_path` (an ssmamba.pt checkpoint or a registered name) on `labels`
    (an ImageFolder directory or a labels CSV, see the module doc).

    Returns the metrics dict: `test` (never used for selection), `val` (selection), `train`,
    classes, best epoch, split sizes and groups, paths.
    """
    items = read_labelled(labels, cfg.group_regex)
    return _finetune_items(
        encoder_path, items, {"labels": str(Path(labels).resolve())}, out_path, cfg, progress
    )


def finetune_from_annotations(
    encoder_path: str | Path,
    run_dir: str | Path,
    out_path: str | Path,
    cfg: FinetuneConfig,
    mpp: float | None = None,
    classes: Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune on the tiles of a run labelled by their stored annotation class (grid `mpp`,
    None = the finest), grouped by slide: train/val/test keep each slide on one side."""
    items, grid = annotation_labelled(run_dir, mpp, classes, cfg.max_tiles_per_class, cfg.seed)
    source = {"annotations_of_run": str(Path(run_dir).resolve()), "mpp": grid}
    return _finetune_items(encoder_path, items, source, out_path, cfg, progress)


def _finetune_items(
    encoder_path: str | Path,
    items: list[LabelledRegion],
    source: dict[str, Any],
    out_path: str | Path,
    cfg: FinetuneConfig,
    progress: bool,
) -> dict[str, Any]:
    """Split `items`, train, score, save (see `finetune`); `source` goes into the provenance."""
    t0 = time.time()
    out_path = Path(out_path)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder, spec = load_encoder(encoder_path, device="cpu", scan_backend=cfg.scan_backend)
    base_hash = spec.weights_hash
    encoder = encoder.to(device)
    px = cfg.input_px or spec.input_px

    classes = sorted({it.label for it in items})
    targets = [classes.index(it.label) for it in items]
    groups = [it.group for it in items]
    grouped = all(g is not None for g in groups)
    split_groups = [str(g) for g in groups] if grouped else None
    tr, va, te = three_way_split(
        targets, split_groups, cfg.val_fraction, cfg.test_fraction, cfg.seed
    )
    if not te:
        log.warning("test_fraction is 0: no test split; the validation metrics are optimistic")
    n_classes = len(classes)

    def ds(idx: list[int]) -> RegionDataset:
        return RegionDataset([items[i] for i in idx], [targets[i] for i in idx], px)

    log.info(
        "fine-tuning %s on %d regions (%d train / %d val / %d test%s), classes %s, %s backbone, %d px",
        spec.name, len(items), len(tr), len(va), len(te),
        f", grouped by {len(set(groups))} groups" if grouped else "", classes,
        "training the" if cfg.train_backbone else "frozen", px,
    )  # fmt: skip
    cache: dict[str, torch.Tensor | None] = {}
    clf, best_epoch, history = fit_classifier(
        encoder, spec, n_classes, ds(tr), ds(va), cfg, device, progress, cache
    )
    train_classes = {targets[i] for i in tr}
    results: dict[str, Any] = {}
    for name, idx in (("train", tr), ("val", va), ("test", te)):
        if not idx:
            results[name] = classification_metrics(np.array([]), np.array([]), n_classes)
            continue
        feats = cache.get(name)
        if feats is not None:  # frozen backbone: score the head on the cached embeddings
            with torch.no_grad():
                prob = torch.softmax(clf.head(feats.to(device)).float(), 1).cpu().numpy()
            y = np.asarray([targets[i] for i in idx])
        else:
            y, prob = predict_proba(clf, ds(idx), spec, device, cfg.batch_size)
        results[name] = _scored_test(y, prob, train_classes, n_classes)

    split_info = {
        "n_train": len(tr), "n_val": len(va), "n_test": len(te), "grouped": grouped,
        "groups": {k: sorted({str(groups[i]) for i in idx}) for k, idx in
                   (("train", tr), ("val", va), ("test", te))} if grouped else None,
    }  # fmt: skip
    provenance = {
        "stage": "finetune",
        "base_encoder": str(encoder_path),
        "base_weights_hash": base_hash,
        "data": {**source, "n": len(items), **split_info,
                 "classes": classes},
        "steps": cfg.epochs,
        "loss": history[-1]["loss"],
        "best_epoch": best_epoch,
        "metrics": {k: results["test" if te else "val"][k]
                    for k in ("accuracy", "balanced_accuracy", "macro_f1")},
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
    }  # fmt: skip
    digest = save_encoder(clf.encoder, out_path, provenance, head=clf.head, classes=classes)
    metrics_path = out_path.with_name(out_path.stem + ".metrics.json")
    result = {
        "out_path": str(out_path),
        "metrics_path": str(metrics_path),
        "content_hash": digest,
        "classes": classes,
        "best_epoch": best_epoch,
        "test": results["test"],
        "val": results["val"],
        "train": results["train"],
        "split": split_info,
        "history": history,
        "train_backbone": cfg.train_backbone,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(metrics_path, result)
    rep = results["test" if te else "val"]
    log.info(
        "fine-tuning done: %s accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f -> %s",
        "test" if te else "validation (no test split)",
        rep["accuracy"], rep["balanced_accuracy"], rep["macro_f1"], out_path,
    )  # fmt: skip
    return result
