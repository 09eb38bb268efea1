"""Tile encoders: registry with specs, SSMamba / MedMamba / baselines, checkpoints, MAMIM."""

from wsi_pipe.encoders import baselines, medmamba, ssmamba  # noqa: F401  (register built-ins)
from wsi_pipe.encoders.checkpoint import (
    EncoderClassifier,
    checkpoint_hash,
    load_classifier,
    load_encoder,
    read_checkpoint,
    read_provenance,
    save_encoder,
    state_dict_hash,
)
from wsi_pipe.encoders.mamim import MAMIM
from wsi_pipe.encoders.registry import (
    EncoderSpec,
    create_encoder,
    encoder_family,
    get_encoder_spec,
    list_encoders,
    register_encoder,
)

__all__ = [
    "MAMIM",
    "EncoderClassifier",
    "EncoderSpec",
    "checkpoint_hash",
    "create_encoder",
    "encoder_family",
    "get_encoder_spec",
    "list_encoders",
    "load_classifier",
    "load_encoder",
    "read_checkpoint",
    "read_provenance",
    "register_encoder",
    "save_encoder",
    "state_dict_hash",
]
