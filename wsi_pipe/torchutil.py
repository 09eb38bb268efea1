"""The one home of torch runtime choices shared by the stages.

* `resolve_device`: every stage that touches torch (pretrain, finetune, extract, train-mil,
  predict, heatmap, anomaly) resolves `--device` here, so the same word means the same device
  everywhere and a missing GPU gives the same error naming the fix.
* `autocast` (`--precision fp32|bf16|fp16`) and `torch_threads` (intra-op threads, restored).
* `worker_context` and `make_loader`: the one DataLoader set-up (one multiprocessing context,
  persistent workers, a seeded generator of its own) of pretrain, finetune and extract.
* `preprocess`: the one model-input preprocessing, tiles -> (x / 255 - mean) / std with the
  encoder spec's mean / std, for training (after augmentation) and inference alike, so the two
  cannot drift apart.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for `precision` "bf16" / "fp16" on `device`; "fp32" runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads in this process (None = leave as is)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------ DataLoaders
def worker_context() -> mp.context.BaseContext:
    """Multiprocessing context of every DataLoader's workers: a forkserver that has imported the
    tile datasets and the readers.

    Plain fork copies the caller's state: a live OpenCV or OpenMP thread pool (any earlier cv2
    call, e.g. the tile stage in the same process) deadlocks the child, and zarr/fsspec event-loop
    threads do not survive a fork. Spawn is safe but imports torch in every worker of every slide.
    A forkserver is started once per process, clean, with torch, cv2 and the readers imported, so
    each worker is a fast fork of a process that never ran a thread pool.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["wsi_pipe.data.tile_dataset", "wsi_pipe.readers"])
    return ctx


def make_loader(
    dataset: Dataset[Any],
    *,
    batch_size: int | None,
    workers: int,
    seed: int,
    shuffle: bool = False,
    sampler: Sampler[Any] | None = None,
    drop_last: bool = False,
    collate_fn: Callable[[Any], Any] | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent: bool = True,
) -> DataLoader[Any]:
    """The one DataLoader set-up: `workers` processes from `worker_context()` (kept alive across
    passes when `persistent`), and a generator of its own seeded with `seed`, so drawing worker
    seeds and shuffles never touches the global RNG (a resumed run would drift from the original).
    """
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {
            "multiprocessing_context": worker_context(),
            "persistent_workers": persistent,
            "worker_init_fn": worker_init_fn,
        }
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


# ----------------------------------------------------------------------------- preprocessing
def preprocess(
    tiles: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | None = None,
) -> torch.Tensor:
    """Tiles (B, 3, H, W) -> float32 model input (x / 255 - mean) / std, on `device`.

    `tiles` are uint8 RGB (inference, and training without augmentation) or float RGB already on
    the [0, 1] scale (training after augmentation); mean / std are the encoder spec's, on the
    [0, 1] scale. One fused multiply-add per element with the same constants in both cases; the
    batch's (channels-last) strides are kept.
    """
    if device is not None:
        tiles = tiles.to(device, non_blocking=True)
    neg_shift, scale = _norm_constants(
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        tiles.device,
        tiles.dtype == torch.uint8,
    )
    return torch.addcmul(neg_shift, tiles.float(), scale)


@functools.lru_cache(maxsize=64)
def _norm_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device, from_uint8: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # made once per (spec, device): no host-to-device copy (and no sync) per batch
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t) if from_uint8 else 1.0 / std_t
    return (-(mean_t / std_t)).to(device), scale.to(device)
