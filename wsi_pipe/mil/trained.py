"""A trained MIL run (`wsi-pipe train-mil` output) loaded for inference: its fold models and
their ensemble. Used by `predict`, `heatmap`, the report and any stage that applies a trained
slide classifier, so none of them reaches into another stage's module."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipe.core.errors import CheckpointError
from wsi_pipe.core.fsutil import read_json
from wsi_pipe.core.layout import MilRunPaths
from wsi_pipe.mil.data import Bag
from wsi_pipe.mil.train import MilModel, load_checkpoint, predict_bags


@dataclass
class TrainedMil:
    """A trained MIL run folder: its description and fold models."""

    model_dir: Path
    info: dict[str, Any]
    models: list[MilModel]

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])


def load_trained(model_dir: str | Path, device: str | torch.device = "cpu") -> TrainedMil:
    """Load `model.json` and every `fold_*/model.pt` of a train-mil output folder."""
    paths = MilRunPaths(model_dir)
    model_dir = paths.root
    info_path = paths.model_json
    if not info_path.exists():
        raise CheckpointError(
            f"{model_dir} is not a train-mil output (no {info_path.name}): give --model "
            "the folder `wsi-pipe train-mil` wrote under RUN_DIR/mil/"
        )
    info = read_json(info_path)
    ckpts = paths.fold_models()
    if not ckpts:
        raise CheckpointError(f"{model_dir} holds no fold_*/model.pt: training did not finish")
    models = [load_checkpoint(p, device)[0] for p in ckpts]
    return TrainedMil(model_dir, info, models)


def ensemble_predict(
    trained: TrainedMil, bags: Sequence[Bag], device: torch.device, with_attention: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean class probabilities (n_bags, n_classes) over the fold models; mean attention per bag."""
    probs, atts = [], []
    for m in trained.models:
        p, a = predict_bags(m, bags, device, with_attention)
        probs.append(p)
        atts.append(a)
    mean_att = (
        [np.mean([a[i] for a in atts], axis=0) for i in range(len(bags))] if with_attention else []
    )
    return np.mean(probs, axis=0), mean_att
