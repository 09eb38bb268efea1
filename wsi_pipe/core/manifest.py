"""Slide lists: discover slides in folders, or read a manifest CSV from `data_manifests/`.

Manifest format (CSV, header row, UTF-8):

    slide_id,path,patient_id,label,mpp
    TCGA-A1-0001,/data/slides/TCGA-A1-0001.svs,TCGA-A1,LUAD,
    ...

- `path` is required; relative paths are resolved against the manifest's folder.
- `slide_id` defaults to the file name without its slide extension; it must be unique.
- `patient_id` defaults to `case_id` (CLAM's dataset CSV `case_id, slide_id, label` is a
  manifest: `case_id` is the patient), else to the slide id; `label` may be empty for
  tiling-only runs.
- `mpp` (optional) overrides the level-0 microns per pixel of that slide.
- any other column (e.g. a fixed `split`) is kept in `SlideEntry.extra`.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from wsi_pipe.core.errors import ConfigError, EmptyInputError, SlideReadError

#: File name endings treated as slides when scanning folders (longest first matters for .ome.tif).
SLIDE_EXTENSIONS = (
    ".ome.tiff",
    ".ome.tif",
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".bif",
    ".svslide",
    ".dcm",
)
MANIFEST_COLUMNS = ("slide_id", "path", "patient_id", "label", "mpp")


@dataclass(frozen=True)
class SlideEntry:
    """One slide of a run. `mpp` is an optional level-0 override in um/px."""

    slide_id: str
    path: str
    patient_id: str
    label: str | None = None
    mpp: float | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)


def slide_stem(path: Path) -> str:
    """Slide id from a file name: strips the slide extension ('a.ome.tif' -> 'a')."""
    name = path.name
    low = name.lower()
    for ext in SLIDE_EXTENSIONS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _is_slide_file(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(SLIDE_EXTENSIONS) and not p.name.startswith(".")


def discover(inputs: list[str | Path]) -> list[SlideEntry]:
    """Slides from folders (recursive), explicit files, or one manifest CSV. Sorted by slide id.

    A folder of DICOM files (one file per level, as WSI DICOM is stored) is one slide named after
    the folder. Raises EmptyInputError when nothing is found, ConfigError on duplicate ids.
    """
    entries: list[SlideEntry] = []
    for raw in inputs:
        p = Path(raw)
        if p.suffix.lower() == ".csv" and p.is_file():
            entries.extend(read_manifest(p))
        elif p.is_dir():
            dicom_dirs: set[Path] = set()
            for f in sorted(p.rglob("*")):
                if not _is_slide_file(f):
                    continue
                if f.name.lower().endswith(".dcm"):
                    dicom_dirs.add(f.parent)
                    continue
                entries.append(SlideEntry(slide_stem(f), str(f.resolve()), slide_stem(f)))
            for d in sorted(dicom_dirs):
                first = sorted(d.glob("*.dcm"))[0]
                entries.append(SlideEntry(d.name, str(first.resolve()), d.name))
        elif p.exists():
            sid = p.parent.name if p.name.lower().endswith(".dcm") else slide_stem(p)
            entries.append(SlideEntry(sid, str(p.resolve()), sid))
        else:
            raise ConfigError(
                f"input {raw} does not exist: give slide files, folders or a manifest CSV"
            )
    if not entries:
        raise EmptyInputError(
            f"no slides found in {', '.join(map(str, inputs))} "
            f"(known extensions: {', '.join(SLIDE_EXTENSIONS)})"
        )
    _check_unique(entries)
    return sorted(entries, key=lambda e: e.slide_id)


def _check_unique(entries: list[SlideEntry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        if e.slide_id in seen and seen[e.slide_id] != e.path:
            raise ConfigError(
                f"slide id {e.slide_id!r} is used by both {seen[e.slide_id]} and {e.path}: "
                "rename one file or give explicit slide_id values in a manifest"
            )
        seen[e.slide_id] = e.path


def resolve_slide_path(
    slide_id: str, listed: str | None, stored: str | None, *, fix: str, must_exist: bool = True
) -> str:
    """The one slide-path rule: the path the slide table / manifest lists now (`listed`, so a
    moved cohort is followed), else the path a store recorded when it was written (`stored`),
    whichever exists first. Raises SlideReadError naming the slide, the paths and `fix` when
    neither exists; with `must_exist=False` returns the first given path instead (or "")."""
    given = [str(p) for p in (listed, stored) if p]
    for cand in given:
        if Path(cand).exists():
            return cand
    if not must_exist:
        return given[0] if given else ""
    raise SlideReadError(
        f"slide {slide_id}: file {' / '.join(dict.fromkeys(given)) or '(no path recorded)'} does "
        f"not exist (moved or deleted?): {fix}"
    )


def read_manifest(path: str | Path, require_labels: bool = False) -> list[SlideEntry]:
    """Read and validate a manifest CSV (see module doc). Errors name the file, row and fix."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"manifest {path} does not exist") from None
    reader = csv.DictReader(text.splitlines())
    cols = [c.strip() for c in (reader.fieldnames or [])]
    if "path" not in cols and "slide_id" not in cols:
        raise ConfigError(
            f"manifest {path} needs a header with at least a 'path' or 'slide_id' column "
            f"(known columns: {', '.join(MANIFEST_COLUMNS)}); found {cols or 'no header'}"
        )
    if require_labels and "label" not in cols:
        raise ConfigError(f"manifest {path} has no 'label' column, which training needs")
    out: list[SlideEntry] = []
    for i, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        raw_path = row.get("path", "")
        if raw_path:
            sp = Path(raw_path)
            if not sp.is_absolute():
                sp = (path.parent / sp).resolve()
        else:
            sp = Path("")
        sid = row.get("slide_id") or (slide_stem(sp) if raw_path else "")
        if not sid:
            raise ConfigError(f"manifest {path} row {i}: empty slide_id and path")
        mpp: float | None = None
        if row.get("mpp"):
            try:
                mpp = float(row["mpp"])
            except ValueError:
                raise ConfigError(
                    f"manifest {path} row {i} ({sid}): mpp {row['mpp']!r} is not a number"
                ) from None
            if not math.isfinite(mpp) or mpp <= 0:
                raise ConfigError(f"manifest {path} row {i} ({sid}): mpp must be > 0, got {mpp}")
        label = row.get("label") or None
        if require_labels and label is None:
            raise ConfigError(f"manifest {path} row {i} ({sid}): empty label")
        extra = {k: v for k, v in row.items() if k not in MANIFEST_COLUMNS}
        out.append(
            SlideEntry(
                sid,
                str(sp) if raw_path else "",
                row.get("patient_id") or row.get("case_id") or sid,
                label,
                mpp,
                extra,
            )
        )
    if not out:
        raise EmptyInputError(f"manifest {path} has a header but no rows")
    _check_unique(out)
    return out


