"""timm encoders: baselines, `timm:<arch>`, pathology foundation models with local weights files.

Every named foundation model is built with random weights, saved to a local file (safetensors,
and a wrapped torch state dict), loaded through wsi-pipe, and compared with
`timm.create_model(arch, pretrained=False, **card kwargs)` + `load_state_dict` on the same input:
exact (torch.equal) in fp32. The card kwargs are written out here, independently of
`timm_models.FOUNDATION_MODELS`. By default the giants run at depth 1 (`arch_kwargs`) and at a
small input where the card allows other sizes (`dynamic_img_size=True`); `slow` tests repeat the
comparison at the real depth. Nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file
from typer.testing import CliRunner

from wsi_pipe.cli.app import app
from wsi_pipe.core.config import TileConfig
from wsi_pipe.core.errors import CheckpointError, ConfigError
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.encoders import (
    FOUNDATION_MODELS,
    MAMIM,
    create_encoder,
    get_encoder_spec,
    is_known_encoder,
    load_encoder,
    save_encoder,
)
from wsi_pipe.readers import open_slide
from wsi_pipe.stages.tile import run_tile
from wsi_pipe.store import open_store
from wsi_pipe.synth import RectPainter, write_pyramidal_tiff

os.environ["HF_HUB_OFFLINE"] = "1"  # a download attempt would fail loudly

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
SWIGLU = {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}

#: name -> (timm arch, kwargs as on the model card, input px, mean, std, embedding dim,
#: dynamic input size, pooling); see docs/encoders.md for the sources
CARDS: dict[str, tuple] = {
    "uni": (
        "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        224,
        *IMAGENET,
        1024,
        True,
        "token",
    ),
    "uni2_h": (
        "vit_giant_patch14_224",
        dict(
            img_size=224,
            patch_size=14,
            depth=24,
            num_heads=24,
            init_values=1e-5,
            embed_dim=1536,
            mlp_ratio=2.66667 * 2,
            num_classes=0,
            no_embed_class=True,
            reg_tokens=8,
            dynamic_img_size=True,
            **SWIGLU,
        ),
        224,
        *IMAGENET,
        1536,
        True,
        "token",
    ),
    "virchow2": (
        "vit_huge_patch14_224",
        dict(
            img_size=224,
            init_values=1e-5,
            num_classes=0,
            mlp_ratio=5.3375,
            global_pool="",
            dynamic_img_size=True,
            reg_tokens=4,
            **SWIGLU,
        ),
        224,
        *IMAGENET,
        2560,
        True,
        "virchow",
    ),
    "h_optimus_0": (
        "vit_giant_patch14_reg4_dinov2",
        dict(img_size=224, init_values=1e-5, dynamic_img_size=False, num_classes=0),
        224,
        (0.707223, 0.578729, 0.703617),
        (0.211883, 0.230117, 0.177517),
        1536,
        False,
        "token",
    ),
    "prov_gigapath": (
        "vit_giant_patch14_dinov2",
        dict(
            img_size=224,
            in_chans=3,
            patch_size=16,
            embed_dim=1536,
            depth=40,
            num_heads=24,
            init_values=1e-5,
            mlp_ratio=5.33334,
            num_classes=0,
        ),
        224,
        *IMAGENET,
        1536,
        False,
        "token",
    ),
}


def _reference(name: str, **override) -> nn.Module:
    arch, kwargs = CARDS[name][:2]
    return timm.create_model(arch, pretrained=False, **{**kwargs, **override}).eval()


def _ref_embedding(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embedding as the model card computes it."""
    out = model(x)
    if CARDS[name][-1] == "virchow":  # class token + mean of the patch tokens (after 4 registers)
        return torch.cat([out[:, 0], out[:, 5:].mean(1)], dim=-1)
    return out


def _input(name: str, batch: int = 2) -> torch.Tensor:
    dynamic = CARDS[name][6]
    px = 112 if dynamic else 224  # a fixed-size model takes its card's 224 px only
    return torch.randn(batch, 3, px, px, generator=torch.Generator().manual_seed(1))


# -------------------------------------------------------------------------------- the cards
def test_named_entries_record_the_model_cards() -> None:
    assert set(FOUNDATION_MODELS) == set(CARDS)
    for name, (arch, _, px, mean, std, dim, _, _) in CARDS.items():
        spec, entry = get_encoder_spec(name), FOUNDATION_MODELS[name]
        assert (entry.arch, spec.input_px, spec.embed_dim, spec.mpp) == (arch, px, dim, 0.5)
        assert spec.mean == pytest.approx(mean) and spec.std == pytest.approx(std)
        assert entry.card.startswith("https://huggingface.co/") and entry.checked
        assert is_known_encoder(name)


