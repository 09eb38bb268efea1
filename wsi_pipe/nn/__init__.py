"""Neural-network building blocks: selective scan backends, Mamba mixers, gated attention."""

from wsi_pipe.nn.attention import GatedAttention
from wsi_pipe.nn.mamba import (
    SS2D,
    DirectionalScan,
    Mamba,
    causal_depthwise_conv1d,
    set_scan_backend,
)
from wsi_pipe.nn.selective_scan import (
    SCAN_BACKENDS,
    cuda_scan_available,
    resolve_scan_backend,
    selective_scan,
    selective_scan_ref,
    selective_scan_torch,
)

__all__ = [
    "SCAN_BACKENDS",
    "SS2D",
    "DirectionalScan",
    "GatedAttention",
    "Mamba",
    "causal_depthwise_conv1d",
    "cuda_scan_available",
    "resolve_scan_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_scan_torch",
    "set_scan_backend",
]
