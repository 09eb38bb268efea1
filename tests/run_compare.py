"""Compare the final outputs of two run folders (used by the failure-safety and Slurm tests).

Final files only: names starting with '.' are temp siblings of atomic writes and are skipped.
Stores are compared array by array and attribute by attribute; JSON by value (minus keys that
hold timings or paths of the run folder); everything else byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from wsi_pipe.store import open_store

#: keys whose values legitimately differ between two identical runs (times, hosts, paths)
VOLATILE_KEYS = frozenset(
    {
        "seconds",
        "seconds_io",
        "seconds_total",
        "started",
        "finished",
        "host",
        "pid",
        "job",
        "time",
        "timestamp",
        "created",
        "tiles_per_s",
        "data_wait",
        "history_seconds",
        "saved_at",
    }
)


def final_files(root: Path, subdirs: Iterable[str]) -> dict[str, Path]:
    """Final artifacts under `root/<subdir>`: {relative path: path}; a .zarr folder is one entry."""
    out: dict[str, Path] = {}
    for sub in subdirs:
        base = root / sub
        if not base.exists():
            continue
        stack = [base]
        while stack:
            d = stack.pop()
            for p in sorted(d.iterdir()):
                if p.name.startswith("."):
                    continue
                if p.is_dir() and p.suffix != ".zarr":
                    stack.append(p)
                else:
                    out[p.relative_to(root).as_posix()] = p
    return out


def leftover_temps(root: Path) -> list[Path]:
    """Temp siblings of atomic writes (hidden '.name.tmp-...') anywhere under `root`."""
    return [p for p in root.rglob(".*") if ".tmp-" in p.name]


def _strip(obj: object, root_a: str, root_b: str) -> object:
    """`obj` without volatile keys, with run folder b's path written as run folder a's."""
    if isinstance(obj, dict):
        return {k: _strip(v, root_a, root_b) for k, v in obj.items() if k not in VOLATILE_KEYS}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, root_a, root_b) for v in obj)
    if isinstance(obj, str):
        return obj.replace(root_b, root_a)
    return obj


def assert_store_equal(
    a: Path, b: Path, ignore_attrs: Iterable[str] = (), roots: tuple[str, str] = ("", "")
) -> None:
    """Same arrays (dtype, shape, values) and attributes; paths under run folder roots[1] read
    as under roots[0]."""
    ign = set(ignore_attrs)
    with open_store(a) as ra, open_store(b) as rb:
        assert ra.names == rb.names, (a, ra.names, rb.names)
        attrs_a = {k: v for k, v in ra.attrs.items() if k not in ign}
        attrs_b = {k: v for k, v in rb.attrs.items() if k not in ign}
        if roots[1]:
            attrs_b = _strip(attrs_b, roots[0], roots[1])  # type: ignore[assignment]
            attrs_a = _strip(attrs_a, roots[0], roots[0])  # type: ignore[assignment]
        assert attrs_a == attrs_b, (a, attrs_a, attrs_b)
        for name in ra.names:
            xa, xb = ra.read(name), rb.read(name)
            assert xa.dtype == xb.dtype and xa.shape == xb.shape, (a, name, xa.shape, xb.shape)
            assert np.array_equal(xa, xb), f"{a}: array {name} differs"
            assert ra.array_attrs(name) == rb.array_attrs(name), (a, name)


def assert_same_outputs(
    root_a: Path, root_b: Path, subdirs: Iterable[str], ignore_attrs: Iterable[str] = ()
) -> int:
    """Every final file under `subdirs` exists in both runs with equal content. Returns count."""
    subdirs = list(subdirs)
    fa, fb = final_files(root_a, subdirs), final_files(root_b, subdirs)
    assert sorted(fa) == sorted(fb), sorted(set(fa) ^ set(fb))
    for rel, pa in fa.items():
        pb = fb[rel]
        if pa.suffix in (".h5", ".zarr"):
            assert_store_equal(pa, pb, ignore_attrs, (str(root_a), str(root_b)))
        elif pa.suffix in (".json", ".geojson"):
            ja = _strip(json.loads(pa.read_text()), str(root_a), str(root_b))
            jb = _strip(json.loads(pb.read_text()), str(root_a), str(root_b))
            assert ja == jb, rel
        elif pa.suffix in (".csv", ".yaml", ".txt"):
            assert pa.read_text() == pb.read_text().replace(str(root_b), str(root_a)), rel
        elif pa.suffix == ".pt":
            import torch

            sa = torch.load(pa, map_location="cpu", weights_only=False)
            sb = torch.load(pb, map_location="cpu", weights_only=False)
            ra, rb = str(root_a), str(root_b)
            _assert_obj_equal(_strip(sa, ra, rb), _strip(sb, ra, rb), rel)
        else:
            assert pa.read_bytes() == pb.read_bytes(), rel
    return len(fa)


def _assert_obj_equal(a: object, b: object, where: str) -> None:
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        ka = {k for k in a if k not in VOLATILE_KEYS}
        kb = {k for k in b if k not in VOLATILE_KEYS}
        assert ka == kb, (where, ka ^ kb)
        for k in ka:
            _assert_obj_equal(a[k], b[k], f"{where}:{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_obj_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, (where, a, b)


def assert_final_files_complete(root: Path, subdirs: Iterable[str]) -> int:
    """Every final-named file opens completely (no partial file under a final name)."""
    n = 0
    for rel, p in final_files(root, subdirs).items():
        if p.suffix in (".h5", ".zarr"):
            with open_store(p) as r:
                for name in r.names:
                    r.read(name)
        elif p.suffix in (".json", ".geojson"):
            json.loads(p.read_text())
        elif p.suffix == ".png":
            import cv2

            assert cv2.imread(str(p)) is not None, f"{rel} is not a complete PNG"
        elif p.suffix == ".pt":
            import torch

            torch.load(p, map_location="cpu", weights_only=False)
        n += 1
    return n
