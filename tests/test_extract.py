"""`wsi-pipe extract`: features equal the encoder applied to tiles read directly, on real slides.

Runs: real slides tiled by `wsi-pipe tile` (Aperio SVS via OpenSlide, OME-TIFF via tiffslide, a
3-level generic TIFF with an mpp override read at level > 0), tiny registered encoders with
local weights files or an `ssmamba.pt` checkpoint, both store backends.
"""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi_pipe.cli.app import app
from wsi_pipe.core.config import ExtractConfig, TileConfig
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import load_slide_table, save_slide_table
from wsi_pipe.data.tile_dataset import TileDataset, TileSource, collate_tiles
from wsi_pipe.encoders import checkpoint_hash, create_encoder, load_encoder, save_encoder
from wsi_pipe.readers import open_slide
from wsi_pipe.stages.extract import run_extract
from wsi_pipe.stages.tile import run_tile
from wsi_pipe.store import open_store
from wsi_pipe.synth import blank_painter, write_pyramidal_tiff

MPPS = (0.5, 1.0)
SLIDES = ("cmu", "ome", "bracs")


class _Cli:
    def __init__(self, exit_code: int, output: str) -> None:
        self.exit_code, self.output = exit_code, output


def _extract_cli(run: Path, *args: str) -> _Cli:
    """`wsi-pipe -q extract RUN ARGS` in-process; output with rich's line wrapping undone."""
    res = CliRunner().invoke(app, ["-q", "extract", str(run), *args])
    return _Cli(res.exit_code, " ".join(res.output.split()))


def _copy_run(src: Path, dst: Path, slides: tuple[str, ...] | None = None) -> Path:
    """A fresh run folder with the tiles and slide table of `src` (no features, state, locks),
    optionally only some of its slides."""
    dst.mkdir(parents=True)
    shutil.copytree(src / "tiles", dst / "tiles")
    entries = load_slide_table(src / "slides.json")
    save_slide_table(
        dst / "slides.json", [e for e in entries if slides is None or e.slide_id in slides]
    )
    return dst


