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

Local weights files (`load_encoder(name, weights=FILE)`, never downloaded):
1. read: `.safetensors` with safetensors, anything else with `torch.load(weights_only=True)`;
   a wrapper dict (`state_dict`, `model`, `teacher`, `module`) is unwrapped, a wsi-pipe
   checkpoint gives its verified state dict;
2. fit the names: a key prefix (`module.`, `backbone.`, `model.`, `encoder.`, `trunk.`) is
   removed when the keys under it match the architecture better than the file as is (the other
   keys, e.g. a DINO head, are dropped); classifier `fc.*` / `head.*` entries the encoder lacks
   are dropped;
3. any missing, unexpected or differently shaped tensor is a CheckpointError naming the file,
   counts and examples of each, the registered encoders the file does fit, and the fix;
4. load strictly. Where the family can (timm models), the encoder is built on the meta device
   and the file's tensors are assigned (cast to the model's dtypes): no random initialisation
   of weights that are replaced anyway (a 1.1 B-parameter ViT-g: ~35 s saved per process).
5. `spec.weights_hash`: sha256 of the loaded state dict (names, dtypes, shapes, bytes), so the
   same weights give the same hash whatever container or wrapper held them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from wsi_pipe.core.errors import CheckpointError, ConfigError
from wsi_pipe.core.fsutil import atomic_path
from wsi_pipe.encoders.registry import (
    EncoderSpec,
    can_build_empty,
    create_encoder,
    get_encoder_spec,
    is_known_encoder,
    list_encoders,
)
from wsi_pipe.encoders.source import EncoderSource, resolve_encoder_source
from wsi_pipe.nn.mamba import set_scan_backend

log = logging.getLogger(__name__)

FORMAT = "wsi-pipe-encoder"
FORMAT_VERSION = 1
#: classifier entries of torchvision / timm state dicts, dropped when loading an encoder
_HEAD_PREFIXES = ("fc.", "head.")
#: wrapper dicts around a state dict, and key prefixes of wrapped models (see the docstring)
_WRAPPER_KEYS = ("state_dict", "model", "teacher", "module")
_KEY_PREFIXES = ("module.", "backbone.", "module.backbone.", "model.", "encoder.", "trunk.")


def state_dict_hash(state: Mapping[str, torch.Tensor], prefix: str = "", h: Any = None) -> str:
    """sha256 hex digest over (name, dtype, shape, bytes) of every tensor, in sorted name order."""
    h = hashlib.sha256() if h is None else h
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{prefix}{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of big tensors
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
    spec = getattr(model, "spec", None)
    if not isinstance(spec, EncoderSpec):
        raise CheckpointError(
            "save_encoder needs a model built by create_encoder (its .spec is not an EncoderSpec)"
        )
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
    """The state dict in a local weights file (steps 1 of the module docstring)."""
    obj: Any
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as e:
            raise CheckpointError(
                f"weights file {path} cannot be read as safetensors ({type(e).__name__}: "
                f"{_brief(e)}); it is truncated or of another kind: re-copy it"
            ) from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(
                f"weights file {path} cannot be read ({type(e).__name__}); it is truncated or "
                "not a torch state dict: give a local .pt/.pth/.bin state dict or a "
                ".safetensors file"
            ) from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return dict(read_checkpoint(path)["state_dict"])
    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        inner = next(
            (
                obj[k]
                for k in _WRAPPER_KEYS
                if isinstance(obj, dict) and isinstance(obj.get(k), dict)
            ),
            None,
        )
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"weights file {path} does not hold a state dict of tensors")
    other = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if other:
        raise CheckpointError(
            f"weights file {path} does not hold a state dict of tensors: {len(other)} entries "
            f"are not tensors (e.g. {other[:3]}); give the model's state dict"
        )
    return {str(k): v for k, v in obj.items()}


def _require_arch(arch: str, where: str) -> None:
    if not is_known_encoder(arch):
        raise CheckpointError(
            f"{where} was written for architecture {arch!r}, which this wsi-pipe does not have "
            f"(known: {', '.join(list_encoders())}): upgrade wsi-pipe"
        )


def _fit_names(
    state: Mapping[str, torch.Tensor], own: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], str]:
    """Step 2 of the module docstring: the state dict renamed to fit `own`, and what was done."""

    def score(d: Mapping[str, Any]) -> int:
        return sum(k in own for k in d)

    best, note = dict(state), ""
    for p in _KEY_PREFIXES:
        sub = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
        if sub and score(sub) > score(best):
            dropped = len(state) - len(sub)
            best, note = (
                sub,
                f"prefix {p!r} removed" + (f", {dropped} other keys dropped" if dropped else ""),
            )
    heads = [k for k in best if k not in own and k.startswith(_HEAD_PREFIXES)]
    if heads:
        best = {k: v for k, v in best.items() if k not in heads}
        note += ("; " if note else "") + f"{len(heads)} classifier entries dropped"
    return best, note


def _shape_of(t: Any) -> tuple[int, ...]:
    return tuple(int(n) for n in t.shape)


