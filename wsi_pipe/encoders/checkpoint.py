"""`ssmamba.pt`: one self-describing encoder checkpoint file, and loading of local weights.

A checkpoint is one `torch.save` dict (loadable with `weights_only=True`):

    format          "wsi-pipe-encoder"          format_version  1
    arch            registry name, e.g. "ssmamba_s"
    arch_kwargs     architecture options passed to the factory (JSON types)
    state_dict      encoder weights (CPU tensors)
    spec            EncoderSpec as a dict (input px, target mpp, mean/std, embed dim)
    embed_dim       size of the pooled embedding
    provenance      how it was made: stage, data, steps, final loss, config, time, versions
    head            None, or {"state_dict", "classes", "in_dim"} of a fine-tuned classifier
    content_hash    sha256 of every tensor of state_dict and head (names, dtypes, shapes, bytes)

The hash makes a corrupted or edited file fail loudly and names the weights in feature stores.
The selective-scan backend is not part of the file: the same weights run on any backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wsi_pipe.core.errors import CheckpointError
from wsi_pipe.core.fsutil import atomic_path
from wsi_pipe.encoders.registry import EncoderSpec, create_encoder, get_encoder_spec, list_encoders
from wsi_pipe.nn.mamba import set_scan_backend

log = logging.getLogger(__name__)

FORMAT = "wsi-pipe-encoder"
FORMAT_VERSION = 1
#: classifier entries of torchvision / timm state dicts, dropped when loading an encoder
_HEAD_PREFIXES = ("fc.", "head.")


def state_dict_hash(state: Mapping[str, torch.Tensor], prefix: str = "", h: Any = None) -> str:
    """sha256 hex digest over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256() if h is None else h
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{prefix}{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _content_hash(state: Mapping[str, torch.Tensor], head: Mapping[str, Any] | None) -> str:
    h = hashlib.sha256()
    state_dict_hash(state, "", h)
    if head is not None:
        state_dict_hash(head["state_dict"], "head.", h)
        h.update(json.dumps(list(head["classes"])).encode())
    return h.hexdigest()


def _brief(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    detail = [ln for ln in lines if "error" in ln.lower()]
    return (detail[-1] if detail else lines[0] if lines else "")[:200]


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class EncoderClassifier(nn.Module):
    """An encoder with a linear head: (B, 3, H, W) -> logits (B, n_classes)."""

    def __init__(self, encoder: nn.Module, n_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(embed_dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def save_encoder(
    model: nn.Module,
    path: str | Path,
    provenance: Mapping[str, Any] | None = None,
    head: nn.Linear | None = None,
    classes: list[str] | None = None,
) -> str:
    """Write `model` (built by `create_encoder`) to one checkpoint file, atomically.

    head/classes: a fine-tuned linear classifier and its class names (stored beside the encoder).
    Returns the content hash (sha256 hex).
    """
    arch = getattr(model, "arch", None)
    if arch is None:
        raise CheckpointError(
            "save_encoder needs a model built by create_encoder (it has no .arch)"
        )
    spec: EncoderSpec = model.spec
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    head_d = None
    if head is not None:
        if not classes or len(classes) != head.out_features:
            raise ValueError(
                f"classes {classes} do not match a head with {head.out_features} outputs"
            )
        head_d = {
            "state_dict": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
            "classes": [str(c) for c in classes],
            "in_dim": int(head.in_features),
        }
    prov = {
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": str(torch.__version__),
        **_jsonable(dict(provenance or {})),
    }
    digest = _content_hash(state, head_d)
    obj = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": _jsonable(getattr(model, "arch_kwargs", {})),
        "state_dict": state,
        "spec": replace(spec, weights_hash=None).to_dict(),
        "embed_dim": int(spec.embed_dim),
        "provenance": prov,
        "head": head_d,
        "content_hash": digest,
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    log.info("saved %s encoder to %s (hash %s)", arch, path, digest[:16])
    return digest


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and verify a checkpoint file (on CPU). CheckpointError names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"encoder checkpoint {path} does not exist: give the file written by "
            "`wsi-pipe pretrain` / `wsi-pipe finetune`"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path} is not a readable wsi-pipe encoder checkpoint ({type(e).__name__}: "
            f"{_brief(e)}); the file is truncated, corrupt or of another kind: re-copy it or "
            "re-run `wsi-pipe pretrain`"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        hint = ""
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            hint = (
                "; it looks like a bare state dict: load it with "
                "load_encoder(<architecture name>, weights=FILE)"
            )
        raise CheckpointError(f"{path} is not a wsi-pipe encoder checkpoint{hint}")
    if int(obj.get("format_version", -1)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {obj.get('format_version')}, newer than this "
            f"wsi-pipe reads ({FORMAT_VERSION}): upgrade wsi-pipe"
        )
    missing = [k for k in ("arch", "state_dict", "spec", "content_hash") if k not in obj]
    if missing:
        raise CheckpointError(
            f"{path} lacks {missing}: it is incomplete; re-run the stage that wrote it"
        )
    digest = _content_hash(obj["state_dict"], obj.get("head"))
    if digest != obj["content_hash"]:
        raise CheckpointError(
            f"{path}: weights do not match the stored content hash ({digest[:16]} != "
            f"{str(obj['content_hash'])[:16]}); the file was modified or corrupted: re-copy it"
        )
    return obj


def checkpoint_hash(path: str | Path, n_hex: int = 16) -> str:
    """The verified content hash of a checkpoint file (first `n_hex` hex digits)."""
    return str(read_checkpoint(path)["content_hash"])[:n_hex]


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"weights file {path} cannot be read ({type(e).__name__}); it is truncated or not a "
            "torch state dict: give a local .pt/.pth state dict"
        ) from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return read_checkpoint(path)["state_dict"]
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _build(arch: str, arch_kwargs: dict[str, Any], scan_backend: str, where: str) -> nn.Module:
    if arch not in list_encoders():
        raise CheckpointError(
            f"{where} was written for architecture {arch!r}, which this wsi-pipe does not have "
            f"(known: {', '.join(list_encoders())}): upgrade wsi-pipe"
        )
    return create_encoder(arch, scan_backend=scan_backend, **arch_kwargs)


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    own = model.state_dict()
    state = {
        k: v
        for k, v in state.items()
        if k in own or not any(k.startswith(p) for p in _HEAD_PREFIXES)
    }
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{where} does not fit architecture {getattr(model, 'arch', '?')}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}), {len(bad_shape)} of another shape (e.g. {bad_shape[:3]})"
        )
    model.load_state_dict(state, strict=True)


