"""Anomaly scorers in one code path: SP-Mamba and the two baselines (kNN / PatchCore, Mahalanobis).

Every scorer maps a `SlideGrid` to raw per-tile parts (n, P) (`tile_parts`). The parts are then
calibrated on normal tiles (median -> 0, 99th percentile -> 1), weighted and summed into the
tile map, which `score_grid` smooths on the grid and turns into a slide score. So the three
methods share the input (standardised multi-scale features), calibration, smoothing and slide
score; only the per-tile distance differs.

Parts: spmamba -> recon_s<k> per scale (1 - cos(teacher, student)) and proto (window-sliding
prototype distance, weight `proto_weight`); knn -> knn (mean distance to the k nearest bank
features); mahalanobis -> mahalanobis (distance to the normal Gaussian, Ledoit-Wolf covariance).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_pipe.anomaly import grid as G
from wsi_pipe.anomaly.config import AnomalyConfig
from wsi_pipe.anomaly.data import SlideGrid
from wsi_pipe.anomaly.model import SPMambaNet
from wsi_pipe.core.fsutil import atomic_path

log = logging.getLogger(__name__)

#: canvases per forward pass when scoring (bounded memory on any slide size)
SCORE_BATCH = 8
#: tiles per distance block (kNN / Mahalanobis)
ROW_BLOCK = 8192


# ------------------------------------------------------------------------- calibration
@dataclass
class Standardizer:
    """Per-dimension standardisation of features, fitted on normal tiles. mean, std: (D,)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardizer:
        x64 = x.astype(np.float64)
        mean = x64.mean(0)
        std = x64.std(0)
        std = np.where(std > 1e-6 * max(1.0, float(std.max(initial=0.0))), std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


@dataclass
class Calibration:
    """Per-part affine calibration on normal tiles and the weights that sum parts into a map."""

    names: list[str]
    median: np.ndarray
    scale: np.ndarray
    weights: np.ndarray

    @classmethod
    def fit(cls, names: list[str], parts: np.ndarray, weights: Sequence[float]) -> Calibration:
        med = np.median(parts, axis=0)
        p99 = np.quantile(parts, 0.99, axis=0)
        scale = np.maximum(p99 - med, 1e-6)
        return cls(
            list(names),
            med.astype(np.float64),
            scale.astype(np.float64),
            np.asarray(weights, np.float64),
        )

    def combine(self, parts: np.ndarray) -> np.ndarray:
        """Raw parts (n, P) -> tile map values (n,): sum_p w_p (part_p - median_p) / scale_p."""
        return ((parts - self.median) / self.scale) @ self.weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": self.names,
            "median": self.median.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(
            list(d["names"]),
            np.asarray(d["median"]),
            np.asarray(d["scale"]),
            np.asarray(d["weights"]),
        )


# ------------------------------------------------------------------------------ scorers
class Scorer:
    """Per-tile raw anomaly parts of a slide grid. Subclasses set `method` and `part_names`."""

    method = ""
    part_names: list[str]

    def __init__(self, standardizer: Standardizer) -> None:
        self.standardizer = standardizer

    def tile_parts(self, grid: SlideGrid) -> np.ndarray:
        """(n, P) float64 raw parts in the store's row order. Computed in a canonical
        (row-major cell) order, so the result never depends on how the store orders its rows."""
        canon = G.canonical_order(grid.cells)
        out = self._parts(self.standardizer(grid.feats[canon]), grid.cells[canon], grid)
        res = np.empty_like(out)
        res[canon] = out
        return res

    def _parts(self, x: np.ndarray, cells: np.ndarray, grid: SlideGrid) -> np.ndarray:
        """Parts (n, P) of standardised features x (n, D) at `cells`, in canonical order."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        raise NotImplementedError


class KnnScorer(Scorer):
    """PatchCore-style: mean Euclidean distance to the k nearest features of a coreset memory
    bank of normal tiles. bank: (M, D) standardised features."""

    method = "knn"

    def __init__(self, standardizer: Standardizer, bank: np.ndarray, k: int = 1) -> None:
        super().__init__(standardizer)
        self.bank = torch.from_numpy(np.ascontiguousarray(bank, np.float32))
        self.k = int(k)
        self.part_names = ["knn"]

    def distances(self, x: np.ndarray) -> np.ndarray:
        """Standardised features (n, D) -> (n,) kNN distance, in blocks of ROW_BLOCK rows."""
        out = np.empty(len(x), np.float64)
        k = min(self.k, len(self.bank))
        bb = (self.bank.double() ** 2).sum(1)
        for s in range(0, len(x), ROW_BLOCK):
            q = torch.from_numpy(x[s : s + ROW_BLOCK]).double()
            d2 = (q**2).sum(1, keepdim=True) - 2 * q @ self.bank.double().t() + bb[None, :]
            d = d2.clamp_min(0).topk(k, dim=1, largest=False).values.sqrt().mean(1)
            out[s : s + len(q)] = d.numpy()
        return out

    def _parts(self, x: np.ndarray, cells: np.ndarray, grid: SlideGrid) -> np.ndarray:
        return self.distances(x)[:, None]

    def state(self) -> dict[str, Any]:
        return {"bank": self.bank.clone(), "k": self.k}


class MahalanobisScorer(Scorer):
    """Mahalanobis distance to the normal feature distribution: mean (D,), precision (D, D)."""

    method = "mahalanobis"

    def __init__(self, standardizer: Standardizer, mean: np.ndarray, precision: np.ndarray) -> None:
        super().__init__(standardizer)
        self.mean = np.asarray(mean, np.float64)
        self.precision = np.asarray(precision, np.float64)
        self.part_names = ["mahalanobis"]

    def distances(self, x: np.ndarray) -> np.ndarray:
        out = np.empty(len(x), np.float64)
        for s in range(0, len(x), ROW_BLOCK):
            d = x[s : s + ROW_BLOCK].astype(np.float64) - self.mean
            out[s : s + len(d)] = np.sqrt(
                np.maximum(np.einsum("nd,de,ne->n", d, self.precision, d), 0)
            )
        return out

    def _parts(self, x: np.ndarray, cells: np.ndarray, grid: SlideGrid) -> np.ndarray:
        return self.distances(x)[:, None]

    def state(self) -> dict[str, Any]:
        return {"mean": torch.from_numpy(self.mean), "precision": torch.from_numpy(self.precision)}


class SPMambaScorer(Scorer):
    """SP-Mamba student + prototypes over the slide grid, scanned in CH order (see model.py)."""

    method = "spmamba"

    def __init__(
        self,
        standardizer: Standardizer,
        net: SPMambaNet,
        cfg: AnomalyConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(standardizer)
        self.net = net.eval()
        self.cfg = cfg
        self.device = torch.device(device)
        self.part_names = [f"recon_s{i}" for i in range(len(net.scale_dims))] + ["proto"]

    def _orders(self, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        perms = G.scan_orders(side, self.cfg.scan_order, self.cfg.n_orientations)
        inv = G.inverse_perms(perms)
        return torch.from_numpy(perms).to(self.device), torch.from_numpy(inv).to(self.device)

    @torch.inference_mode()
    def _parts(self, x: np.ndarray, cells: np.ndarray, grid: SlideGrid) -> np.ndarray:
        index = G.index_grid(cells, grid.shape)
        side, origins, halo = G.plan_windows(grid.shape, G.ch_floor(self.cfg.window_cells))
        perms, inv = self._orders(side)
        core = G.core_mask(side, halo).reshape(-1)
        n_parts = len(self.part_names)
        out = np.full((len(cells), n_parts), np.nan, np.float64)
        widx = G.window_index(index, origins, side).reshape(len(origins), -1)  # (m, L)
        keep = (widx[:, core] >= 0).any(1)
        widx = widx[keep]
        xt = torch.from_numpy(x)
        for s in range(0, len(widx), SCORE_BATCH):
            idx = torch.from_numpy(widx[s : s + SCORE_BATCH])
            mask = idx >= 0
            feats = xt[idx.clamp_min(0)].to(self.device)
            mask_d = mask.to(self.device)
            res = self.net(feats, mask_d, side, perms, inv)
            recon = res["recon"]
            if self.cfg.inpaint:  # each cell's reconstruction from the pass that hid it
                recon = torch.zeros_like(recon)
                for phase in range(4):
                    ph = torch.from_numpy(lattice_phase(side, phase)).to(self.device)
                    hide = mask_d & ph[None, :]
                    r = self.net(feats, mask_d, side, perms, inv, hide=hide)["recon"]
                    recon = torch.where(hide[None], r, recon)
            parts = torch.cat([recon.permute(1, 2, 0), res["proto"][..., None]], dim=-1)
            parts_np = parts.double().cpu().numpy()  # (b, L, P)
            take = mask.numpy() & core[None, :]
            out[widx[s : s + SCORE_BATCH][take]] = parts_np[take]
        if np.isnan(out).any():  # every tissue cell lies in exactly one window core
            raise RuntimeError(f"slide {grid.slide_id}: some tiles got no score (window plan bug)")
        return out

    def state(self) -> dict[str, Any]:
        return {
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        }


# ----------------------------------------------------------------------------- fitting
def lattice_phase(side: int, phase: int) -> np.ndarray:
    """bool (side * side,) row-major: canvas cells of phase `phase` (0..3) of the 2 x 2 lattice,
    i.e. (row % 2, col % 2) == divmod(phase, 2). Cells of one phase are 2 apart, so every hidden
    cell keeps all 8 neighbours visible."""
    r, c = np.divmod(np.arange(side * side), side)
    a, b = divmod(int(phase), 2)
    return ((r % 2) == a) & ((c % 2) == b)


def build_net(cfg: AnomalyConfig, scale_dims: list[int]) -> SPMambaNet:
    """The student network of `cfg` (initialised from cfg.seed without touching torch's global RNG)."""
    k = cfg.n_orientations * 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return SPMambaNet(
            sum(scale_dims),
            scale_dims,
            cfg.d_model,
            cfg.d_state,
            cfg.expand,
            cfg.n_layers,
            k,
            cfg.n_prototypes,
            cfg.proto_temperature,
            cfg.scan_backend,
        )


def _train_side(cfg: AnomalyConfig, grids: Sequence[SlideGrid]) -> int:
    longest = max(max(g.shape) for g in grids)
    return min(G.ch_floor(cfg.window_cells), G.ch_size(longest))


def _batch(
    grids: Sequence[SlideGrid],
    xs: list[np.ndarray],
    indexes: list[np.ndarray],
    side: int,
    cfg: AnomalyConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One training batch of canvases: (x (B, L, D), mask (B, L), hide (B, L), noise (B, L, D))."""
    sizes = np.array([len(g) for g in grids], np.float64)
    pick = rng.choice(len(grids), size=cfg.batch_size, p=sizes / sizes.sum())
    d = xs[0].shape[1]
    length = side * side
    x = np.zeros((cfg.batch_size, length, d), np.float32)
    mask = np.zeros((cfg.batch_size, length), bool)
    for b, gi in enumerate(pick):
        g = grids[gi]
        centre = g.cells[rng.integers(len(g))]
        jitter = rng.integers(-(side // 4), side // 4 + 1, size=2)
        origin = (centre - side // 2 + jitter)[None, :]
        idx = G.window_index(indexes[gi], origin, side).reshape(-1)
        m = idx >= 0
        x[b, m] = xs[gi][idx[m]]
        mask[b] = m
    if cfg.inpaint:
        phases = rng.integers(0, 4, size=cfg.batch_size)
        hide = np.stack([lattice_phase(side, int(p)) for p in phases]) & mask
    else:
        hide = (rng.random(mask.shape) < cfg.input_mask_ratio) & mask
    noise = (rng.standard_normal(x.shape, dtype=np.float32) * cfg.input_noise).astype(np.float32)
    return x, mask, hide, noise


def fit_spmamba(
    grids: Sequence[SlideGrid],
    std: Standardizer,
    cfg: AnomalyConfig,
    resume_path: Path | None,
    device: torch.device,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[SPMambaScorer, dict[str, Any]]:
    """Train the student on normal grids. Every `checkpoint_every` steps the model, optimiser and
    step are saved atomically to `resume_path`; a rerun resumes there. Batches depend only on
    (seed, step), so a resumed run ends with exactly the weights of an uninterrupted one."""
    scale_dims = grids[0].scale_dims
    net = build_net(cfg, scale_dims).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))
        ),
    )
    start, losses = 0, []
    key = cfg.config_hash()
    if resume_path is not None and resume_path.exists():
        try:
            ck = torch.load(resume_path, map_location=device, weights_only=True)
            if ck.get("config_hash") == key:
                net.load_state_dict(ck["model"])
                opt.load_state_dict(ck["opt"])
                sched.load_state_dict(ck["sched"])
                start, losses = int(ck["step"]), list(ck["losses"])
                log.info(
                    "resuming anomaly fit at step %d of %d from %s", start, cfg.steps, resume_path
                )
        except Exception as e:  # a foreign or damaged resume file: start over
            log.warning("ignoring resume checkpoint %s (%s)", resume_path, e)
    xs = [std(g.feats) for g in grids]
    indexes = [G.index_grid(g.cells, g.shape) for g in grids]
    side = _train_side(cfg, grids)
    perms_np = G.scan_orders(side, cfg.scan_order, cfg.n_orientations)
    perms = torch.from_numpy(perms_np).to(device)
    inv = torch.from_numpy(G.inverse_perms(perms_np)).to(device)
    net.train()
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        x, mask, hide, noise = (
            torch.from_numpy(a).to(device) for a in _batch(grids, xs, indexes, side, cfg, rng)
        )
        res = net(x, mask, side, perms, inv, hide=hide, noise=noise)
        n = mask.sum().clamp_min(1)
        if cfg.inpaint:  # only hidden cells carry the reconstruction loss: no copying
            nh = hide.sum().clamp_min(1)
            loss_rec = (res["recon"] * hide).sum() / (nh * res["recon"].shape[0])
        else:
            loss_rec = res["recon"].sum() / (n * res["recon"].shape[0])
        loss_proto = res["proto_self"].sum() / n
        loss = loss_rec + loss_proto
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append([loss_rec.item(), loss_proto.item()])
        if progress is not None:
            progress(step + 1, loss.item())
        done = step + 1
        if resume_path is not None and (done % cfg.checkpoint_every == 0) and done < cfg.steps:
            with atomic_path(resume_path) as tmp:
                torch.save(
                    {
                        "config_hash": key,
                        "step": done,
                        "model": net.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "losses": losses,
                    },
                    tmp,
                )
    net.eval()
    info = {
        "steps": cfg.steps,
        "resumed_from": start,
        "train_side": side,
        "final_loss": losses[-1] if losses else None,
        "seconds": time.perf_counter() - t0,
        "loss_every_10": losses[::10],
    }
    return SPMambaScorer(std, net, cfg, device), info


def greedy_coreset(x: np.ndarray, m: int, seed: int = 0, proj_dim: int = 128) -> np.ndarray:
    """Indices (m,) of a k-center greedy coreset of x (n, D), on a random projection of at most
    `proj_dim` dims (PatchCore). Each iteration updates all distances at once."""
    n = len(x)
    if m >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    if x.shape[1] > proj_dim:
        proj = torch.from_numpy(rng.standard_normal((x.shape[1], proj_dim)).astype(np.float32))
        xt = xt @ proj / math.sqrt(proj_dim)
    first = int(rng.integers(n))
    dist = ((xt - xt[first]) ** 2).sum(1)
    sel = np.empty(m, np.int64)
    sel[0] = first
    for i in range(1, m):
        j = int(torch.argmax(dist))
        sel[i] = j
        dist = torch.minimum(dist, ((xt - xt[j]) ** 2).sum(1))
    return sel


def split_calibration(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, calibration rows) of n normal tiles; at least one row in each when n >= 2."""
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(n)
    n_cal = min(max(1, int(round(fraction * n))), n - 1)
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])


def fit_knn(x: np.ndarray, std: Standardizer, cfg: AnomalyConfig) -> tuple[KnnScorer, np.ndarray]:
    """kNN scorer on normal features x (n, D) raw; returns it and the calibration rows."""
    fit_rows, cal_rows = split_calibration(len(x), cfg.calib_fraction, cfg.seed)
    xs = std(x[fit_rows])
    rng = np.random.default_rng([cfg.seed, 11])
    if len(xs) > cfg.knn_max_candidates:
        xs = xs[np.sort(rng.choice(len(xs), cfg.knn_max_candidates, replace=False))]
    sel = greedy_coreset(xs, cfg.knn_bank_size, cfg.seed)
    return KnnScorer(std, xs[sel], cfg.knn_k), cal_rows


def fit_mahalanobis(
    x: np.ndarray, std: Standardizer, cfg: AnomalyConfig
) -> tuple[MahalanobisScorer, np.ndarray]:
    """Gaussian (Ledoit-Wolf shrunk covariance) of normal features x (n, D) raw."""
    from sklearn.covariance import LedoitWolf

    fit_rows, cal_rows = split_calibration(len(x), cfg.calib_fraction, cfg.seed)
    xs = std(x[fit_rows]).astype(np.float64)
    lw = LedoitWolf().fit(xs)
    return MahalanobisScorer(std, lw.location_, lw.precision_), cal_rows


# ---------------------------------------------------------------------------- scoring
@dataclass
class GridScores:
    """Scores of one slide: parts (n, P) raw, tile_map (n,) smoothed calibrated map (store row
    order), slide score and its parts."""

    parts: np.ndarray
    tile_map: np.ndarray
    score: float
    score_parts: dict[str, float]


def score_grid(
    scorer: Scorer, calib: Calibration, grid: SlideGrid, cfg: AnomalyConfig
) -> GridScores:
    """Parts -> calibrated tile map -> masked smoothing on the grid -> slide score."""
    parts = scorer.tile_parts(grid)
    raw = calib.combine(parts)
    dense, mask = G.dense_map(raw, grid.cells, grid.shape)
    sm = G.masked_gaussian(dense, mask, cfg.smooth_sigma_cells)
    tile_map = sm[grid.cells[:, 1], grid.cells[:, 0]]
    score, sparts = G.slide_score(
        sm, mask, cfg.dog_sigmas, cfg.conc_quantile, cfg.conc_radius_cells, cfg.w_dog, cfg.w_conc
    )
    return GridScores(parts, tile_map, score, sparts)


def scorer_from_state(
    method: str,
    state: dict[str, Any],
    std: Standardizer,
    cfg: AnomalyConfig,
    scale_dims: list[int],
    device: torch.device,
) -> Scorer:
    """Rebuild a fitted scorer from its checkpoint state."""
    if method == "knn":
        return KnnScorer(std, state["bank"].numpy(), int(state["k"]))
    if method == "mahalanobis":
        return MahalanobisScorer(std, state["mean"].numpy(), state["precision"].numpy())
    net = build_net(cfg, scale_dims)
    net.load_state_dict(state["state_dict"])
    return SPMambaScorer(std, net.to(device), cfg, device)
