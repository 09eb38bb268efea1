"""Unsupervised anomaly maps on slide feature grids: SP-Mamba and kNN / Mahalanobis baselines.

    grid.py     pure grid maths: cells, CH-scan size, scan orders, windows, smoothing, slide score
    data.py     a slide's multi-scale feature grid from the run's feature stores
    model.py    the SP-Mamba student (K ordered selective scans) and window-sliding prototypes
    scorers.py  SP-Mamba / kNN / Mahalanobis in one code path, calibration, `score_grid`
    metrics.py  tile AUROC, AUPRO, slide AUROC with bootstrap CI, top-fraction precision

The stage (`wsi_pipe.stages.anomaly`) and the CLI (`wsi-pipe anomaly fit|score`) sit on top.
"""

from wsi_pipe.anomaly.config import AnomalyConfig

__all__ = ["AnomalyConfig"]
