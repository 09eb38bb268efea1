"""What `--encoder TEXT [--weights FILE]` means: the one resolver every stage uses.

`resolve_encoder_source(text, weights)` decides, in this order:

1. `text` names an existing file: a checkpoint (`ssmamba.pt` written by `wsi-pipe pretrain` /
   `finetune`). An existing folder is an error (give the file inside it).
2. `timm:<arch>`: a registered name of the timm pattern; an unknown or hub architecture is a
   ConfigError saying so (checked before step 4: hub names hold a `/`).
3. A registered encoder name (`list_encoders()`, tiny variants included).
4. Something that looks like a path (a checkpoint suffix such as `.pt`, or a path separator)
   but is not there: CheckpointError "does not exist".
5. Anything else: ConfigError naming the registered encoders and both accepted forms.

Then the weights: `--weights` with a checkpoint is a ConfigError (the checkpoint holds its
weights); with a name, the file must exist (CheckpointError otherwise); `need_weights=True`
(extract: features from random weights are never wanted) makes a missing `--weights` a
ConfigError. Nothing is loaded here: `checkpoint.load_encoder` loads an `EncoderSource`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from wsi_pipe.core.errors import CheckpointError, ConfigError
from wsi_pipe.encoders.registry import get_encoder_spec, is_known_encoder, list_encoders
from wsi_pipe.encoders.timm_models import TIMM_PREFIX, is_timm_name

#: suffixes of files given as `--encoder` (checkpoints; a weights file given there by mistake is
#: reported by the checkpoint reader as a bare state dict)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


@dataclass(frozen=True)
class EncoderSource:
    """A resolved `--encoder`: a checkpoint file, or a registered name (+ local weights file).

    kind: "checkpoint" or "registered". text: as given. name: the architecture name (registered)
    or the checkpoint path as given. path: the checkpoint file. weights: the weights file of a
    registered name (None: random weights).
    """

    kind: Literal["checkpoint", "registered"]
    text: str
    name: str
    path: Path | None = None
    weights: Path | None = None

    @property
    def is_checkpoint(self) -> bool:
        return self.kind == "checkpoint"

    @property
    def file(self) -> Path | None:
        """The file holding the weights: the checkpoint, or the weights file (None: random)."""
        return self.path if self.is_checkpoint else self.weights

    @property
    def label(self) -> str:
        """The default feature set name: the checkpoint's stem, else the encoder name."""
        return self.path.stem if self.path is not None else self.name

    @property
    def source(self) -> str:
        """What provenance records: the checkpoint's absolute path, or `name:weights path`."""
        if self.path is not None:
            return str(self.path.resolve())
        return f"{self.name}:{self.weights.resolve()}" if self.weights else self.name


def looks_like_checkpoint_path(text: str) -> bool:
    """`text` is meant as a file (exists, a checkpoint suffix, or a path separator); no
    registry lookup, so it answers for configs validated before anything is built."""
    if is_timm_name(text):
        return Path(text).is_file()
    p = Path(text)
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return p.exists() or p.suffix.lower() in CHECKPOINT_SUFFIXES or any(s in text for s in seps)


def encoder_label(text: str) -> str:
    """The default feature set name of `--encoder TEXT` (checkpoint stem, else the name),
    without resolving it (no error for a name that would not resolve)."""
    return Path(text).stem if looks_like_checkpoint_path(text) else text


def resolve_encoder_source(
    text: str | Path,
    weights: str | Path | None = None,
    *,
    need_weights: bool = False,
) -> EncoderSource:
    """What `--encoder text [--weights weights]` means (see the module docstring).

    Raises CheckpointError (a named file is missing or a folder) or ConfigError (an unknown
    name, `--weights` with a checkpoint, no weights where `need_weights`), each naming the fix.
    """
    text = str(text)
    if not text.strip():
        raise ConfigError("no encoder given: give a checkpoint such as models/ssmamba.pt, or NAME")
    p = Path(text)
    if p.is_dir():
        raise CheckpointError(
            f"encoder {p} is a folder: give the checkpoint file inside it (e.g. {p / 'ssmamba.pt'})"
        )
    if p.is_file():
        src = EncoderSource("checkpoint", text, text, path=p)
    elif is_timm_name(text) or is_known_encoder(text):
        if is_timm_name(text):
            get_encoder_spec(text)  # ConfigError: unknown or hub architecture, and the fix
        src = EncoderSource("registered", text, text)
    elif looks_like_checkpoint_path(text):
        raise CheckpointError(
            f"encoder checkpoint {p} does not exist: give the ssmamba.pt written by "
            "`wsi-pipe pretrain`/`finetune`, or a registered architecture with --weights FILE"
        )
    else:
        raise ConfigError(
            f"encoder {text!r} is neither a checkpoint file nor a registered architecture "
            f"({', '.join(list_encoders(tiny=False))}, or {TIMM_PREFIX}<arch>): give e.g. "
            "models/ssmamba.pt, or NAME --weights FILE"
        )
    if src.is_checkpoint:
        if weights is not None:
            raise ConfigError(
                f"--weights is for a registered architecture; {p} is already a checkpoint "
                "(it holds its weights): drop --weights"
            )
        return src
    if weights is None:
        if need_weights:
            raise ConfigError(
                f"encoder {text!r} is an architecture name: give its local weights file with "
                "--weights FILE (wsi-pipe never downloads weights), or a checkpoint path such "
                "as models/ssmamba.pt"
            )
        return src
    w = Path(weights)
    if not w.is_file():
        raise CheckpointError(
            f"weights file {w} for encoder {text!r} does not exist: give a local file"
        )
    return EncoderSource("registered", text, text, weights=w)