@pytest.fixture(scope="module")
def tiled(wsi_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real slides tiled at 0.5 and 1.0 um/px, 64-px tiles."""
    d = tmp_path_factory.mktemp("tiled")
    m = d / "slides.csv"
    m.write_text(
        "slide_id,path,mpp\n"
        f"cmu,{wsi_dir / 'CMU-1-Small-Region.svs'},\n"
        f"ome,{wsi_dir / 'OS-1-detail_HE.ome.tif'},\n"
        f"bracs,{wsi_dir / 'BRACS_1640_N_3_cropped.tiff'},0.25\n"
    )
    s = run_tile([str(m)], d / "run", TileConfig(target_mpps=MPPS, tile_px=64), progress=False)
    assert s.ok, s.results
    return d / "run"


@pytest.fixture(scope="module")
def vit_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local state-dict file of the registered `vit_tiny` (the fastest tiny encoder)."""
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / "vit_tiny.pth"
    torch.save(create_encoder("vit_tiny").state_dict(), p)
    return p


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local state-dict file of the registered `resnet_tiny` (random, seeded)."""
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / "resnet_tiny.pth"
    torch.save(create_encoder("resnet_tiny").state_dict(), p)
    return p


def _direct_features(
    store_attrs: dict, coords: np.ndarray, model: torch.nn.Module, spec
) -> np.ndarray:
    """The encoder applied to tiles read straight from the slide, without the extract stage."""
    a = store_attrs
    size = int(a["read_size_px"])
    tiles = []
    with open_slide(a["slide_path"], backend=a["backend"], mpp_override=a["level0_mpp"]) as r:
        for x, y in coords:
            t = r.read_region((int(x), int(y)), int(a["read_level"]), (size, size))
            if size != spec.input_px:
                interp = cv2.INTER_AREA if size > spec.input_px else cv2.INTER_LINEAR
                t = cv2.resize(t, (spec.input_px, spec.input_px), interpolation=interp)
            tiles.append(t)
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.eval()(x).numpy()


def _read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    with open_store(path) as r:
        return r.attrs, {n: r.read(n) for n in r.names}


# ------------------------------------------------------------------------------- correctness
def test_features_equal_encoder_on_direct_reads_both_backends(tiled, weights, tmp_path):
    run = _copy_run(tiled, tmp_path / "run")
    lay = RunLayout(run)
    res = _extract_cli(
        run,
        "--encoder",
        "resnet_tiny",
        "--weights",
        str(weights),
        "--workers",
        "2",
        "--batch-size",
        "32",
        "--clam-export",
    )
    assert res.exit_code == 0, res.output
    res = _extract_cli(
        run,
        "--encoder",
        "resnet_tiny",
        "--weights",
        str(weights),
        "--workers",
        "0",
        "--threads",
        "1",
        "--store",
        "zarr",
    )
    assert res.exit_code == 0, res.output
    model, spec = load_encoder("resnet_tiny", weights=weights)
    for sid in SLIDES:
        for mpp in MPPS:
            h5_attrs, h5 = _read(lay.feature_store("resnet_tiny", sid, mpp, "h5"))
            z_attrs, z = _read(lay.feature_store("resnet_tiny", sid, mpp, "zarr"))
            c_attrs, c = _read(lay.coords_store(sid, mpp, "h5"))
            # both backends read back identically (workers 2 vs 0: the same numbers)
            assert (
                h5.keys() == z.keys() == {"coords", "tissue_fraction", "parent_index", "features"}
            )
            for name in h5:
                np.testing.assert_array_equal(h5[name], z[name])
            # same rows as the coords store, parent links kept
            for name in ("coords", "tissue_fraction", "parent_index"):
                np.testing.assert_array_equal(h5[name], c[name])
            assert h5["features"].shape == (len(c["coords"]), spec.embed_dim)
            assert h5["features"].dtype == np.float32 and len(c["coords"]) > 0
            want = _direct_features(c_attrs, c["coords"], model, spec)
            np.testing.assert_allclose(h5["features"], want, rtol=1e-4, atol=1e-5)
            for a in (h5_attrs, z_attrs):
                assert a["kind"] == "features" and a["schema_version"] == 1
                assert a["encoder"] == "resnet_tiny" and a["precision"] == "fp32"
                assert a["weights_hash"] == spec.weights_hash and len(a["weights_hash"]) == 16
                assert a["parent_mpp"] == c_attrs["parent_mpp"]
                assert a["target_mpp"] == mpp and a["coords_config_hash"] == c_attrs["config_hash"]
            assert h5_attrs["config_hash"] != z_attrs["config_hash"]  # store is part of the config
            # CLAM layout: h5_files/ with features + coords, pt_files/ with the tensor
            clam = lay.clam_export_dir("resnet_tiny", mpp)
            with h5py.File(clam / "h5_files" / f"{sid}.h5", "r") as f:
                np.testing.assert_array_equal(f["features"][:], h5["features"])
                np.testing.assert_array_equal(f["coords"][:], h5["coords"])
                assert f["coords"].attrs["patch_size_level0"] > 0
            pt = torch.load(clam / "pt_files" / f"{sid}.pt", weights_only=True)
            np.testing.assert_array_equal(pt.numpy(), h5["features"])
    # the bracs tiles are read at a reduced level (mpp override 0.25, 3-level TIFF)
    assert _read(lay.coords_store("bracs", 1.0, "h5"))[0]["read_level"] > 0
    # chunks: thousands of rows, or the whole array when it is smaller
    with h5py.File(lay.feature_store("resnet_tiny", "cmu", 0.5, "h5"), "r") as f:
        assert f["features"].chunks[0] >= min(1024, f["features"].shape[0])
    cfg_text = lay.extract_config("resnet_tiny").read_text()
    assert "resnet_tiny" in cfg_text and "device: cpu" in cfg_text


def test_ssmamba_checkpoint_low_precision_and_float16_store(tiled, tmp_path):
    run = _copy_run(tiled, tmp_path / "run", slides=("ome", "bracs"))  # the pure-torch scan is slow
    lay = RunLayout(run)
    torch.manual_seed(1)
    ckpt = lay.models_dir / "ssmamba.pt"
    save_encoder(create_encoder("ssmamba_tiny"), ckpt)
    model, spec = load_encoder(ckpt)
    res = _extract_cli(
        run,
        "--encoder",
        str(ckpt),
        "--mpp",
        "1.0",
        "--precision",
        "bf16",
        "--feature-dtype",
        "float16",
        "--workers",
        "1",
    )
    assert res.exit_code == 0, res.output
    assert not lay.features_dir("ssmamba", 0.5).exists()  # only the grid asked for
    for sid in ("ome", "bracs"):
        attrs, got = _read(lay.feature_store("ssmamba", sid, 1.0, "h5"))
        c_attrs, c = _read(lay.coords_store(sid, 1.0, "h5"))
        assert got["features"].dtype == np.float16
        assert attrs["precision"] == "bf16" and attrs["weights_hash"] == checkpoint_hash(ckpt)
        want = _direct_features(c_attrs, c["coords"], model, spec)
        err = np.linalg.norm(got["features"].astype(np.float32) - want) / np.linalg.norm(want)
        assert err < 0.05, f"{sid}: bf16 relative error {err:.3f}"


def test_zero_tile_slide_gives_empty_store(tmp_path, weights):
    write_pyramidal_tiff(tmp_path / "blank.tif", 1024, 1024, 0.5, levels=1, painter=blank_painter)
    run = tmp_path / "run"
    assert run_tile([str(tmp_path / "blank.tif")], run, TileConfig(tile_px=64), progress=False).ok
    for store in ("h5", "zarr"):
        cfg = ExtractConfig(encoder="resnet_tiny", weights=str(weights), store=store)
        s = run_extract(run, cfg, progress=False)
        assert s.ok and s.results[0].info["tiles"] == {"0.5": 0}
        attrs, arrays = _read(RunLayout(run).feature_store("resnet_tiny", "blank", 0.5, store))
        assert arrays["features"].shape == (0, 64) and arrays["coords"].shape == (0, 2)
        assert attrs["embed_dim"] == 64


def test_resume_overwrite_and_new_weights(tiled, weights, tmp_path):
    run = _copy_run(tiled, tmp_path / "run")
    lay = RunLayout(run)
    cfg = ExtractConfig(
        encoder="resnet_tiny", weights=str(weights), mpps=(1.0,), workers=0, threads=1
    )
    assert run_extract(run, cfg, progress=False).count("done") == 3
    store = lay.feature_store("resnet_tiny", "cmu", 1.0, "h5")
    mtime = store.stat().st_mtime_ns
    s = run_extract(run, cfg, progress=False)
    assert s.count("skipped") == 3 and store.stat().st_mtime_ns == mtime
    assert run_extract(run, cfg, progress=False, overwrite=True).count("done") == 3
    # other weights under the same feature set name: the stores are stale and get redone
    torch.manual_seed(5)
    other = tmp_path / "other.pth"
    torch.save(create_encoder("resnet_tiny").state_dict(), other)
    s = run_extract(run, cfg.model_copy(update={"weights": str(other)}), progress=False)
    assert s.count("done") == 3
    assert (
        _read(store)[0]["weights_hash"]
        == load_encoder("resnet_tiny", weights=other)[1].weights_hash
    )
    state = json.loads(lay.state_file("extract/resnet_tiny", "cmu").read_text())
    assert state["status"] == "done" and state["attempts"] == 3


# --------------------------------------------------------------------------------- bad input
def test_bad_encoder_files_are_clear_errors(tiled, weights, tmp_path):
    run = _copy_run(tiled, tmp_path / "run")
    res = _extract_cli(run, "--encoder", str(tmp_path / "missing.pt"))
    assert res.exit_code == 2 and "missing.pt does not exist" in res.output
    foreign = tmp_path / "foreign.pt"
    foreign.write_bytes(b"not a checkpoint at all" * 10)
    res = _extract_cli(run, "--encoder", str(foreign))
    assert res.exit_code == 2 and "foreign.pt" in res.output and "checkpoint" in res.output
    res = _extract_cli(run, "--encoder", str(weights))  # a bare state dict is not a checkpoint
    assert res.exit_code == 2 and "state dict" in res.output
    res = _extract_cli(run, "--encoder", "resnet_tiny")  # an architecture needs local weights
    assert res.exit_code == 2 and "--weights" in res.output
    res = _extract_cli(run, "--encoder", "no_such_arch", "--weights", str(weights))
    assert res.exit_code == 2 and "registered" in res.output
    res = _extract_cli(run, "--encoder", "vit_tiny", "--weights", str(weights))
    assert res.exit_code == 2 and "does not fit" in res.output
    res = _extract_cli(run, "--encoder", "resnet_tiny", "--weights", str(weights), "--mpp", "0.3")
    assert res.exit_code == 2 and "0.3" in res.output
    assert not (run / "features").exists()


def test_bad_slides_and_stores_fail_alone(tiled, weights, tmp_path):
    run = _copy_run(tiled, tmp_path / "run")
    lay = RunLayout(run)
    # cmu: its coords store comes from another schema version
    p = lay.coords_store("cmu", 1.0, "h5")
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 99
    # bracs: the slide moved away (neither the slide table nor the store knows where)
    slide = tmp_path / "bracs.tiff"
    entries = load_slide_table(lay.slides_table)
    shutil.copy2(next(e.path for e in entries if e.slide_id == "bracs"), slide)
    entries = [
        e if e.slide_id != "bracs" else e.__class__(**{**e.__dict__, "path": str(slide)})
        for e in entries
    ]
    save_slide_table(lay.slides_table, entries)
    for mpp in MPPS:
        with h5py.File(lay.coords_store("bracs", mpp, "h5"), "a") as f:
            f.attrs["slide_path"] = str(slide)
    slide.rename(tmp_path / "elsewhere.tiff")
    res = _extract_cli(run, "--encoder", "resnet_tiny", "--weights", str(weights), "--mpp", "1.0")
    assert res.exit_code == 1, res.output
    states = {s: json.loads(lay.state_file("extract/resnet_tiny", s).read_text()) for s in SLIDES}
    assert states["ome"]["status"] == "done"
    assert lay.feature_store("resnet_tiny", "ome", 1.0, "h5").exists()
    assert states["cmu"]["status"] == "failed"
    assert "StoreSchemaError" in states["cmu"]["error"] and "slide cmu" in states["cmu"]["error"]
    assert "schema version 99" in states["cmu"]["error"] and "--overwrite" in states["cmu"]["error"]
    assert states["bracs"]["status"] == "failed"
    err = states["bracs"]["error"]
    assert "slide bracs" in err and "does not exist" in err and "slides.json" in err
    # bracs comes back, but truncated: unreadable, a clear error again; cmu gets a good store
    data = (tmp_path / "elsewhere.tiff").read_bytes()
    slide.write_bytes(data[: len(data) // 3])
    shutil.copy2(tiled / "tiles" / "mpp1" / "cmu.h5", p)
    res = _extract_cli(run, "--encoder", "resnet_tiny", "--weights", str(weights), "--mpp", "1.0")
    assert res.exit_code == 1
    err = json.loads(lay.state_file("extract/resnet_tiny", "bracs").read_text())["error"]
    assert "SlideReadError" in err and "bracs" in err
    assert lay.feature_store("resnet_tiny", "cmu", 1.0, "h5").exists()
    # another file under the slide's name: its size differs from the one tiled
    slide.unlink()
    shutil.copy2(
        Path(next(e.path for e in entries if e.slide_id == "cmu")).with_name(
            "CMU-1_16x16_tiny.svs"
        ),
        slide,
    )
    res = _extract_cli(run, "--encoder", "resnet_tiny", "--weights", str(weights), "--mpp", "1.0")
    err = json.loads(lay.state_file("extract/resnet_tiny", "bracs").read_text())["error"]
    assert res.exit_code == 1 and "tile --overwrite" in err
    assert not [p for p in (run / "features").rglob("*") if p.name.startswith(".")]


# ----------------------------------------------------------------------------- kill and resume
def test_sigkill_mid_slide_then_rerun_gives_complete_identical_stores(
    wsi_dir, vit_weights, tmp_path
):
    # "a" (small) is done first, "b" (about 2,400 tiles) is killed while its store is being written
    m = tmp_path / "m.csv"
    m.write_text(
        f"slide_id,path\na,{wsi_dir / 'OS-1-detail_HE.ome.tif'}\n"
        f"b,{wsi_dir / 'CMU-1-Small-Region.svs'}\n"
    )
    run = tmp_path / "run"
    assert run_tile([str(m)], run, TileConfig(tile_px=32), progress=False).ok
    ref = _copy_run(run, tmp_path / "ref")
    lay = RunLayout(run)
    feat_dir = lay.features_dir("vit_tiny", 0.5)
    # batch size 1 without workers: slow enough to be caught in the middle of slide b
    cmd = [
        sys.executable,
        "-m",
        "wsi_pipe.cli.app",
        "-q",
        "extract",
        str(run),
        "--encoder",
        "vit_tiny",
        "--weights",
        str(vit_weights),
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not list(feat_dir.glob(".b.h5.tmp-*")):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "slide b never started"
            time.sleep(0.02)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    visible = sorted(p.name for p in feat_dir.iterdir() if not p.name.startswith("."))
    assert visible == ["a.h5"], "slide b finished before the kill: make it slower"
    a_mtime = (feat_dir / "a.h5").stat().st_mtime_ns
    # rerun: a is skipped, b is redone from scratch (its stale lock broken, temp removed)
    cfg = ExtractConfig(encoder="vit_tiny", weights=str(vit_weights), workers=2)
    s = run_extract(run, cfg, progress=False)
    assert {r.slide_id: r.status for r in s.results} == {"a": "skipped", "b": "done"}
    assert (feat_dir / "a.h5").stat().st_mtime_ns == a_mtime
    assert sorted(p.name for p in feat_dir.iterdir()) == ["a.h5", "b.h5"]
    # identical to an uninterrupted run
    assert run_extract(ref, cfg, progress=False).ok
    for sid in ("a", "b"):
        got_attrs, got = _read(lay.feature_store("vit_tiny", sid, 0.5, "h5"))
        want_attrs, want = _read(RunLayout(ref).feature_store("vit_tiny", sid, 0.5, "h5"))
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_array_equal(got[name], want[name])
        assert got_attrs["features_key"] == want_attrs["features_key"]
    assert len(got["features"]) > 2000


# ----------------------------------------------------------------------------------- dataset
def test_tile_dataset_items_collate_and_pickle(wsi_dir):
    path = wsi_dir / "OS-1-detail_HE.ome.tif"
    coords = np.array([[0, 0], [500, 300], [1080, 1080]], np.int64)  # the last runs off the edge
    ds = TileDataset(TileSource("ome", str(path), "tiffslide", 0, 100, 64, coords, 0.2271))
    tile, row = ds[1]
    assert tile.shape == (3, 64, 64) and tile.dtype == torch.uint8 and row == 1
    with open_slide(path, backend="tiffslide") as r:
        direct = cv2.resize(
            r.read_region((500, 300), 0, (100, 100)), (64, 64), interpolation=cv2.INTER_AREA
        )
    np.testing.assert_array_equal(tile.permute(1, 2, 0).numpy(), direct)
    edge = ds[2][0]
    assert (edge[:, -20:, :] == 255).all()  # outside the slide: white
    tiles, rows = collate_tiles([ds[i] for i in range(3)])
    assert tiles.shape == (3, 3, 64, 64) and rows.tolist() == [0, 1, 2]
    assert tiles.is_contiguous(memory_format=torch.channels_last)
    clone = pickle.loads(pickle.dumps(ds))  # a spawned worker gets no handle, opens its own
    assert clone._reader is None and torch.equal(clone[1][0], tile)
    ds.close()
    clone.close()


def _worker_pids(pool) -> list[int]:
    return sorted(w.pid for w in pool._it._workers)


def test_tile_pool_keeps_workers_across_slides_and_recovers_from_a_bad_one(wsi_dir, tmp_path):
    from wsi_pipe.core.errors import SlideReadError
    from wsi_pipe.data.tile_dataset import TilePool

    ome = TileSource(
        "ome",
        str(wsi_dir / "OS-1-detail_HE.ome.tif"),
        "tiffslide",
        0,
        100,
        64,
        np.array([[x, y] for x in range(0, 900, 150) for y in range(0, 900, 300)], np.int64),
        0.2271,
    )
    cmu_path = wsi_dir / "CMU-1-Small-Region.svs"
    cmu = TileSource(
        "cmu",
        str(cmu_path),
        "openslide",
        0,
        128,
        64,
        np.array([[x, 400] for x in range(0, 1600, 100)], np.int64),
        None,
    )
    with open_slide(cmu_path) as r:
        lv1 = 1 if r.level_count > 1 else 0
    cmu1 = TileSource("cmu", str(cmu_path), "openslide", lv1, 64, 64, cmu.coords[:5], None)

    def direct(src: TileSource) -> np.ndarray:
        ds = TileDataset(src)
        try:
            return np.stack([ds.read_tile(i) for i in range(len(src.coords))])
        finally:
            ds.close()

    def read(pool: TilePool, src: TileSource, bs: int = 4) -> np.ndarray:
        got, rows = [], []
        for tiles, r in pool.batches(src, bs):
            assert tiles.dtype == torch.uint8 and tiles.is_contiguous(
                memory_format=torch.channels_last
            )
            got.append(tiles.permute(0, 2, 3, 1).numpy())
            rows.append(r.numpy())
        assert np.concatenate(rows).tolist() == list(range(len(src.coords)))
        return np.concatenate(got)

    with TilePool(2) as pool:
        np.testing.assert_array_equal(read(pool, ome), direct(ome))
        pids = _worker_pids(pool)
        # another slide, another reader backend, another level, a slide seen before
        for src in (cmu, cmu1, ome):
            np.testing.assert_array_equal(read(pool, src, bs=3), direct(src))
            assert _worker_pids(pool) == pids  # the same worker processes served every slide
        # a slide abandoned after one batch does not leak into the next one
        next(pool.batches(cmu, 2))
        np.testing.assert_array_equal(read(pool, ome), direct(ome))
        # a truncated slide: a clear error naming it; after discard() the next slide gets new workers
        bad = tmp_path / "bad.svs"
        bad.write_bytes(cmu_path.read_bytes()[: cmu_path.stat().st_size // 3])
        with pytest.raises(SlideReadError, match=r"^slide 'bad' .*truncated"):
            read(pool, TileSource("bad", str(bad), "openslide", 0, 128, 64, cmu.coords, None))
        pool.discard()
        np.testing.assert_array_equal(read(pool, cmu), direct(cmu))
        assert set(_worker_pids(pool)).isdisjoint(pids)
    # persistent=False (the benchmark's baseline): fresh workers for every slide, same tiles
    with TilePool(2, persistent=False) as pool:
        np.testing.assert_array_equal(read(pool, ome), direct(ome))
        first = _worker_pids(pool)
        np.testing.assert_array_equal(read(pool, ome), direct(ome))
        assert set(_worker_pids(pool)).isdisjoint(first)
