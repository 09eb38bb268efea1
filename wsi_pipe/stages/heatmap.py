"""`wsi-pipe heatmap`: a trained MIL model's attention drawn over the slide thumbnail, plus the
top-k attended tiles as images.

Outputs under `RunLayout(run).heatmap_dir(name)` (name = the model folder's name):

    <slide>.png               thumbnail with the attention colour map blended over the tiles,
                              a colour bar and a legend (slide, prediction, scale) beneath
    <slide>_attention.csv     x, y (level-0 px), attention, rank of every tile
    <slide>_top/rank<r>_x<x>_y<y>.png   the k most attended tiles, read from the slide
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from wsi_pipe.core.errors import ConfigError, EmptyInputError
from wsi_pipe.core.fsutil import atomic_write_bytes, atomic_write_text
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry, load_slide_table, resolve_slide_path
from wsi_pipe.imageops.tiles import encode_png
from wsi_pipe.mil.data import bags_from_entries
from wsi_pipe.mil.ordering import infer_stride_l0

log = logging.getLogger(__name__)


def rank_normalise(scores: np.ndarray) -> np.ndarray:
    """Scores (n,) -> their percentile ranks in [0, 1] (ties share a rank; one tile -> 1)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) <= 1:
        return np.ones_like(s)
    _, inv = np.unique(s, return_inverse=True)
    return inv / max(1, inv.max())


def render_heatmap(
    thumb: np.ndarray,
    coords_l0: np.ndarray,
    tile_size_l0: float,
    scores: np.ndarray,
    dims_l0: tuple[int, int],
    alpha: float = 0.5,
    colormap: int = cv2.COLORMAP_JET,
    scale: str = "rank",
) -> np.ndarray:
    """Blend a colour map of per-tile `scores` over a slide thumbnail.

    thumb: (h, w, 3) uint8 RGB of the whole slide; coords_l0: (n, 2) int level-0 px top-left of
    each tile; tile_size_l0: tile side in level-0 px; scores: (n,); dims_l0: level-0 (w, h).
    scale: "rank" (percentiles, spreads the colours) or "minmax". Overlapping tiles average.
    Returns (h, w, 3) uint8 RGB; pixels under no tile keep the thumbnail.
    """
    h, w = thumb.shape[:2]
    sx, sy = w / float(dims_l0[0]), h / float(dims_l0[1])
    s = np.asarray(scores, dtype=np.float64)
    if scale == "rank":
        v = rank_normalise(s)
    elif scale == "minmax":
        span = s.max() - s.min() if len(s) else 0.0
        v = (s - s.min()) / span if span > 0 else np.ones_like(s)
    else:
        raise ValueError(f"scale must be 'rank' or 'minmax', got {scale!r}")
    acc = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.float64)
    c = np.asarray(coords_l0, dtype=np.float64)
    x0 = np.clip(np.floor(c[:, 0] * sx).astype(int), 0, w)
    y0 = np.clip(np.floor(c[:, 1] * sy).astype(int), 0, h)
    x1 = np.clip(np.maximum(np.ceil((c[:, 0] + tile_size_l0) * sx).astype(int), x0 + 1), 0, w)
    y1 = np.clip(np.maximum(np.ceil((c[:, 1] + tile_size_l0) * sy).astype(int), y0 + 1), 0, h)
    for i in range(len(v)):
        acc[y0[i] : y1[i], x0[i] : x1[i]] += v[i]
        cnt[y0[i] : y1[i], x0[i] : x1[i]] += 1
    covered = cnt > 0
    level = np.zeros((h, w), np.uint8)
    level[covered] = np.round(255 * acc[covered] / cnt[covered]).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(level, colormap), cv2.COLOR_BGR2RGB)
    out = thumb.copy()
    blend = (1 - alpha) * thumb[covered].astype(np.float64) + alpha * colour[covered].astype(
        np.float64
    )
    out[covered] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    return out


