"""Encoder registry contract, checkpoints (ssmamba.pt), MAMIM model and augmentations."""

from __future__ import annotations

import pytest
import torch

from wsi_pipe.core.errors import CheckpointError, ConfigError
from wsi_pipe.encoders import (
    ENCODERS,
    FOUNDATION_MODELS,
    MAMIM,
    EncoderSource,
    create_encoder,
    encoder_family,
    encoder_label,
    encoder_options,
    get_encoder_spec,
    list_encoders,
    load_classifier,
    load_encoder,
    read_checkpoint,
    register_encoder,
    resolve_encoder_source,
    save_encoder,
)
from wsi_pipe.encoders.augment import augment_batch, hed_jitter, random_dihedral
from wsi_pipe.nn.mamba import set_scan_backend

TINY = list_encoders(tiny=True)
FULL = list_encoders(tiny=False)
#: pathology foundation models (0.3-1.1 B parameters): built empty here, run in test_timm_encoders
BIG = set(list_encoders(family="foundation", tiny=False))
#: parameter counts (millions) published for MedMamba (the paper's include a small head)
PUBLISHED_M = {"medmamba_t": 14.5, "medmamba_s": 18.6, "medmamba_b": 39.9}


def test_every_family_has_a_tiny_variant():
    families = {encoder_family(n) for n in list_encoders()}
    assert families == {"ssmamba", "medmamba", "resnet", "vit", "foundation"}
    assert {encoder_family(n) for n in TINY} == families
    assert {"ssmamba_t", "ssmamba_s", "ssmamba_b", "medmamba_t", "resnet50", "vit_s16"} <= set(FULL)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("ssmamba_t", embed_dim=1, family="x")(lambda **kw: None)


def test_unknown_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match="ssmamba_s"):
        create_encoder("ssmamba_xl")


#: every name that checkpoints, configs, docs and tests use: it must keep its spec
NAMES = {
    # name: (family, input px, embed dim)
    "resnet50": ("resnet", 224, 2048),
    "resnet_tiny": ("resnet", 64, 64),
    "vit_s16": ("vit", 224, 384),
    "vit_tiny": ("vit", 64, 32),
    **{
        f"{f}_{s}": (f, 224, 1024 if s == "b" else 768)
        for f in ("ssmamba", "medmamba")
        for s in "tsb"
    },
    **{f"{f}_tiny": (f, 64, 64) for f in ("ssmamba", "medmamba")},
    **{f"{f}_cpu": (f, 160, 128) for f in ("ssmamba", "medmamba")},
    "uni": ("foundation", 224, 1024),
    "uni2_h": ("foundation", 224, 1536),
    "virchow2": ("foundation", 224, 2560),
    "h_optimus_0": ("foundation", 224, 1536),
    "prov_gigapath": ("foundation", 224, 1536),
    "foundation_tiny": ("foundation", 64, 64),
}


def test_registered_names_and_specs_are_stable():
    assert set(list_encoders()) == set(NAMES)
    for name, (family, px, dim) in NAMES.items():
        spec = get_encoder_spec(name)
        assert (encoder_family(name), spec.name, spec.input_px, spec.embed_dim) == (
            family,
            name,
            px,
            dim,
        )
        assert spec.mpp == 0.5


def test_each_family_declares_one_tiny_variant_built_with_its_options():
    """One entry per family carries `tiny` options; `<family>_tiny` is built with exactly them
    (same tensors as the declaring entry built with those options) and has its own spec."""
    for family in {encoder_family(n) for n in list_encoders()}:
        declaring = [
            e for e in ENCODERS.entries() if e.family == family and e.tiny and not e.tiny_variant
        ]
        assert len(declaring) == 1, (family, [e.name for e in declaring])
        (tiny,) = list_encoders(family=family, tiny=True)
        assert tiny == f"{family}_tiny"
        parent, variant = declaring[0], ENCODERS.get(tiny)
        assert dict(variant.tiny) == dict(parent.tiny) and variant.options == parent.options
        spec = get_encoder_spec(tiny)
        assert spec.name == tiny and spec.embed_dim < get_encoder_spec(parent.name).embed_dim
        torch.manual_seed(0)
        a = create_encoder(tiny, scan_backend="torch").state_dict()
        torch.manual_seed(0)
        b = create_encoder(parent.name, scan_backend="torch", **parent.tiny).state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), family
        with torch.no_grad():
            y = create_encoder(tiny, scan_backend="torch").eval()(torch.randn(1, 3, 64, 64))
        assert y.shape == (1, spec.embed_dim)
    assert "ssmamba_tiny" not in ENCODERS.choices() and "ssmamba_s" in ENCODERS.choices()


