"""Every registered full-size encoder runs one forward at its specified input size.

The contract tests in test_encoders.py loop over the tiny variants; this one builds each full-size
encoder (random weights, no downloads) and runs a single tile of `spec.input_px` (224 px for the
published architectures) through it on the CPU: batch 1, `torch.inference_mode()`, one thread count as given. Marked `slow` (the
Mamba encoders run the pure-torch scan on a CPU); CI runs slow tests too.
"""

from __future__ import annotations

import time

import pytest
import torch

from wsi_pipe.encoders import create_encoder, get_encoder_spec, list_encoders

#: the pathology foundation models (0.3-1.1 B parameters) have their own slow tests, at their
#: real depth, against timm (test_timm_encoders.py)
FULL = [n for n in list_encoders(tiny=False) if n not in list_encoders(family="foundation")]


#: the published architectures, specified at 224 px (other full-size variants, e.g. CPU-sized
#: ones, carry their own input size in their spec)
AT_224 = (
    "ssmamba_t",
    "ssmamba_s",
    "ssmamba_b",
    "medmamba_t",
    "medmamba_s",
    "medmamba_b",
    "resnet50",
    "vit_s16",
)


def test_every_family_has_full_size_encoders() -> None:
    assert set(AT_224) <= set(FULL)
    assert all(get_encoder_spec(n).input_px == 224 for n in AT_224)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_encoder_forward_at_spec_size(name: str) -> None:
    spec = get_encoder_spec(name)
    torch.manual_seed(0)
    model = create_encoder(name).eval()
    x = torch.randn(1, 3, spec.input_px, spec.input_px)
    t0 = time.perf_counter()
    with torch.inference_mode():
        y = model(x)
    seconds = time.perf_counter() - t0
    assert y.shape == (1, spec.embed_dim), (name, tuple(y.shape))
    assert y.dtype == torch.float32 and torch.isfinite(y).all(), name
    assert float(y.std()) > 0, f"{name}: constant embedding"
    print(f"{name}: one {spec.input_px}-px forward in {seconds:.2f} s")  # shown with -rP