def _fitting_encoders(state: Mapping[str, torch.Tensor], exclude: str) -> list[str]:
    """Registered encoders (those built without weights on the meta device) the state fits."""
    fits = []
    for name in list_encoders():
        if name == exclude or not can_build_empty(name):
            continue  # a family that cannot be built empty is too slow to try on an error path
        try:
            own = _empty_shapes(name)
        except Exception:
            continue
        fitted, _ = _fit_names(state, own)
        if set(fitted) == set(own) and all(_shape_of(fitted[k]) == own[k] for k in own):
            fits.append(name)
    return fits


@functools.cache
def _empty_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the registered encoder `name`, built on the meta device."""
    return {k: _shape_of(v) for k, v in create_encoder(name, empty=True).state_dict().items()}


def _load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    where: str,
    rebuild: Any = None,
) -> nn.Module:
    """Load `state` into `model` strictly (steps 2-4 of the module docstring); the loaded model.

    A model built on the meta device gets the tensors assigned; `rebuild()` builds it again
    normally when some of its tensors are not in any state dict (non-persistent buffers).
    """
    own = model.state_dict()
    state, note = _fit_names(state, own)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and _shape_of(state[k]) != _shape_of(own[k])]
    arch = str(getattr(model, "arch", "?"))
    if missing or unexpected or bad_shape:
        shapes = [
            f"{k}: file {_shape_of(state[k])} vs model {_shape_of(own[k])}" for k in bad_shape[:3]
        ]
        fits = _fitting_encoders(state, arch)
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"] if unexpected else []
        parts += [f"{len(bad_shape)} of another shape (e.g. {shapes})"] if bad_shape else []
        fix = (
            f"it fits {', '.join(fits)}: use that encoder name"
            if fits
            else f"give the state dict of {arch} (the file its model card names), or the "
            "encoder name the file was saved for"
        )
        raise CheckpointError(
            f"{where} does not fit architecture {arch} ({len(own)} tensors; the file has "
            f"{len(state)}): {', '.join(parts)}; {fix}"
        )
    if note:
        log.info("%s: %s", where, note)
    if not any(t.is_meta for t in own.values()):
        model.load_state_dict(state, strict=True)
        return model
    cast = {
        k: (v.to(own[k].dtype) if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
    }
    model.load_state_dict(cast, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        if rebuild is None:
            raise CheckpointError(f"{where}: {arch} has tensors no state dict holds")
        model = rebuild()
        model.load_state_dict(cast, strict=True)
    return model


def load_encoder(
    path_or_name: str | Path | EncoderSource,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    scan_backend: str = "auto",
    arch_kwargs: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, EncoderSpec]:
    """An encoder in eval mode on `device`, and its spec (with `weights_hash` set).

    path_or_name: what `--encoder` names, resolved by `source.resolve_encoder_source` (or an
    `EncoderSource` it returned): a checkpoint file written by `save_encoder` (`ssmamba.pt`), or
    a registered architecture name (random weights unless `weights` names a local state-dict
    file, e.g. a torchvision ResNet-50 or timm ViT-S/16 file). The file is read on CPU and moved
    to `device`, whichever device trained it; `scan_backend` is chosen freely (the weights are
    the same). arch_kwargs: architecture options for a name (e.g. `{"depth": 2}`); the spec
    stays the name's. Names: registered ones and `timm:<arch>` (`is_known_encoder`).
    """
    if isinstance(path_or_name, EncoderSource):
        if weights is not None:
            raise ConfigError("give the weights file in the EncoderSource, not beside it")
        source = path_or_name
    else:
        source = resolve_encoder_source(path_or_name, weights)
    kw = dict(arch_kwargs or {})
    if not source.is_checkpoint:
        name = source.name
        spec = get_encoder_spec(name)
        if source.weights is None:
            model = create_encoder(name, scan_backend=scan_backend, **kw)
        else:
            wpath = source.weights
            state = _load_weights_file(wpath)
            model = _load_state(
                create_encoder(name, scan_backend=scan_backend, empty=True, **kw),
                state,
                f"weights file {wpath}",
                rebuild=lambda: create_encoder(name, scan_backend=scan_backend, **kw),
            )
            spec = replace(spec, weights_hash=state_dict_hash(model.state_dict())[:16])
    else:
        src = str(source.path)
        if kw:
            raise CheckpointError(
                f"{src} is a checkpoint file: its architecture options are in the file"
            )
        ckpt = read_checkpoint(src)
        arch, kw = str(ckpt["arch"]), dict(ckpt.get("arch_kwargs") or {})
        _require_arch(arch, src)
        model = _load_state(
            create_encoder(arch, scan_backend=scan_backend, empty=True, **kw),
            ckpt["state_dict"],
            src,
            rebuild=lambda: create_encoder(arch, scan_backend=scan_backend, **kw),
        )
        spec = replace(EncoderSpec.from_dict(ckpt["spec"]), weights_hash=ckpt["content_hash"][:16])
    setattr(model, "spec", spec)  # noqa: B010  (a plain attribute; see create_encoder)
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