def test_options_are_checked_against_the_family_schema(tmp_path):
    with pytest.raises(ConfigError) as e:
        create_encoder("ssmamba_s", bogus=1)
    msg = str(e.value)
    assert "'ssmamba_s' has no option(s) ['bogus']" in msg and "'depths'" in msg
    assert "scan_backend" not in msg  # a control, not an architecture option
    assert {"dims", "depths", "d_state", "scales"} <= encoder_options("ssmamba_s")
    assert "scales" not in encoder_options("medmamba_t")  # each family its own schema
    with pytest.raises(ConfigError, match=r"'medmamba_tiny' has no option\(s\) \['scales'\]"):
        create_encoder("medmamba_tiny", scales=(1, 2))
    # timm families: the timm class's constructor, plus the earlier hand-written names
    assert {"depth", "num_heads", "img_px", "dim"} <= encoder_options("vit_tiny")
    assert {"layers", "widths", "channels"} <= encoder_options("resnet_tiny")
    assert "num_classes" not in encoder_options("uni")  # encoders are headless
    with pytest.raises(ConfigError, match=r"'resnet_tiny' has no option\(s\) \['depth'\]"):
        create_encoder("resnet_tiny", depth=2)
    with pytest.raises(ConfigError, match="'timm:resnet18' has no option"):
        create_encoder("timm:resnet18", empty=True, depht=3)
    # options over the tiny ones; saved (without the controls) and rebuilt from the checkpoint
    model = create_encoder("ssmamba_tiny", scan_backend="torch", depths=(1, 1, 2, 1))
    assert model.arch_kwargs == {"depths": (1, 1, 2, 1)} and len(model.stages[2]) == 2
    save_encoder(model, tmp_path / "e.pt")
    again, _ = load_encoder(tmp_path / "e.pt", scan_backend="torch")
    assert len(again.stages[2]) == 2


