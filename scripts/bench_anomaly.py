"""Benchmark of `wsi-pipe anomaly` on a semi-real cohort: SP-Mamba vs kNN (PatchCore) vs
Mahalanobis, the scan-order ablation (circular-Hilbert vs row-major vs Hilbert), and QC.

Cohort (written once into OUT/slides, reused by later runs):
- pyramidal TIFFs at 0.5 um/px whose tissue is a mosaic of REAL H&E texture tiles
  (Kather 2016: STROMA, MUCOSA, ADIPOSE = "normal"), seeded per slide;
- anomalous slides carry insertions with known masks: real TUMOR texture (+ COMPLEX), or
  artefacts synthesised on the real texture: blur, pen (real ink from HistoQC's pen images),
  folds, bubbles. Their outlines are written as QuPath GeoJSON (OUT/annotations) and the tile
  labels come from those files through `--annotations`, as a user's would.
Pipeline: `wsi-pipe tile` (grids at 1.0 and 2.0 um/px, linked by parent_index) -> `extract`
with a frozen, randomly initialised small ResNet (no weights can be downloaded here; random
CNN features are a known-good texture descriptor) -> `anomaly fit` on the training normals ->
`anomaly score` on the held-out slides.

    python scripts/bench_anomaly.py --out /tmp/bench_anomaly            # default size
    python scripts/bench_anomaly.py --out /tmp/bench_anomaly --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "patches"
KATHER = SHARED / "kather2016_texture"
HISTOQC = SHARED / "histoqc_artifacts"
NORMAL_CLASSES = ("02_STROMA", "06_MUCOSA", "07_ADIPOSE")
TUMOUR_CLASSES = ("01_TUMOR", "03_COMPLEX")
ARTEFACTS = ("blur", "pen", "fold", "bubble")
MPP0 = 0.5

log = logging.getLogger("bench_anomaly")


# ------------------------------------------------------------------------------ cohort
def _pool(classes: tuple[str, ...]) -> list[np.ndarray]:
    from wsi_pipe.synth import load_patches

    out: list[np.ndarray] = []
    for c in classes:
        out += load_patches(KATHER / c)
    return out


def _ink() -> np.ndarray:
    import cv2

    from wsi_pipe.synth import pen_transmission

    img = cv2.cvtColor(cv2.imread(str(HISTOQC / "pen_red.png")), cv2.COLOR_BGR2RGB)
    mask = cv2.imread(str(HISTOQC / "pen_red_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    # the ink strokes are thin at this scale: thicken them so a marker-width stroke results
    mask = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    t = pen_transmission(img, mask)
    t[mask] = np.minimum(t[mask], np.array([0.95, 0.35, 0.45], np.float32))  # red marker tint
    return t


def recipe(i: int, kind: str, w: int, h: int, seed: int) -> dict:
    """Slide i: tissue shapes and insertions (level-0 px), all from a seeded RNG."""
    rng = random.Random(seed * 7919 + i)
    tissue = [
        (
            "rect",
            (
                rng.uniform(0.02, 0.08) * w,
                rng.uniform(0.02, 0.08) * h,
                rng.uniform(0.92, 0.98) * w,
                rng.uniform(0.92, 0.98) * h,
            ),
        )
    ]
    holes = [
        (
            "disc",
            (rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.03, 0.06) * w),
        )
    ]
    ins = []
    if kind != "normal":
        n = rng.choice((1, 2))
        for _ in range(n):
            r = rng.uniform(0.08, 0.14) * min(w, h)
            cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
            if kind == "pen":
                ins.append(
                    (kind, ("rect", (cx - 2.5 * r, cy - 0.35 * r, cx + 2.5 * r, cy + 0.35 * r)))
                )
            else:
                ins.append((kind, ("disc", (cx, cy, r))))
    return {"tissue": tissue, "holes": holes, "insertions": ins, "seed": seed * 100 + i}


def _shape(spec: tuple):
    from wsi_pipe.synth import Disc, Rect

    kind, args = spec
    return Disc(*args) if kind == "disc" else Rect(*args)


def build_painter(rec: dict):
    from wsi_pipe.synth import CompositePainter, Insertion, PatchMosaicTexture

    normal = PatchMosaicTexture(_pool(NORMAL_CLASSES), 1.0, rec["seed"])
    ins = []
    for kind, spec in rec["insertions"]:
        if kind == "tumour":
            ins.append(
                Insertion(
                    _shape(spec),
                    "tissue",
                    texture=PatchMosaicTexture(_pool(TUMOUR_CLASSES), 1.0, rec["seed"] + 1),
                    label="tumour",
                )
            )
        elif kind == "pen":
            ins.append(Insertion(_shape(spec), "pen", ink=_ink(), ink_scale=1.0))
        else:
            ins.append(Insertion(_shape(spec), kind, sigma_l0=10.0))
    painter = CompositePainter(
        [_shape(s) for s in rec["tissue"]], normal, ins, holes=[_shape(s) for s in rec["holes"]]
    )
    return painter, ins


def write_slide(path: str, w: int, h: int, rec: dict) -> str:
    from wsi_pipe.synth import write_pyramidal_tiff

    painter, _ = build_painter(rec)
    write_pyramidal_tiff(path, w, h, MPP0, levels=3, painter=painter)
    return path


def build_cohort(
    out: Path, counts: dict[str, int], w: int, h: int, seed: int, workers: int
) -> list[dict]:
    """Write the cohort's slides, GeoJSON annotations and manifest; returns slide records."""
    from wsi_pipe.core.fsutil import atomic_write_json, atomic_write_text
    from wsi_pipe.synth import insertions_geojson

    slides, ann = out / "slides", out / "annotations"
    slides.mkdir(parents=True, exist_ok=True)
    ann.mkdir(parents=True, exist_ok=True)
    recs = []
    i = 0
    for group, n in counts.items():
        for _ in range(n):
            k = "normal" if group.startswith("normal") else group
            sid = f"{group}_{i:03d}"
            rec = recipe(i, k, w, h, seed)
            recs.append(
                {
                    "slide_id": sid,
                    "group": group,
                    "kind": k,
                    "path": str(slides / f"{sid}.tiff"),
                    "rec": rec,
                }
            )
            i += 1
    todo = [r for r in recs if not Path(r["path"]).exists()]
    if todo:
        log.info("writing %d slides of %d x %d px", len(todo), w, h)
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            list(
                pool.map(
                    write_slide,
                    [r["path"] for r in todo],
                    [w] * len(todo),
                    [h] * len(todo),
                    [r["rec"] for r in todo],
                )
            )
    for r in recs:
        _, ins = build_painter(r["rec"]) if r["rec"]["insertions"] else (None, [])
        atomic_write_json(ann / f"{r['slide_id']}.geojson", insertions_geojson(ins, r["slide_id"]))
    lines = ["slide_id,path,patient_id,label"]
    for r in recs:
        label = (
            "normal"
            if r["kind"] == "normal"
            else ("tumour" if r["kind"] == "tumour" else "artefact")
        )
        lines.append(f"{r['slide_id']},{r['path']},{r['slide_id']},{label}")
    atomic_write_text(out / "manifest.csv", "\n".join(lines) + "\n")
    return recs


