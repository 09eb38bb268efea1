"""Slide readers on every real slide in ../shared/data/wsi, synthetic TIFFs and broken files."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from wsi_pipe.core.errors import ConfigError, MissingMppError, SlideReadError
from wsi_pipe.readers import (
    OpenSlideReader,
    SlideReader,
    TiffSlideReader,
    level_px_to_l0,
    open_slide,
    ycbcr_to_rgb,
)
from wsi_pipe.synth import DiscPainter, write_pyramidal_tiff


@pytest.fixture(scope="session")
def wsi(shared_data: Path) -> Path:
    return shared_data / "wsi"


@pytest.fixture(scope="module")
def synthetic_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3-level generic TIFF, 2048 x 1536 at 0.5 um/px, a disc (with a hole) of known geometry."""
    path = tmp_path_factory.mktemp("synth") / "discs.tiff"
    painter = DiscPainter([(700, 700, 500), (1600, 1000, 300)], holes=[(700, 700, 120)])
    write_pyramidal_tiff(path, 2048, 1536, 0.5, levels=3, painter=painter)
    return path


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# ------------------------------------------------------------------------------ real slides
def test_svs_aperio(wsi: Path) -> None:
    with open_slide(wsi / "CMU-1-Small-Region.svs") as r:
        assert isinstance(r, SlideReader)
        assert r.backend == "openslide"
        assert r.vendor == "aperio"
        assert r.slide_id == "CMU-1-Small-Region"
        assert r.mpp == pytest.approx(0.499)
        assert r.mpp_source == "openslide.mpp-x"
        assert r.objective_power == 20.0
        assert r.level_count == 1
        assert r.level_dimensions == [(2220, 2967)]
        assert r.dimensions == (2220, 2967)
        assert r.level_downsamples == [1.0]
        tile = r.read_region((1000, 1000), 0, (256, 128))
        assert tile.shape == (128, 256, 3) and tile.dtype == np.uint8
        thumb = r.get_thumbnail(300)
        assert max(thumb.shape[:2]) == 300
        assert thumb.shape[1] == round(2220 * 300 / 2967)
    with pytest.raises(SlideReadError, match="closed"):
        r.read_region((0, 0), 0, (8, 8))


def test_tiny_svs_16px(wsi: Path) -> None:
    with open_slide(wsi / "CMU-1_16x16_tiny.svs") as r:
        assert r.dimensions == (16, 16)
        assert r.mpp == pytest.approx(0.499)
        whole = r.read_level_image(0)
        assert whole.shape == (16, 16, 3)
        # a 64-px read hangs over the edge: the outside is white, the inside is the slide
        big = r.read_region((0, 0), 0, (64, 64))
        assert np.array_equal(big[:16, :16], whole)
        assert (big[16:] == 255).all() and (big[:, 16:] == 255).all()
        assert r.get_thumbnail(8).shape == (8, 8, 3)


def test_bracs_placeholder_resolution_needs_override(wsi: Path) -> None:
    path = wsi / "BRACS_1640_N_3_cropped.tiff"
    with pytest.raises(MissingMppError) as ei:
        open_slide(path)
    msg = str(ei.value)
    assert "BRACS_1640_N_3_cropped" in msg
    assert "implausible" in msg and "1000" in msg
    assert "--mpp-override" in msg and "`mpp` column" in msg
    with open_slide(path, mpp_override=0.25) as r:
        assert r.mpp == 0.25 and r.mpp_source == "override"
        assert r.level_count == 3
        assert r.level_dimensions == [(650, 743), (325, 371), (162, 185)]
        assert r.level_downsamples[1] == pytest.approx(2.0013, abs=1e-3)
        assert r.read_level_image(2).shape == (185, 162, 3)


@pytest.mark.parametrize("name", ["OS-1-detail_HE.ome.tif", "OS-2-ndpi-crop_Ki67.ome.tif"])
def test_ome_tiff_auto_picks_tiffslide(
    wsi: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="wsi_pipe.readers"), open_slide(wsi / name) as r:
        assert r.backend == "tiffslide"
        assert r.mpp == pytest.approx(0.2271, abs=1e-4)
        assert r.mpp_source == "ome PhysicalSizeX"
        assert "OpenSlide" in r.backend_reason
        side = 1101 if name.startswith("OS-1") else 2202
        assert r.dimensions == (side, side)
        img = r.read_region((100, 100), 0, (64, 64))
        assert img.mean() < 240  # all tissue
    assert any("backend tiffslide" in rec.getMessage() for rec in caplog.records)
    # OpenSlide either cannot open the file or reads it without an mpp: never silently wrong
    with pytest.raises((SlideReadError, MissingMppError)):
        open_slide(wsi / name, backend="openslide")


