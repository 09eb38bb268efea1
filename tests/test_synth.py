"""Synthetic pyramidal slides: both backends open them, geometry and pixels are as painted."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from wsi_pipe.readers import open_slide
from wsi_pipe.synth import (
    Disc,
    DiscPainter,
    HETexture,
    IHCTexture,
    Rect,
    RectPainter,
    ShapePainter,
    TexturePainter,
    write_pyramidal_tiff,
)

W, H, MPP = 2304, 1792, 0.25  # not multiples of the tile size, so edge tiles are partial
DISCS = [(600, 600, 450), (1700, 1100, 350)]
HOLES = [(600, 600, 120)]


@pytest.fixture(scope="module", params=["generic", "aperio"])
def slide(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("synth") / f"{request.param}.tiff"
    info = write_pyramidal_tiff(
        path, W, H, MPP, levels=3, painter=DiscPainter(DISCS, HOLES), vendor=request.param
    )
    assert info.path == path and info.level_dimensions == [(2304, 1792), (1152, 896), (576, 448)]
    return path


def _saturation(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]


def test_both_backends_agree_on_geometry(slide: Path) -> None:
    aperio = slide.stem == "aperio"
    with open_slide(slide, backend="openslide") as o, open_slide(slide, backend="tiffslide") as t:
        assert o.mpp == pytest.approx(MPP, rel=1e-6)
        assert t.mpp == pytest.approx(o.mpp, rel=1e-6)
        assert o.level_count == t.level_count == 3
        assert o.level_dimensions == t.level_dimensions == [(2304, 1792), (1152, 896), (576, 448)]
        assert o.level_downsamples == t.level_downsamples == [1.0, 2.0, 4.0]
        if aperio:
            assert o.vendor == t.vendor == "aperio"
            assert o.objective_power == t.objective_power == 40.0
            assert t.mpp_source == "aperio MPP"
        else:
            assert o.vendor == "generic-tiff"
            assert t.mpp_source == "tiff resolution (cm)"


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_pixels_match_known_shapes(slide: Path, backend: str) -> None:
    painter = DiscPainter(DISCS, HOLES)
    with open_slide(slide, backend=backend) as r:
        for level in range(3):
            ds = r.level_downsamples[level]
            w, h = r.level_dimensions[level]
            img = r.read_level_image(level)
            truth = painter.tissue_mask(0, 0, w, h, ds)
            # away from the edges (JPEG ringing, anti-aliasing), tissue is coloured, glass white
            k = np.ones((5, 5), np.uint8)
            core = cv2.erode(truth.astype(np.uint8), k).astype(bool)
            glass = cv2.erode((~truth).astype(np.uint8), k).astype(bool)
            sat = _saturation(img)
            assert (sat[core] > 40).mean() > 0.99
            assert (img[glass] >= 245).all(axis=-1).mean() > 0.99
        # a pixel inside the disc ring, one in the hole, one on glass (level 0)
        assert _saturation(r.read_region((600 - 300, 600), 0, (1, 1)))[0, 0] > 40
        assert (r.read_region((600, 600), 0, (4, 4)) >= 245).all()
        assert (r.read_region((2200, 100), 0, (4, 4)) >= 245).all()


def test_levels_show_the_same_picture(slide: Path) -> None:
    with open_slide(slide) as r:
        level0 = r.read_level_image(0)
        level2 = r.read_level_image(2)
        down = cv2.resize(level0, level2.shape[1::-1], interpolation=cv2.INTER_AREA)
        diff = np.abs(down.astype(np.float32) - level2.astype(np.float32)).mean()
        assert diff < 6.0  # painter at ds=4 vs area-averaged level 0 (+ two JPEG passes)


def test_painter_is_deterministic_and_resolution_independent() -> None:
    p = DiscPainter([(500, 500, 400)])
    a = p(100, 100, 64, 64, 1.0)
    assert np.array_equal(a, p(100, 100, 64, 64, 1.0))
    # a shifted read shows the same pixels where they overlap
    b = p(132, 116, 64, 64, 1.0)
    assert np.array_equal(a[16:, 32:], b[:48, :32])
    # mean colour of a tissue block is stable across scales
    hi = p(300, 300, 256, 256, 1.0).reshape(-1, 3).mean(0)
    lo = p(300, 300, 32, 32, 8.0).reshape(-1, 3).mean(0)
    assert np.abs(hi - lo).max() < 8


def test_truth_mask_geometry() -> None:
    p = ShapePainter([Disc(100, 100, 50), Rect(300, 0, 400, 100)], holes=[Disc(100, 100, 10)])
    m = p.tissue_mask(0, 0, 500, 200, 1.0)
    assert m.sum() == pytest.approx(np.pi * (50**2 - 10**2) + 100 * 100, rel=0.01)
    assert not m[100, 100] and m[100, 140] and not m[150, 350] and m[50, 350]
    assert RectPainter([(0, 0, 10, 10)]).tissue_mask(0, 0, 20, 20, 1.0).sum() == 100


def test_textures_two_classes_differ() -> None:
    xs = np.arange(0, 512, dtype=np.float64) + 0.5
    a = IHCTexture("A")(xs, xs, 1.0)
    b = IHCTexture("B")(xs, xs, 1.0)
    assert a.shape == b.shape == (512, 512, 3)
    # B is the H&E-like restain: redder (eosin) and less brown than the DAB of A
    assert b[..., 0].mean() - b[..., 1].mean() > a[..., 0].mean() - a[..., 1].mean()
    assert np.abs(a.mean((0, 1)) - b.mean((0, 1))).max() > 10
    # mip-mapped sampling: a coarse read is the average of the fine one, roughly
    lo = IHCTexture("A")(xs[::8] * 1.0, xs[::8], 8.0)
    assert np.abs(lo.mean((0, 1)) - a.mean((0, 1))).max() < 10
    tp = TexturePainter([Rect(0, 0, 2048, 2048)], "A", regions=[(Disc(1024, 1024, 300), "B")])
    img = tp(0, 0, 256, 256, 8.0)
    assert img.shape == (256, 256, 3)
    assert tp.region_mask(0, 0, 0, 256, 256, 8.0).sum() == pytest.approx(
        np.pi * (300 / 8) ** 2, rel=0.05
    )
    he = HETexture()(xs, xs, 1.0)
    assert 150 < he.mean() < 230


def test_write_errors_and_atomicity(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too many"):
        write_pyramidal_tiff(tmp_path / "a.tiff", 64, 64, 0.5, levels=8)

    def bad(x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        return np.zeros((h, w), np.uint8)

    with pytest.raises(ValueError, match="painter returned"):
        write_pyramidal_tiff(tmp_path / "b.tiff", 512, 512, 0.5, levels=1, painter=bad)
    assert not (tmp_path / "b.tiff").exists()
    assert not any(p.name.startswith(".b.tiff") for p in tmp_path.iterdir())


def test_blank_slide_is_white(tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "blank.tiff", 600, 500, 0.5, levels=2).path
    with open_slide(path) as r:
        assert r.level_dimensions == [(600, 500), (300, 250)]
        assert r.read_level_image(1).min() >= 250
