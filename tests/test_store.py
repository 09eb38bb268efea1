"""One contract suite every store backend must pass."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipe.core.errors import StoreSchemaError
from wsi_pipe.store import create_store, open_store, schema, write_store

BACKENDS = ["h5", "zarr"]


def _attrs(kind: str = "features") -> dict:
    return {
        "kind": kind,
        "slide_id": "s1",
        "level0_mpp": 0.2631,
        "target_mpp": 0.5,
        "tile_px": 256,
        "mpp_source": None,
        "levels": (1, 4, 16),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_roundtrip_arrays_and_attrs(tmp_path, backend):
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 10**6, size=(5000, 2)).astype(np.int64)
    feats = rng.standard_normal((5000, 64)).astype(np.float16)
    path = tmp_path / f"s1.{backend}"
    write_store(
        path,
        {"coords": coords, "features": feats},
        _attrs(),
        {"coords": {"patch_size": 256, "downsample": [2.0, 2.0]}},
    )
    with open_store(path) as r:
        assert sorted(r.names) == ["coords", "features"]
        np.testing.assert_array_equal(r.read("coords"), coords)
        np.testing.assert_array_equal(r.read("features"), feats)
        np.testing.assert_array_equal(r.read_rows("features", 100, 200), feats[100:200])
        assert r.dtype("features") == "float16"
        a = r.attrs
        assert a["schema_version"] == schema.SCHEMA_VERSION
        assert a["level0_mpp"] == pytest.approx(0.2631, abs=0)  # exact, not rounded to 0.25
        assert a["mpp_source"] is None and list(a["levels"]) == [1, 4, 16]
        assert r.array_attrs("coords") == {"patch_size": 256, "downsample": [2.0, 2.0]}
        assert len(r) == 5000


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_writes_equal_one_shot_and_chunks_are_large(tmp_path, backend):
    rng = np.random.default_rng(1)
    n, d = 10_000, 32
    feats = rng.standard_normal((n, d)).astype(np.float32)
    path = tmp_path / f"s.{backend}"
    with create_store(path) as w:
        w.create_array("features", (n, d), "float32")
        w.create_array("coords", (n, 2), "int64")
        for s in range(0, n, 97):  # odd batch size: buffering must still land every row
            w.write("features", s, feats[s : s + 97])
            w.write("coords", s, np.full((len(feats[s : s + 97]), 2), s, np.int64))
        assert not path.exists(), "final name must not appear before the writer finishes"
        w.set_attrs(_attrs())
    with open_store(path) as r:
        np.testing.assert_array_equal(r.read("features"), feats)
    if backend == "h5":
        import h5py

        with h5py.File(path) as f:
            assert f["features"].chunks[0] >= 1024
    else:
        import zarr

        assert zarr.open_group(str(path), mode="r")["features"].chunks[0] >= 1024


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_store(tmp_path, backend):
    path = tmp_path / f"e.{backend}"
    write_store(
        path,
        {"coords": np.zeros((0, 2), np.int64), "features": np.zeros((0, 384), np.float32)},
        _attrs(),
    )
    with open_store(path) as r:
        assert r.shape("features") == (0, 384)
        assert r.read("coords").shape == (0, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_writer_leaves_nothing(tmp_path, backend):
    path = tmp_path / f"x.{backend}"
    with pytest.raises(RuntimeError), create_store(path) as w:
        w.create_array("coords", (10, 2), "int64")
        raise RuntimeError("killed mid-slide")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_schema_violations_are_clear(tmp_path, backend):
    path = tmp_path / f"bad.{backend}"
    write_store(
        path,
        {"coords": np.zeros((3, 2), np.int64), "features": np.zeros((4, 8), np.float32)},
        _attrs(),
    )
    with pytest.raises(StoreSchemaError, match="4 rows, coords has 3"):
        open_store(path)
    future = tmp_path / f"future.{backend}"
    with create_store(future) as w:
        w.put("coords", np.zeros((1, 2), np.int64))
        w.put("features", np.zeros((1, 8), np.float32))
        w.set_attrs({**_attrs(), "schema_version": 99})
    with pytest.raises(StoreSchemaError, match="schema version 99"):
        open_store(future)
    with pytest.raises(StoreSchemaError, match="does not exist"):
        open_store(tmp_path / f"missing.{backend}")


def test_foreign_file_is_a_clear_error(tmp_path):
    p = tmp_path / "notastore.h5"
    p.write_bytes(b"garbage" * 10)
    with pytest.raises(StoreSchemaError, match="not a readable HDF5"):
        open_store(p)


def test_grid_attrs_round_trip_and_missing_attrs(tmp_path):
    from wsi_pipe.store import create_store, open_store, schema
    from wsi_pipe.store.schema import GridAttrs

    grid = GridAttrs(
        "s1", "/slides/s1.svs", "openslide", 0.2508, 0.5, 224, 1, 112, 447, 0, 9000, 7000
    )
    for backend in ("h5", "zarr"):
        path = tmp_path / f"s1.{backend}"
        with create_store(path) as w:
            w.put(schema.COORDS, np.zeros((3, 2), np.int64))
            w.put(schema.TISSUE_FRACTION, np.ones(3, np.float32))
            w.put(schema.PARENT_INDEX, -np.ones(3, np.int64))
            w.set_attrs({"kind": schema.KIND_COORDS, **grid.to_attrs(), "extra": 1})
        with open_store(path) as r:
            back = GridAttrs.from_attrs(r.attrs, str(path))
        assert back == grid and isinstance(back.level0_mpp, float) and back.read_level == 1
    with pytest.raises(StoreSchemaError, match=r"x.h5 lacks root attributes \['read_size_px'\]"):
        GridAttrs.from_attrs(
            {k: v for k, v in grid.to_attrs().items() if k != "read_size_px"}, "x.h5"
        )