def add_colour_bar(
    img: np.ndarray,
    lines: list[str],
    colormap: int = cv2.COLORMAP_JET,
    low: str = "low",
    high: str = "high",
    caption: str = "attention: percentile rank within the slide",
    max_px: int | None = None,
) -> np.ndarray:
    """`img` (h, w, 3) uint8 RGB with a legend strip beneath: `lines` of text (ASCII), then a
    colour bar of `colormap` labelled `low` .. `high` and `caption`. With `max_px`, the result
    is scaled down to fit max_px on its longest side. Returns a new RGB uint8 image."""
    h, w = img.shape[:2]
    font = cv2.FONT_HERSHEY_SIMPLEX
    fs = float(np.clip(w / 1000.0, 0.35, 0.8))
    thick = 1 if fs < 0.6 else 2
    (_, th), base = cv2.getTextSize("Ag", font, fs, thick)
    line_h = th + base + max(4, int(th * 0.6))
    pad = max(6, int(0.02 * w))
    bar_h = max(8, int(1.1 * th))
    strip_h = pad + line_h * (len(lines) + 1) + bar_h + pad
    strip = np.full((strip_h, w, 3), 255, np.uint8)
    y = pad + th
    for text in lines:
        cv2.putText(strip, text, (pad, y), font, fs, (20, 20, 20), thick, cv2.LINE_AA)
        y += line_h
    (lw, _), _ = cv2.getTextSize(low, font, fs, thick)
    (hw, _), _ = cv2.getTextSize(high, font, fs, thick)
    x0, x1 = pad + lw + pad, max(pad + lw + pad + 10, w - pad - hw - pad)
    ramp = np.linspace(0, 255, max(1, x1 - x0)).astype(np.uint8)[None, :]
    bar = cv2.cvtColor(cv2.applyColorMap(np.repeat(ramp, bar_h, 0), colormap), cv2.COLOR_BGR2RGB)
    yb = y - th
    strip[yb : yb + bar_h, x0 : x0 + bar.shape[1]] = bar[:, : max(0, min(bar.shape[1], w - x0))]
    cv2.rectangle(strip, (x0, yb), (x0 + bar.shape[1] - 1, yb + bar_h - 1), (90, 90, 90), 1)
    cv2.putText(strip, low, (pad, yb + bar_h - 1), font, fs, (20, 20, 20), thick, cv2.LINE_AA)
    cv2.putText(strip, high, (x1 + pad, yb + bar_h - 1), font, fs, (20, 20, 20), thick, cv2.LINE_AA)
    cv2.putText(
        strip,
        caption,
        (x0, yb + bar_h + line_h - base),
        font,
        fs * 0.9,
        (70, 70, 70),
        1,
        cv2.LINE_AA,
    )
    out = np.concatenate([img, strip], axis=0)
    if max_px is not None and max(out.shape[:2]) > max_px:
        f = max_px / max(out.shape[:2])
        size = (max(1, round(out.shape[1] * f)), max(1, round(out.shape[0] * f)))
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
    return out


def _slide_path(
    layout: RunLayout, slide_id: str, store_path_attr: str | None, override: str | None
) -> tuple[str, float | None, str]:
    if override:
        return override, None, "auto"
    listed, listed_mpp = None, None
    if layout.slides_table.exists():
        for e in load_slide_table(layout.slides_table):
            if e.slide_id == slide_id and e.path:
                listed, listed_mpp = e.path, e.mpp
    if listed or store_path_attr:
        path = resolve_slide_path(
            slide_id, listed, store_path_attr, fix="pass --slide-path FILE", must_exist=False
        )
        return path, listed_mpp if path == listed else None, "auto"
    raise ConfigError(
        f"slide {slide_id}: its file is not in {layout.slides_table} nor in the feature "
        "store (CLAM/TRIDENT feature files do not record it); pass --slide-path FILE"
    )


@dataclass(frozen=True)
class HeatmapResult:
    """Files written for one slide and the ensemble's prediction."""

    png: Path
    attention_csv: Path
    top_tiles: list[Path]
    probabilities: dict[str, float]


