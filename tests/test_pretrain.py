"""MAMIM pretraining on real tiles of a real slide (CMU-1-Small-Region.svs, two mpp grids)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from wsi_pipe.core.config import PretrainConfig, TileConfig
from wsi_pipe.core.errors import EmptyInputError
from wsi_pipe.core.layout import EncoderSideFiles, RunLayout
from wsi_pipe.encoders import load_encoder, read_provenance
from wsi_pipe.stages import pretrain as pretrain_mod
from wsi_pipe.stages.pretrain import pretrain, warmup_cosine


@pytest.fixture(scope="module")
def tiled_run(wsi_dir, tmp_path_factory):
    from wsi_pipe.stages.tile import run_tile

    run = tmp_path_factory.mktemp("run")
    summary = run_tile(
        [str(wsi_dir / "CMU-1-Small-Region.svs")],
        run,
        TileConfig(target_mpps=(0.5, 1.0), tile_px=64),
        progress=False,
    )
    assert summary.count("failed") == 0
    assert RunLayout(run).tile_mpps() == [0.5, 1.0]
    return run


def small_cfg(**kw):
    base = dict(
        arch="ssmamba_tiny",
        input_px=64,
        epochs=1,
        steps_per_epoch=60,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        workers=0,
        device="cpu",
        scan_backend="torch",
        max_tiles=2000,
    )
    return PretrainConfig(**{**base, **kw})


def read_losses(path):
    with open(path) as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def test_mamim_on_real_tiles_lowers_loss(tiled_run):
    out = tiled_run / "models" / "ssmamba.pt"
    cfg = small_cfg(workers=1)  # tiles are read by a DataLoader worker process
    r = pretrain(tiled_run, cfg, out, progress=False)
    losses = read_losses(EncoderSideFiles.of(out).loss_csv)
    assert len(losses) == 60 == r.steps
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (
        f"reconstruction loss did not fall clearly: {first:.3f} -> {last:.3f}"
    )
    # tiles of both magnifications were sampled
    prov = read_provenance(out)
    assert prov["data"]["mpps"] == [0.5, 1.0] and prov["steps"] == 60 and prov["method"] == "MAMIM"
    assert prov["data"]["tiles_sampled"] == r.n_tiles > 100
    model, spec = load_encoder(out)
    assert spec.name == "ssmamba_tiny" and spec.weights_hash == r.content_hash[:16]
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 64)
    summary = json.loads(EncoderSideFiles.of(out).summary.read_text())
    assert len(summary["loss_curve"]) == 60
    assert not EncoderSideFiles.of(out).state.exists()


def test_resume_continues_from_the_last_checkpoint(tiled_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed.pt"
    cfg = small_cfg(steps_per_epoch=10, checkpoint_every=4, max_tiles=200)
    state = EncoderSideFiles.of(out).state

    def crash(*a, **k):
        raise RuntimeError("simulated crash after training, before the encoder was written")

    monkeypatch.setattr(pretrain_mod, "save_encoder", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(tiled_run, cfg, out, progress=False)
    monkeypatch.undo()
    assert state.exists() and not out.exists()
    saved = torch.load(state, weights_only=True)
    assert saved["step"] == 8
    before = read_losses(EncoderSideFiles.of(out).loss_csv)
    assert len(before) == 8
    r = pretrain(tiled_run, cfg, out, resume=True, progress=False)
    assert r.steps == 10 and out.exists() and not state.exists()
    after = read_losses(EncoderSideFiles.of(out).loss_csv)
    assert len(after) == 10 and after[:8] == before


def test_resume_ignores_a_state_of_another_config(tiled_run, tmp_path, monkeypatch, caplog):
    out = tmp_path / "other.pt"
    cfg = small_cfg(steps_per_epoch=6, checkpoint_every=2, max_tiles=100)
    monkeypatch.setattr(pretrain_mod, "save_encoder", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pretrain(tiled_run, cfg, out, progress=False)
    monkeypatch.undo()
    other = small_cfg(steps_per_epoch=6, checkpoint_every=2, max_tiles=100, lr=1e-3)
    r = pretrain(tiled_run, other, out, resume=True, progress=False)
    assert r.steps == 6 and "another arch/config" in caplog.text
    assert len(read_losses(EncoderSideFiles.of(out).loss_csv)) == 6


def test_lr_schedule_warmup_then_cosine():
    lrs = [warmup_cosine(s, 100, 10, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False))
    assert lrs[-1] == pytest.approx(0.01, abs=0.01)


def test_run_without_tiles_is_an_empty_input_error(tmp_path):
    with pytest.raises(EmptyInputError, match="wsi-pipe tile"):
        pretrain(tmp_path, small_cfg(), tmp_path / "x.pt", progress=False)


def test_pretrain_on_an_image_folder_cli(shared_data, tmp_path):
    """`wsi-pipe pretrain --images DIR` on a tiny subset of real Kather 2016 tiles (class
    sub-folders are read as plain images)."""
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    root = shared_data / "patches" / "kather2016_texture"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    images = tmp_path / "rois"
    for c in ("01_TUMOR", "07_ADIPOSE"):
        (images / c).mkdir(parents=True)
        for f in sorted((root / c).glob("*.tif"))[:4]:
            (images / c / f.name).symlink_to(f)
    out = tmp_path / "ssmamba_rois.pt"
    args = ["-q", "pretrain", "--images", str(images), "--arch", "ssmamba_tiny", "--input-px", "32",
            "--epochs", "1", "--steps-per-epoch", "3", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--scan-backend", "torch", "--out", str(out)]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    prov = read_provenance(out)
    assert prov["steps"] == 3 and prov["data"]["tiles_sampled"] == 8
    assert prov["data"]["images"] == str(images.resolve())
    model, spec = load_encoder(out, scan_backend="torch")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, spec.embed_dim)
    # a run folder and --images together, or an empty folder, are clear errors
    res = CliRunner().invoke(app, ["-q", "pretrain", str(tmp_path), "--images", str(images)])
    assert res.exit_code == 2 and "not both" in res.output
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(
        app, ["-q", "pretrain", "--images", str(tmp_path / "empty"), "--out", str(out)]
    )
    assert res.exit_code == 2 and "holds no images" in " ".join(res.output.split())


def test_pretrain_images_rejects_a_wrongly_sized_array(tmp_path):
    import numpy as np

    from wsi_pipe.core.errors import ConfigError
    from wsi_pipe.stages.pretrain import pretrain_images

    with pytest.raises(ConfigError, match=r"\(n, 64, 64, 3\)"):
        pretrain_images(np.zeros((2, 32, 32, 3), np.uint8), small_cfg(), tmp_path / "x.pt")
