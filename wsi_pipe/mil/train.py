"""Fit / evaluate loop for one MIL model on bags (one bag per step), checkpoints.

`MilModel` wraps an aggregator with per-feature standardisation (identity unless fitted on the
training bags), so a checkpoint carries everything needed to predict on raw features.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wsi_pipe.core.errors import CheckpointError
from wsi_pipe.core.fsutil import atomic_path
from wsi_pipe.mil.data import Bag
from wsi_pipe.mil.registry import Aggregator, MilOutput, create_aggregator

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "wsi-pipe-mil"
CHECKPOINT_VERSION = 1


class MilModel(nn.Module):
    """Standardise features ((x - mean) / std, per feature), then aggregate one bag."""

    feat_mean: torch.Tensor  # (in_dim,) buffers, saved with the weights
    feat_std: torch.Tensor

    def __init__(self, aggregator: Aggregator) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.register_buffer("feat_mean", torch.zeros(aggregator.in_dim))
        self.register_buffer("feat_std", torch.ones(aggregator.in_dim))

    def set_standardization(self, mean: np.ndarray, std: np.ndarray) -> None:
        """mean, std: (in_dim,) from the training bags; std below 1e-6 is treated as 1."""
        std = np.where(std < 1e-6, 1.0, std)
        self.feat_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feat_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor | None = None, step_l0: float | None = None
    ) -> MilOutput:
        """x: (n_tiles, in_dim) raw features; coords: (n_tiles, 2) int64 level-0 px or None;
        step_l0: the bag's stored grid stride in level-0 px or None."""
        return self.aggregator((x - self.feat_mean) / self.feat_std, coords, step_l0)