@pytest.mark.parametrize("name", sorted(CARDS))
def test_foundation_model_loads_and_equals_timm_reduced_depth(name: str, tmp_path: Path) -> None:
    """Depth 1, random weights: safetensors and a wrapped .pt load to timm's exact embedding."""
    torch.manual_seed(0)
    ref = _reference(name, depth=1)
    state = ref.state_dict()
    st = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    pt = tmp_path / f"{name}.pt"  # a training checkpoint: wrapper dict, DataParallel names
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, pt)
    x = _input(name)
    with torch.no_grad():
        want = _ref_embedding(name, ref, x)
    assert want.shape == (2, CARDS[name][5])
    hashes = set()
    for f in (st, pt):
        model, spec = load_encoder(name, weights=f, arch_kwargs={"depth": 1})
        assert not model.training and all(not p.is_meta for p in model.parameters())
        with torch.no_grad():
            assert torch.equal(model(x), want), f"{name} from {f.name}"
        hashes.add(spec.weights_hash)
    assert len(hashes) == 1 and None not in hashes  # the same tensors, whatever the container


@pytest.mark.big
@pytest.mark.parametrize("name", sorted(CARDS))
def test_foundation_model_equals_timm_at_real_depth(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = _reference(name)
    n_params_m = sum(p.numel() for p in ref.parameters()) / 1e6
    assert abs(n_params_m - FOUNDATION_MODELS[name].params_m) < 0.01
    f = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    x = _input(name, batch=1)
    with torch.no_grad():
        want = _ref_embedding(name, ref, x)
    del ref
    model, spec = load_encoder(name, weights=f)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    assert spec.embed_dim == want.shape[1] and spec.weights_hash


# -------------------------------------------------------------------------------- baselines
def test_resnet50_loads_a_torchvision_file_exactly(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    f = tmp_path / "resnet50-torchvision.pth"
    torch.save(tv.state_dict(), f)  # with the 1000-class fc layer
    model, spec = load_encoder("resnet50", weights=f)
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), tv(x))
    assert spec.embed_dim == 2048 and spec.weights_hash


def test_vit_s16_loads_a_timm_file_with_its_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = timm.create_model("vit_small_patch16_224", pretrained=False).eval()  # 1000 classes
    f = tmp_path / "vit_s16.safetensors"
    save_file(ref.state_dict(), str(f))
    model, _ = load_encoder("vit_s16", weights=f)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), ref.forward_head(ref.forward_features(x), pre_logits=True))


def test_mamim_on_the_timm_vit_hides_masked_content() -> None:
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny")
    mim = MAMIM(enc, mask_px=16).eval()
    mask = mim.random_mask(2, 64, 64, 0.5, torch.Generator().manual_seed(0))
    x1 = torch.randn(2, 3, 64, 64)
    pix = mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None].expand(-1, 3, -1, -1)
    x2 = torch.where(pix, torch.randn_like(x1), x1)
    tok = mask.repeat_interleave(2, 1).repeat_interleave(2, 2)
    with torch.no_grad():
        f1 = enc.forward_tokens(x1, tok, mim.mask_token)
        f2 = enc.forward_tokens(x2, tok, mim.mask_token)
        assert f1.shape == (2, 8, 8, 32) and torch.equal(f1, f2)
        assert not torch.allclose(f1, enc.forward_tokens(x2))
    loss, pred = mim(x1, mask)
    assert pred.shape == x1.shape and torch.isfinite(loss)
    with pytest.raises(ValueError, match="token grid"):
        MAMIM(create_encoder("resnet_tiny"))


# ----------------------------------------------------------------------------- timm:<arch>
def test_generic_timm_name(tmp_path: Path) -> None:
    name = "timm:vit_tiny_patch16_224.augreg_in21k"
    spec = get_encoder_spec(name)
    assert (spec.input_px, spec.embed_dim, spec.mean) == (224, 192, (0.5, 0.5, 0.5))
    assert is_known_encoder(name) and is_known_encoder("timm:resnet18")
    assert not is_known_encoder("timm:no_such_net") and not is_known_encoder("no_such_net")
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    f = tmp_path / "w.bin"
    torch.save({"state_dict": ref.state_dict()}, f)
    model, lspec = load_encoder(name, weights=f)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.equal(model(x), want)
    # a checkpoint of it records the timm name and loads back to the same output
    ckpt = tmp_path / "vit_tiny.pt"
    save_encoder(model, ckpt, {"data": "unit test"})
    again, cspec = load_encoder(ckpt)
    assert cspec.name == name
    with torch.no_grad():
        assert torch.equal(again(x), want)
    with pytest.raises(ConfigError, match="never downloads"):
        get_encoder_spec("timm:hf-hub:MahmoodLab/UNI")
    with pytest.raises(ConfigError, match="no architecture"):
        create_encoder("timm:vit_nonexistent_patch16")


