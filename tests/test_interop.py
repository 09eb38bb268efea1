"""CLAM and TRIDENT, both ways (docs/interop.md).

Out: for every grid of real and synthetic slides, CLAM's reading of our CLAM export
(read_region(coord, patch_level, patch_size) -> a level-0 box of patch_size x level downsample)
and TRIDENT's reading of our native store (patch_size x level0_mag / target_mag level-0 px) cover
our tile boxes (x, y, tile_size_level0). In: CLAM/TRIDENT-layout folders, written with their
published h5 layout (dataset names, attributes, one-row chunks, resizable rows, pt tensors), feed
train-mil / predict / heatmap through the CLI, and their coords re-extract to the same features
as our own tiling of the same grid.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi_pipe.cli.app import app
from wsi_pipe.core.config import ExtractConfig, TileConfig
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import load_slide_table
from wsi_pipe.encoders import create_encoder
from wsi_pipe.interop import h5io
from wsi_pipe.mil.data import synthetic_bags
from wsi_pipe.readers import open_slide
from wsi_pipe.stages.extract import CoordsImport, _export_clam, import_coords, run_extract
from wsi_pipe.stages.tile import run_tile
from wsi_pipe.store import open_store, schema, write_store
from wsi_pipe.synth import DiscPainter, blank_painter, write_pyramidal_tiff

ENCODER = "resnet_tiny"
TILE_PX = 64
MPPS = (0.5, 1.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["-q", *args])
    return res.exit_code, " ".join(res.output.split())


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / f"{ENCODER}.pth"
    torch.save(create_encoder(ENCODER).state_dict(), p)
    return p


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic 0.25 um/px slides (levels 1, 2, 4 and 1, 4, 16) with tissue discs."""
    d = tmp_path_factory.mktemp("slides")
    paint = DiscPainter([(400, 300, 260), (900, 520, 180)])
    write_pyramidal_tiff(d / "s2.tif", 1200, 800, 0.25, levels=3, painter=paint)
    write_pyramidal_tiff(d / "s4.tif", 1200, 800, 0.25, levels=3, painter=paint, level_step=4)
    return d