def feature_stats(bags: Sequence[Bag]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float64, (dim,)) over every instance of `bags`."""
    s = s2 = None
    n = 0
    for b in bags:
        x, _ = b.load()
        x = x.astype(np.float64)
        s = x.sum(0) if s is None else s + x.sum(0)
        s2 = (x * x).sum(0) if s2 is None else s2 + (x * x).sum(0)
        n += len(x)
    assert s is not None and s2 is not None
    mean = s / n
    return mean, np.sqrt(np.maximum(s2 / n - mean * mean, 0.0))


@dataclass(frozen=True)
class TrainParams:
    """Optimisation settings of `fit` (lr, weight decay: Adam; max_bag_train: tiles sampled per
    training bag, None = whole bags; patience in epochs without a better validation score;
    monitor: the validation score, "loss" or "loss+error" (Ilse et al.'s criterion))."""

    epochs: int = 50
    patience: int = 10
    lr: float = 2e-4
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_bag_train: int | None = 4096
    class_weighting: bool = True
    grad_clip: float | None = None
    min_epochs: int = 1
    monitor: str = "loss"
    seed: int = 0


@dataclass
class FitResult:
    """Best epoch (by the monitored validation score, or the last without validation), that
    score, and per-epoch history."""

    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """n / (n_classes * n_c) per class (1 for absent classes)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 1.0)
    return torch.as_tensor(w, dtype=torch.float32)


def _to_tensors(
    x: np.ndarray, c: np.ndarray | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    ct = (
        torch.from_numpy(np.ascontiguousarray(c, dtype=np.int64)).to(device)
        if c is not None
        else None
    )
    return xt, ct


def evaluate_loss(
    model: MilModel, bags: Sequence[Bag], device: torch.device, weight: torch.Tensor | None
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over `bags` with full bags, in eval mode."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    losses, correct = [], 0
    with torch.no_grad():
        for b in bags:
            x, c = _to_tensors(*b.load(), device)
            out = model(x, c, b.stride_l0)
            y = torch.tensor([b.label], device=device)
            losses.append(float(loss_fn(out.logits[None], y)))
            correct += int(int(out.logits.argmax()) == b.label)
    return float(np.mean(losses)), correct / max(1, len(bags))


def fit(
    model: MilModel,
    train: Sequence[Bag],
    val: Sequence[Bag],
    params: TrainParams,
    device: torch.device,
) -> FitResult:
    """Train `model` in place (Adam, one bag per step, shuffled each epoch) and leave it at the
    epoch with the lowest validation loss (early stopping with `params.patience`).

    Training bags larger than `max_bag_train` are randomly subsampled each step (rows kept in
    store order); validation uses whole bags.
    """
    if not train:
        raise ValueError("no training bags")
    if params.monitor not in ("loss", "loss+error"):
        raise ValueError(f"monitor must be 'loss' or 'loss+error', got {params.monitor!r}")
    n_classes = model.aggregator.n_classes
    rng = np.random.default_rng(params.seed)
    model.to(device)
    weight = (
        class_weights([b.label for b in train], n_classes).to(device)
        if params.class_weighting
        else None
    )
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.Adam(
        model.parameters(), lr=params.lr, betas=params.betas, weight_decay=params.weight_decay
    )
    best_state: dict[str, torch.Tensor] | None = None
    best_loss, best_epoch, stale = math.inf, -1, 0
    history: list[dict[str, float]] = []
    for epoch in range(params.epochs):
        model.train()
        total = 0.0
        for i in rng.permutation(len(train)):
            b = train[i]
            x, c = b.load()
            if params.max_bag_train is not None and len(x) > params.max_bag_train:
                keep = np.sort(rng.choice(len(x), params.max_bag_train, replace=False))
                x, c = x[keep], (c[keep] if c is not None else None)
            xt, ct = _to_tensors(x, c, device)
            out = model(xt, ct, b.stride_l0)
            loss = loss_fn(out.logits[None], torch.tensor([b.label], device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if params.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), params.grad_clip)
            opt.step()
            total += float(loss.detach())
        rec = {"epoch": epoch, "train_loss": total / len(train)}
        if val:
            vl, va = evaluate_loss(model, val, device, weight)
            rec.update(val_loss=vl, val_acc=va)
            score = vl + (1.0 - va) if params.monitor == "loss+error" else vl
            if score < best_loss - 1e-6 or epoch < params.min_epochs:
                best_loss, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        history.append(rec)
        log.debug("epoch %d %s", epoch, rec)
        if val and stale >= params.patience and epoch + 1 >= params.min_epochs:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = len(history) - 1
    return FitResult(best_epoch, best_loss, history)


@torch.no_grad()
def predict_bags(
    model: MilModel, bags: Sequence[Bag], device: torch.device, with_attention: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n_bags, n_classes) on whole bags; attentions (n_tiles,) per bag when
    `with_attention` (else an empty list)."""
    model.eval()
    model.to(device)
    probs, atts = [], []
    for b in bags:
        x, c = _to_tensors(*b.load(), device)
        out = model(x, c, b.stride_l0)
        probs.append(torch.softmax(out.logits.float(), -1).cpu().numpy())
        if with_attention:
            atts.append(out.attention.float().cpu().numpy())
    return np.stack(probs) if probs else np.zeros((0, model.aggregator.n_classes)), atts


def save_checkpoint(path: str | Path, model: MilModel, meta: dict[str, Any] | None = None) -> None:
    """Write model + what rebuilds it (method, in_dim, n_classes, options) + `meta`, atomically."""
    agg = model.aggregator
    blob = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "method": agg.name,
        "in_dim": agg.in_dim,
        "n_classes": agg.n_classes,
        "init_kwargs": dict(agg.init_kwargs),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[MilModel, dict[str, Any]]:
    """Rebuild a MilModel saved by `save_checkpoint`; returns (model in eval mode, meta)."""
    path = Path(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist: train a model first") from None
    except Exception as e:  # truncated or foreign file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a wsi-pipe MIL checkpoint")
    if int(blob.get("version", -1)) != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {blob.get('version')}, expected {CHECKPOINT_VERSION}"
        )
    agg = create_aggregator(
        blob["method"], blob["in_dim"], blob["n_classes"], **blob["init_kwargs"]
    )
    model = MilModel(agg)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit the {blob['method']} model ({e})"
        ) from None
    model.to(device).eval()
    return model, blob["meta"]