def write_manifest(path: str | Path, entries: list[SlideEntry]) -> None:
    """Write entries as a manifest CSV (atomically)."""
    from wsi_pipe.core.fsutil import atomic_write_text

    extra_cols = sorted({k for e in entries for k in e.extra})
    lines = [",".join(MANIFEST_COLUMNS + tuple(extra_cols))]
    for e in entries:
        vals = [
            e.slide_id,
            e.path,
            e.patient_id,
            e.label or "",
            "" if e.mpp is None else repr(e.mpp),
        ]
        vals += [e.extra.get(k, "") for k in extra_cols]
        lines.append(",".join(vals))
    atomic_write_text(path, "\n".join(lines) + "\n")


def save_slide_table(path: str | Path, entries: list[SlideEntry]) -> None:
    """Write the run's slide table (JSON list of entries) atomically."""
    from dataclasses import asdict

    from wsi_pipe.core.fsutil import atomic_write_json

    atomic_write_json(path, [asdict(e) for e in sorted(entries, key=lambda e: e.slide_id)])


def load_slide_table(path: str | Path) -> list[SlideEntry]:
    """Read the run's slide table written by `wsi-pipe tile` (RunLayout.slides_table)."""
    from wsi_pipe.core.fsutil import read_json

    p = Path(path)
    if not p.exists():
        raise EmptyInputError(
            f"{p} does not exist: run `wsi-pipe tile SLIDES --out {p.parent}` first"
        )
    return [SlideEntry(**d) for d in read_json(p)]
