"""Synthetic pyramidal slides with known tissue geometry (torch-free).

`write_pyramidal_tiff` writes a tiled JPEG TIFF that both OpenSlide and tiffslide open (the recipe
in ENVIRONMENT.md: BigTIFF, one top-level page per level, 256-px tiles, photometric RGB, resolution
in px/cm, `subfiletype=1` on reduced levels; the Aperio flavour adds an ImageDescription on every
page, a stripped thumbnail as page 1 and no reduced-image flag, as real SVS files). Tiles come from a generator, so memory stays roughly
constant: a 50,000 x 50,000 slide is fine.

Painters are resolution-independent functions of level-0 coordinates:

    painter(x0_l0, y0_l0, w_lvl, h_lvl, downsample) -> uint8 (h_lvl, w_lvl, 3)

Pixel (i, j) of the result covers level-0 x in [x0 + j * ds, x0 + (j + 1) * ds) (same for y), its
centre is x0 + (j + 0.5) * ds. Every level of a slide is rendered by calling the painter at that
level's downsample, so lower levels are the same picture, not a resampled level 0.

`ShapePainter` (and the `DiscPainter` / `RectPainter` shortcuts) paints tissue inside known discs
and rectangles (minus holes) on white; `ShapePainter.tissue_mask` gives the exact truth at any
scale. Textures: `HETexture` (procedural pink/purple, H&E-like) and `IHCTexture` (real histology
from `skimage.data.immunohistochemistry()`, variant "A" = the IHC image as is, variant "B" = the
same tissue re-stained H&E-like by colour deconvolution and shown at 2x scale) for two-class demos.

`build_cohort` writes a seeded two-class cohort of such slides plus its labelled manifest (what
`wsi-pipe demo` and the CLI tests run on): "normal" slides hold tissue with texture "A" only,
"tumour" slides the same tissue with one or two regions of texture "B" (`cohort_slide_recipe`
gives each slide's shapes, the ground truth of where the tumour is).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from wsi_pipe.core.fsutil import atomic_path, atomic_write_text
from wsi_pipe.core.units import magnification_label

log = logging.getLogger(__name__)

Painter = Callable[[float, float, int, int, float], np.ndarray]

WHITE = (255, 255, 255)


# ------------------------------------------------------------------------------------ shapes
@dataclass(frozen=True)
class Disc:
    """A disc in level-0 px: centre (cx, cy), radius r."""

    cx: float
    cy: float
    r: float

    def sdf(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Signed distance (px, > 0 inside) at pixel centres `xs` (w,) x `ys` (h,) -> (h, w)."""
        return self.r - np.hypot(xs[None, :] - self.cx, ys[:, None] - self.cy)

    @property
    def area_px(self) -> float:
        return math.pi * self.r * self.r


