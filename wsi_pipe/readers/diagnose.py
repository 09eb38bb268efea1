"""Why a file is not a readable slide: missing, empty, text, random bytes, truncated TIFF.

`tiff_truncation(path)` walks the TIFF directory chain (classic and BigTIFF, either byte order)
and checks that every directory and every strip/tile of image data lies inside the file. It reads
only the directories and the offset/byte-count arrays, so it is cheap even for large slides.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_TIFF_TYPE_SIZE = {
    1: 1,
    2: 1,
    3: 2,
    4: 4,
    5: 8,
    6: 1,
    7: 1,
    8: 2,
    9: 4,
    10: 8,
    11: 4,
    12: 8,
    13: 4,
    16: 8,
    17: 8,
    18: 8,
}
_TIFF_INT_DTYPE = {3: "u2", 4: "u4", 13: "u4", 16: "u8", 18: "u8"}
_DATA_OFFSET_TAGS = {273: 279, 324: 325}  # StripOffsets -> StripByteCounts, Tile... -> Tile...
_MAX_IFDS = 100_000


def file_kind(path: Path) -> str:
    """'tiff', 'dicom', 'empty', 'text' or 'unknown' from the first bytes of a file."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "empty"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown"
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return "text" if printable >= 0.95 * len(text) else "unknown"


def tiff_truncation(path: Path) -> str | None:
    """A sentence saying where a TIFF is cut off, or None when its structure is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
        if head[:2] == b"II":
            bo = "<"
        elif head[:2] == b"MM":
            bo = ">"
        else:
            return None
        if len(head) < 8:
            return f"the file is only {size} bytes long: truncated TIFF header"
        magic = struct.unpack(bo + "H", head[2:4])[0]
        if magic == 42:
            big, offset = False, struct.unpack(bo + "I", head[4:8])[0]
        elif magic == 43 and len(head) >= 16:
            big, offset = True, struct.unpack(bo + "Q", head[8:16])[0]
        else:
            return None
        count_fmt, count_size = ("Q", 8) if big else ("H", 2)
        entry_size, inline = (20, 8) if big else (12, 4)
        seen: set[int] = set()
        n = 0
        while offset and n < _MAX_IFDS:
            if offset in seen:
                return f"TIFF directory #{n} loops back to byte {offset}: the file is corrupt"
            seen.add(offset)
            if offset + count_size > size:
                return (
                    f"TIFF directory #{n} should start at byte {offset} but the file ends at "
                    f"byte {size}: the file is truncated"
                )
            f.seek(offset)
            n_entries = struct.unpack(bo + count_fmt, f.read(count_size))[0]
            ifd_end = offset + count_size + n_entries * entry_size + (8 if big else 4)
            if ifd_end > size:
                return (
                    f"TIFF directory #{n} (bytes {offset}-{ifd_end}) runs past the end of the "
                    f"file at byte {size}: the file is truncated"
                )
            raw = f.read(n_entries * entry_size + (8 if big else 4))
            arrays: dict[int, np.ndarray] = {}
            for i in range(n_entries):
                e = raw[i * entry_size : (i + 1) * entry_size]
                if big:
                    tag, typ, count = struct.unpack(bo + "HHQ", e[:12])
                    field = e[12:20]
                else:
                    tag, typ, count = struct.unpack(bo + "HHI", e[:8])
                    field = e[8:12]
                nbytes = count * _TIFF_TYPE_SIZE.get(typ, 1)
                if nbytes > inline:
                    at = struct.unpack(bo + ("Q" if big else "I"), field)[0]
                    if at + nbytes > size:
                        return (
                            f"TIFF directory #{n}: tag {tag} data (bytes {at}-{at + nbytes}) "
                            f"lies past the end of the file at byte {size}: truncated"
                        )
                    if (
                        tag in _DATA_OFFSET_TAGS or tag in _DATA_OFFSET_TAGS.values()
                    ) and typ in _TIFF_INT_DTYPE:
                        here = f.tell()
                        f.seek(at)
                        arrays[tag] = np.frombuffer(f.read(nbytes), bo + _TIFF_INT_DTYPE[typ])
                        f.seek(here)
                elif tag in _DATA_OFFSET_TAGS or tag in _DATA_OFFSET_TAGS.values():
                    if typ in _TIFF_INT_DTYPE:
                        arrays[tag] = np.frombuffer(field[:nbytes], bo + _TIFF_INT_DTYPE[typ])
            for off_tag, cnt_tag in _DATA_OFFSET_TAGS.items():
                if off_tag in arrays and cnt_tag in arrays and arrays[off_tag].size:
                    offs = arrays[off_tag].astype(np.uint64)
                    cnts = arrays[cnt_tag].astype(np.uint64)
                    k = min(offs.size, cnts.size)
                    ends = offs[:k] + cnts[:k]
                    end = int(ends.max()) if k else 0
                    if end > size:
                        missing = int((ends > size).sum())
                        return (
                            f"image data of TIFF directory #{n} ends at byte {end} but the "
                            f"file ends at byte {size} ({missing} of {k} tiles/strips "
                            "missing): the file is truncated"
                        )
            nxt = raw[n_entries * entry_size :]
            offset = struct.unpack(bo + ("Q" if big else "I"), nxt)[0]
            n += 1
    return None


def explain_unreadable(path: Path, backend: str | None = None) -> str:
    """Likely cause, in words, of a file that could not be opened (for SlideReadError messages).

    backend: the one backend that was tried, or None when every backend failed.
    """
    if not path.exists():
        return "the file does not exist (moved, deleted or not yet copied?)"
    if path.is_dir():
        return "the folder holds no .dcm files; give a slide file or a DICOM WSI folder"
    kind = file_kind(path)
    if kind == "empty":
        return "the file is empty (0 bytes): an interrupted copy?"
    if kind == "text":
        return "it is a text file, not a slide image"
    if kind == "tiff":
        cut = tiff_truncation(path)
        if cut:
            return cut
        if backend is not None:
            return (
                f"{backend} does not read this TIFF layout; backend 'auto' also tries the other "
                "reader"
            )
        return (
            "it is a TIFF, but neither OpenSlide nor tiffslide reads it as a slide "
            "(unsupported layout or compression, or corrupt image data)"
        )
    if kind == "dicom" and backend == "tiffslide":
        return "tiffslide does not read DICOM; use backend 'auto' or 'openslide'"
    if kind == "dicom":
        return (
            "it is a DICOM file that OpenSlide cannot open as a whole-slide image "
            "(not a VL Whole Slide Microscopy instance, an incomplete series, or truncated)"
        )
    with open(path, "rb") as f:
        head = f.read(8)
    return (
        f"it is neither a TIFF nor a DICOM file (first bytes {head.hex(' ')}): corrupt data "
        "or a format no installed backend supports"
    )
