"""`AnomalyConfig`: the frozen, validated config of `wsi-pipe anomaly fit|score`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from wsi_pipe.core.config import Device, FrozenModel, ScanBackend

AnomalyMethod = Literal["spmamba", "knn", "mahalanobis"]
ScanOrder = Literal["circular_hilbert", "hilbert", "row_major"]


class AnomalyConfig(FrozenModel):
    """One anomaly model of a run: which features it learns from, the model and the map/score."""

    method: AnomalyMethod = "spmamba"
    features: str | None = Field(
        None, description="feature set under RUN_DIR/features; None = the only one"
    )
    mpps: tuple[float, ...] | None = Field(
        None,
        description="grids (scales) of the feature set; the finest is the map grid; None = all",
    )
    normal_label: str | None = Field(
        "normal",
        description="slides with this label are the normal training set; None = all slides (QC)",
    )
    store: Literal["h5", "zarr"] = "h5"
    # --- SP-Mamba student
    d_model: int = Field(64, ge=4, description="width of the student")
    d_state: int = Field(16, ge=1)
    expand: float = Field(2.0, gt=0)
    n_layers: int = Field(2, ge=1)
    scan_order: ScanOrder = "circular_hilbert"
    n_orientations: int = Field(
        2, ge=1, le=4, description="canvas orientations; x2 with reversed scans"
    )
    window_cells: int = Field(48, ge=4, description="largest scan canvas side in grid cells")
    n_prototypes: int = Field(32, ge=1)
    proto_temperature: float = Field(0.05, gt=0)
    proto_weight: float = Field(
        1.0, ge=0, description="lambda: weight of the prototype distance in the map"
    )
    inpaint: bool = Field(
        True,
        description="the student predicts each cell from its context only: in training and scoring "
        "one of the 4 phases of a 2 x 2 cell lattice is hidden (4 passes at scoring); False = the "
        "student sees every cell (denoising, cells hidden at random in training only)",
    )
    input_mask_ratio: float = Field(
        0.25, ge=0, lt=1, description="denoising mode: tissue cells hidden at random in training"
    )
    input_noise: float = Field(
        0.1, ge=0, description="std of Gaussian noise on standardised inputs in training"
    )
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    checkpoint_every: int = Field(50, ge=1, description="training steps between resume checkpoints")
    scan_backend: ScanBackend = "auto"
    # --- baselines
    knn_bank_size: int = Field(4096, ge=1, description="kNN: coreset size (PatchCore memory bank)")
    knn_k: int = Field(1, ge=1)
    knn_max_candidates: int = Field(
        50000, ge=1, description="kNN: random tiles the coreset is chosen from"
    )
    calib_fraction: float = Field(
        0.1, gt=0, lt=1, description="baselines: normal tiles held out for calibration"
    )
    # --- map and slide score
    smooth_sigma_cells: float = Field(1.0, ge=0)
    dog_sigmas: tuple[float, float] = (1.0, 4.0)
    w_dog: float = Field(1.0, ge=0)
    w_conc: float = Field(1.0, ge=0)
    conc_radius_cells: float = Field(3.0, gt=0)
    conc_quantile: float = Field(0.99, gt=0, lt=1)
    # --- outputs
    top_k: int = Field(8, ge=0, description="most anomalous tiles saved as PNGs")
    heatmap_max_px: int = Field(1600, ge=64)
    heatmap_vmax: float = Field(3.0, gt=0, description="map value at the top of the colour bar")
    bootstrap: int = Field(1000, ge=0)
    device: Device = "auto"
    threads: int | None = Field(None, ge=1, description="torch threads; None = torch's default")
    seed: int = 0

    @field_validator("mpps")
    @classmethod
    def _sorted(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is None:
            return v
        if not v or any(m <= 0 for m in v):
            raise ValueError("mpps must be positive")
        return tuple(sorted(set(float(m) for m in v)))