@dataclass(frozen=True)
class Rect:
    """An axis-aligned rectangle in level-0 px: [x0, x1) x [y0, y1)."""

    x0: float
    y0: float
    x1: float
    y1: float

    def sdf(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Signed distance (px, > 0 inside; exact inside, approximate outside) -> (h, w)."""
        dx = np.minimum(xs - self.x0, self.x1 - xs)  # (w,)
        dy = np.minimum(ys - self.y0, self.y1 - ys)  # (h,)
        return np.minimum(dx[None, :], dy[:, None])

    @property
    def area_px(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)


Shape = Disc | Rect


def _union_sdf(shapes: Sequence[Shape], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    out = np.full((ys.size, xs.size), -np.inf, np.float64)
    for s in shapes:
        np.maximum(out, s.sdf(xs, ys), out=out)
    return out


def _centres(x0: float, n: int, ds: float) -> np.ndarray:
    return x0 + (np.arange(n, dtype=np.float64) + 0.5) * ds


# ---------------------------------------------------------------------------------- textures
class Texture(Protocol):
    def __call__(self, xs: np.ndarray, ys: np.ndarray, ds: float) -> np.ndarray:
        """Colour at level-0 pixel centres `xs` (w,), `ys` (h,) -> float32 (h, w, 3) in 0-255."""
        ...


def _hash2(ix: np.ndarray, iy: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic uint32 hash of integer cell indices (broadcasting)."""
    h = (ix.astype(np.int64) * 73856093) ^ (iy.astype(np.int64) * 19349663) ^ (seed * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    return (h ^ (h >> 16)) & 0xFFFFFFFF


@dataclass(frozen=True)
class HETexture:
    """Procedural H&E-like texture: pink stroma with purple 'nuclei' on a jittered grid.

    A function of level-0 coordinates; detail finer than the pixel size fades to its mean, so
    every pyramid level shows the same tissue. `cell_px` is the nucleus spacing in level-0 px.
    """

    seed: int = 0
    cell_px: float = 24.0
    nucleus_px: float = 5.0
    pink: tuple[float, float, float] = (236.0, 168.0, 205.0)
    purple: tuple[float, float, float] = (118.0, 70.0, 160.0)

    def __call__(self, xs: np.ndarray, ys: np.ndarray, ds: float) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        # stroma: a few separable sinusoids, each damped when its period nears the pixel size
        t = np.zeros((ys.size, xs.size), np.float32)
        for period, amp in ((300.0, 0.10), (90.0, 0.08), (33.0, 0.06)):
            theta, phase = rng.uniform(0, 2 * np.pi, 2)
            k = 2 * np.pi / period
            gain = amp * math.exp(-2.0 * (ds / period) ** 2)
            ax = (k * math.cos(theta)) * xs
            by = (k * math.sin(theta)) * ys + phase
            t += gain * (np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax)))
        # nuclei: one per grid cell at a hashed offset, anti-aliased by the pixel size
        g, r = self.cell_px, self.nucleus_px
        cx_idx, cy_idx = np.floor(xs / g), np.floor(ys / g)
        h = _hash2(cx_idx[None, :], cy_idx[:, None], self.seed)
        jx = r + (h & 0xFFFF) / 65535.0 * (g - 2 * r)
        jy = r + (h >> 16) / 65535.0 * (g - 2 * r)
        dx = xs[None, :] - (cx_idx[None, :] * g + jx)
        dy = ys[:, None] - (cy_idx[:, None] * g + jy)
        cover = np.clip((r - np.hypot(dx, dy)) / max(ds, 1.0) + 0.5, 0.0, 1.0)
        mean_cover = math.pi * r * r / (g * g)
        sharp = min(1.0, g / (2.0 * ds))  # cells smaller than 2 px blur into their mean
        nuclei = sharp * cover + (1.0 - sharp) * mean_cover
        mix = np.clip(0.18 + t + 0.75 * nuclei, 0.0, 1.0)[..., None]
        pink = np.asarray(self.pink, np.float32)
        purple = np.asarray(self.purple, np.float32)
        return pink * (1.0 - mix) + purple * mix