def test_one_resolver_decides_what_encoder_means(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, ckpt = _tiny_checkpoint(tmp_path)
    src = resolve_encoder_source(str(ckpt))
    assert src == EncoderSource("checkpoint", str(ckpt), str(ckpt), path=ckpt)
    assert src.label == "ssmamba" and src.source == str(ckpt.resolve()) and src.file == ckpt
    w = tmp_path / "w.pth"
    torch.save(create_encoder("resnet_tiny").state_dict(), w)
    src = resolve_encoder_source("resnet_tiny", w, need_weights=True)
    assert (src.kind, src.name, src.weights, src.label) == (
        "registered",
        "resnet_tiny",
        w,
        "resnet_tiny",
    )
    assert src.source == f"resnet_tiny:{w.resolve()}"
    assert resolve_encoder_source("timm:resnet18").kind == "registered"
    assert resolve_encoder_source("vit_tiny").weights is None  # random weights, where allowed
    cases = [  # (text, weights, need_weights) -> error class, message
        ("missing.pt", None, False, CheckpointError, "missing.pt does not exist"),
        ("models/ssmamba", None, False, CheckpointError, "does not exist"),
        (str(tmp_path), None, False, CheckpointError, "is a folder"),
        ("no_such_arch", w, False, ConfigError, "neither a checkpoint file nor a registered"),
        (str(ckpt), w, False, ConfigError, "already a checkpoint"),
        ("resnet_tiny", None, True, ConfigError, "--weights FILE"),
        (
            "resnet_tiny",
            tmp_path / "nope.pth",
            False,
            CheckpointError,
            "nope.pth for encoder .resnet_tiny. does not exist",
        ),
        ("timm:hf-hub:MahmoodLab/UNI", None, False, ConfigError, "never downloads"),
        ("timm:no_such_net", None, False, ConfigError, "no architecture"),
        ("", None, False, ConfigError, "no encoder given"),
    ]
    for text, weights, need, cls, match in cases:
        with pytest.raises(cls, match=match):
            resolve_encoder_source(text, weights, need_weights=need)
    # load_encoder resolves the same way (a timm name with a dot is not a file name)
    with pytest.raises(ConfigError, match="already a checkpoint"):
        load_encoder(ckpt, weights=w)
    model, spec = load_encoder(resolve_encoder_source("resnet_tiny", w))
    assert spec.weights_hash == load_encoder("resnet_tiny", weights=w)[1].weights_hash
    # the default feature set name, without resolving
    assert encoder_label("run/models/ssmamba_ft.pt") == "ssmamba_ft"
    assert (
        encoder_label("timm:vit_tiny_patch16_224.augreg_in21k")
        == "timm:vit_tiny_patch16_224.augreg_in21k"
    )
    assert encoder_label("resnet50") == "resnet50"


@pytest.mark.parametrize("name", list_encoders())
def test_registry_contract(name, tmp_path):
    """Every registered encoder: spec sane, builds, forward to (B, embed_dim); tiny variants also
    backward, and save -> load gives identical outputs on any scan backend."""
    spec = get_encoder_spec(name)
    assert spec.name == name and spec.input_px >= 32 and spec.mpp > 0 and spec.embed_dim > 0
    assert len(spec.mean) == 3 and len(spec.std) == 3 and min(spec.std) > 0
    if name in BIG:  # built on the meta device: parameter count and output width only
        model = create_encoder(name, empty=True)
        n_params_m = sum(p.numel() for p in model.parameters()) / 1e6
        assert abs(n_params_m - FOUNDATION_MODELS[name].params_m) < 0.01
        y = model(torch.empty(1, 3, spec.input_px, spec.input_px, device="meta"))
        assert y.shape == (1, spec.embed_dim)
        return
    torch.manual_seed(0)
    model = create_encoder(name, scan_backend="torch")
    n_params_m = sum(p.numel() for p in model.parameters()) / 1e6
    if name in PUBLISHED_M:
        want = PUBLISHED_M[name]
        assert abs(n_params_m - want) / want < 0.01, f"{n_params_m:.2f}M vs published {want}M"
    if name not in TINY:
        # full-size variants: instantiate and count; the smallest of a family also runs once
        if name in ("ssmamba_t", "medmamba_t"):
            with torch.no_grad():
                assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, spec.embed_dim)
        return
    x = torch.randn(2, 3, 64, 64)
    model.train()
    y = model(x)
    assert y.shape == (2, spec.embed_dim)
    y.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / f"{name}.pt"
    digest = save_encoder(model, path, {"data": "unit test", "steps": 0})
    loaded, lspec = load_encoder(path, scan_backend="torch")
    assert lspec.embed_dim == spec.embed_dim and lspec.weights_hash == digest[:16]
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
        # the scan backend is not part of the weights: the sequential oracle gives the same output
        seq = set_scan_backend(loaded, "sequential")(x)
    torch.testing.assert_close(seq, ref, rtol=1e-4, atol=1e-5)


def test_resnet50_loads_a_torchvision_layout_state_dict(tmp_path):
    torch.manual_seed(0)
    src = create_encoder("resnet50").eval()
    state = dict(src.state_dict())
    assert len(state) == 318 and "layer4.2.bn3.running_var" in state
    assert "layer1.0.downsample.1.num_batches_tracked" in state
    # a torchvision file also holds the 1000-class fc layer (320 entries) and may be DataParallel
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    file = tmp_path / "resnet50-torchvision.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, file)
    model, spec = load_encoder("resnet50", weights=file)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))
    assert spec.weights_hash is not None
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.randn(3, 3)}, bad)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_encoder("resnet50", weights=bad)


def _tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_encoder("ssmamba_tiny", scan_backend="torch")
    path = tmp_path / "ssmamba.pt"
    save_encoder(model, path, {"data": "x", "steps": 3, "loss": 0.5})
    return model, path


def test_checkpoint_contents(tmp_path):
    _, path = _tiny_checkpoint(tmp_path)
    ck = read_checkpoint(path)
    assert ck["format"] == "wsi-pipe-encoder" and ck["arch"] == "ssmamba_tiny"
    assert ck["embed_dim"] == 64 and ck["spec"]["input_px"] == 64
    assert ck["provenance"]["steps"] == 3 and len(ck["content_hash"]) == 64
    assert not list(tmp_path.glob(".*tmp-*")), "atomic write left a temp file"


def test_checkpoint_errors(tmp_path):
    _, path = _tiny_checkpoint(tmp_path)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_encoder(truncated)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="truncated, corrupt or of another kind"):
        load_encoder(text)
    bare = tmp_path / "bare.pt"
    torch.save(create_encoder("ssmamba_tiny").state_dict(), bare)
    with pytest.raises(CheckpointError, match="bare state dict"):
        load_encoder(bare)
    ck = torch.load(path, weights_only=True)
    ck["state_dict"]["norm.weight"] = ck["state_dict"]["norm.weight"] + 1
    tampered = tmp_path / "tampered.pt"
    torch.save(ck, tampered)
    with pytest.raises(CheckpointError, match="content hash"):
        load_encoder(tampered)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_encoder(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="no classifier head"):
        load_classifier(path)