def load_encoder(
    path_or_name: str | Path,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    scan_backend: str = "auto",
) -> tuple[nn.Module, EncoderSpec]:
    """An encoder in eval mode on `device`, and its spec (with `weights_hash` set).

    path_or_name: a checkpoint file written by `save_encoder` (`ssmamba.pt`), or a registered
    architecture name (random weights unless `weights` names a local state-dict file, e.g. a
    torchvision ResNet-50 or timm ViT-S/16 file). The file is read on CPU and moved to `device`,
    whichever device trained it; `scan_backend` is chosen freely (the weights are the same).
    """
    src = str(path_or_name)
    if src in list_encoders() and not Path(src).is_file():
        model = create_encoder(src, scan_backend=scan_backend)
        spec = get_encoder_spec(src)
        if weights is not None:
            wpath = Path(weights)
            if not wpath.is_file():
                raise CheckpointError(f"weights file {wpath} for encoder {src!r} does not exist")
            state = _load_weights_file(wpath)
            _load_state(model, state, f"weights file {wpath}")
            spec = replace(spec, weights_hash=state_dict_hash(model.state_dict())[:16])
    else:
        if weights is not None:
            raise CheckpointError(
                f"{src} is a checkpoint file already; weights= is for an architecture name"
            )
        ckpt = read_checkpoint(src)
        model = _build(ckpt["arch"], dict(ckpt.get("arch_kwargs") or {}), scan_backend, src)
        _load_state(model, ckpt["state_dict"], src)
        spec = replace(EncoderSpec.from_dict(ckpt["spec"]), weights_hash=ckpt["content_hash"][:16])
    model.spec = spec
    set_scan_backend(model, scan_backend)
    return model.eval().to(device), spec


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu", scan_backend: str = "auto"
) -> tuple[EncoderClassifier, list[str], EncoderSpec]:
    """A fine-tuned checkpoint as encoder + linear head (eval mode), its class names and spec."""
    ckpt = read_checkpoint(path)
    head = ckpt.get("head")
    if not head:
        raise CheckpointError(
            f"{path} has no classifier head: it is not the output of `wsi-pipe finetune`"
        )
    encoder, spec = load_encoder(path, device="cpu", scan_backend=scan_backend)
    clf = EncoderClassifier(encoder, len(head["classes"]), int(head["in_dim"]))
    clf.head.load_state_dict(head["state_dict"])
    return clf.eval().to(device), list(head["classes"]), spec


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance dict of a checkpoint (data, steps, loss, config...)."""
    return dict(read_checkpoint(path).get("provenance") or {})
