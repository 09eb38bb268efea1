"""QuPath annotations in: `wsi-pipe tile --annotations` (label / restrict / tissue modes,
exclusions), the stored `annotation_class` column in both backends, the tissue GeoJSON round
trip, finetune and anomaly evaluation from the stored labels, malformed GeoJSON.

The synthetic slide is 4096 x 4096 level-0 px at 0.5 um/px; tiles of 256 px at 1 um/px are
512 level-0 px, so the grid is 8 x 8 and every painted rectangle and polygon below lies on tile
edges: tile sets are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsi_pipe.core.config import TileConfig
from wsi_pipe.core.errors import ConfigError, StoreSchemaError
from wsi_pipe.core.layout import RunLayout
from wsi_pipe.core.manifest import SlideEntry
from wsi_pipe.imageops import annotations as A
from wsi_pipe.imageops.contours import to_geojson
from wsi_pipe.imageops.tissue import segment_tissue
from wsi_pipe.stages.tile import load_slide_annotations, run_tile
from wsi_pipe.store import open_store, schema, write_store
from wsi_pipe.synth import RectPainter, write_pyramidal_tiff

T = 512  # tile side in level-0 px
TISSUE = [(512, 512, 3584, 2048), (512, 2560, 2048, 3584)]  # painted rectangles


def sq(x0: float, y0: float, x1: float, y1: float, cw: bool = False) -> list[list[float]]:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return ring[::-1] if cw else ring


def feature(rings, cls=None, *, old_style=False, multi=False) -> dict:
    props: dict = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = cls if old_style else {"name": cls, "color": [1, 2, 3]}
    geom = {"type": "MultiPolygon", "coordinates": rings} if multi else {
        "type": "Polygon", "coordinates": rings}  # fmt: skip
    return {"type": "Feature", "geometry": geom, "properties": props}


#: Tumor with a hole (3 tiles), Stroma as a MultiPolygon (3 tiles), Ignore* (1 tissue tile),
#: "Artefact" in the older string form (1 tissue tile)
ANNOTATIONS = [
    feature([sq(512, 512, 1536, 1536), sq(1024, 1024, 1536, 1536, cw=True)], "Tumor"),
    feature([[sq(2048, 512, 3072, 1024)], [sq(1536, 2560, 2048, 3072)]], "Stroma", multi=True),
    feature([sq(3072, 1536, 3584, 2048)], "Ignore*"),
    feature([sq(512, 3072, 1024, 3584)], "Artefact", old_style=True),
]
TUMOR = {(512, 512), (1024, 512), (512, 1024)}
STROMA = {(2048, 512), (2560, 512), (1536, 2560)}
EXCLUDED = {(3072, 1536), (512, 3072)}


def tissue_tiles() -> set[tuple[int, int]]:
    return {(x, y) for x0, y0, x1, y1 in TISSUE for x in range(x0, x1, T) for y in range(y0, y1, T)}


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("slides")
    write_pyramidal_tiff(d / "s1.tif", 4096, 4096, 0.5, levels=3, painter=RectPainter(TISSUE))
    return d


@pytest.fixture()
def ann_dir(tmp_path) -> Path:
    d = tmp_path / "ann"
    d.mkdir()
    # a plain list of Features, as some QuPath exports write
    (d / "s1.geojson").write_text(json.dumps(ANNOTATIONS))
    return d


def tile(slide_dir: Path, out: Path, ann: Path | None, **kw):
    cfg = dict(target_mpps=(1.0,), tile_px=256, min_tissue_fraction=0.5)
    if ann is not None:
        cfg["annotations_dir"] = str(ann)
    return run_tile([str(slide_dir / "s1.tif")], out, TileConfig(**{**cfg, **kw}), progress=False)


def read(out: Path, sid: str = "s1", backend: str = "h5", mpp: float = 1.0) -> dict:
    with open_store(RunLayout(out).coords_store(sid, mpp, backend)) as r:
        d = {n: r.read(n) for n in r.names}
        d["attrs"] = r.attrs
        if schema.ANNOTATION_CLASS in r.names:
            d["names"] = r.array_attrs(schema.ANNOTATION_CLASS)[schema.CLASS_NAMES]
    d["set"] = {(int(x), int(y)) for x, y in d["coords"]}
    return d


def labelled(d: dict, name: str) -> set[tuple[int, int]]:
    i = d["names"].index(name)
    return {(int(x), int(y)) for (x, y), c in zip(d["coords"], d["annotation_class"]) if c == i}


# ------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("backend", ["h5", "zarr"])
def test_label_mode_stores_classes_and_drops_excluded(slide_dir, ann_dir, tmp_path, backend):
    s = tile(slide_dir, tmp_path / "run", ann_dir, store=backend)
    assert s.ok, s.results[0].error
    d = read(tmp_path / "run", backend=backend)
    assert d["set"] == tissue_tiles() - EXCLUDED
    assert d["names"] == ["Stroma", "Tumor"]
    assert labelled(d, "Tumor") == TUMOR and labelled(d, "Stroma") == STROMA
    assert d["annotation_class"].dtype == np.int16 and len(d["annotation_class"]) == len(
        d["coords"]
    )
    lab = d["annotation_class"] >= 0
    np.testing.assert_array_equal(d["annotation_fraction"][lab], 1.0)
    np.testing.assert_array_equal(d["annotation_fraction"][~lab], 0.0)
    a = d["attrs"]
    assert a["annotation_file"] == "s1.geojson" and a["annotation_mode"] == "label"
    assert a["tissue_source"] == "segmentation" and len(a["annotation_sha256"]) == 64
    assert s.results[0].info["annotations"]["tiles_dropped"]["excluded"] == 2


def test_restrict_mode_keeps_only_annotated_tiles(slide_dir, ann_dir, tmp_path):
    s = tile(slide_dir, tmp_path / "all", ann_dir, annotation_mode="restrict")
    assert s.ok
    d = read(tmp_path / "all")
    assert d["set"] == TUMOR | STROMA
    assert (d["annotation_class"] >= 0).all()
    # one class only, named case-insensitively; a coarser grid keeps the parents of kept tiles
    s = tile(
        slide_dir, tmp_path / "tumor", ann_dir, annotation_mode="restrict",
        annotation_classes=("tumor",), target_mpps=(1.0, 2.0),
    )  # fmt: skip
    assert s.ok
    d = read(tmp_path / "tumor")
    assert d["set"] == TUMOR and d["names"] == ["tumor"]
    coarse = read(tmp_path / "tumor", mpp=2.0)
    assert coarse["set"] == {(0, 0), (1024, 0), (0, 1024)}  # parents, below the 0.5 share
    assert (coarse["annotation_class"] == -1).all()
    np.testing.assert_allclose(sorted(coarse["annotation_fraction"]), [0.25, 0.25, 0.25])


def test_exclusion_is_configurable(slide_dir, ann_dir, tmp_path):
    s = tile(slide_dir, tmp_path / "none", ann_dir, annotation_exclude=())
    assert s.ok
    d = read(tmp_path / "none")
    assert d["set"] == tissue_tiles()  # nothing excluded: Ignore* and Artefact become labels
    assert d["names"] == ["Artefact", "Ignore*", "Stroma", "Tumor"]
    assert labelled(d, "Ignore*") == {(3072, 1536)}
    s = tile(slide_dir, tmp_path / "half", ann_dir, annotation_exclude=("ARTEFACT",))
    assert s.ok
    assert read(tmp_path / "half")["set"] == tissue_tiles() - {(512, 3072)}


def test_missing_geojson_label_vs_restrict_and_resume(slide_dir, ann_dir, tmp_path):
    write_pyramidal_tiff(
        slide_dir / "s2.tif", 2048, 2048, 0.5, levels=2, painter=RectPainter([(0, 0, 1024, 1024)])
    )
    inputs = [str(slide_dir / "s1.tif"), str(slide_dir / "s2.tif")]

    def run(out, **kw):
        cfg = TileConfig(
            target_mpps=(1.0,), min_tissue_fraction=0.5, annotations_dir=str(ann_dir), **kw
        )
        return run_tile(inputs, out, cfg, progress=False)

    s = run(tmp_path / "label")
    assert s.ok
    d = read(tmp_path / "label", "s2")
    assert len(d["coords"]) == 4 and (d["annotation_class"] == -1).all()
    assert d["attrs"]["annotation_file"] == "" and d["names"] == []
    # restrict: the slide without a file fails alone, with the fix; the other is tiled
    s = run(tmp_path / "restrict", annotation_mode="restrict")
    by = {r.slide_id: r for r in s.results}
    assert by["s1"].status == "done" and by["s2"].status == "failed"
    assert "no annotation file" in by["s2"].error and "s2.geojson" in by["s2"].error
    # resume: unchanged -> skipped; an edited GeoJSON re-tiles that slide only
    s = run(tmp_path / "label")
    assert s.count("skipped") == 2
    edited = [*ANNOTATIONS, feature([sq(2560, 1024, 3072, 1536)], "Tumor")]
    (ann_dir / "s1.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": edited})
    )
    s = run(tmp_path / "label")
    assert {r.slide_id: r.status for r in s.results} == {"s1": "done", "s2": "skipped"}
    assert labelled(read(tmp_path / "label"), "Tumor") == TUMOR | {(2560, 1024)}
    # a changed option changes the config hash: everything re-tiles
    s = run(tmp_path / "label", annotation_min_fraction=0.9)
    assert s.count("done") == 2


def test_annotation_keys_leave_the_hash_of_plain_runs_alone():
    plain = TileConfig()
    assert plain.config_hash() == TileConfig(annotation_mode="restrict").config_hash()
    a = TileConfig(annotations_dir="/x")
    assert a.config_hash() != plain.config_hash()
    assert a.config_hash() != TileConfig(annotations_dir="/y").config_hash()
    assert (
        a.config_hash() != TileConfig(annotations_dir="/x", annotation_mode="tissue").config_hash()
    )


# ---------------------------------------------------------------------- tissue round trip
def test_tissue_geojson_round_trip_gives_the_same_mask():
    """segment -> to_geojson (level-0 px) -> parse -> mask: pixel-identical, holes included, at
    an integer and a non-integer level-0 / mask px factor."""
    painter = RectPainter(
        [(64, 64, 900, 700), (1000, 200, 1400, 1100)], holes=[(300, 250, 600, 450)]
    )
    for inv in (8.0, 7.37):
        w, h = int(1600 / inv), int(1300 / inv)
        rgb = painter(0.0, 0.0, w, h, inv)
        tm = segment_tissue(rgb, 0.5 * inv)
        assert len(tm.polygons) == 2 and sum(len(hs) for _, hs in tm.polygons) == 1
        geo = json.loads(json.dumps(to_geojson(tm.polygons, inv, "x")))
        mask, polys = A.tissue_mask_from_polygons(A.parse_geojson(geo), (h, w), 1.0 / inv)
        np.testing.assert_array_equal(mask, tm.mask)
        assert len(polys) == 2


def test_edited_tissue_geojson_replaces_the_mask(slide_dir, tmp_path):
    three = [*TISSUE, (2560, 2560, 3584, 3584)]
    write_pyramidal_tiff(tmp_path / "s3.tif", 4096, 4096, 0.5, levels=3, painter=RectPainter(three))
    base = dict(target_mpps=(1.0,), tile_px=256, min_tissue_fraction=0.5)
    s = run_tile([str(tmp_path / "s3.tif")], tmp_path / "seg", TileConfig(**base), progress=False)
    assert s.ok
    computed = read(tmp_path / "seg", "s3")
    truth = {(x, y) for x0, y0, x1, y1 in three for x in range(x0, x1, T) for y in range(y0, y1, T)}
    assert computed["set"] == truth
    geo = json.loads(RunLayout(tmp_path / "seg").tissue_geojson("s3").read_text())
    assert len(geo["features"]) == 3

    def feed(features, name):
        d = tmp_path / f"ann_{name}"
        d.mkdir()
        (d / "s3.geojson").write_text(json.dumps({**geo, "features": features}))
        cfg = TileConfig(**base, annotations_dir=str(d), annotation_mode="tissue")
        s = run_tile([str(tmp_path / "s3.tif")], tmp_path / name, cfg, progress=False)
        assert s.ok, s.results[0].error
        return read(tmp_path / name, "s3")

    # unedited: exactly the computed tiles and tissue fractions
    same = feed(geo["features"], "same")
    np.testing.assert_array_equal(same["coords"], computed["coords"])
    np.testing.assert_array_equal(same["tissue_fraction"], computed["tissue_fraction"])
    assert same["attrs"]["tissue_source"] == "annotations"
    assert same["names"] == ["Tissue"] and (same["annotation_class"] == 0).all()

    # edited: drop the bottom-right piece, cut a hole in the top piece, add a piece on glass
    def bbox(f):
        pts = np.asarray(f["geometry"]["coordinates"][0])
        return pts.min(0)

    feats = [f for f in geo["features"] if tuple(bbox(f) // T) != (5, 5)]
    assert len(feats) == 2
    top = next(f for f in feats if bbox(f)[1] < 1000)
    top["geometry"]["coordinates"].append(sq(1536, 1024, 2560, 1536, cw=True))
    feats.append(feature([sq(2560, 2048, 3584, 2560)], "Tissue"))  # on glass
    edited = feed(feats, "edited")
    hole = {(1536, 1024), (2048, 1024)}
    dropped = {(x, y) for x in (2560, 3072) for y in (2560, 3072)}
    added = {(2560, 2048), (3072, 2048)}
    assert not added & truth
    assert edited["set"] == (truth - hole - dropped) | added
    new = np.array([(int(x), int(y)) in added for x, y in edited["coords"]])
    np.testing.assert_array_equal(edited["tissue_fraction"][new], 1.0)
    out = json.loads(RunLayout(tmp_path / "edited").tissue_geojson("s3").read_text())
    assert len(out["features"]) == 3 and len(out["features"][0]["geometry"]["coordinates"]) >= 1


# --------------------------------------------------------------------------- bad input
def test_malformed_and_foreign_geojson_errors(tmp_path):
    entry = SlideEntry("s", str(tmp_path / "s.tif"), "s")
    d = tmp_path / "ann"
    d.mkdir()
    cfg = TileConfig(annotations_dir=str(d), annotation_mode="restrict")

    def err(text: str) -> str:
        (d / "s.geojson").write_text(text)
        with pytest.raises(ConfigError) as e:
            load_slide_annotations(cfg, entry, (4096, 4096))
        assert "s.geojson" in str(e.value)
        return str(e.value)

    assert "not valid JSON" in err("{not json") and "QuPath" in err("{not json")
    assert "FeatureCollection" in err('{"type": "Point", "coordinates": [1, 2]}')
    assert "fewer than 3" in err(json.dumps([feature([[[0, 0], [5, 5], [0, 0]]], "T")]))
    assert "[x, y]" in err(json.dumps([feature([[["a", "b"], [1, 2], [3, 4]]], "T")]))
    assert "coordinates list" in err(
        json.dumps([{"type": "Feature", "geometry": {"type": "Polygon"}}])
    )
    far = err(json.dumps([feature([sq(0, 0, 40000, 40000)], "T")]))
    assert "another slide" in far and "level-0" in far and "4096" in far
    assert "no region polygons" in err(json.dumps([feature([sq(0, 0, 512, 512)], "Ignore*")]))
    (d / "s.json").write_text("[]")
    (d / "s.geojson").write_text("[]")
    with pytest.raises(ConfigError, match="several annotation files"):
        load_slide_annotations(cfg, entry, (4096, 4096))
    # QuPath's file naming (slide file name + .geojson) and .json are found
    (d / "s.json").unlink()
    (d / "s.geojson").unlink()
    (d / "s.tif.geojson").write_text(json.dumps([feature([sq(0, 0, 512, 512)], "T")]))
    assert load_slide_annotations(cfg, entry, (4096, 4096)).class_names == ["T"]


def test_store_schema_checks_the_annotation_arrays(tmp_path):
    base = {
        schema.COORDS: np.zeros((3, 2), np.int64),
        schema.TISSUE_FRACTION: np.ones(3, np.float32),
        schema.PARENT_INDEX: np.full(3, -1, np.int64),
    }
    attrs = {"kind": "coords", "slide_id": "a", "level0_mpp": 0.5, "target_mpp": 1.0, "tile_px": 8}
    for backend in ("h5", "zarr"):
        bad = [
            ({schema.ANNOTATION_CLASS: np.zeros(3, np.int64)}, {}, "dtype"),
            ({schema.ANNOTATION_CLASS: np.zeros(2, np.int16)}, {}, "rows"),
            ({schema.ANNOTATION_CLASS: np.zeros(3, np.int16)}, {}, "class_names"),
            ({schema.ANNOTATION_FRACTION: np.zeros(3, np.float32)}, {}, "without"),
        ]
        for i, (extra, aa, what) in enumerate(bad):
            p = tmp_path / f"b{i}.{backend}"
            write_store(p, {**base, **extra}, attrs, aa)
            with pytest.raises(StoreSchemaError, match=what):
                open_store(p).close()
        p = tmp_path / f"ok.{backend}"
        arrays = {**base, schema.ANNOTATION_CLASS: np.array([-1, 0, 1], np.int16),
                  schema.ANNOTATION_FRACTION: np.array([0, 1, 0.5], np.float32)}  # fmt: skip
        write_store(p, arrays, attrs, {schema.ANNOTATION_CLASS: {schema.CLASS_NAMES: ["a", "b"]}})
        with open_store(p) as r:
            assert r.array_attrs(schema.ANNOTATION_CLASS)[schema.CLASS_NAMES] == ["a", "b"]


def test_scanline_fill_is_exact_on_pixel_centres():
    ring = np.array(sq(2, 2, 10, 8), float)
    hole = np.array(sq(4, 4, 6, 6, cw=True), float)
    m = A.fill_polygons([A.ClassedPolygon("a", ring, (hole,))], (12, 12), 1.0)
    expect = np.zeros((12, 12), bool)
    expect[2:8, 2:10] = True
    expect[4:6, 4:6] = False
    np.testing.assert_array_equal(m, expect)
    # a disc: the count matches its area to the pixel
    t = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    disc = np.stack([100 + 60 * np.cos(t), 100 + 60 * np.sin(t)], 1)
    n = A.fill_polygons([A.ClassedPolygon("d", disc)], (200, 200), 1.0).sum()
    assert abs(n - np.pi * 60**2) < 2 * np.pi * 60 * 0.05


# --------------------------------------------------------------------------------- CLI
def test_cli_tile_with_annotations(slide_dir, ann_dir, tmp_path):
    cmd = [
        sys.executable, "-m", "wsi_pipe.cli.app", "-q", "tile", str(slide_dir / "s1.tif"),
        "--out", str(tmp_path / "run"), "--mpp", "1", "--min-tissue", "0.5",
        "--annotations", str(ann_dir), "--annotation-mode", "restrict",
        "--annotation-classes", "Tumor, Stroma", "--exclude-classes", "ignore*,artefact",
    ]  # fmt: skip
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "s1.geojson: 6 labelled" in p.stdout
    d = read(tmp_path / "run")
    assert d["set"] == TUMOR | STROMA and d["names"] == ["Tumor", "Stroma"]
    p = subprocess.run(cmd[:6] + ["--out", str(tmp_path / "x"), "--annotation-mode", "restrict"],
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == 2 and "need --annotations" in p.stdout + p.stderr


# ------------------------------------------------------------- finetune and anomaly
def test_finetune_from_annotation_labels(slide_dir, tmp_path):
    """Four slides (links to one file), left half "A", right half "B": trains with slides kept
    whole in train / val / test."""
    import torch

    from wsi_pipe.encoders import create_encoder, save_encoder
    from wsi_pipe.stages.finetune import annotation_labelled

    ann = tmp_path / "ann"
    ann.mkdir()
    links = []
    for i in range(4):
        link = tmp_path / f"p{i}.tif"
        link.symlink_to(slide_dir / "s1.tif")
        links.append(str(link))
        feats = [
            feature([sq(512, 512, 2048, 2048)], "A"),
            feature([sq(2048, 512, 3584, 2048)], "B"),
        ]
        (ann / f"p{i}.geojson").write_text(json.dumps(feats))
    cfg = TileConfig(target_mpps=(1.0,), min_tissue_fraction=0.5, annotations_dir=str(ann))
    assert run_tile(links, tmp_path / "run", cfg, progress=False).ok
    torch.manual_seed(0)
    enc = tmp_path / "enc.pt"
    save_encoder(create_encoder("ssmamba_tiny"), enc, {"data": "random init"})
    from typer.testing import CliRunner

    from wsi_pipe.cli.app import app

    args = [
        "-q", "finetune", "--encoder", str(enc), "--from-annotations", str(tmp_path / "run"),
        "--out", str(tmp_path / "ft.pt"), "--epochs", "2", "--input-px", "32", "--device", "cpu",
        "--scan-backend", "torch", "--val-fraction", "0.25", "--test-fraction", "0.25",
    ]  # fmt: skip
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "ft.metrics.json").read_text())
    assert m["classes"] == ["A", "B"] and m["split"]["grouped"]
    g = m["split"]["groups"]
    assert sorted(g["train"] + g["val"] + g["test"]) == ["p0", "p1", "p2", "p3"]
    assert g["test"] and g["val"]
    assert m["split"]["n_train"] + m["split"]["n_val"] + m["split"]["n_test"] == 4 * 18
    res = CliRunner().invoke(app, args[:4] + ["--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 2 and "--from-annotations" in res.output
    # sampling per class, seeded; a class filter
    items, mpp = annotation_labelled(tmp_path / "run", max_per_class=5, seed=1)
    assert mpp == 1.0 and sorted(it.label for it in items) == ["A"] * 5 + ["B"] * 5
    assert items == annotation_labelled(tmp_path / "run", max_per_class=5, seed=1)[0]
    with pytest.raises(ConfigError, match="single class"):
        annotation_labelled(tmp_path / "run", classes=["A"])


def test_anomaly_metrics_from_the_stored_column(tmp_path):
    """Feature stores + coords stores with `annotation_class`: tile metrics come from the
    stored column without --annotations, equal to those of the equivalent GeoJSON."""
    from wsi_pipe.anomaly.config import AnomalyConfig
    from wsi_pipe.core.manifest import save_slide_table
    from wsi_pipe.stages.anomaly import fit_anomaly, score_anomaly

    lay = RunLayout(tmp_path / "run")
    rng = np.random.default_rng(0)
    entries, gj = [], tmp_path / "gj"
    gj.mkdir()
    yy, xx = np.mgrid[0:10, 0:10]
    coords = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.int64) * 64
    for i, label in enumerate(["normal"] * 3 + ["tumour"] * 2):
        sid = f"s{i}"
        feats = rng.standard_normal((100, 8)).astype(np.float32)
        cls = np.full(100, -1, np.int16)
        if label == "tumour":
            hot = (coords[:, 0] < 192) & (coords[:, 1] < 192)  # 3 x 3 tiles
            feats[hot] += 6.0
            cls[hot] = 1
            (gj / f"{sid}.geojson").write_text(json.dumps([feature([sq(0, 0, 192, 192)], "Tumor")]))
        attrs = {"kind": "features", "slide_id": sid, "level0_mpp": 0.5, "target_mpp": 1.0,
                 "tile_px": 32, "stride_level0": 64.0, "tile_size_level0": 64,
                 "level0_width": 640, "level0_height": 640}  # fmt: skip
        write_store(
            lay.feature_store("f", sid, 1.0, "h5"),
            {schema.COORDS: coords, schema.FEATURES: feats,
             schema.PARENT_INDEX: np.full(100, -1, np.int64)}, attrs,
        )  # fmt: skip
        write_store(
            lay.coords_store(sid, 1.0, "zarr"),
            {schema.COORDS: coords, schema.TISSUE_FRACTION: np.ones(100, np.float32),
             schema.PARENT_INDEX: np.full(100, -1, np.int64), schema.ANNOTATION_CLASS: cls},
            {**attrs, "kind": "coords", "annotation_file": f"{sid}.geojson" if label != "normal" else ""},
            {schema.ANNOTATION_CLASS: {schema.CLASS_NAMES: ["Stroma", "Tumor"]}},
        )  # fmt: skip
        entries.append(SlideEntry(sid, "", sid, label))
    save_slide_table(lay.slides_table, entries)
    cfg = AnomalyConfig(method="knn", device="cpu", bootstrap=20, top_k=1, heatmap_max_px=64)
    fit_anomaly(lay.root, cfg)
    stored = score_anomaly(lay.root, progress=False).metrics
    assert stored["tile_labels"] == "stored annotation_class"
    assert stored["n_tiles"] == 500 and stored["n_anomalous_tiles"] == 18
    assert stored["tile_auroc"] > 0.95
    none = score_anomaly(lay.root, progress=False, anomaly_classes=["stroma"]).metrics
    assert none["n_anomalous_tiles"] == 0
    geo = score_anomaly(lay.root, progress=False, annotations=gj).metrics
    assert geo["tile_labels"] == "geojson"
    for k in ("tile_auroc", "aupro", "n_anomalous_tiles", "n_tiles"):
        assert geo[k] == stored[k]


# --------------------------------------------------------------------------- real slide
def test_real_slide_with_a_hand_made_geojson(wsi_dir, tmp_path):
    """CMU-1-Small-Region (2220 x 2967 px at 0.499 um/px): a hand-drawn rectangle in the
    tissue, restrict mode: every tile lies inside it, and labels match on both backends."""
    slide = wsi_dir / "CMU-1-Small-Region.svs"
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "CMU-1-Small-Region.geojson").write_text(
        json.dumps([feature([sq(500, 1000, 1800, 2400)], "Tumor")])
    )
    for backend in ("h5", "zarr"):
        cfg = TileConfig(target_mpps=(1.0,), tile_px=128, annotations_dir=str(ann),
                         annotation_mode="restrict", store=backend)  # fmt: skip
        s = run_tile([str(slide)], tmp_path / backend, cfg, progress=False)
        assert s.ok, s.results[0].error
    h5, zr = (
        read(tmp_path / "h5", "CMU-1-Small-Region"),
        read(tmp_path / "zarr", "CMU-1-Small-Region", "zarr"),
    )
    assert len(h5["coords"]) > 10
    size = h5["attrs"]["tile_size_level0"]
    c = h5["coords"]
    # at least half of each tile inside the rectangle
    ix = np.clip(np.minimum(c[:, 0] + size, 1800) - np.maximum(c[:, 0], 500), 0, None)
    iy = np.clip(np.minimum(c[:, 1] + size, 2400) - np.maximum(c[:, 1], 1000), 0, None)
    assert (ix * iy >= 0.5 * size * size - 2 * size).all()
    np.testing.assert_array_equal(h5["coords"], zr["coords"])
    np.testing.assert_array_equal(h5["annotation_class"], zr["annotation_class"])


def test_real_slide_tissue_geojson_round_trip(wsi_dir, tmp_path):
    """Our tissue GeoJSON of a real slide (irregular contours, holes) fed back as the tissue
    mask gives exactly the computed tiles and tissue fractions."""
    slide = str(wsi_dir / "CMU-1-Small-Region.svs")
    base = dict(target_mpps=(1.0,), tile_px=128)
    assert run_tile([slide], tmp_path / "seg", TileConfig(**base), progress=False).ok
    ann = RunLayout(tmp_path / "seg").root / "tissue"
    geo = json.loads((ann / "CMU-1-Small-Region.geojson").read_text())
    assert sum(len(f["geometry"]["coordinates"]) for f in geo["features"]) > len(geo["features"])
    cfg = TileConfig(**base, annotations_dir=str(ann), annotation_mode="tissue")
    assert run_tile([slide], tmp_path / "fed", cfg, progress=False).ok
    a, b = (
        read(tmp_path / "seg", "CMU-1-Small-Region"),
        read(tmp_path / "fed", "CMU-1-Small-Region"),
    )
    np.testing.assert_array_equal(a["coords"], b["coords"])
    np.testing.assert_array_equal(a["tissue_fraction"], b["tissue_fraction"])
    assert b["attrs"]["tissue_source"] == "annotations"