@pytest.mark.gpu
def test_checkpoint_loads_on_gpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, path = _tiny_checkpoint(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.eval()(x)
        gpu, _ = load_encoder(path, device="cuda", scan_backend="torch")
        out = gpu(x.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)


# -------------------------------------------------------------------------------------- MAMIM
def test_mamim_masks_hide_content_and_loss_is_masked_only():
    torch.manual_seed(0)
    enc = create_encoder("ssmamba_tiny", scan_backend="torch")
    mim = MAMIM(enc, mask_px=8).eval()
    mask = mim.random_mask(2, 64, 64, 0.75, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 8, 8) and (mask.sum(dim=(1, 2)) == 48).all()
    x1 = torch.randn(2, 3, 64, 64)
    # change only the pixels under masked units: the encoder must not see the difference
    pix = mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand(-1, 3, -1, -1)
    x2 = torch.where(pix, torch.randn_like(x1), x1)
    per = 8 // enc.patch
    tok = mask.repeat_interleave(per, 1).repeat_interleave(per, 2)
    with torch.no_grad():
        f1 = enc.forward_tokens(x1, tok, mim.mask_token)
        f2 = enc.forward_tokens(x2, tok, mim.mask_token)
        f3 = enc.forward_tokens(x2)
    assert torch.equal(f1, f2)
    assert not torch.allclose(f1, f3)
    loss, pred = mim(x1, mask)
    assert pred.shape == x1.shape and loss.ndim == 0
    (g,) = torch.autograd.grad(loss, pred)
    assert (g[~pix] == 0).all() and (g[pix] != 0).float().mean() > 0.99


def test_mamim_rejects_encoders_without_token_grid():
    with pytest.raises(ValueError, match="token grid"):
        MAMIM(create_encoder("resnet_tiny"))


# ------------------------------------------------------------------------------ augmentations
def test_augmentations_keep_range_and_content():
    g = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    d = random_dihedral(tiles, g)
    for a, b in zip(tiles, d, strict=True):  # a dihedral map permutes pixels
        assert torch.equal(a.flatten(1).sort(dim=1).values, b.flatten(1).sort(dim=1).values)
    x = tiles.float() / 255
    assert torch.equal(hed_jitter(x, 0.0), x)
    # stain space round trip (no jitter drawn as identity) is exact up to float error
    j = hed_jitter(x.clamp_min(1 / 255), 1e-9, g)
    torch.testing.assert_close(j, x.clamp_min(1 / 255), rtol=0, atol=1e-4)
    out = augment_batch(tiles, generator=g)
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


#: the input px recommended for 150-px tiles at ~0.5 um/px (docs/encoder_quality.md)
RECOMMENDED_PX = 160


@pytest.mark.parametrize("name", [n for n in list_encoders() if n in TINY or n.endswith("_cpu")])
def test_encoders_accept_the_recommended_input_px(name):
    torch.manual_seed(0)
    model = create_encoder(name, scan_backend="torch").eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, RECOMMENDED_PX, RECOMMENDED_PX))
    assert y.shape == (1, get_encoder_spec(name).embed_dim) and torch.isfinite(y).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FULL if not n.endswith("_cpu") and n not in BIG])
def test_full_size_encoders_accept_the_recommended_input_px(name):
    model = create_encoder(name, scan_backend="torch").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, RECOMMENDED_PX, RECOMMENDED_PX)).shape[0] == 1


def test_mamim_on_the_cpu_encoder_at_160px():
    from wsi_pipe.stages.pretrain import default_mask_px

    torch.manual_seed(0)
    enc = create_encoder("ssmamba_cpu", scan_backend="torch")
    spec = get_encoder_spec("ssmamba_cpu")
    assert spec.input_px == RECOMMENDED_PX and RECOMMENDED_PX % enc.total_stride == 0
    mask_px = default_mask_px(RECOMMENDED_PX, enc.patch)
    mim = MAMIM(enc, mask_px=mask_px)
    x = torch.randn(2, 3, RECOMMENDED_PX, RECOMMENDED_PX)
    loss, pred = mim(x, mim.random_mask(2, RECOMMENDED_PX, RECOMMENDED_PX, 0.75))
    assert pred.shape == x.shape and torch.isfinite(loss)
