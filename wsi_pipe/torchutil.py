"""The one home of torch runtime choices shared by stages: which device to run on.

Every stage that touches torch (pretrain, finetune, extract, train-mil, predict, heatmap,
anomaly) resolves `--device` here, so the same word means the same device everywhere and a
missing GPU gives the same error naming the fix.
"""

from __future__ import annotations

import torch

from wsi_pipe.core.errors import ConfigError


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when torch sees a GPU, else cpu; 'cpu', 'cuda', 'cuda:N' as given.

    Raises ConfigError when a CUDA device is asked for and torch sees none.
    """
    text = str(device)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {text} was asked for but torch sees no CUDA GPU: use --device cpu or auto"
        )
    try:
        return torch.device(text)
    except RuntimeError:
        raise ConfigError(
            f"--device {text!r} is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
