"""ROI image collections: an ImageFolder tree, a labels CSV, or a plain folder of images.

* `scan_image_folder(root)`: ImageFolder layout, one sub-folder per class
  (`root/<class>/**/<image>`); the class is the sub-folder name.
* `list_images(root)`: every image file under `root` (recursively), labels ignored; what MAMIM
  pretraining reads (`wsi-pipe pretrain --images DIR`).
* `groups_from_regex(paths, regex)`: a group id per file from its name (e.g. the source slide:
  `--group-regex 'CRC-Prim-HE-\\d+'`), so that splits keep a group on one side.
* `load_tiles(paths, px)`: the images decoded and resized once to (n, px, px, 3) uint8 with
  `resize_tile`, the same resize every other stage uses.

Malformed input raises `ConfigError` / `EmptyInputError` / `SlideReadError` naming the file or
folder and the fix: a single class, an empty class folder, unreadable images.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from wsi_pipe.core.errors import ConfigError, EmptyInputError, SlideReadError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


@dataclass(frozen=True)
class LabelledImage:
    """One labelled ROI image file; `group` (e.g. source slide) is None when not known."""

    path: str
    label: str
    group: str | None = None


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_images(root: str | Path) -> list[str]:
    """Every image file under `root` (recursive, sorted). EmptyInputError if there is none."""
    r = Path(root)
    if not r.is_dir():
        raise ConfigError(f"image folder {r} does not exist or is not a folder")
    files = sorted(str(p) for p in r.rglob("*") if _is_image(p))
    if not files:
        raise EmptyInputError(
            f"image folder {r} holds no images ({', '.join(IMAGE_SUFFIXES)}); point --images at "
            "the folder of ROI images"
        )
    return files


def scan_image_folder(root: str | Path) -> list[LabelledImage]:
    """ImageFolder layout: `root/<class>/...image`. Raises on a single class or an empty class."""
    r = Path(root)
    if not r.is_dir():
        raise ConfigError(f"image folder {r} does not exist or is not a folder")
    class_dirs = sorted(d for d in r.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise ConfigError(
            f"{r} has no class sub-folders: the ImageFolder layout is {r}/<class>/<image>"
        )
    items: list[LabelledImage] = []
    for d in class_dirs:
        files = sorted(p for p in d.rglob("*") if _is_image(p))
        if not files:
            raise EmptyInputError(
                f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)}): add images or "
                "remove the folder"
            )
        items += [LabelledImage(str(p), d.name) for p in files]
    check_classes([it.label for it in items], str(r))
    return items


def check_classes(labels: Sequence[str], source: str, min_per_class: int = 1) -> None:
    """ConfigError if fewer than 2 classes, or a class has fewer than `min_per_class` examples."""
    counts = Counter(labels)
    if len(counts) < 2:
        raise ConfigError(
            f"{source} has a single class {sorted(counts)}: classification needs at least 2 "
            "classes (one sub-folder or label value each)"
        )
    small = {c: n for c, n in counts.items() if n < min_per_class}
    if small:
        raise ConfigError(
            f"{source}: classes {small} have fewer than {min_per_class} examples; add images or "
            "drop those classes"
        )


def groups_from_regex(paths: Sequence[str], regex: str) -> list[str]:
    """Group id of each file: the first match of `regex` in its file name (group 1 if the regex
    has a capturing group, else the whole match). ConfigError naming a file that does not match."""
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise ConfigError(
            f"--group-regex {regex!r} is not a valid regular expression: {e}"
        ) from None
    out = []
    for p in paths:
        m = pat.search(Path(p).name)
        if m is None:
            raise ConfigError(
                f"--group-regex {regex!r} does not match the file name of {p}: every file needs a "
                "group (e.g. its source slide id in the name)"
            )
        out.append(m.group(1) if pat.groups else m.group(0))
    return out


def read_rgb(path: str) -> np.ndarray:
    """An image file as (h, w, 3) uint8 RGB (alpha dropped). SlideReadError if unreadable."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise SlideReadError(f"cannot read image {path}: not an image or corrupt; fix or remove it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_tiles(paths: Sequence[str], px: int) -> np.ndarray:
    """Decode and resize every image once: (n, px, px, 3) uint8 (`resize_tile`, as elsewhere)."""
    from wsi_pipe.imageops.tiles import resize_tile

    out = np.empty((len(paths), px, px, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = resize_tile(np.ascontiguousarray(read_rgb(p)), px)
    return out
