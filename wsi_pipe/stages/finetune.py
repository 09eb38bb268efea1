"""`wsi-pipe finetune`: supervised fine-tuning of an encoder on labelled ROIs (SSMamba stage 2).

Labels CSV, one of two layouts (paths relative to the CSV's folder or absolute):

    image,label                          ROI image files (PNG/JPEG/TIFF), resized to the input px
    slide,x,y,level,size_px,label        regions of slides: level-0 top-left (x, y), read
                                         size_px x size_px at `level`, resized to the input px

A stratified held-out split (`val_fraction`, seeded) is made per class. With a frozen backbone
(default) the embeddings are computed once and a linear head is trained on them (a linear
probe); with `train_backbone` the whole network trains (backbone at `backbone_lr`, head at
`lr`) with dihedral and stain augmentations. The epoch with the best held-out balanced accuracy
is kept. Accuracy, balanced accuracy and macro-F1 (held-out) go to `<out stem>.metrics.json`;
the backbone + head go to `out_path` (loadable by `load_encoder` and `load_classifier`).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from wsi_pipe.core.config import FinetuneConfig
from wsi_pipe.core.errors import ConfigError, EmptyInputError, MissingMppError, SlideReadError
from wsi_pipe.core.fsutil import atomic_write_json
from wsi_pipe.encoders import EncoderClassifier, load_encoder, save_encoder
from wsi_pipe.encoders.augment import augment_batch, normalize
from wsi_pipe.stages.pretrain import resolve_device
from wsi_pipe.stages.tile_dataset import resize_tile

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "label")
SLIDE_COLUMNS = ("slide", "x", "y", "level", "size_px", "label")


@dataclass(frozen=True)
class LabelledRegion:
    """One labelled example: an image file, or a region of a slide (level-0 px (x, y))."""

    path: str
    label: str
    x: int | None = None
    y: int | None = None
    level: int | None = None
    size_px: int | None = None

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
            f"{','.join(SLIDE_COLUMNS)}"
        )
    out = []
    for i, r in enumerate(rows, start=2):
        r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
        src = r["slide" if kind == "slide" else "image"]
        if not src or not r["label"]:
            raise ConfigError(f"{p} line {i}: empty path or label")
        path = Path(src) if Path(src).is_absolute() else p.parent / src
        if not path.exists():
            raise ConfigError(
                f"{p} line {i}: {path} does not exist (paths are relative to the CSV)"
            )
        if kind == "image":
            out.append(LabelledRegion(str(path), r["label"]))
            continue
        try:
            x, y, level, size = int(r["x"]), int(r["y"]), int(r["level"]), int(r["size_px"])
        except ValueError:
            raise ConfigError(f"{p} line {i}: x, y, level, size_px must be integers") from None
        if size <= 0 or level < 0:
            raise ConfigError(f"{p} line {i}: size_px must be > 0 and level >= 0")
        out.append(LabelledRegion(str(path), r["label"], x, y, level, size))
    if not out:
        raise EmptyInputError(f"labels file {p} has no rows")
    return out


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
        region = np.asarray(
            r.read_region((item.x, item.y), item.level, (item.size_px, item.size_px))
        )
    else:
        img = cv2.imread(item.path, cv2.IMREAD_COLOR)
        if img is None:
            raise SlideReadError(
                f"cannot read image {item.path}: not an image or corrupt; fix or drop it"
            )
        region = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
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


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """accuracy, balanced accuracy, macro-F1 and the confusion matrix (rows = true class)."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    labels = list(range(n_classes))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(len(y_true)),
    }


def _loader(ds: Dataset, cfg: FinetuneConfig, shuffle: bool, seed: int) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context="spawn" if cfg.workers > 0 else None,
        persistent_workers=cfg.workers > 0,
    )


@torch.no_grad()
def _embed_all(encoder: nn.Module, loader: DataLoader, spec: Any, device: torch.device):  # noqa: ANN202
    encoder.eval()
    feats, ys = [], []
    for tiles, y in loader:
        x = normalize(tiles.to(device).float() / 255.0, spec.mean, spec.std)
        feats.append(encoder(x).float().cpu())
        ys.append(y)
    return torch.cat(feats), torch.cat(ys)