@pytest.mark.parametrize(("size", "unit"), [(0.3, "µm"), (300.0, "nm")])
def test_ome_opened_by_openslide_without_mpp_goes_to_tiffslide(
    tmp_path: Path, size: float, unit: str
) -> None:
    # tifffile's OME-TIFF: OpenSlide opens it as generic-tiff but finds no mpp
    path = tmp_path / "ome_made.ome.tif"
    meta = {"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeY": size}
    meta |= {"PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
    data = np.full((512, 512, 3), 180, np.uint8)
    tifffile.imwrite(
        path, data, tile=(256, 256), photometric="rgb", compression="jpeg", ome=True, metadata=meta
    )
    with open_slide(path) as r:
        assert r.backend == "tiffslide"
        assert r.mpp == pytest.approx(0.3) and r.mpp_source == "ome PhysicalSizeX"
        assert "no mpp" in r.backend_reason
    with pytest.raises(MissingMppError, match="ome_made.*--mpp-override"):
        open_slide(path, backend="openslide")
    with open_slide(path, mpp_override=0.5) as r:
        assert r.backend == "openslide" and r.mpp == 0.5


def test_dicom_levels_and_corrected_colours(wsi: Path) -> None:
    import pydicom
    from PIL import Image

    folder = wsi / "CMU-1-Small-Region_dicom"
    with open_slide(folder) as r:
        assert r.slide_id == "CMU-1-Small-Region_dicom"
        assert r.backend == "openslide" and r.vendor == "dicom"
        assert r.level_count == 12
        assert r.dimensions == (2220, 2967)
        assert r.level_dimensions[-1] == (1, 1)
        assert r.mpp == pytest.approx(0.499)
        assert r.best_level_for_downsample(4.0) == 2  # 4.002 is within the 1e-3 tolerance
        assert r.best_level_for_downsample(3.9) == 1
        assert r.best_level_for_downsample(0.5) == 0
        assert r.best_level_for_downsample(1e9) == 11
        assert r.read_level_image(5).shape == (92, 69, 3)

        # ground truth: pydicom + Pillow decode of frames 0 and 7 of the level-0 file
        ds = pydicom.dcmread(folder / "level-0-frames-0-30.dcm")
        n = int(ds.NumberOfFrames)
        per_row = -(-int(ds.TotalPixelMatrixColumns) // int(ds.Columns))
        truths = {}
        for index in (0, 7):
            frame = pydicom.encaps.get_frame(ds.PixelData, index, number_of_frames=n)
            truths[index] = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB"))
            x, y = (index % per_row) * 500, (index // per_row) * 500
            ours = r.read_region((x, y), 0, (500, 500))
            assert _mad(ours, truths[index]) < 0.1  # measured 0.0002 and 0.02
        truth = truths[0]

        # OpenSlide itself returns the YCbCr samples as RGB (white paper ~ (255, 128, 128))
        assert isinstance(r, OpenSlideReader)
        raw = np.asarray(r._slide.read_region((0, 0), 0, (500, 500)))[..., :3]
        assert r.ycbcr_as_rgb == (_mad(raw, truth) > 30)
        assert _mad(ycbcr_to_rgb(raw), truth) < 1.0

    # the same tissue as the SVS it was converted from (different JPEG compression)
    with (
        open_slide(folder / "level-3-frames-0-1.dcm") as d,
        open_slide(wsi / "CMU-1-Small-Region.svs") as s,
    ):
        assert d.slide_id == "CMU-1-Small-Region_dicom"
        assert _mad(d.read_level_image(0), s.read_level_image(0)) < 5.0  # measured 3.4


def test_dicom_not_readable_by_tiffslide(wsi: Path) -> None:
    with pytest.raises(
        SlideReadError, match="CMU-1-Small-Region_dicom.*tiffslide does not read DICOM"
    ):
        open_slide(wsi / "CMU-1-Small-Region_dicom", backend="tiffslide")


def test_override_wins_and_is_validated(wsi: Path) -> None:
    with open_slide(wsi / "CMU-1-Small-Region.svs", mpp_override=0.25) as r:
        assert r.mpp == 0.25 and r.mpp_source == "override"
    with pytest.raises(ConfigError, match="CMU-1-Small-Region"):
        open_slide(wsi / "CMU-1-Small-Region.svs", mpp_override=1000.0)


# --------------------------------------------------------------------------- reader parity
def test_parity_svs_openslide_vs_tiffslide(wsi: Path) -> None:
    path = wsi / "CMU-1-Small-Region.svs"
    with open_slide(path, backend="openslide") as o, open_slide(path, backend="tiffslide") as t:
        assert isinstance(t, TiffSlideReader) and t.mpp_source == "aperio MPP"
        assert o.mpp == pytest.approx(t.mpp, rel=1e-9)
        assert o.level_dimensions == t.level_dimensions
        assert o.vendor == t.vendor == "aperio"
        assert o.objective_power == t.objective_power == 20.0
        a, b = o.read_level_image(0), t.read_level_image(0)
        assert _mad(a, b) < 0.05  # same libjpeg: measured 0.0
        for loc in [(-100, -50), (2100, 2900), (500, 700)]:
            ra, rb = o.read_region(loc, 0, (256, 256)), t.read_region(loc, 0, (256, 256))
            assert _mad(ra, rb) < 0.05


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_synthetic_tiff_pixels_and_out_of_bounds(synthetic_tiff: Path, backend: str) -> None:
    with open_slide(synthetic_tiff, backend=backend) as r:
        assert r.level_dimensions == [(2048, 1536), (1024, 768), (512, 384)]
        assert r.level_downsamples == [1.0, 2.0, 4.0]
        assert r.mpp == pytest.approx(0.5, rel=1e-6)
        inside = r.read_region((700 - 350, 700), 0, (8, 8))
        assert (
            inside.mean() < 235 and (inside.max(axis=2).astype(int) - inside.min(axis=2)).min() > 20
        )
        assert (r.read_region((100, 1400), 0, (32, 32)) >= 250).all()  # glass
        assert (r.read_region((690, 690), 0, (20, 20)) >= 250).all()  # hole
        # out of bounds on every side and level: white, and the in-bounds part untouched
        for level in (0, 1, 2):
            ds = r.level_downsamples[level]
            w, h = r.level_dimensions[level]
            out = r.read_region((-64 * int(ds), -32 * int(ds)), level, (128, 96))
            assert (out[:32] == 255).all() and (out[:, :64] == 255).all()
            corner = r.read_region(((w - 10) * int(ds), (h - 5) * int(ds)), level, (40, 40))
            assert (corner[5:] == 255).all() and (corner[:, 10:] == 255).all()
        far = r.read_region((10_000, 10_000), 1, (16, 16))
        assert (far == 255).all()


def test_parity_synthetic_openslide_vs_tiffslide(synthetic_tiff: Path) -> None:
    with (
        open_slide(synthetic_tiff, backend="openslide") as o,
        open_slide(synthetic_tiff, backend="tiffslide") as t,
    ):
        assert o.level_count == t.level_count == 3
        assert o.level_dimensions == t.level_dimensions
        assert o.mpp == pytest.approx(t.mpp, rel=1e-6)
        assert o.vendor == "generic-tiff"
        for level in range(3):
            assert _mad(o.read_level_image(level), t.read_level_image(level)) < 0.05
        rng = np.random.default_rng(0)
        for _ in range(10):
            x, y = (int(v) for v in rng.integers(-100, 2000, 2))
            assert (
                _mad(o.read_region((x, y), 0, (256, 256)), t.read_region((x, y), 0, (256, 256)))
                < 0.05
            )
        # thumbnails through the block reader agree too
        assert _mad(o.get_thumbnail(300), t.get_thumbnail(300)) < 0.05


def test_blockwise_thumbnail_matches_whole_level(
    synthetic_tiff: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wsi_pipe.readers.base as base

    for backend in ("openslide", "tiffslide"):
        with open_slide(synthetic_tiff, backend=backend) as r:
            whole = r.get_thumbnail(500)
            monkeypatch.setattr(base, "_BLOCK_PX", 300)  # force the block reader
            blocks = r.get_thumbnail(500)
            monkeypatch.undo()
        assert blocks.shape == whole.shape == (375, 500, 3)
        assert _mad(blocks, whole) < 1.0


def test_read_at_mpp(wsi: Path, synthetic_tiff: Path) -> None:
    with open_slide(wsi / "CMU-1-Small-Region.svs") as r:
        img = r.read_at_mpp(8.0)
        assert img.shape == (round(2967 * 0.499 / 8), round(2220 * 0.499 / 8), 3)
    with open_slide(wsi / "CMU-1-Small-Region_dicom") as d:
        dicom = d.read_at_mpp(8.0)  # from level 3 (8.01 um/px) of the DICOM pyramid
        level3 = cv2.resize(d.read_level_image(3), (138, 185), interpolation=cv2.INTER_AREA)
        assert np.array_equal(dicom, level3)
        # the converter's own downsampling differs from area-averaging level 0: measured 5.5
        assert _mad(dicom, img) < 7.0
    with open_slide(synthetic_tiff) as r:
        assert r.read_at_mpp(2.0).shape == (384, 512, 3)  # exactly level 2
        assert _mad(r.read_at_mpp(2.0), r.read_level_image(2)) == 0
        assert r.read_at_mpp(0.25).shape == (3072, 4096, 3)  # finer than level 0: upsampled


def test_level_px_to_l0_maps_back_exactly() -> None:
    for ds in (1.0, 2.0, 4.0, 2.001347708894879, 4.014280947614282, 3.3333):
        for x_lvl in (0, 1, 7, 100, 4095, 12345):
            x_l0 = level_px_to_l0(x_lvl, ds)
            assert int(x_l0 / ds) == x_lvl
            assert x_l0 == 0 or int((x_l0 - 1) / ds) < x_lvl


# ---------------------------------------------------------------------------- bad metadata
def _small_tiled_tiff(path: Path, resolution: tuple[float, float] | None, unit: str) -> Path:
    data = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(
        path,
        data,
        tile=(256, 256),
        photometric="rgb",
        compression="jpeg",
        resolution=resolution,
        resolutionunit=unit,
        metadata=None,
    )
    return path


def test_anisotropic_pixels_rejected(tmp_path: Path) -> None:
    path = _small_tiled_tiff(tmp_path / "aniso.tif", (40000.0, 30000.0), "CENTIMETER")
    with pytest.raises(MissingMppError, match="anisotropic") as ei:
        open_slide(path)
    assert "aniso" in str(ei.value) and "--mpp-override" in str(ei.value)
    with open_slide(path, mpp_override=0.3) as r:
        assert r.mpp == 0.3


def test_resolution_unit_none_is_no_mpp(tmp_path: Path) -> None:
    path = _small_tiled_tiff(tmp_path / "nounit.tif", (40000.0, 40000.0), "NONE")
    for backend in ("auto", "tiffslide"):
        with pytest.raises(MissingMppError, match="nounit.*--mpp-override"):
            open_slide(path, backend=backend)


def test_inch_resolution(tmp_path: Path) -> None:
    path = _small_tiled_tiff(tmp_path / "inch.tif", (101600.0, 101600.0), "INCH")
    with open_slide(path, backend="tiffslide") as r:
        assert r.mpp == pytest.approx(0.25) and r.mpp_source == "tiff resolution (inch)"
    with open_slide(path) as r:
        assert r.mpp == pytest.approx(0.25)


# --------------------------------------------------------------------------- broken files
def _broken_files(wsi: Path, tmp: Path) -> dict[str, Path]:
    src = (wsi / "CMU-1-Small-Region.svs").read_bytes()
    files = {
        "trunc50.svs": src[: len(src) // 2],
        "trunc90.svs": src[: int(len(src) * 0.9)],
        "trunc99.svs": src[: int(len(src) * 0.99)],
        "random.svs": np.random.default_rng(1).bytes(50_000),
        "notes.tif": b"slide list\nthis is not an image\n" * 20,
        "empty.svs": b"",
    }
    out = {}
    for name, data in files.items():
        (tmp / name).write_bytes(data)
        out[name] = tmp / name
    return out


@pytest.mark.parametrize("backend", ["auto", "openslide", "tiffslide"])
def test_broken_files_raise_slide_read_error(wsi: Path, tmp_path: Path, backend: str) -> None:
    expected = {
        "trunc50.svs": "truncated",
        "trunc90.svs": "truncated",
        "trunc99.svs": "truncated",
        "random.svs": "neither a TIFF nor a DICOM",
        "notes.tif": "text file",
        "empty.svs": "empty",
    }
    for name, path in _broken_files(wsi, tmp_path).items():
        with pytest.raises(SlideReadError) as ei:
            open_slide(path, backend=backend)
        msg = str(ei.value)
        assert name in msg, msg
        assert expected[name] in msg, msg
    with pytest.raises(SlideReadError, match="gone.svs.*does not exist"):
        open_slide(tmp_path / "gone.svs", backend=backend)


def test_truncated_tile_data_detected(tmp_path: Path, synthetic_tiff: Path) -> None:
    # cut inside the level-0 tile data of a file whose directories come first (tifffile layout
    # puts each directory before... or after its data; either way the cut must be caught)
    data = synthetic_tiff.read_bytes()
    for frac in (0.3, 0.6, 0.95):
        p = tmp_path / f"cut{int(frac * 100)}.tiff"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(SlideReadError, match=f"cut{int(frac * 100)}.*truncated"):
            open_slide(p)


def test_vanished_file_names_slide(tmp_path: Path, synthetic_tiff: Path) -> None:
    p = tmp_path / "moved.tiff"
    shutil.copy(synthetic_tiff, p)
    r = open_slide(p)
    r.close()
    p.unlink()
    with pytest.raises(SlideReadError, match="moved.*does not exist"):
        open_slide(p)


def test_unknown_backend(wsi: Path) -> None:
    with pytest.raises(ValueError, match="unknown reader backend"):
        open_slide(wsi / "CMU-1-Small-Region.svs", backend="bioformats")
