"""Tile encoders: registry with specs, SSMamba / MedMamba, timm models (baselines, `timm:<arch>`,
pathology foundation models with local weights), checkpoints, MAMIM."""

from wsi_pipe.encoders import baselines, medmamba, ssmamba, timm_models  # noqa: F401  (built-ins)
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
    ENCODERS,
    EncoderSpec,
    can_build_empty,
    create_encoder,
    encoder_family,
    encoder_options,
    get_encoder_spec,
    is_known_encoder,
    list_encoders,
    register_encoder,
)
from wsi_pipe.encoders.source import (
    CHECKPOINT_SUFFIXES,
    EncoderSource,
    encoder_label,
    looks_like_checkpoint_path,
    resolve_encoder_source,
)
from wsi_pipe.encoders.timm_models import FOUNDATION_MODELS, FoundationModel

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "ENCODERS",
    "EncoderClassifier",
    "EncoderSource",
    "EncoderSpec",
    "FOUNDATION_MODELS",
    "FoundationModel",
    "MAMIM",
    "can_build_empty",
    "checkpoint_hash",
    "create_encoder",
    "encoder_family",
    "encoder_label",
    "encoder_options",
    "get_encoder_spec",
    "is_known_encoder",
    "list_encoders",
    "load_classifier",
    "load_encoder",
    "looks_like_checkpoint_path",
    "read_checkpoint",
    "read_provenance",
    "register_encoder",
    "resolve_encoder_source",
    "save_encoder",
    "state_dict_hash",
]
