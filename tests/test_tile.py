"""`wsi-pipe tile` end to end: synthetic slides with known tissue geometry and the real slides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_pipe.core.config import TileConfig
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.readers import open_slide
from wsi_pipe.stages.tile import run_tile
from wsi_pipe.store import open_store
from wsi_pipe.synth import RectPainter, blank_painter, write_pyramidal_tiff


def _tile(inputs, out, **kw):
    return run_tile([str(i) for i in inputs], out, TileConfig(**kw), progress=False)


@pytest.fixture(scope="module")
def rect_slide(tmp_path_factory) -> Path:
    """8192^2 px at 0.25 um/px with one tissue rectangle aligned to the 0.5 um/px / 256 px grid."""
    d = tmp_path_factory.mktemp("rect")
    write_pyramidal_tiff(
        d / "rect.tif", 8192, 8192, 0.25, levels=3, painter=RectPainter([(1024, 1024, 3072, 2048)])
    )
    return d / "rect.tif"


def test_counts_positions_and_parents_match_ground_truth(rect_slide, tmp_path):
    s = _tile([rect_slide], tmp_path, target_mpps=(0.5, 2.0), tile_px=256, min_tissue_fraction=0.5)
    assert s.ok and s.results[0].info["tiles"] == {"0.5": 8, "2": 2}
    lay = RunLayout(tmp_path)
    with open_store(lay.coords_store("rect", 0.5, "h5")) as r:
        coords, frac, parent = r.read("coords"), r.read("tissue_fraction"), r.read("parent_index")
        a, ca = r.attrs, r.array_attrs("coords")
    # the rectangle covers tile columns 2..5 and rows 2..3 of the 512-px level-0 grid exactly
    expect = [(x, y) for y in (1024, 1536) for x in (1024, 1536, 2048, 2560)]
    assert [tuple(c) for c in coords] == expect
    assert frac.min() > 0.97
    assert a["tile_size_level0"] == 512 and a["read_size_px"] == 256 and a["read_level"] == 1
    assert ca["patch_size_level0"] == 512 and ca["patch_level"] == 1 and ca["target_mpp"] == 0.5
    assert ca["level0_mpp"] == pytest.approx(0.25, rel=1e-6)
    with open_store(lay.coords_store("rect", 2.0, "h5")) as r:
        coarse, cpar, cfrac = r.read("coords"), r.read("parent_index"), r.read("tissue_fraction")
    # coarse tiles are 2048 px: the rectangle's tiles sit in the first two, kept as parents although
    # each holds only 25 % tissue (below the 50 % threshold on its own)
    assert [tuple(c) for c in coarse] == [(0, 0), (2048, 0)]
    np.testing.assert_allclose(cfrac, [0.25, 0.25], atol=0.02)
    assert (cpar == -1).all()
    for (x, y), p in zip(coords, parent):
        px, py = coarse[p]
        assert px <= x < px + 2048 and py <= y < py + 2048


def test_pixels_read_at_stored_coords_are_tissue(rect_slide, tmp_path):
    _tile([rect_slide], tmp_path, target_mpps=(0.5,), min_tissue_fraction=0.5)
    lay = RunLayout(tmp_path)
    with open_store(lay.coords_store("rect", 0.5, "h5")) as r:
        coords, a = r.read("coords"), r.attrs
    with open_slide(rect_slide) as sl:
        for x, y in coords:
            tile = sl.read_region((int(x), int(y)), a["read_level"], (a["read_size_px"],) * 2)
            assert tile.shape == (256, 256, 3)
            assert (tile.mean(axis=2) < 235).mean() > 0.95  # tissue, not white background
        off = sl.read_region((6000, 6000), a["read_level"], (256, 256))
        assert off.min() > 240


def test_true_mpp_gives_exact_read_size(tmp_path):
    """A 0.263 um/px slide tiled at 0.5 um/px reads 487 px tiles at level 0, not 512."""
    write_pyramidal_tiff(
        tmp_path / "odd.tif", 4096, 4096, 0.263, levels=3, painter=RectPainter([(0, 0, 4096, 4096)])
    )
    s = _tile([tmp_path / "odd.tif"], tmp_path / "run", target_mpps=(0.5,), min_tissue_fraction=0.9)
    assert s.ok
    with open_store(RunLayout(tmp_path / "run").coords_store("odd", 0.5, "h5")) as r:
        a, coords = r.attrs, r.read("coords")
    assert a["read_level"] == 0 and a["read_size_px"] == 487 and a["tile_size_level0"] == 487
    assert a["level0_mpp"] == pytest.approx(0.263, rel=1e-5)
    xs = np.unique(coords[:, 0])
    np.testing.assert_array_equal(xs[:4], np.round(np.arange(4) * 256 * 0.5 / a["level0_mpp"]))


def test_overlap_and_zarr_backend_agree_with_h5(rect_slide, tmp_path):
    kw = dict(target_mpps=(0.5,), tile_px=256, overlap_px=128, min_tissue_fraction=0.5)
    _tile([rect_slide], tmp_path / "h5", store="h5", **kw)
    _tile([rect_slide], tmp_path / "zarr", store="zarr", **kw)
    with (
        open_store(RunLayout(tmp_path / "h5").coords_store("rect", 0.5, "h5")) as a,
        open_store(RunLayout(tmp_path / "zarr").coords_store("rect", 0.5, "zarr")) as b,
    ):
        np.testing.assert_array_equal(a.read("coords"), b.read("coords"))
        np.testing.assert_array_equal(a.read("tissue_fraction"), b.read("tissue_fraction"))
        steps = np.diff(np.unique(a.read("coords")[:, 0]))
        assert set(steps.tolist()) == {256}  # stride = (256 - 128) px at 0.5 um/px = 256 level-0 px


def test_blank_slide_gives_empty_store_and_qc(tmp_path):
    write_pyramidal_tiff(tmp_path / "blank.tif", 2048, 2048, 0.5, levels=2, painter=blank_painter)
    s = _tile([tmp_path / "blank.tif"], tmp_path / "run")
    assert s.ok and s.results[0].info["tiles"] == {"0.5": 0}
    lay = RunLayout(tmp_path / "run")
    with open_store(lay.coords_store("blank", 0.5, "h5")) as r:
        assert r.read("coords").shape == (0, 2)
    assert lay.qc_png("blank").exists()
    assert json.loads(lay.tissue_geojson("blank").read_text())["features"] == []


def test_resume_overwrite_and_config_change(rect_slide, tmp_path):
    s1 = _tile([rect_slide], tmp_path)
    assert s1.count("done") == 1
    store = RunLayout(tmp_path).coords_store("rect", 0.5, "h5")
    mtime = store.stat().st_mtime_ns
    s2 = _tile([rect_slide], tmp_path)
    assert s2.count("skipped") == 1 and store.stat().st_mtime_ns == mtime
    s3 = _tile([rect_slide], tmp_path, min_tissue_fraction=0.9)  # another config: redone
    assert s3.count("done") == 1
    s4 = run_tile(
        [str(rect_slide)],
        tmp_path,
        TileConfig(min_tissue_fraction=0.9),
        overwrite=True,
        progress=False,
    )
    assert s4.count("done") == 1
    state = json.loads(RunLayout(tmp_path).state_file("tile", "rect").read_text())
    assert state["status"] == "done" and state["attempts"] == 3


def test_bad_slides_fail_alone_and_keep_earlier_outputs(rect_slide, tmp_path):
    d = tmp_path / "slides"
    d.mkdir()
    (d / "rect.tif").symlink_to(rect_slide)
    (d / "garbage.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    (d / "notes.tif").write_text("this is not a slide\n")
    run = tmp_path / "run"
    _tile([d / "rect.tif"], run)
    good = RunLayout(run).coords_store("rect", 0.5, "h5")
    before = good.read_bytes()
    s = _tile([d], run)
    status = {r.slide_id: r.status for r in s.results}
    assert status == {"garbage": "failed", "notes": "failed", "rect": "skipped"}
    errors = {r.slide_id: r.error for r in s.results}
    assert "garbage" in errors["garbage"] and "notes" in errors["notes"]
    assert good.read_bytes() == before
    assert not any(p.name.startswith(".") for p in (run / "tiles" / "mpp0.5").iterdir())


# ------------------------------------------------------------------------------ real slides
def test_real_slides(wsi_dir, tmp_path):
    s = _tile([wsi_dir], tmp_path, target_mpps=(0.5, 2.0))
    res = {r.slide_id: r for r in s.results}
    assert res["CMU-1-Small-Region"].status == "done"
    assert res["CMU-1-Small-Region"].info["backend"] == "openslide"
    assert res["CMU-1-Small-Region"].info["tiles"]["0.5"] > 20
    assert res["OS-1-detail_HE"].info["backend"] == "tiffslide"
    assert res["OS-1-detail_HE"].info["level0_mpp"] == pytest.approx(0.2271, rel=1e-3)
    assert res["CMU-1-Small-Region_dicom"].status == "done"
    # the DICOM pyramid and the SVS are the same pixels: the same grid must come out (within a
    # few edge tiles, since JPEG re-encoding moves the tissue boundary slightly)
    a = set(
        map(
            tuple,
            open_store(RunLayout(tmp_path).coords_store("CMU-1-Small-Region", 0.5, "h5")).read(
                "coords"
            ),
        )
    )
    b = set(
        map(
            tuple,
            open_store(
                RunLayout(tmp_path).coords_store("CMU-1-Small-Region_dicom", 0.5, "h5")
            ).read("coords"),
        )
    )
    assert len(a & b) / len(a | b) > 0.85
    # 16 x 16 px: nothing to tile, an empty store and no error
    assert res["CMU-1_16x16_tiny"].status == "done"
    assert res["CMU-1_16x16_tiny"].info["tiles"] == {"0.5": 0, "2": 0}
    # placeholder resolution tags (1000 um/px): a clear error naming the override
    assert res["BRACS_1640_N_3_cropped"].status == "failed"
    assert "override" in res["BRACS_1640_N_3_cropped"].error
    assert s.n_failed == 1


def test_manifest_mpp_override_and_cli_exit_codes(wsi_dir, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(f"slide_id,path,mpp\nbracs,{wsi_dir / 'BRACS_1640_N_3_cropped.tiff'},0.25\n")
    cmd = [
        sys.executable,
        "-m",
        "wsi_pipe.cli.app",
        "-q",
        "tile",
        str(m),
        "--out",
        str(tmp_path / "ok"),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    with open_store(RunLayout(tmp_path / "ok").coords_store("bracs", 0.5, "h5")) as r:
        assert r.attrs["level0_mpp"] == 0.25 and r.attrs["mpp_source"] == "override"
        assert len(r) > 0  # all tissue
    cmd = [
        sys.executable,
        "-m",
        "wsi_pipe.cli.app",
        "-q",
        "tile",
        str(wsi_dir / "BRACS_1640_N_3_cropped.tiff"),
        "--out",
        str(tmp_path / "bad"),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1
    assert "failed" in p.stdout and "--mpp-override" in p.stdout


def test_qc_thumbnail_reads_the_coarsest_adequate_level():
    """The QC picture never costs a fine-level read: 1,250 px is enough for a 1,600-px QC."""
    from wsi_pipe.stages.tile import _qc_thumbnail

    class Spy:
        level_dimensions = [(20000, 16000), (5000, 4000), (1250, 1000), (312, 250)]
        reads: list = []

        def read_level_resized(self, level, size):
            self.reads.append((level, size))
            return np.zeros((size[1], size[0], 3), np.uint8)

    spy = Spy()
    assert _qc_thumbnail(spy, 1600).shape == (1000, 1250, 3)  # level 2 as it is
    assert _qc_thumbnail(spy, 1000).shape == (800, 1000, 3)  # level 2, shrunk to 1,000 px
    assert _qc_thumbnail(spy, 4000).shape == (3200, 4000, 3)  # level 1, shrunk
    assert [lv for lv, _ in spy.reads] == [2, 2, 1]
    one = type("One", (Spy,), {"level_dimensions": [(900, 700)], "reads": []})()
    assert _qc_thumbnail(one, 1600).shape == (700, 900, 3)  # a one-level slide: level 0


def test_qc_image_has_caption_and_tiles(rect_slide, tmp_path):
    import cv2

    _tile([rect_slide], tmp_path, target_mpps=(0.5,), min_tissue_fraction=0.5)
    qc = cv2.imread(str(RunLayout(tmp_path).qc_png("rect")))
    assert qc.shape[1] == 1600 and qc.shape[0] > 1600  # the thumbnail plus the caption strip
    info = json.loads(RunLayout(tmp_path).state_file("tile", "rect").read_text())
    assert "OD >" in info["info"]["segmentation"], info