def finetune(
    encoder_path: str | Path,
    labels_csv: str | Path,
    out_path: str | Path,
    cfg: FinetuneConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune `encoder_path` (an ssmamba.pt checkpoint or a registered name) on `labels_csv`.

    Returns the metrics dict (held-out `val` and `train` metrics, classes, best epoch, paths).
    """
    t0 = time.time()
    out_path = Path(out_path)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    encoder, spec = load_encoder(encoder_path, device="cpu", scan_backend=cfg.scan_backend)
    base_hash = spec.weights_hash
    encoder = encoder.to(device)
    px = cfg.input_px or spec.input_px

    items = read_labels(labels_csv)
    classes = sorted({it.label for it in items})
    if len(classes) < 2:
        raise ConfigError(f"labels file {labels_csv} has a single class {classes}: need at least 2")
    targets = [classes.index(it.label) for it in items]
    tr, va = stratified_split(targets, cfg.val_fraction, cfg.seed)
    train_ds = RegionDataset([items[i] for i in tr], [targets[i] for i in tr], px)
    val_ds = RegionDataset([items[i] for i in va], [targets[i] for i in va], px)
    counts = np.bincount([targets[i] for i in tr], minlength=len(classes))
    class_w = torch.tensor(len(tr) / (len(classes) * np.maximum(counts, 1)), dtype=torch.float32)
    log.info(
        "fine-tuning %s on %d regions (%d train / %d held out), classes %s, %s backbone, %d px",
        spec.name, len(items), len(tr), len(va), classes,
        "training the" if cfg.train_backbone else "frozen", px,
    )  # fmt: skip

    clf = EncoderClassifier(encoder, len(classes), spec.embed_dim).to(device)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    from tqdm.auto import trange

    if not cfg.train_backbone:
        encoder.requires_grad_(False)
        f_tr, y_tr = _embed_all(encoder, _loader(train_ds, cfg, False, cfg.seed), spec, device)
        f_va, y_va = _embed_all(encoder, _loader(val_ds, cfg, False, cfg.seed), spec, device)
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
            head.eval()
            with torch.no_grad():
                pred = head(f_va).argmax(1).numpy()
            m = classification_metrics(y_va.numpy(), pred, len(classes))
            history.append({"epoch": epoch + 1, "loss": float(loss.item()), **m})
            if best is None or m["balanced_accuracy"] >= best[0]:  # ties: the later epoch
                best = (
                    m["balanced_accuracy"],
                    epoch + 1,
                    {k: v.clone() for k, v in head.state_dict().items()},
                )
        head.load_state_dict(best[2])
        clf.head = head.to(device)
        with torch.no_grad():
            train_pred = head(f_tr).argmax(1).numpy()
            val_pred = head(f_va).argmax(1).numpy()
        train_true, val_true = y_tr.numpy(), y_va.numpy()
    else:
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
        val_loader = _loader(val_ds, cfg, False, cfg.seed)
        for epoch in trange(cfg.epochs, disable=not progress, desc="finetune"):
            clf.train()
            for tiles, y in train_loader:
                x = normalize(
                    augment_batch(tiles, generator=aug_gen).to(device), spec.mean, spec.std
                )
                loss = F.cross_entropy(clf(x), y.to(device), weight=class_w.to(device))
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
                opt.step()
                sched.step()
            val_true, val_pred = _predict(clf, val_loader, spec, device)
            m = classification_metrics(val_true, val_pred, len(classes))
            history.append({"epoch": epoch + 1, "loss": float(loss.item()), **m})
            if best is None or m["balanced_accuracy"] >= best[0]:  # ties: the later epoch
                state = {k: v.detach().cpu().clone() for k, v in clf.state_dict().items()}
                best = (m["balanced_accuracy"], epoch + 1, state)
        clf.load_state_dict(best[2])
        train_true, train_pred = _predict(
            clf, _loader(train_ds, cfg, False, cfg.seed), spec, device
        )
        val_true, val_pred = _predict(clf, val_loader, spec, device)

    val_m = classification_metrics(val_true, val_pred, len(classes))
    train_m = classification_metrics(train_true, train_pred, len(classes))
    provenance = {
        "stage": "finetune",
        "base_encoder": str(encoder_path),
        "base_weights_hash": base_hash,
        "data": {"labels_csv": str(Path(labels_csv).resolve()), "n": len(items), "n_train": len(tr),
                 "n_val": len(va), "classes": classes},
        "steps": cfg.epochs,
        "loss": history[-1]["loss"],
        "best_epoch": best[1],
        "metrics": {k: val_m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")},
        "config": cfg.model_dump(mode="json"),
        "config_hash": cfg.config_hash(),
    }  # fmt: skip
    encoder.requires_grad_(True)
    digest = save_encoder(clf.encoder, out_path, provenance, head=clf.head, classes=classes)
    metrics_path = out_path.with_name(out_path.stem + ".metrics.json")
    result = {
        "out_path": str(out_path),
        "metrics_path": str(metrics_path),
        "content_hash": digest,
        "classes": classes,
        "best_epoch": best[1],
        "val": val_m,
        "train": train_m,
        "history": history,
        "train_backbone": cfg.train_backbone,
        "seconds": round(time.time() - t0, 2),
    }
    atomic_write_json(metrics_path, result)
    log.info(
        "fine-tuning done: held-out accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f -> %s",
        val_m["accuracy"], val_m["balanced_accuracy"], val_m["macro_f1"], out_path,
    )  # fmt: skip
    return result


@torch.no_grad()
def _predict(clf: nn.Module, loader: DataLoader, spec: Any, device: torch.device):  # noqa: ANN202
    clf.eval()
    ys, preds = [], []
    for tiles, y in loader:
        x = normalize(tiles.to(device).float() / 255.0, spec.mean, spec.std)
        preds.append(clf(x).argmax(1).cpu())
        ys.append(y)
    return torch.cat(ys).numpy(), torch.cat(preds).numpy()