def heatmap(
    run_dir: str | Path,
    model_dir: str | Path,
    slide_id: str,
    top_k: int = 8,
    max_px: int = 2048,
    alpha: float = 0.5,
    tile_out_px: int = 256,
    slide_path: str | None = None,
    device: str = "auto",
    features: str | None = None,
) -> HeatmapResult:
    """Attention heatmap (PNG) and the `top_k` most attended tiles of one slide of `run_dir`,
    with the fold models of `model_dir` averaged. Tiles are saved at most `tile_out_px` wide.
    `features`: another feature set or a CLAM/TRIDENT feature folder with coords (h5 files;
    CLAM's pt_files hold none) made with the model's encoder (default: the model's own)."""
    from wsi_pipe.mil.data import is_foreign_set, resolve_feature_source
    from wsi_pipe.mil.trained import ensemble_predict, load_trained
    from wsi_pipe.readers import open_slide
    from wsi_pipe.readers.top_tiles import write_top_tiles
    from wsi_pipe.torchutil import resolve_device

    layout = RunLayout(run_dir)
    dev = resolve_device(device)
    trained = load_trained(model_dir, dev)
    info = trained.info
    if features is not None:
        fset, fmpp = resolve_feature_source(
            layout, features, None if is_foreign_set(features) else float(info["mpp"])
        )
        info = {**info, "feature_set": fset, "mpp": fmpp}
    bags, _ = bags_from_entries(
        layout,
        [SlideEntry(slide_id, "", slide_id)],
        info["feature_set"],
        float(info["mpp"]),
        classes=trained.classes,
        require_labels=False,
    )
    bag = bags[0]
    feats, coords = bag.load()
    if coords is None:
        raise ConfigError(
            f"slide {slide_id}: {bag.store_path} holds features without coords (CLAM's pt_files "
            "have none), so there is nothing to place on the slide: give --features the h5_files/ "
            "folder beside it (CLAM) or TRIDENT's features_<encoder>/ folder"
        )
    if len(coords) == 0:
        raise EmptyInputError(f"slide {slide_id} has no tiles to draw")
    prob, atts = ensemble_predict(trained, bags, dev, with_attention=True)
    att = atts[0]
    path, mpp_override, backend = _slide_path(layout, slide_id, bag.slide_path, slide_path)
    # no tile size stored: the grid stride (exact for non-integer strides, unlike a gcd)
    tile_l0 = float(bag.tile_size_l0 or (infer_stride_l0(coords) if len(coords) > 1 else 256))
    name = Path(model_dir).name
    order = np.argsort(-att, kind="stable")
    rank = np.empty(len(att), dtype=np.int64)
    rank[order] = np.arange(1, len(att) + 1)
    lines = ["x,y,attention,rank"] + [
        f"{int(x)},{int(y)},{a:.8g},{r}" for (x, y), a, r in zip(coords, att, rank, strict=True)
    ]
    csv_path = layout.heatmap_attention_csv(name, slide_id)
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    with open_slide(path, backend=backend, mpp_override=mpp_override, slide_id=slide_id) as reader:
        thumb = reader.get_thumbnail(max_px)
        img = render_heatmap(thumb, coords, tile_l0, att, reader.dimensions, alpha)
        probs_now = {c: float(v) for c, v in zip(trained.classes, prob[0], strict=True)}
        pred_txt = ", ".join(f"P({c}) = {v:.3f}" for c, v in probs_now.items())
        img = add_colour_bar(
            img,
            [
                f"{slide_id}: {pred_txt}",
                f"{name}: attention and P averaged over {len(trained.models)} fold models, "
                f"{len(att)} tiles",
            ],
            low="lowest",
            high="highest",
            max_px=max(max_px, max(img.shape[:2])),
        )
        png = layout.heatmap_png(name, slide_id)
        atomic_write_bytes(png, encode_png(img))
        tiles = write_top_tiles(
            reader,
            coords,
            order,
            tile_l0,
            layout.heatmap_top_tiles_dir(name, slide_id),
            top_k,
            tile_out_px,
        )
    probs = {c: float(v) for c, v in zip(trained.classes, prob[0], strict=True)}
    log.info("heatmap %s: %d tiles, prediction %s -> %s", slide_id, len(att), probs, png)
    return HeatmapResult(png, csv_path, tiles, probs)
