"""Frozen, validated configs: one pydantic model per stage, one YAML per run.

Every model forbids unknown keys, so a typo in a YAML file is an error naming the key, not a
silently ignored setting. The resolved config (defaults filled in) and its hash are saved next to
every output by the stage that uses it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wsi_pipe.core.errors import ConfigError

StoreBackend = Literal["h5", "zarr"]
ReaderBackend = Literal["auto", "openslide", "tiffslide"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "bf16", "fp16"]
ScanBackend = Literal["auto", "torch", "numba", "triton", "cuda", "sequential"]


class FrozenModel(BaseModel):
    """Base of every config: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def config_hash(self) -> str:
        """sha256 (first 16 hex) of the canonical JSON of this config."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- tile
class SegmentConfig(FrozenModel):
    """Tissue segmentation on a low-resolution level (all sizes in physical units)."""

    seg_mpp: float = Field(8.0, gt=0, description="um/px of the image segmentation works on")
    saturation_threshold: int | None = Field(
        None, ge=0, le=255, description="fixed HSV saturation threshold; None = Otsu"
    )
    min_saturation: int = Field(
        8, ge=0, le=255, description="floor under the Otsu threshold (blank slides stay blank)"
    )
    median_blur_um: float = Field(56.0, ge=0, description="median filter width in um")
    close_um: float = Field(32.0, ge=0, description="morphological close kernel in um")
    min_tissue_area_mm2: float = Field(
        0.01, ge=0, description="drop tissue pieces smaller than this"
    )
    min_hole_area_mm2: float = Field(
        0.004, ge=0, description="holes larger than this are kept as background"
    )
    max_n_holes: int = Field(50, ge=0, description="largest holes kept per tissue piece")
    remove_pen: bool = Field(
        True, description="remove red/green/blue pen marks before thresholding"
    )
    max_brightness: int = Field(
        235,
        ge=0,
        le=255,
        description="pixels brighter than this (HSV value, low sat) are background",
    )
    max_otsu_saturation: int = Field(
        30,
        ge=0,
        le=255,
        description="ceiling of the Otsu threshold, so pale tissue survives beside dark tissue",
    )
    pen_dilate_um: float = Field(
        16.0, ge=0, description="grow detected pen ink by this (faint edges)"
    )


class TileConfig(FrozenModel):
    """`wsi-pipe tile`: readers, segmentation and tiling at one or more true mpps."""

    target_mpps: tuple[float, ...] = Field((0.5,), min_length=1, description="um/px of each grid")
    tile_px: int = Field(256, ge=8, le=8192, description="tile side in px at each target mpp")
    overlap_px: int = Field(0, ge=0, description="overlap of neighbouring tiles, px at target mpp")
    min_tissue_fraction: float = Field(0.25, ge=0, le=1, description="tissue share a tile needs")
    backend: ReaderBackend = "auto"
    mpp_override: float | None = Field(None, gt=0, description="level-0 um/px for every slide")
    store: StoreBackend = "h5"
    segment: SegmentConfig = SegmentConfig()
    qc_max_px: int = Field(1600, ge=64, description="longest side of the QC thumbnail")
    # QuPath annotations (docs/tiling.md); these keys enter the hash only with annotations_dir
    annotations_dir: str | None = Field(
        None, description="folder of QuPath GeoJSON, <slide_id>.geojson or .json, level-0 px"
    )
    annotation_mode: Literal["label", "restrict", "tissue"] = Field(
        "label",
        description="label: store each tile's class; restrict: also keep only annotated "
        "tiles; tissue: the annotation polygons replace the computed tissue mask",
    )
    annotation_classes: tuple[str, ...] | None = Field(
        None, description="classes that are regions/labels (case-insensitive); None = all"
    )
    annotation_exclude: tuple[str, ...] = Field(
        ("ignore*", "artefact", "artifact"),
        description="classes whose regions are excluded (case-insensitive fnmatch patterns)",
    )
    annotation_min_fraction: float = Field(
        0.5, ge=0, le=1, description="box share a class (restrict: the regions) must cover"
    )
    annotation_max_excluded: float = Field(
        0.0, ge=0, lt=1, description="a tile is dropped when excluded regions cover more"
    )

    def config_hash(self) -> str:
        """sha256 (first 16 hex) of the canonical JSON; the annotation keys count only when
        `annotations_dir` is set, so runs without annotations keep the hash they had."""
        data = self.model_dump(mode="json")
        if self.annotations_dir is None:
            data = {k: v for k, v in data.items() if not k.startswith("annotation")}
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @field_validator("target_mpps")
    @classmethod
    def _positive_sorted_unique(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(m <= 0 for m in v):
            raise ValueError("every target mpp must be > 0")
        return tuple(sorted(set(float(m) for m in v)))

    @field_validator("overlap_px")
    @classmethod
    def _overlap_small(cls, v: int, info: Any) -> int:
        tile_px = info.data.get("tile_px", 256)
        if v >= tile_px:
            raise ValueError(f"overlap_px ({v}) must be smaller than tile_px ({tile_px})")
        return v


# ------------------------------------------------------------------------- encoder / pretrain
class PretrainConfig(FrozenModel):
    """`wsi-pipe pretrain`: MAMIM self-supervised pretraining of an encoder on the run's tiles."""

    arch: str = "ssmamba_s"
    input_px: int = Field(224, ge=16, description="encoder input side in px")
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(
        None, ge=1, description="None = one pass over sampled tiles"
    )
    max_tiles: int = Field(100_000, ge=1, description="tiles sampled from all slides and mpps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1.5e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(500, ge=1, description="steps between checkpoints")
    workers: int = Field(2, ge=0)
    device: Device = "auto"
    scan_backend: ScanBackend = "auto"
    seed: int = 0
    mpps: tuple[float, ...] | None = Field(None, description="which grids to sample; None = all")
    mask_px: int | None = Field(
        None, ge=1, description="side of a mask unit in px; None = input_px/8 capped at 32"
    )
    norm_pix_loss: bool = Field(
        False, description="targets normalised again per mask unit (MAE norm_pix_loss)"
    )
    stain_jitter: float = Field(0.05, ge=0, le=0.5, description="HED stain jitter strength")
    min_lr_ratio: float = Field(0.01, ge=0, le=1, description="cosine floor as a share of lr")


class FinetuneConfig(FrozenModel):
    """`wsi-pipe finetune`: supervised fine-tuning of a pretrained encoder on labelled ROIs."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    backbone_lr: float = Field(1e-5, ge=0)
    train_backbone: bool = False
    val_fraction: float = Field(0.2, gt=0, lt=1, description="validation share (model selection)")
    test_fraction: float = Field(
        0.2, ge=0, lt=1, description="test share, never seen by model selection; 0 = no test split"
    )
    group_regex: str | None = Field(
        None, description="regex on file names giving each example's group (e.g. source slide)"
    )
    input_px: int | None = Field(None, ge=16, description="None = the encoder's own input px")
    workers: int = Field(0, ge=0)
    device: Device = "auto"
    scan_backend: ScanBackend = "auto"
    seed: int = 0
    max_tiles_per_class: int | None = Field(
        None, ge=1, description="annotation labels of a run: tiles sampled per class; None = all"
    )


# ------------------------------------------------------------------------------------ extract
class ExtractConfig(FrozenModel):
    """`wsi-pipe extract`: encoder inference at stored coordinates into feature stores."""

    encoder: str = Field(
        ..., description="ssmamba.pt checkpoint, or a registered architecture name"
    )
    weights: str | None = Field(
        None, description="local weights file for a registered architecture"
    )
    mpps: tuple[float, ...] | None = Field(None, description="which grids of the run; None = all")
    device: Device = "auto"
    batch_size: int = Field(64, ge=1)
    workers: int = Field(2, ge=0)
    precision: Precision = "fp32"
    feature_dtype: Literal["float32", "float16"] = "float32"
    store: StoreBackend = "h5"
    scan_backend: ScanBackend = "auto"
    clam_export: bool = Field(False, description="also write h5_files/ and pt_files/ like CLAM")
    name: str | None = Field(
        None, description="feature set name; None = checkpoint file stem or architecture name"
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads of the main process; None = on CPU the cores the workers leave",
    )


# ---------------------------------------------------------------------------------- train-mil
class MilConfig(FrozenModel):
    """`wsi-pipe train-mil`: slide-level MIL with patient-level cross-validation."""

    method: str = "abmil"
    features: str | None = Field(None, description="feature set name under RUN_DIR/features")
    mpp: float | None = Field(None, description="which grid's features; None = the only one")
    n_folds: int = Field(5, ge=2)
    val_fraction: float = Field(0.15, ge=0, lt=1, description="of each training fold, by patient")
    epochs: int = Field(50, ge=1)
    patience: int = Field(10, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    hidden_dim: int = Field(256, ge=8)
    dropout: float = Field(0.25, ge=0, lt=1)
    max_bag_train: int | None = Field(4096, ge=1, description="tiles sampled per bag in training")
    class_weighting: bool = True
    n_stages: int = Field(3, ge=1, description="msm: number of masked stages")
    mask_rule: Literal["topk", "mass"] = "topk"
    mask_k: float = Field(
        0.1, gt=0, description="msm: fraction (<1) or count (>=1) masked per stage"
    )
    mask_mass: float = Field(0.5, gt=0, lt=1, description="msm: attention mass masked per stage")
    n_layers: int = Field(2, ge=1, description="mamba: layers")
    tile_order: Literal["store", "hilbert", "circular_hilbert"] = "store"
    reorder_stride: int = Field(10, ge=1, description="mamba: stride of the reordered second scan")
    scan_backend: ScanBackend = "auto"
    device: Device = "auto"
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for 95% CIs")
    seed: int = 0
    standardize: bool = Field(False, description="standardise features on each training fold")
    cache_gb: float = Field(4.0, ge=0, description="keep bags in memory when they fit in this")


# --------------------------------------------------------------------------------------- run
class RunConfig(FrozenModel):
    """`wsi-pipe run`: every stage of a local run, from one YAML."""

    slides: tuple[str, ...] = Field(..., min_length=1, description="folders, files or a manifest")
    out: str
    manifest: str | None = None
    tile: TileConfig = TileConfig()
    pretrain: PretrainConfig | None = None
    extract: ExtractConfig | None = None
    mil: MilConfig | None = None
    workers: int = Field(1, ge=1)


M = TypeVar("M", bound=FrozenModel)


def load_config(model: type[M], path: str | Path | None = None, **overrides: Any) -> M:
    """Build `model` from a YAML file (optional) plus overrides (None values are ignored).

    Raises ConfigError naming the file and the offending key.
    """
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        where = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}"
            )
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"invalid {model.__name__} from {where}: {problems}") from None


def dump_config(cfg: FrozenModel) -> str:
    """YAML text of a resolved config, with its hash as a comment on top."""
    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    return f"# {type(cfg).__name__} hash {cfg.config_hash()}\n{body}"