class IHCTexture:
    """Real histology texture from `skimage.data.immunohistochemistry()` (512 x 512 RGB).

    The image is mirrored into a seamless 1024 x 1024 tile repeated over the plane; `scale` is
    level-0 px per texture px. Sampling uses a mip-map, so low levels average rather than alias.
    variant "A": the IHC image (DAB brown + haematoxylin) at `scale`;
    variant "B": the same tissue re-stained H&E-like (DAB -> eosin by colour deconvolution)
    at 2 x `scale` -- a different stain and texture scale, for two-class MIL demos.
    """

    def __init__(self, variant: Literal["A", "B"] = "A", scale: float = 1.0) -> None:
        from skimage import data

        if variant not in ("A", "B"):
            raise ValueError(f"IHCTexture variant must be 'A' or 'B', got {variant!r}")
        img = data.immunohistochemistry()  # (512, 512, 3) uint8
        if variant == "B":
            img = _restain_he(img)
            scale *= 2.0
        self.variant = variant
        self.scale = float(scale)
        tile = np.concatenate([img, img[:, ::-1]], axis=1)
        tile = np.concatenate([tile, tile[::-1]], axis=0)  # mirrored: seamless when repeated
        self._mips: list[np.ndarray] = [tile.astype(np.float32)]  # float32 (h, w, 3) levels
        while self._mips[-1].shape[0] > 1:
            m = self._mips[-1]
            self._mips.append(
                cv2.resize(m, (m.shape[1] // 2, m.shape[0] // 2), interpolation=cv2.INTER_AREA)
            )

    def __call__(self, xs: np.ndarray, ys: np.ndarray, ds: float) -> np.ndarray:
        texels_per_px = ds / self.scale
        m = int(np.clip(math.floor(math.log2(max(texels_per_px, 1.0))), 0, len(self._mips) - 1))
        mip = self._mips[m]
        n = mip.shape[0]
        ix = (np.floor(xs / (self.scale * 2**m)).astype(np.int64)) % n
        iy = (np.floor(ys / (self.scale * 2**m)).astype(np.int64)) % n
        return mip[iy[:, None], ix[None, :]]


def _restain_he(rgb: np.ndarray) -> np.ndarray:
    """IHC (H + DAB) -> H&E-like: the DAB density becomes eosin, haematoxylin stays."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(rgb)
    he = np.zeros_like(hed)
    he[..., 0] = hed[..., 0] * 1.3
    he[..., 1] = hed[..., 2] * 1.5 + 0.03  # eosin everywhere in tissue, more where DAB was
    out = hed2rgb(he)
    return np.clip(out * 255.0, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- painters
class ShapePainter:
    """Tissue = union of `shapes` minus union of `holes`, filled with `texture`, on white.

    `regions`: (shape, texture) pairs painted over the tissue inside their shape (e.g. a class-B
    area inside class-A tissue); they never extend outside the tissue. All in level-0 px.
    """

    def __init__(
        self,
        shapes: Sequence[Shape],
        texture: Texture | None = None,
        holes: Sequence[Shape] = (),
        regions: Sequence[tuple[Shape, Texture]] = (),
        background: tuple[int, int, int] = WHITE,
    ) -> None:
        self.shapes = list(shapes)
        self.holes = list(holes)
        self.texture: Texture = texture if texture is not None else HETexture()
        self.regions = list(regions)
        self.background = np.asarray(background, np.float32)

    def sdf(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        """Signed distance to the tissue boundary at pixel centres, level-0 px, (h, w)."""
        xs, ys = _centres(x0, w, ds), _centres(y0, h, ds)
        d = _union_sdf(self.shapes, xs, ys)
        if self.holes:
            d = np.minimum(d, -_union_sdf(self.holes, xs, ys))
        return d

    def tissue_mask(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        """Exact truth: bool (h, w), True where the pixel centre lies in tissue."""
        return self.sdf(x0, y0, w, h, ds) > 0

    def region_mask(
        self, index: int, x0: float, y0: float, w: int, h: int, ds: float
    ) -> np.ndarray:
        """bool (h, w): pixel centres in tissue AND in region `index`."""
        xs, ys = _centres(x0, w, ds), _centres(y0, h, ds)
        return (self.sdf(x0, y0, w, h, ds) > 0) & (self.regions[index][0].sdf(xs, ys) > 0)

    def __call__(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        xs, ys = _centres(x0, w, ds), _centres(y0, h, ds)
        d = self.sdf(x0, y0, w, h, ds)
        cover = np.clip(d / max(ds, 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
        if not cover.any():
            return np.full((h, w, 3), self.background.astype(np.uint8), np.uint8)
        colour: np.ndarray = np.asarray(self.texture(xs, ys, ds), np.float32)
        for shape, tex in self.regions:
            rc = np.clip(shape.sdf(xs, ys) / max(ds, 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
            if rc.any():
                colour = colour * (1 - rc[..., None]) + np.asarray(tex(xs, ys, ds)) * rc[..., None]
        out = self.background * (1.0 - cover[..., None]) + colour * cover[..., None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def DiscPainter(
    discs: Sequence[tuple[float, float, float]],
    holes: Sequence[tuple[float, float, float]] = (),
    texture: Texture | None = None,
) -> ShapePainter:
    """Tissue discs (cx, cy, r) minus hole discs, level-0 px, H&E-like texture by default."""
    return ShapePainter([Disc(*d) for d in discs], texture, [Disc(*d) for d in holes])


def RectPainter(
    rects: Sequence[tuple[float, float, float, float]],
    holes: Sequence[tuple[float, float, float, float]] = (),
    texture: Texture | None = None,
) -> ShapePainter:
    """Tissue rectangles (x0, y0, x1, y1) minus hole rectangles, level-0 px."""
    return ShapePainter([Rect(*r) for r in rects], texture, [Rect(*r) for r in holes])


def TexturePainter(
    shapes: Sequence[Shape],
    variant: Literal["A", "B"] = "A",
    scale: float = 1.0,
    regions: Sequence[tuple[Shape, Literal["A", "B"]]] = (),
) -> ShapePainter:
    """Tissue in `shapes` with real IHC texture of `variant`; `regions` get another variant."""
    textures: dict[str, IHCTexture] = {}

    def tex(v: Literal["A", "B"]) -> IHCTexture:
        if v not in textures:
            textures[v] = IHCTexture(v, scale)
        return textures[v]

    return ShapePainter(shapes, tex(variant), regions=[(s, tex(v)) for s, v in regions])


def blank_painter(x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
    """An empty (all white) slide."""
    return np.full((h, w, 3), 255, np.uint8)


# ------------------------------------------------------------------------------------ writer
@dataclass(frozen=True)
class SyntheticSlideInfo:
    """What `write_pyramidal_tiff` wrote."""

    path: Path
    mpp: float
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]  # nominal (2 ** k); the file's are W0 / Wk
    vendor: str


def _tile_iter(
    painter: Painter, w_lvl: int, h_lvl: int, ds: float, tile: int
) -> Iterator[np.ndarray]:
    for ty in range(0, h_lvl, tile):
        for tx in range(0, w_lvl, tile):
            tw, th = min(tile, w_lvl - tx), min(tile, h_lvl - ty)
            region = np.asarray(painter(tx * ds, ty * ds, tw, th, ds))
            if region.shape != (th, tw, 3) or region.dtype != np.uint8:
                raise ValueError(
                    f"painter returned {region.shape} {region.dtype}, expected ({th}, {tw}, 3) uint8"
                )
            if (th, tw) != (tile, tile):  # tiles are stored whole; pad the edge ones with white
                full = np.full((tile, tile, 3), 255, np.uint8)
                full[:th, :tw] = region
                region = full
            yield region


def write_pyramidal_tiff(
    path: str | Path,
    width: int,
    height: int,
    mpp: float,
    levels: int = 3,
    tile: int = 256,
    painter: Painter | None = None,
    vendor: Literal["generic", "aperio"] = "generic",
    jpeg_quality: int = 85,
    thumbnail_px: int = 768,
    maxworkers: int | None = 1,
    level_step: int = 2,
) -> SyntheticSlideInfo:
    """Write a tiled JPEG pyramidal TIFF of `width` x `height` level-0 px at `mpp` um/px.

    Level k is `width // s**k` x `height // s**k` px (s = `level_step`, 2 by default; scanners
    often use 4), rendered by `painter` at downsample s**k.
    vendor "generic": OpenSlide sees `generic-tiff`, mpp from the resolution tags.
    vendor "aperio": Aperio ImageDescription on every page (AppMag from mpp, MPP) and a
    stripped thumbnail as page 1; OpenSlide and tiffslide see vendor `aperio`.
    The file appears atomically at `path`. Returns what was written.
    """
    import tifffile

    if width < 1 or height < 1 or levels < 1:
        raise ValueError(f"bad slide size {width}x{height} or levels {levels}")
    if level_step < 2:
        raise ValueError(f"level_step must be >= 2, got {level_step}")
    if min(width, height) // level_step ** (levels - 1) < 1:
        raise ValueError(f"{levels} levels is too many for a {width}x{height} slide")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    if vendor not in ("generic", "aperio"):
        raise ValueError(f"vendor must be 'generic' or 'aperio', got {vendor!r}")
    painter = painter if painter is not None else blank_painter
    path = Path(path)
    dims = [(width // level_step**k, height // level_step**k) for k in range(levels)]
    dss = [float(level_step**k) for k in range(levels)]
    desc = None
    if vendor == "aperio":
        mag = magnification_label(mpp)
        mag_s = f"{mag:g}"
        desc = (
            f"Aperio Image Library v12.0.0\r\n{width}x{height} [0,0 {width}x{height}] "
            f"({tile}x{tile}) JPEG/RGB Q={jpeg_quality}|AppMag = {mag_s}|MPP = {mpp:g}"
        )
    common: dict[str, Any] = dict(
        photometric="rgb",
        compression="jpeg",
        compressionargs={"level": int(jpeg_quality)},
        resolutionunit="CENTIMETER",
        metadata=None,
        maxworkers=maxworkers,
    )
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, ((w_lvl, h_lvl), ds) in enumerate(zip(dims, dss, strict=True)):
            px_per_cm = 1e4 / (mpp * ds)
            tw.write(
                _tile_iter(painter, w_lvl, h_lvl, ds, tile),
                shape=(h_lvl, w_lvl, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                resolution=(px_per_cm, px_per_cm),
                # real SVS files (and tifffile's SVS parser) mark no level as reduced
                subfiletype=1 if k > 0 and vendor == "generic" else 0,
                description=desc,
                **common,
            )
            if k == 0 and vendor == "aperio":
                t_ds = max(1.0, max(width, height) / float(thumbnail_px))
                t_w, t_h = max(1, round(width / t_ds)), max(1, round(height / t_ds))
                thumb = np.asarray(painter(0.0, 0.0, t_w, t_h, width / t_w))
                tw.write(
                    thumb,
                    rowsperstrip=16,
                    resolution=(1e4 / (mpp * width / t_w),) * 2,
                    description=desc,
                    **common,
                )
    return SyntheticSlideInfo(path, float(mpp), dims, dss, vendor)


# ------------------------------------------------------------- semi-real slides (anomalies)
def load_patches(folder: str | Path, limit: int | None = None) -> list[np.ndarray]:
    """RGB uint8 patches (h, w, 3) of every image file in `folder` (sorted; TIFF/PNG/JPEG)."""
    import tifffile

    out = []
    for p in sorted(Path(folder).iterdir()):
        suf = p.suffix.lower()
        if suf in (".tif", ".tiff"):
            img = np.asarray(tifffile.imread(p))
        elif suf in (".png", ".jpg", ".jpeg"):
            bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(
                    f"{p}: OpenCV cannot decode this image; re-save it or remove it from {folder}"
                )
            img = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        else:
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
        if limit is not None and len(out) >= limit:
            break
    return out


class PatchMosaicTexture:
    """Real texture from a pool of equal-size RGB patches (e.g. 150 x 150 px H&E tiles).

    The plane is cut into square cells of `patch side x scale` level-0 px; each cell shows one
    patch of the pool, chosen and flipped/transposed by a hash of the cell (seeded), so a slide is
    a mosaic of real tissue. `scale` = level-0 px per patch px. Lower levels sample a mip-map of
    the pool (averages, no aliasing). Fully vectorised over the requested pixels.
    """

    def __init__(self, patches: Sequence[np.ndarray], scale: float = 1.0, seed: int = 0) -> None:
        if not patches:
            raise ValueError("PatchMosaicTexture needs at least one patch")
        side = min(min(p.shape[0], p.shape[1]) for p in patches)
        side = 1 << int(math.floor(math.log2(side)))  # power of two: clean mip levels
        stack = np.stack(
            [
                cv2.resize(
                    np.ascontiguousarray(p[..., :3]), (side, side), interpolation=cv2.INTER_AREA
                )
                for p in patches
            ]
        )
        self.side, self.scale, self.seed = side, float(scale), int(seed)
        self._mips = [stack.astype(np.float32)]
        while self._mips[-1].shape[1] > 1:
            m = self._mips[-1]
            self._mips.append(
                0.25 * (m[:, 0::2, 0::2] + m[:, 1::2, 0::2] + m[:, 0::2, 1::2] + m[:, 1::2, 1::2])
            )

    def __call__(self, xs: np.ndarray, ys: np.ndarray, ds: float) -> np.ndarray:
        cell = self.side * self.scale
        lvl = int(np.clip(math.floor(math.log2(max(ds / self.scale, 1.0))), 0, len(self._mips) - 1))
        mip = self._mips[lvl]
        n, s = mip.shape[0], mip.shape[1]
        cx, cy = np.floor(xs / cell).astype(np.int64), np.floor(ys / cell).astype(np.int64)
        h = _hash2(cx[None, :], cy[:, None], self.seed)  # (h, w)
        pid = (h % n).astype(np.int64)
        flip = (h >> 8) & 3
        u = np.floor((xs - cx * cell) / (self.scale * 2**lvl)).astype(np.int64).clip(0, s - 1)
        v = np.floor((ys - cy * cell) / (self.scale * 2**lvl)).astype(np.int64).clip(0, s - 1)
        uu = np.broadcast_to(u[None, :], pid.shape)
        vv = np.broadcast_to(v[:, None], pid.shape)
        uu = np.where(flip & 1, s - 1 - uu, uu)
        vv = np.where(flip & 2, s - 1 - vv, vv)
        return mip[pid, vv, uu]


def pen_transmission(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Real ink as a multiplicative layer: (h, w, 3) float32 in (0, 1], the ink pixels of a pen
    image divided by the image's clean background colour (1 outside the mask)."""
    m = np.asarray(mask).astype(bool)
    if m.ndim == 3:
        m = m[..., 0]
    img = np.asarray(image, np.float32)[..., :3]
    bg = img[~m].mean(0) if (~m).any() else np.full(3, 255.0, np.float32)
    t = np.ones_like(img)
    t[m] = np.clip(img[m] / np.maximum(bg, 1.0), 0.05, 1.0)
    return t


INSERTION_KINDS = ("tissue", "blur", "pen", "fold", "bubble")


@dataclass(frozen=True)
class Insertion:
    """An anomaly painted over the tissue inside `shape` (level-0 px).

    kind: "tissue" (another `texture`), "blur" (Gaussian blur, `sigma_l0` level-0 px), "pen"
    (the tissue times a tiled real-ink transmission layer `ink`, `ink_scale` level-0 px per ink
    px), "fold" (tissue folded onto itself: multiplied with a shifted copy, darker and denser),
    "bubble" (an air bubble: washed-out tissue with a dark refractive rim).
    """

    shape: Shape
    kind: str
    texture: Texture | None = None
    sigma_l0: float = 12.0
    ink: np.ndarray | None = None
    ink_scale: float = 1.0
    label: str = ""

    @property
    def cls(self) -> str:
        return self.label or self.kind


class CompositePainter:
    """Tissue in `shapes` minus `holes` with a (real) `texture`, plus `insertions` with known
    masks, on white.

    `insertion_mask(i, ...)` gives the exact truth of insertion i (its shape inside the tissue)
    at any level, like `ShapePainter.region_mask`.
    """

    def __init__(
        self,
        shapes: Sequence[Shape],
        texture: Texture,
        insertions: Sequence[Insertion] = (),
        holes: Sequence[Shape] = (),
        background: tuple[int, int, int] = WHITE,
    ) -> None:
        for ins in insertions:
            if ins.kind not in INSERTION_KINDS:
                raise ValueError(
                    f"unknown insertion kind {ins.kind!r}; choose one of {INSERTION_KINDS}"
                )
            if ins.kind == "tissue" and ins.texture is None:
                raise ValueError("a 'tissue' insertion needs a texture")
            if ins.kind == "pen" and ins.ink is None:
                raise ValueError("a 'pen' insertion needs an ink layer (pen_transmission)")
        self.base = ShapePainter(shapes, texture, holes=holes, background=background)
        self.texture = texture
        self.insertions = list(insertions)
        self.background = np.asarray(background, np.float32)

    def tissue_mask(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        return self.base.tissue_mask(x0, y0, w, h, ds)

    def insertion_mask(
        self, index: int, x0: float, y0: float, w: int, h: int, ds: float
    ) -> np.ndarray:
        """bool (h, w): pixel centres in tissue and inside insertion `index`."""
        xs, ys = _centres(x0, w, ds), _centres(y0, h, ds)
        return self.base.tissue_mask(x0, y0, w, h, ds) & (
            self.insertions[index].shape.sdf(xs, ys) > 0
        )

    def _colour(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        xs, ys = _centres(x0, w, ds), _centres(y0, h, ds)
        return np.asarray(self.texture(xs, ys, ds), np.float32)

    def __call__(self, x0: float, y0: float, w: int, h: int, ds: float) -> np.ndarray:
        d = self.base.sdf(x0, y0, w, h, ds)
        cover = np.clip(d / max(ds, 1.0) + 0.5, 0.0, 1.0).astype(np.float32)
        if not cover.any():
            return np.full((h, w, 3), self.background.astype(np.uint8), np.uint8)
        colour = self._colour(x0, y0, w, h, ds)
        xs, ys = _centres(x0, w, ds), _centres(y0, h, ds)
        for ins in self.insertions:
            sd = ins.shape.sdf(xs, ys)
            a = np.clip(sd / max(ds, 1.0) + 0.5, 0.0, 1.0).astype(np.float32)[..., None]
            if not a.any():
                continue
            new: np.ndarray  # (h, w, 3) colour of the insertion
            if ins.kind == "tissue":
                texture = ins.texture
                assert texture is not None
                new = np.asarray(texture(xs, ys, ds), np.float32)
            elif ins.kind == "blur":
                sig = max(0.5, ins.sigma_l0 / ds)
                m = int(math.ceil(3 * sig))
                ext = self._colour(x0 - m * ds, y0 - m * ds, w + 2 * m, h + 2 * m, ds)
                new = cv2.GaussianBlur(ext, (0, 0), sig)[m : m + h, m : m + w]
            elif ins.kind == "pen":
                ink = ins.ink
                assert ink is not None
                ih, iw = ink.shape[:2]
                u = (np.floor(xs / (ins.ink_scale)).astype(np.int64)) % (2 * iw)
                v = (np.floor(ys / (ins.ink_scale)).astype(np.int64)) % (2 * ih)
                u = np.where(u >= iw, 2 * iw - 1 - u, u)  # mirrored tiling: no seams
                v = np.where(v >= ih, 2 * ih - 1 - v, v)
                new = colour * ink[v[:, None], u[None, :]]
            elif ins.kind == "fold":
                shift = 0.37 * (
                    ins.shape.r if isinstance(ins.shape, Disc) else (ins.shape.x1 - ins.shape.x0)
                )
                under = self._colour(x0 + shift, y0 + shift * 0.6, w, h, ds)
                new = colour * under / 255.0 * 0.95
            else:  # bubble
                r = (
                    ins.shape.r
                    if isinstance(ins.shape, Disc)
                    else 0.5 * min(ins.shape.x1 - ins.shape.x0, ins.shape.y1 - ins.shape.y0)
                )
                rim = np.exp(-((sd / max(0.06 * r, ds)) ** 2))[..., None].astype(np.float32)
                washed = 0.45 * colour + 0.55 * 245.0
                new = washed * (1 - 0.75 * rim) + 60.0 * 0.75 * rim
            colour = colour * (1 - a) + new * a
        out = self.background * (1.0 - cover[..., None]) + colour * cover[..., None]
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def shape_polygon(shape: Shape, n_vertices: int = 64) -> np.ndarray:
    """Closed polygon (k, 2) level-0 px of a Disc (regular n-gon) or Rect (4 corners)."""
    if isinstance(shape, Disc):
        t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
        pts = np.stack([shape.cx + shape.r * np.cos(t), shape.cy + shape.r * np.sin(t)], 1)
    else:
        pts = np.array(
            [[shape.x0, shape.y0], [shape.x1, shape.y0], [shape.x1, shape.y1], [shape.x0, shape.y1]]
        )
    return np.concatenate([pts, pts[:1]])


def insertions_geojson(insertions: Sequence[Insertion], slide_id: str) -> dict:
    """QuPath GeoJSON FeatureCollection of the insertions (class = insertion kind or label).
    The polygons are the insertion shapes; tissue clipping is left to the tile labelling."""
    feats: list[dict[str, Any]] = []
    for ins in insertions:
        feats.append(
            {
                "type": "Feature",
                "id": f"{slide_id}-{len(feats)}",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [shape_polygon(ins.shape).round(2).tolist()],
                },
                "properties": {"objectType": "annotation", "classification": {"name": ins.cls}},
            }
        )
    return {"type": "FeatureCollection", "features": feats}


# ---------------------------------------------------------------------------- two-class cohort
#: labels of the synthetic cohort; slide i gets COHORT_CLASSES[i % 2]
COHORT_CLASSES = ("normal", "tumour")
#: level-0 um/px of every cohort slide
COHORT_MPP = 0.5

#: one slide's shapes, level-0 px: {"tissue": [("disc", (cx, cy, r)) | ("rect", (x0, y0, x1, y1))],
#: "regions": [(cx, cy, r)]} (the tumour discs; empty on a normal slide)
CohortShapes = dict[str, list[Any]]


def cohort_slide_recipe(index: int, size_px: int, seed: int) -> tuple[str, str, CohortShapes]:
    """(slide id, label, shapes) of cohort slide `index` on a `size_px` square (level-0 px).

    1. The label alternates: COHORT_CLASSES[index % 2].
    2. Tissue: a disc of radius 0.28-0.36 x size near the centre, plus a second piece elsewhere
       on the glass (a vertical strip or a small disc), drawn from a generator seeded by
       (seed, index) so every slide is reproducible on its own.
    3. Tumour slides get one or two discs of radius 0.3-0.45 x r inside the main disc.
    """
    rng = random.Random(seed * 1_000_003 + index)
    label = COHORT_CLASSES[index % 2]
    s = float(size_px)
    cx, cy = rng.uniform(0.4, 0.6) * s, rng.uniform(0.4, 0.6) * s
    r = rng.uniform(0.28, 0.36) * s
    tissue: list[Any] = [("disc", (cx, cy, r))]
    # a second piece: a strip or a smaller disc, somewhere else on the glass
    if rng.random() < 0.5:
        x0 = rng.uniform(0.05, 0.15) * s
        tissue.append(("rect", (x0, 0.1 * s, x0 + rng.uniform(0.12, 0.2) * s, 0.9 * s)))
    else:
        tissue.append(
            (
                "disc",
                (
                    rng.uniform(0.75, 0.85) * s,
                    rng.uniform(0.15, 0.85) * s,
                    rng.uniform(0.08, 0.12) * s,
                ),
            )
        )
    regions = []
    if label == "tumour":
        for _ in range(rng.choice((1, 2))):
            ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.45) * r
            regions.append(
                (cx + dist * math.cos(ang), cy + dist * math.sin(ang), rng.uniform(0.3, 0.45) * r)
            )
    sid = f"demo_{index:03d}_{label}"
    return sid, label, {"tissue": tissue, "regions": regions}


def _write_cohort_slide(path: str, size_px: int, shapes: CohortShapes) -> str:
    """One cohort slide: texture "A" in the tissue, "B" in the tumour regions, 3 levels."""
    tissue = [Disc(*a) if kind == "disc" else Rect(*a) for kind, a in shapes["tissue"]]
    painter = TexturePainter(tissue, "A", 1.0, regions=[(Disc(*d), "B") for d in shapes["regions"]])
    write_pyramidal_tiff(path, size_px, size_px, COHORT_MPP, levels=3, painter=painter)
    return path


def build_cohort(
    folder: str | Path, n_slides: int = 8, size_px: int = 4096, seed: int = 0, workers: int = 1
) -> Path:
    """Write `n_slides` synthetic slides (`size_px` square, level-0 px) and a labelled manifest
    into `folder`; slides already there are kept. Returns the manifest path.

    1. Each slide's recipe comes from `cohort_slide_recipe(i, size_px, seed)`.
    2. Slides missing from `folder` are written (in `workers` processes when > 1).
    3. `folder/manifest.csv` (slide_id, path relative to the folder, patient_id, label) is written
       atomically; one patient per slide.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    recipes = [cohort_slide_recipe(i, size_px, seed) for i in range(n_slides)]
    todo = [
        (str(folder / f"{sid}.tiff"), size_px, shapes)
        for sid, _, shapes in recipes
        if not (folder / f"{sid}.tiff").exists()
    ]
    if todo:
        log.info(
            "writing %d synthetic slides of %d x %d px into %s", len(todo), size_px, size_px, folder
        )
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_write_cohort_slide, *zip(*todo, strict=True)))
        else:
            for args in todo:
                _write_cohort_slide(*args)
    rows = ["slide_id,path,patient_id,label"]
    rows += [f"{sid},{sid}.tiff,patient_{sid[5:8]},{label}" for sid, label, _ in recipes]
    manifest = folder / "manifest.csv"
    atomic_write_text(manifest, "\n".join(rows) + "\n")
    return manifest