# ------------------------------------------------------------------------------------ errors
def test_mismatched_weight_files_name_keys_and_the_fix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    f = tmp_path / "foundation_tiny.safetensors"
    save_file(create_encoder("foundation_tiny").state_dict(), str(f))
    with pytest.raises(CheckpointError) as e:
        load_encoder("vit_tiny", weights=f)
    msg = str(e.value)
    assert str(f) in msg and "does not fit architecture vit_tiny" in msg
    # LayerScale and register tokens of the file are unknown to vit_tiny; SwiGLU is wider
    assert "5 unexpected (e.g. ['blocks.0.ls1.gamma'" in msg
    assert "7 of another shape" in msg and "blocks.0.mlp.fc1.weight: file (170, 32) vs model" in msg
    assert "it fits foundation_tiny: use that encoder name" in msg
    # the same architecture at another size: shapes named file vs model
    g = tmp_path / "uni_d2.pt"
    torch.save(_reference("uni", depth=1).state_dict(), g)
    with pytest.raises(CheckpointError) as e:
        load_encoder("uni2_h", weights=g, arch_kwargs={"depth": 1})
    msg = str(e.value)
    assert (
        "uni_d2.pt" in msg and "of another shape" in msg and "patch_embed.proj.weight: file" in msg
    )
    assert "give the state dict of uni2_h" in msg
    # not a state dict / truncated / missing
    h = tmp_path / "notes.pt"
    torch.save({"weights": "elsewhere"}, h)
    with pytest.raises(CheckpointError, match="notes.pt does not hold a state dict of tensors"):
        load_encoder("vit_tiny", weights=h)
    t = tmp_path / "cut.safetensors"
    t.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut.safetensors cannot be read as safetensors"):
        load_encoder("foundation_tiny", weights=t)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder("uni", weights=tmp_path / "absent.bin")


# ------------------------------------------------------------------------------ through the CLI
def _slide_run(tmp_path: Path, tile_px: int) -> Path:
    """A synthetic 0.5 um/px slide tiled at the encoder's input px (no resize in between)."""
    slide = tmp_path / "s.tiff"
    side = 4 * tile_px
    painter = RectPainter([(0, 0, side, side)])
    write_pyramidal_tiff(slide, side, side, 0.5, levels=1, painter=painter)
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide_id,path,mpp\ns,{slide},\n")
    cfg = TileConfig(tile_px=tile_px)
    res = run_tile([str(manifest)], tmp_path / "run", cfg, progress=False)
    assert res.ok, res.results
    return tmp_path / "run"


def _cli_extract_equals_direct(name: str, weights: Path, tmp_path: Path) -> None:
    run = _slide_run(tmp_path, get_encoder_spec(name).input_px)
    res = CliRunner().invoke(
        app, ["-q", "extract", str(run), "--encoder", name, "--weights", str(weights)]
    )
    assert res.exit_code == 0, res.output
    model, spec = load_encoder(name, weights=weights)
    with open_store(RunLayout(run).feature_store(name, "s", 0.5, "h5")) as r:
        attrs, feats, coords = r.attrs, r.read("features"), r.read("coords")
    assert feats.shape == (len(coords), spec.embed_dim) and len(coords) > 0
    assert attrs["weights_hash"] == spec.weights_hash
    size = int(attrs["read_size_px"])
    assert size == spec.input_px
    with open_slide(attrs["slide_path"]) as sl:
        tiles = [sl.read_region((int(x), int(y)), 0, (size, size)) for x, y in coords]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-4)


def test_cli_extract_with_a_named_timm_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = tmp_path / "foundation_tiny.safetensors"
    save_file(create_encoder("foundation_tiny").state_dict(), str(w))
    _cli_extract_equals_direct("foundation_tiny", w, tmp_path)


@pytest.mark.big
def test_cli_extract_with_uni(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = tmp_path / "uni.bin"
    torch.save(_reference("uni").state_dict(), w)
    _cli_extract_equals_direct("uni", w, tmp_path)
