"""Units, geometry, configs, atomic writes and manifests."""

from __future__ import annotations

import os

import numpy as np
import pytest

from wsi_pipe.core import geometry, units
from wsi_pipe.core.config import MilConfig, TileConfig, dump_config, load_config
from wsi_pipe.core.errors import ConfigError, EmptyInputError, SlideReadError, WsiPipeError
from wsi_pipe.core.fsutil import atomic_path, atomic_write_text, clean_stale_tmp
from wsi_pipe.core.manifest import discover, load_slide_table, read_manifest, save_slide_table


def test_errors_subclass_builtins():
    assert issubclass(SlideReadError, OSError) and issubclass(SlideReadError, WsiPipeError)
    assert issubclass(ConfigError, ValueError)


def test_units_use_true_mpp():
    assert units.tile_size_level0(256, 0.5, 0.263) == 487  # 486.69, not 512
    assert units.tile_size_level0(256, 0.5, 0.25) == 512
    assert units.downsample_for(2.0, 0.5) == 4.0
    assert not units.is_plausible_mpp(1000.0) and units.is_plausible_mpp(0.2271)
    assert units.mm2_to_px2(1.0, 0.5) == pytest.approx(4e6)


def test_grid_starts_cover_extent_and_recover_index():
    starts = geometry.grid_starts(1000, 486.69)
    assert starts.tolist() == [0, 487, 973]
    coords = geometry.grid_coords(1000, 500, 486.69)
    assert coords.shape == (6, 2) and coords[1].tolist() == [487, 0]
    np.testing.assert_array_equal(geometry.grid_index(coords, 486.69)[:, 0], [0, 1, 2, 0, 1, 2])


def test_parent_rows_nested_grids():
    fine = geometry.grid_coords(2048, 2048, 256.0)
    coarse = geometry.grid_coords(2048, 2048, 1024.0)
    rows = geometry.parent_rows(fine, 256.0, coarse, 1024.0, (2, 2))
    for (x, y), r in zip(fine, rows):
        px, py = coarse[r]
        assert px <= x < px + 1024 and py <= y < py + 1024
    # a missing parent is -1
    rows = geometry.parent_rows(fine, 256.0, coarse[:1], 1024.0, (2, 2))
    assert (rows[(fine[:, 0] >= 1024) | (fine[:, 1] >= 1024)] == -1).all()
    assert (rows[(fine[:, 0] < 1024) & (fine[:, 1] < 1024)] == 0).all()


def test_config_rejects_typos_and_bad_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tile_px: 256\ntile_pxx: 3\n")
    with pytest.raises(ConfigError, match="tile_pxx"):
        load_config(TileConfig, p)
    with pytest.raises(ConfigError, match="overlap_px"):
        load_config(TileConfig, None, tile_px=64, overlap_px=64)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TileConfig, tmp_path / "nope.yaml")
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TileConfig, p)
    cfg = load_config(TileConfig, None, target_mpps=(2.0, 0.5, 0.5))
    assert cfg.target_mpps == (0.5, 2.0)
    text = dump_config(cfg)
    assert cfg.config_hash() in text.splitlines()[0]
    q = tmp_path / "r.yaml"
    q.write_text(text)
    assert load_config(TileConfig, q) == cfg
    assert MilConfig().config_hash() != MilConfig(method="msm").config_hash()


def test_atomic_path_never_exposes_partial(tmp_path):
    final = tmp_path / "out.txt"
    atomic_write_text(final, "old")
    with pytest.raises(KeyError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise KeyError("crash")
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    # directories (zarr stores) replace too
    d = tmp_path / "store.zarr"
    for content in ("a", "b"):
        with atomic_path(d) as tmp:
            tmp.mkdir()
            (tmp / "x").write_text(content)
    assert (d / "x").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt", "store.zarr"]


def test_clean_stale_tmp(tmp_path):
    t = tmp_path / ".a.h5.tmp-1-abc"
    t.write_text("x")
    os.utime(t, (0, 0))
    assert clean_stale_tmp(tmp_path, older_than_s=10) == 1 and not t.exists()


def test_manifest_and_discovery(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "s1.svs").write_bytes(b"")
    (tmp_path / "a" / "s2.ome.tif").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("")
    (tmp_path / "dcm").mkdir()
    for i in range(3):
        (tmp_path / "dcm" / f"level-{i}.dcm").write_bytes(b"")
    got = discover([tmp_path])
    assert [e.slide_id for e in got] == ["dcm", "s1", "s2"]
    m = tmp_path / "m.csv"
    m.write_text(
        "slide_id,path,patient_id,label,mpp,split\nx,a/s1.svs,P1,tumour,0.25,train\ny,a/s2.ome.tif,P1,normal,,test\n"
    )
    rows = read_manifest(m, require_labels=True)
    assert rows[0].path == str((tmp_path / "a" / "s1.svs").resolve()) and rows[0].mpp == 0.25
    assert rows[1].mpp is None and rows[1].extra == {"split": "test"} and rows[1].patient_id == "P1"
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path,label,mpp\nx,a/s1.svs,t,abc\n")
    with pytest.raises(ConfigError, match=r"row 2 \(x\): mpp 'abc'"):
        read_manifest(bad)
    nolabel = tmp_path / "nl.csv"
    nolabel.write_text("path\na/s1.svs\n")
    with pytest.raises(ConfigError, match="no 'label' column"):
        read_manifest(nolabel, require_labels=True)
    dup = tmp_path / "dup.csv"
    dup.write_text("slide_id,path\nx,a/s1.svs\nx,a/s2.ome.tif\n")
    with pytest.raises(ConfigError, match="used by both"):
        read_manifest(dup)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyInputError, match="no slides found"):
        discover([tmp_path / "empty"])
    save_slide_table(tmp_path / "run" / "slides.json", rows)
    assert load_slide_table(tmp_path / "run" / "slides.json") == rows


def test_one_slide_path_rule(tmp_path):
    from wsi_pipe.core.errors import SlideReadError
    from wsi_pipe.core.manifest import resolve_slide_path

    listed, stored = tmp_path / "now.svs", tmp_path / "then.svs"
    stored.write_bytes(b"x")
    assert resolve_slide_path("s", str(listed), str(stored), fix="f") == str(stored)
    listed.write_bytes(b"x")  # the slide table's current path wins when it exists
    assert resolve_slide_path("s", str(listed), str(stored), fix="f") == str(listed)
    gone = tmp_path / "gone.svs"
    with pytest.raises(SlideReadError, match=r"slide s: file .*gone.svs does not exist .*: fix it"):
        resolve_slide_path("s", str(gone), None, fix="fix it")
    assert resolve_slide_path("s", str(gone), None, fix="", must_exist=False) == str(gone)
    assert resolve_slide_path("s", None, None, fix="", must_exist=False) == ""