@pytest.fixture(scope="module")
def ours(slides: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our own run: tiled at 0.5 and 1.0 um/px, 64-px tiles, extracted with the CLAM export."""
    run = tmp_path_factory.mktemp("ours") / "run"
    s = run_tile([str(slides)], run, TileConfig(target_mpps=MPPS, tile_px=TILE_PX), progress=False)
    assert s.ok, s.results
    cfg = ExtractConfig(
        encoder=ENCODER, weights=str(weights), workers=0, batch_size=32, clam_export=True
    )
    s = run_extract(run, cfg, progress=False)
    assert s.ok, s.results
    return run


def _clam_side_l0(attrs: dict, reader) -> float:
    """What CLAM's Whole_Slide_Bag_FP reads, in level-0 px."""
    return int(attrs["patch_size"]) * float(reader.level_downsamples[int(attrs["patch_level"])])


def _trident_side_l0(attrs: dict) -> int:
    """What TRIDENT's WSIPatcher reads, in level-0 px (round(patch_size * src_mag / dst_mag))."""
    ratio = float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    return int(round(int(attrs["patch_size"]) * ratio))


def _check_grid(coords_store: Path, clam_coords_attrs: dict) -> tuple[float, float]:
    """Assert both loaders' boxes against ours; returns (|CLAM - ours|, allowed) in level-0 px."""
    with open_store(coords_store) as r:
        root, native, coords = r.attrs, r.array_attrs(schema.COORDS), r.read(schema.COORDS)
    side = int(root["tile_size_level0"])
    with open_slide(root["slide_path"], mpp_override=root["level0_mpp"]) as reader:
        clam = _clam_side_l0(clam_coords_attrs, reader)
        level_ds = float(reader.level_downsamples[int(clam_coords_attrs["patch_level"])])
    # TRIDENT on the native store: exactly our box (its arithmetic rounds the exact side)
    assert _trident_side_l0(native) == side
    # CLAM on the export: patch_size px at patch_level = our read, so its box is
    # read_size_px * level_ds; exact when the exact side is a whole number of level px, else
    # within half a level pixel of the exact side (+ our rounding of it to an integer)
    exact = float(root["tile_size_level0_exact"])
    allowed = (level_ds + 1) / 2
    assert abs(clam - side) <= allowed
    if float(exact / level_ds).is_integer():
        assert clam == side
    # both read at the same top-left: the stored coords are the tile boxes' origins
    assert coords.dtype == np.int64 and coords.shape[1] == 2
    return abs(clam - side), allowed


# ------------------------------------------------------------------------------------ out
def test_clam_export_is_clam_correct_on_synthetic_slides(ours: Path) -> None:
    lay = RunLayout(ours)
    seen = 0
    for mpp in MPPS:
        for sid in ("s2", "s4"):
            h5 = lay.clam_export_h5(ENCODER, sid, mpp)
            patches = lay.clam_export_patches(ENCODER, sid, mpp)
            pt = lay.clam_export_pt(ENCODER, sid, mpp)
            with h5py.File(h5, "r") as f, h5py.File(patches, "r") as p:
                feats, coords = f["features"], f["coords"]
                # CLAM's save_hdf5 layout: one-row chunks, resizable rows
                assert feats.chunks == (1, feats.shape[1]) and feats.maxshape == (
                    None,
                    feats.shape[1],
                )
                assert coords.chunks == (1, 2) and coords.maxshape == (None, 2)
                assert list(p) == ["coords"] and p["coords"].chunks == (1, 2)
                np.testing.assert_array_equal(p["coords"][:], coords[:])
                attrs = dict(coords.attrs)
                assert dict(p["coords"].attrs).keys() == attrs.keys()
                for k in ("patch_size", "patch_level", "downsample", "downsampled_level_dim",
                          "level_dim", "name", "save_path", "target_patch_size"):  # fmt: skip
                    assert k in attrs, k
                # no TRIDENT keys: TRIDENT falls back to its CLAM reader for these files
                assert "level0_magnification" not in attrs
                ft = torch.load(pt, weights_only=True)
                np.testing.assert_array_equal(ft.numpy(), feats[:])
            store = lay.find_coords_store(sid, mpp)
            assert store is not None
            diff, _ = _check_grid(store, attrs)
            assert diff == 0  # integer read sizes here: exact
            assert int(attrs["target_patch_size"]) == TILE_PX
            seen += 1
    assert seen == 4


def test_issue_example_224px_at_0_5_on_a_0_25_slide(slides: Path, tmp_path: Path) -> None:
    """0.25 um/px slide with levels 1, 4, 16 tiled at 0.5 um/px, 224-px tiles: the native store
    keeps TRIDENT's patch_size 224 (at 20x); the CLAM export says 448 px at level 0."""
    run = tmp_path / "run"
    cfg = TileConfig(target_mpps=(0.5,), tile_px=224)
    assert run_tile([str(slides / "s4.tif")], run, cfg, progress=False).ok
    store = RunLayout(run).find_coords_store("s4", 0.5)
    assert store is not None
    with open_store(store) as r:
        native = r.array_attrs(schema.COORDS)
        feats = np.zeros((len(r), 3), np.float32)
        arrays = {n: r.read(n) for n in r.names}
        attrs = {**r.attrs, "kind": schema.KIND_FEATURES}
    assert (native["patch_level"], native["patch_size"]) == (0, 224)  # TRIDENT meaning
    assert _trident_side_l0(native) == 448
    fstore = tmp_path / "f.h5"
    write_store(fstore, {**arrays, "features": feats}, attrs, {"coords": native})
    out = tmp_path / "clam"
    _export_clam(fstore, out / "h5_files/s4.h5", out / "pt_files/s4.pt", out / "patches/s4.h5")
    with h5py.File(out / "h5_files/s4.h5", "r") as f:
        clam = dict(f["coords"].attrs)
    assert (clam["patch_level"], clam["patch_size"], clam["target_patch_size"]) == (0, 448, 224)


SHARED_SLIDES = {
    "cmu": ("CMU-1-Small-Region.svs", None),
    "ome": ("OS-1-detail_HE.ome.tif", None),
    "bracs": ("BRACS_1640_N_3_cropped.tiff", 0.25),
}


def test_clam_and_trident_readings_cover_our_boxes_on_real_slides(
    wsi_dir: Path, tmp_path: Path
) -> None:
    m = tmp_path / "slides.csv"
    rows = [f"{sid},{wsi_dir / name},{mpp or ''}" for sid, (name, mpp) in SHARED_SLIDES.items()]
    m.write_text("slide_id,path,mpp\n" + "\n".join(rows) + "\n")
    run = tmp_path / "run"
    cfg = TileConfig(target_mpps=(0.5, 1.0, 2.0), tile_px=100)
    s = run_tile([str(m)], run, cfg, progress=False)
    assert s.ok, s.results
    lay = RunLayout(run)
    worst = []
    for mpp in (0.5, 1.0, 2.0):
        for sid in SHARED_SLIDES:
            store = lay.find_coords_store(sid, mpp)
            assert store is not None
            with open_store(store) as r:
                arrays = {n: r.read(n) for n in r.names}
                attrs = {**r.attrs, "kind": schema.KIND_FEATURES}
                native = r.array_attrs(schema.COORDS)
            fstore = tmp_path / "f" / f"{sid}_{mpp}.h5"
            feats = np.zeros((len(arrays["coords"]), 2), np.float32)
            write_store(fstore, {**arrays, "features": feats}, attrs, {"coords": native})
            out = tmp_path / "clam" / str(mpp)
            h5, pt, pa = (out / d / f"{sid}.{e}" for d, e in
                          (("h5_files", "h5"), ("pt_files", "pt"), ("patches", "h5")))  # fmt: skip
            _export_clam(fstore, h5, pt, pa)
            with h5py.File(h5, "r") as f:
                worst.append(_check_grid(store, dict(f["coords"].attrs)))
    assert len(worst) == 9


# ------------------------------------------------------------------------------------- in
def _trident_coords_folder(ours: Path, job: Path, mpp: float, level0_mag: float) -> Path:
    """TRIDENT's layout of our grid: JOB/20x_64px_0px_overlap/patches/<slide>_patches.h5."""
    mag = level0_mag * 0.25 / mpp
    grid = job / f"{mag:g}x_{TILE_PX}px_0px_overlap"
    for store in sorted(RunLayout(ours).tiles_dir(mpp).glob("*.h5")):
        with open_store(store) as r:
            coords, root = r.read("coords"), r.attrs
        attrs = {
            "patch_size": TILE_PX,
            "patch_size_level0": TILE_PX * int(level0_mag) // int(mag),
            "level0_magnification": level0_mag,
            "target_magnification": mag,
            "overlap": 0,
            "name": root["slide_id"],
            "savetodir": str(grid),
            "level0_width": root["level0_width"],
            "level0_height": root["level0_height"],
        }
        h5io.write_h5(
            grid / "patches" / f"{root['slide_id']}_patches.h5",
            {"coords": coords},
            {"coords": attrs},
        )
    return grid


def _features(run: Path, sid: str, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    p = RunLayout(run).find_feature_store(ENCODER, sid, mpp)
    assert p is not None
    with open_store(p) as r:
        return r.read("features"), r.read("coords")


@pytest.mark.parametrize("fmt", ["clam", "trident"])
def test_imported_coords_extract_to_our_features(
    fmt: str, ours: Path, slides: Path, weights: Path, tmp_path: Path
) -> None:
    mpp = 0.5
    if fmt == "clam":
        src = RunLayout(ours).clam_export_dir(ENCODER, mpp) / "patches"
    else:
        src = _trident_coords_folder(ours, tmp_path / "job", mpp, 40.0)
    run = tmp_path / "imported"
    code, out = _cli(
        "extract", str(run), "--coords", str(src), "--slides", str(slides),
        "--encoder", ENCODER, "--weights", str(weights), "--workers", "0",
    )  # fmt: skip
    assert code == 0, out
    for sid in ("s2", "s4"):
        store = RunLayout(run).find_coords_store(sid, mpp)
        assert store is not None  # the grid folder is tiles/mpp0.5
        with open_store(store) as r:
            assert r.attrs["imported_from"] == fmt
            assert np.isnan(r.read("tissue_fraction")).all()
            assert (r.read("parent_index") == -1).all()
            assert r.attrs["target_mpp"] == pytest.approx(0.5)
            read = (r.attrs["read_level"], r.attrs["read_size_px"])
        if fmt == "clam":  # our reader reads what CLAM's read_region(coord, level, size) reads
            with h5py.File(src / f"{sid}.h5", "r") as f:
                assert read == (f["coords"].attrs["patch_level"], f["coords"].attrs["patch_size"])
        theirs, c_theirs = _features(run, sid, mpp)
        mine, c_mine = _features(ours, sid, mpp)
        np.testing.assert_array_equal(c_theirs, c_mine)
        np.testing.assert_allclose(theirs, mine, rtol=0, atol=1e-5)
    assert {e.slide_id for e in load_slide_table(RunLayout(run).slides_table)} == {"s2", "s4"}
    # importing over a grid that `wsi-pipe tile` made is refused, naming the store and the fix
    code, out = _cli(
        "extract", str(ours), "--coords", str(src), "--slides", str(slides),
        "--encoder", ENCODER, "--weights", str(weights), "--workers", "0",
    )  # fmt: skip
    assert code != 0 and "wsi-pipe tile" in out and "another run folder" in out


def test_trident_magnification_is_converted_to_true_mpp(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TRIDENT said 20x of a 40x slide, but the slide is 0.263 um/px: its tiles are 0.526."""
    sd = tmp_path / "slides"
    sd.mkdir()
    write_pyramidal_tiff(sd / "odd.tif", 640, 512, 0.263, levels=2, painter=blank_painter)
    write_pyramidal_tiff(sd / "fine.tif", 640, 512, 0.25, levels=2, painter=blank_painter)
    grid = tmp_path / "job" / "20x_64px_0px_overlap"
    for sid in ("odd", "fine"):
        attrs = {"patch_size": 64, "patch_size_level0": 128, "level0_magnification": 40,
                 "target_magnification": 20, "overlap": 0, "name": sid, "savetodir": str(grid),
                 "level0_width": 640, "level0_height": 512}  # fmt: skip
        coords = np.array([[0, 0], [128, 0], [0, 128]], np.int64)
        h5io.write_h5(grid / "patches" / f"{sid}_patches.h5", {"coords": coords}, {"coords": attrs})
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        res = import_coords(run, CoordsImport(str(grid), (str(sd),)))
    assert res.grid_mpp == pytest.approx(0.5) and res.fmt == "trident"
    assert len(res.warnings) == 1 and "slide odd" in res.warnings[0] and "0.526" in res.warnings[0]
    assert "slide odd" in caplog.text
    lay = RunLayout(run)
    for sid, true in (("odd", 0.526), ("fine", 0.5)):
        store = lay.find_coords_store(sid, 0.5)
        assert store is not None
        with open_store(store) as r:
            assert r.attrs["target_mpp"] == pytest.approx(true)
            assert r.attrs["grid_mpp"] == pytest.approx(0.5)
            assert r.attrs["tile_size_level0"] == 128  # TRIDENT's box, whatever the true mpp


def _write_cohort(root: Path) -> tuple[Path, Path, Path, list]:
    """A learnable cohort in CLAM's (h5_files + pt_files) and TRIDENT's layout, and CLAM's
    dataset CSV (case_id, slide_id, label) with two slides per case."""
    bags, _ = synthetic_bags(24, dim=16, bag_size=(30, 50), n_key=(3, 6), shift=4.0, seed=1)
    clam = root / "clam_feats"
    trident = root / "job" / "20x_256px_0px_overlap" / "features_toyenc"
    rows = []
    for b in bags:
        feats, coords = b.load()
        assert coords is not None
        h5io.write_h5(clam / "h5_files" / f"{b.bag_id}.h5", {"features": feats, "coords": coords})
        (clam / "pt_files").mkdir(parents=True, exist_ok=True)
        torch.save(torch.from_numpy(feats), clam / "pt_files" / f"{b.bag_id}.pt")
        tattrs = {"patch_size": 256, "patch_size_level0": 256, "level0_magnification": 20,
                  "target_magnification": 20, "overlap": 0, "name": b.bag_id}  # fmt: skip
        h5io.write_h5(
            trident / f"{b.bag_id}.h5",
            {"features": feats, "coords": coords},
            {"features": {"name": b.bag_id, "encoder": "toyenc"}, "coords": tattrs},
        )
        i = int(b.bag_id[3:])  # cases of two slides with one label: bags i and i + 2
        rows.append((f"case{(i // 4) * 2 + i % 2}", b.bag_id, "tumor" if b.label else "normal"))
    csv_path = root / "dataset.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["case_id", "slide_id", "label"])
        w.writerows(rows)
    return clam, trident, csv_path, bags


def test_train_predict_heatmap_on_clam_and_trident_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clam, trident, dataset_csv, bags = _write_cohort(tmp_path / "data")
    work = tmp_path / "work"  # no wsi-pipe run here: this folder takes the outputs
    work.mkdir()
    monkeypatch.chdir(work)
    code, out = _cli(
        "train-mil", "--features", str(clam / "h5_files"), "--manifest", str(dataset_csv),
        "--method", "abmil", "--folds", "3", "--epochs", "6", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, out
    model = work / "mil" / "abmil_clam_feats"
    metrics = json.loads((model / "metrics.json").read_text())
    print("pooled AUROC", metrics["pooled"]["auroc"]["value"])
    assert metrics["pooled"]["auroc"]["value"] > 0.85
    # CLAM's case_id is the patient: both slides of a case sit in the same fold
    splits = json.loads((model / "splits.json").read_text())
    assert splits["patients"]["bag0005"] == splits["patients"]["bag0007"] == "case3"
    # predict on the same slides from the TRIDENT folder (same features, other layout)
    code, out = _cli("predict", "--model", str(model), "--slides", str(dataset_csv),
                     "--features", str(trident), "--device", "cpu")  # fmt: skip
    assert code == 0, out
    with open(model / "inference" / "predictions.csv") as fh:
        pred = list(csv.DictReader(fh))
    assert len(pred) == len(bags)
    # pt_files hold no coords: heatmap says so and names the fix
    slide = tmp_path / "bag0001.tif"
    write_pyramidal_tiff(slide, 2560, 2560, 0.5, levels=2, painter=blank_painter)
    code, out = _cli("heatmap", "--model", str(model), "--slide", "bag0001", "--features",
                     str(clam / "pt_files"), "--slide-path", str(slide), "--device", "cpu")  # fmt: skip
    assert code != 0 and "bag0001.pt" in out and "h5_files" in out
    code, out = _cli("heatmap", "--model", str(model), "--slide", "bag0001", "--features",
                     str(trident), "--slide-path", str(slide), "--top-k", "2",
                     "--device", "cpu")  # fmt: skip
    assert code == 0, out
    png = work / "heatmaps" / "abmil_clam_feats" / "bag0001.png"
    assert png.is_file()
    att = (work / "heatmaps" / "abmil_clam_feats" / "bag0001_attention.csv").read_text()
    assert att.count("\n") == bags[1].n_tiles + 1


def test_folders_of_the_wrong_shape_say_what_to_give(
    tmp_path: Path, slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clam, _, dataset_csv, _ = _write_cohort(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    # the CLAM feat_dir itself instead of its h5_files/
    code, out = _cli("train-mil", "--features", str(clam), "--manifest", str(dataset_csv))
    assert code != 0 and "h5_files" in out and str(clam) in out
    # a features folder given as coords to import
    code, out = _cli("extract", "--coords", str(clam / "h5_files"), "--slides", str(slides),
                     "--encoder", ENCODER)  # fmt: skip
    assert code != 0 and "coords" in out and "bag0000.h5" in out
    # coords without slides
    code, out = _cli("extract", "--coords", str(clam / "h5_files"), "--encoder", ENCODER)
    assert code != 0 and "--slides" in out
    # a coords file whose slide is not among the slides
    bad = tmp_path / "patches"
    attrs = {"patch_size": 64, "patch_level": 0, "downsample": [1.0, 1.0], "name": "ghost"}
    h5io.write_h5(bad / "ghost.h5", {"coords": np.zeros((1, 2), np.int64)}, {"coords": attrs})
    code, out = _cli("extract", str(tmp_path / "run"), "--coords", str(bad), "--slides",
                     str(slides), "--encoder", ENCODER)  # fmt: skip
    assert code != 0 and "ghost" in out and str(slides) in out
    # a slide missing from the feature folder: named, with the fix
    shutil.copy(dataset_csv, tmp_path / "more.csv")
    with open(tmp_path / "more.csv", "a") as fh:
        fh.write("case99,nosuchslide,tumor\n")
    code, out = _cli("train-mil", "--features", str(clam / "h5_files"), "--manifest",
                     str(tmp_path / "more.csv"))  # fmt: skip
    assert code != 0 and "nosuchslide" in out


@pytest.mark.parametrize("fmt", ["clam", "trident"])
def test_real_slides_round_trip_through_clam_and_trident_coords(
    fmt: str, wsi_dir: Path, weights: Path, tmp_path: Path
) -> None:
    """From the CLI, on the shared slides: tile + extract with --clam-export, then re-extract on
    the exported CLAM coords (or a TRIDENT coords folder of the same grid) in a new run. The
    imported grid reads the same pixels, so the features equal ours."""
    m = tmp_path / "slides.csv"
    rows = [f"{sid},{wsi_dir / name},{mpp or ''}" for sid, (name, mpp) in SHARED_SLIDES.items()]
    m.write_text("slide_id,path,mpp\n" + "\n".join(rows) + "\n")
    ours = tmp_path / "ours"
    code, out = _cli("tile", str(m), "--out", str(ours), "--mpp", "1.0", "--tile-px", "64")
    assert code == 0, out
    code, out = _cli(
        "extract", str(ours), "--encoder", ENCODER, "--weights", str(weights),
        "--workers", "0", "--clam-export",
    )  # fmt: skip
    assert code == 0, out
    if fmt == "clam":
        src = RunLayout(ours).clam_export_dir(ENCODER, 1.0) / "patches"
    else:
        # TRIDENT writes each slide's own magnifications: our native coords attributes are
        # TRIDENT's, so copy them (CMU: level0 20x from its objective power, target 9.98x)
        src = tmp_path / "job" / f"10x_{TILE_PX}px_0px_overlap"
        for store in sorted(RunLayout(ours).tiles_dir(1.0).glob("*.h5")):
            with open_store(store) as r:
                coords, native = r.read("coords"), r.array_attrs("coords")
            keys = ("patch_size", "level0_magnification", "target_magnification", "overlap",
                    "level0_width", "level0_height", "name")  # fmt: skip
            h5io.write_h5(
                src / "patches" / f"{native['name']}_patches.h5",
                {"coords": coords},
                {"coords": {k: native[k] for k in keys}},
            )
    run = tmp_path / "imported"
    code, out = _cli(
        "extract", str(run), "--coords", str(src), "--slides", str(m), "--mpp", "1.0",
        "--encoder", ENCODER, "--weights", str(weights), "--workers", "0",
    )  # fmt: skip
    assert code == 0, out
    n_checked = 0
    for sid in SHARED_SLIDES:
        theirs, c_theirs = _features(run, sid, 1.0)
        with open_store(RunLayout(ours).find_feature_store(ENCODER, sid, 1.0)) as r:
            mine, c_mine = r.read("features"), r.read("coords")
        np.testing.assert_array_equal(c_theirs, c_mine)
        np.testing.assert_allclose(theirs, mine, rtol=0, atol=1e-5)
        n_checked += 1
    assert n_checked == len(SHARED_SLIDES)  # SVS, OME-TIFF, and a TIFF with the manifest's mpp