# ------------------------------------------------------------------------------ pipeline
def random_encoder(seed: int = 0):
    """A frozen, randomly initialised small ResNet (64 px input, 256-dim pooled features)."""
    import dataclasses

    import torch

    from wsi_pipe.encoders.registry import create_encoder, get_encoder_spec
    from wsi_pipe.stages.extract import encoder_bundle

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_encoder("resnet_tiny", widths=(16, 32, 48, 64))
    with torch.no_grad():
        dim = int(model.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
    spec = dataclasses.replace(
        get_encoder_spec("resnet_tiny"), name="resnet_tiny_random", embed_dim=dim
    )
    return encoder_bundle(
        model, spec, f"random-seed{seed}", "random init (frozen)", torch.device("cpu")
    )


def qc_fraction(
    layout,
    model: str,
    recs: list[dict],
    ann: Path,
    kinds: tuple[str, ...],
    mpp: float,
    frac: float = 0.05,
) -> float:
    """Share of tiles of `kinds` among the top `frac` tiles of the normal + `kinds` test slides."""
    from wsi_pipe.imageops.annotations import label_tiles, read_geojson
    from wsi_pipe.stages.anomaly import read_score_store

    ss, ys = [], []
    for r in recs:
        if r["group"] == "normal_train" or r["kind"] not in ("normal",) + kinds:
            continue
        st = read_score_store(layout.find_anomaly_score_store(model, r["slide_id"], mpp))
        pos = label_tiles(
            st["coords"],
            float(st["attrs"]["tile_size_level0"]),
            read_geojson(ann / f"{r['slide_id']}.geojson"),
            list(kinds),
            0.5,
        )
        ss.append(st["score"])
        ys.append(pos)
    s, y = np.concatenate(ss), np.concatenate(ys)
    k = max(1, math.ceil(frac * len(s)))
    top = np.argsort(-s, kind="stable")[:k]
    return float(y[top].mean()), float(y.mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", type=int, nargs=2, default=(2560, 2048), help="level-0 W H px")
    ap.add_argument("--train", type=int, default=6, help="normal training slides")
    ap.add_argument("--test-normal", type=int, default=6)
    ap.add_argument("--tumour", type=int, default=5)
    ap.add_argument("--per-artefact", type=int, default=2, help="slides per artefact kind")
    ap.add_argument("--steps", type=int, default=150, help="SP-Mamba training steps")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the machine is shared)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run")
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="AnomalyConfig overrides for every method, e.g. n_prototypes=256",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("tifffile", "wsi_pipe.runner.loop", "wsi_pipe.stages.extract"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not KATHER.is_dir():
        print(
            f"real textures not found at {KATHER}: this benchmark needs ../shared/data",
            file=sys.stderr,
        )
        return 2
    import torch

    from wsi_pipe.anomaly.config import AnomalyConfig
    from wsi_pipe.core.config import ExtractConfig, TileConfig
    from wsi_pipe.core.layout import RunLayout
    from wsi_pipe.stages.anomaly import fit_anomaly, score_anomaly
    from wsi_pipe.stages.extract import run_extract
    from wsi_pipe.stages.tile import run_tile

    torch.set_num_threads(args.threads)
    if args.quick:
        args.size, args.train, args.test_normal, args.tumour, args.per_artefact, args.steps = (
            (1536, 1152),
            3,
            2,
            2,
            1,
            20,
        )
    w, h = args.size
    counts = {"normal_train": args.train, "normal": args.test_normal, "tumour": args.tumour}
    counts.update({a: args.per_artefact for a in ARTEFACTS})
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    recs = build_cohort(args.out, counts, w, h, args.seed, args.workers)
    timings["cohort_s"] = time.perf_counter() - t0
    run = args.out / "run"
    t = time.perf_counter()
    tcfg = TileConfig(target_mpps=(1.0, 2.0), tile_px=32, min_tissue_fraction=0.5, qc_max_px=800)
    s = run_tile([str(args.out / "manifest.csv")], run, tcfg, workers=args.workers, progress=False)
    assert s.ok, [r.error for r in s.results if r.error]
    timings["tile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ecfg = ExtractConfig(
        encoder="resnet_tiny",
        name="rand_cnn",
        device="cpu",
        batch_size=256,
        workers=1,
        threads=args.threads,
    )
    s = run_extract(run, ecfg, encoder=random_encoder(args.seed), progress=False)
    assert s.ok, [r.error for r in s.results if r.error]
    timings["extract_s"] = time.perf_counter() - t
    layout = RunLayout(run)
    train = [r["slide_id"] for r in recs if r["group"] == "normal_train"]
    test = [r["slide_id"] for r in recs if r["group"] != "normal_train"]
    # CPU-sized student (the config defaults are GPU-sized); K = 2 orientations x 2 directions
    base = dict(
        features="rand_cnn",
        steps=args.steps,
        device="cpu",
        threads=args.threads,
        seed=args.seed,
        d_model=32,
        d_state=4,
        expand=1.0,
        n_layers=1,
        batch_size=4,
        window_cells=24,
        lr=3e-3,
        checkpoint_every=50,
        bootstrap=1000,
        top_k=8,
    )
    methods = {
        "spmamba_ch": dict(method="spmamba", scan_order="circular_hilbert"),
        "spmamba_rowmajor": dict(method="spmamba", scan_order="row_major"),
        "spmamba_hilbert": dict(method="spmamba", scan_order="hilbert"),
        "knn": dict(method="knn"),
        "mahalanobis": dict(method="mahalanobis"),
    }
    for kv in args.set:
        k, v = kv.split("=", 1)
        base[k] = json.loads(v) if v[:1] in "0123456789-[{tf" else v
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}
    results = {}
    for name, over in methods.items():
        cfg = AnomalyConfig(**{**base, **over})
        t = time.perf_counter()
        fit = fit_anomaly(run, cfg, name=name, slides=train, overwrite=True)
        t_fit = time.perf_counter() - t
        t = time.perf_counter()
        res = score_anomaly(
            run,
            model=name,
            slides=test,
            manifest=args.out / "manifest.csv",
            annotations=args.out / "annotations",
            progress=False,
        )
        t_score = time.perf_counter() - t
        assert res.summary.ok, [r.error for r in res.summary.results if r.error]
        m = res.metrics
        qc, base_rate = qc_fraction(layout, name, recs, args.out / "annotations", ARTEFACTS, 1.0)
        tum_top, _ = qc_fraction(layout, name, recs, args.out / "annotations", ("tumour",), 1.0)
        results[name] = {
            "tile_auroc": m.get("tile_auroc"),
            "aupro": m.get("aupro"),
            "slide_auroc": m["slide_auroc"],
            "artefact_top5": qc,
            "artefact_base_rate": base_rate,
            "tumour_top5": tum_top,
            "fit_s": round(t_fit, 1),
            "score_s": round(t_score, 1),
            "n_train_tiles": fit.n_tiles,
        }
        log.info("%s: %s", name, results[name])
    timings["total_s"] = time.perf_counter() - t0
    out = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "timings": timings,
        "results": results,
    }
    (args.out / "bench_results.json").write_text(json.dumps(out, indent=2, default=str))
    hdr = f"{'method':<18}{'tile AUROC':>11}{'AUPRO':>8}{'slide AUROC (95% CI)':>26}{'artefact top5%':>16}{'fit s':>8}{'score s':>9}"
    print(hdr)
    print("-" * len(hdr))
    for name, r in results.items():
        sa = r["slide_auroc"]
        ci = f"{sa['value']:.3f} ({sa['ci_low']:.2f}-{sa['ci_high']:.2f})"
        print(
            f"{name:<18}{r['tile_auroc']:>11.3f}{r['aupro']:>8.3f}{ci:>26}"
            f"{r['artefact_top5']:>16.3f}{r['fit_s']:>8.1f}{r['score_s']:>9.1f}"
        )
    print(
        f"artefact tiles among all normal+artefact test tiles: {next(iter(results.values()))['artefact_base_rate']:.3f}"
    )
    print(f"timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
