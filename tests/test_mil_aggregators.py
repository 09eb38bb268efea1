"""MIL aggregators: registry contract (forward, backward, save, load), invariances, MSM masks,
tile orders, and learning a synthetic key-instance task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsi_pipe.core.errors import CheckpointError, ConfigError
from wsi_pipe.mil import create_aggregator, get_spec, list_aggregators, register_aggregator
from wsi_pipe.mil.data import synthetic_bags
from wsi_pipe.mil.metrics import auroc
from wsi_pipe.mil.msm import MSMMIL, stage_mask_count
from wsi_pipe.mil.ordering import (
    circular_hilbert_order,
    grid_indices,
    hilbert_order,
    inverse_permutation,
    strided_permutation,
    tile_order,
)
from wsi_pipe.mil.registry import Aggregator
from wsi_pipe.mil.train import (
    MilModel,
    TrainParams,
    fit,
    load_checkpoint,
    predict_bags,
    save_checkpoint,
)

ALL = list_aggregators()
IN_DIM, N_CLASSES = 12, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: intra-op threads only add contention on a shared 2-core box
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny(name: str, **kw) -> Aggregator:
    torch.manual_seed(0)
    return create_aggregator(name, IN_DIM, N_CLASSES, **{**get_spec(name).tiny, **kw})


def bag(n: int = 23, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN_DIM, generator=g)
    side = int(np.ceil(np.sqrt(n))) + 1
    cells = torch.randperm(side * side, generator=g)[:n]
    coords = torch.stack([cells % side, cells // side], 1).long() * 224 + 1000
    return x, coords


# ------------------------------------------------------------------------------- registry
def test_registry_lists_every_family() -> None:
    assert {"abmil", "msm", "mamba", "mean", "max"} <= set(ALL)


def test_duplicate_name_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_aggregator("abmil")
        class Again(Aggregator):
            pass


def test_unknown_method_and_option_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown MIL method 'nope'.*abmil"):
        create_aggregator("nope", 8, 2)
    with pytest.raises(ConfigError, match="no option"):
        create_aggregator("abmil", 8, 2, n_stages=3)


# ------------------------------------------------------------------------ contract (loop)
@pytest.mark.parametrize("name", ALL)
def test_forward_shapes_and_attention(name: str) -> None:
    m = tiny(name).eval()
    x, c = bag()
    out = m(x, c)
    assert out.logits.shape == (N_CLASSES,)
    assert out.attention.shape == (x.shape[0],)
    assert torch.isfinite(out.logits).all()
    assert (out.attention >= 0).all()
    assert float(out.attention.detach().sum()) == pytest.approx(1.0, abs=1e-5)
    one = m(x[:1], c[:1])  # a one-tile bag
    assert one.logits.shape == (N_CLASSES,) and float(one.attention.detach()[0]) == pytest.approx(
        1.0
    )
    with pytest.raises(ValueError):
        m(x[:0], c[:0])
    with pytest.raises(ValueError):
        m(x[:, :5], c)


@pytest.mark.parametrize("name", ALL)
def test_backward_reaches_every_parameter(name: str) -> None:
    m = tiny(name, dropout=0.0).train()
    x, c = bag()
    out = m(x, c)
    torch.nn.functional.cross_entropy(out.logits[None], torch.tensor([1])).backward()
    missing = [
        n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, f"{name}: no finite gradient for {missing}"
    assert any(float(p.grad.abs().sum()) > 0 for p in m.parameters())


@pytest.mark.parametrize("name", ALL)
def test_save_load_reproduces_outputs(name: str, tmp_path) -> None:
    model = MilModel(tiny(name))
    model.set_standardization(np.full(IN_DIM, 0.5), np.full(IN_DIM, 2.0))
    model.eval()
    x, c = bag(31, seed=3)
    with torch.no_grad():
        ref = model(x, c)
    save_checkpoint(tmp_path / "m.pt", model, {"classes": ["a", "b", "c"]})
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert meta == {"classes": ["a", "b", "c"]}
    assert type(loaded.aggregator) is type(model.aggregator)
    with torch.no_grad():
        out = loaded(x, c)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.attention, ref.attention, rtol=0, atol=0)


def test_load_rejects_foreign_and_truncated_files(tmp_path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a wsi-pipe MIL checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    model = MilModel(tiny("abmil"))
    save_checkpoint(tmp_path / "ok.pt", model)
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------- invariances
@pytest.mark.parametrize("name", [n for n in ALL if get_spec(n).permutation_invariant])
def test_permutation_invariance(name: str) -> None:
    assert {"abmil", "msm"} <= {n for n in ALL if get_spec(n).permutation_invariant}
    m = tiny(name).eval()
    x, c = bag(40, seed=1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = m(x, c), m(x[perm], c[perm])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.attention[perm], b.attention, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("order", ["hilbert", "circular_hilbert"])
def test_mamba_spatial_order_ignores_row_order(order: str) -> None:
    """With a coordinate-derived order, shuffling the store rows changes nothing."""
    m = tiny("mamba", tile_order=order).eval()
    x, c = bag(40, seed=2)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = m(x, c), m(x[perm], c[perm])
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.attention[perm], b.attention, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="needs the tiles' coords"):
        m(x, None)


def test_mamba_store_order_is_a_sequence_model() -> None:
    m = tiny("mamba").eval()
    x, c = bag(40, seed=2)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert not torch.allclose(m(x, c).logits, m(x[perm], c[perm]).logits, atol=1e-6)


# ------------------------------------------------------------------------------ MSM masks
def test_msm_stages_mask_what_earlier_stages_attended() -> None:
    m = create_aggregator(
        "msm", IN_DIM, 2, hidden_dim=16, n_stages=3, mask_rule="topk", mask_k=4
    ).eval()
    assert isinstance(m, MSMMIL)
    x, _ = bag(30, seed=4)
    with torch.no_grad():
        z, alphas, keeps = m.stages(x)
    assert z.shape == (3, 16) and alphas.shape == (3, 30) and keeps.shape == (3, 30)
    assert keeps[0].all()
    for s in range(1, 3):
        removed = keeps[s - 1] & ~keeps[s]
        assert int(removed.sum()) == 4
        top = torch.topk(alphas[s - 1], 4).indices
        assert set(top.tolist()) == set(torch.nonzero(removed).ravel().tolist())
        assert float(alphas[s][~keeps[s]].abs().sum()) == 0.0  # masked tiles get no attention
        assert (keeps[s] <= keeps[s - 1]).all()  # masks stack


def test_msm_mass_rule_and_fraction() -> None:
    alpha = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    keep = torch.ones(5, dtype=torch.bool)
    assert stage_mask_count(alpha, keep, "mass", 0.1, 0.5, 5) == 1
    assert stage_mask_count(alpha, keep, "mass", 0.1, 0.75, 5) == 2
    assert stage_mask_count(alpha, keep, "topk", 0.5, 0.5, 5) == 3  # ceil(0.5 * 5)
    assert stage_mask_count(alpha, keep, "topk", 2, 0.5, 5) == 2
    # never masks the last unmasked tile
    assert stage_mask_count(alpha, keep, "topk", 50, 0.5, 5) == 4
    assert (
        stage_mask_count(alpha, torch.tensor([True, False, False, False, False]), "topk", 2, 0.5, 5)
        == 0
    )


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("rule", ["topk", "mass"])
def test_msm_bags_smaller_than_the_masks(n: int, rule: str) -> None:
    m = create_aggregator(
        "msm", IN_DIM, 2, hidden_dim=16, n_stages=4, mask_rule=rule, mask_k=5, mask_mass=0.9
    ).eval()
    x, c = bag(n)
    with torch.no_grad():
        _, alphas, keeps = m.stages(x)
        out = m(x, c)
    assert keeps.sum(1).min() >= 1  # every stage attends to something
    assert torch.isfinite(alphas).all() and torch.isfinite(out.logits).all()
    assert float(out.attention.sum()) == pytest.approx(1.0, abs=1e-5)


def test_msm_rejects_bad_options() -> None:
    with pytest.raises(ConfigError):
        create_aggregator("msm", 8, 2, mask_rule="random")
    with pytest.raises(ConfigError):
        create_aggregator("msm", 8, 2, n_stages=0)


# ----------------------------------------------------------------------------- tile orders
def _grid(w: int, h: int, step: int = 256, origin: int = 512) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(w), np.arange(h))
    return np.stack([cols.ravel(), rows.ravel()], 1).astype(np.int64) * step + origin


@pytest.mark.parametrize("w,h", [(8, 8), (16, 16), (5, 7)])
def test_hilbert_order_is_a_path_of_neighbours(w: int, h: int) -> None:
    c = _grid(w, h)
    order = hilbert_order(c)
    assert sorted(order.tolist()) == list(range(w * h))
    g = grid_indices(c)[order]
    steps = np.abs(np.diff(g, axis=0)).sum(1)
    if w == h and (w & (w - 1)) == 0:
        assert (steps == 1).all()  # a full power-of-two square is one unbroken curve
    else:
        assert np.median(steps) == 1


def test_circular_hilbert_visits_rings_first_then_the_centre() -> None:
    c = _grid(12, 12)
    order = circular_hilbert_order(c)
    assert sorted(order.tolist()) == list(range(144))
    g = grid_indices(c)[order]
    ring = np.minimum.reduce([g[:, 0], g[:, 1], 11 - g[:, 0], 11 - g[:, 1]])
    # 12 -> centre square of 8, so 2 outer rings (44 + 36 tiles) come first, outermost first
    assert ring[:44].tolist() == [0] * 44 and ring[44:80].tolist() == [1] * 36
    assert (ring[80:] >= 2).all()
    assert g[0].tolist() == [0, 0] and g[1].tolist() == [1, 0]  # clockwise from the top-left
    assert (np.abs(np.diff(g[80:], axis=0)).sum(1) == 1).all()  # Hilbert over the 8x8 centre


def test_grid_step_inferred_with_overlap_and_orders_are_permutations() -> None:
    c = _grid(6, 5, step=192)  # e.g. 256-px tiles with 64 px overlap
    assert grid_indices(c).max(0).tolist() == [5, 4]
    rng = np.random.default_rng(0)
    shuffled = c[rng.permutation(len(c))]
    for how in ("hilbert", "circular_hilbert"):
        o = tile_order(shuffled, how)
        assert o is not None and sorted(o.tolist()) == list(range(len(c)))
    assert tile_order(c, "store") is None
    with pytest.raises(ValueError):
        tile_order(c, "zigzag")


def test_strided_permutation_and_inverse() -> None:
    p = strided_permutation(10, 3)
    assert p.tolist() == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    x = np.arange(10) * 7
    assert (x[p][inverse_permutation(p)] == x).all()
    assert strided_permutation(1, 10).tolist() == [0]


# -------------------------------------------------------------------- learning (synthetic)
SYNTH_KW = {
    "abmil": dict(lr=2e-3, epochs=8),
    "msm": dict(lr=2e-3, epochs=8),
    "mean": dict(lr=2e-3, epochs=10),
    "max": dict(lr=2e-3, epochs=8),
    "mamba": dict(lr=2e-3, epochs=5),
}


@pytest.mark.parametrize("name", ALL)
def test_learns_key_instance_task_and_attends_to_key_instances(name: str) -> None:
    train, _ = synthetic_bags(80, dim=16, seed=1)
    val, _ = synthetic_bags(16, dim=16, seed=2)
    test, keys = synthetic_bags(60, dim=16, seed=3)
    torch.manual_seed(0)
    kw = {**get_spec(name).tiny, "hidden_dim": 32, "dropout": 0.0}
    if name == "msm":
        kw["mask_k"] = 3
    model = MilModel(create_aggregator(name, 16, 2, **kw))
    p = SYNTH_KW.get(name, dict(lr=2e-3, epochs=8))
    fit(
        model,
        train,
        val,
        TrainParams(
            patience=100, weight_decay=1e-4, max_bag_train=None, class_weighting=False, seed=0, **p
        ),
        torch.device("cpu"),
    )
    prob, att = predict_bags(model, test, torch.device("cpu"), with_attention=True)
    y = np.array([b.label for b in test])
    assert auroc(y, prob) > 0.95, f"{name}: held-out AUROC {auroc(y, prob):.3f}"
    # in positive bags, the most attended tile is a key instance, and key tiles hold far more
    # attention than their share of the bag
    pos = [i for i in range(len(test)) if y[i] == 1]
    hit = np.mean([keys[i][int(np.argmax(att[i]))] for i in pos])
    lift = np.mean([att[i][keys[i]].sum() / keys[i].mean() for i in pos])
    assert hit >= 0.8, f"{name}: top tile is a key instance in only {hit:.0%} of positive bags"
    assert lift > 3.0, f"{name}: key tiles get only {lift:.1f}x their share of attention"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ALL)
def test_cuda_matches_cpu(name: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    m = tiny(name).eval()
    x, c = bag(200, seed=7)
    with torch.no_grad():
        ref = m(x, c)
        out = m.to("cuda")(x.cuda(), c.cuda())
    torch.testing.assert_close(out.logits.cpu(), ref.logits, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(out.attention.cpu(), ref.attention, rtol=1e-3, atol=1e-5)
    m.train()
    o = m(x.cuda(), c.cuda())
    torch.nn.functional.cross_entropy(o.logits[None], torch.tensor([1], device="cuda")).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_mamba_uses_the_stored_grid_stride() -> None:
    """A grid not anchored at (0, 0) with a non-integer stride (a CLAM grid starts at its tissue
    contour; 256 px at 0.5 um/px on a 0.263 um/px slide is 486.69 level-0 px): the stride the
    store recorded gives the true Hilbert order, inference from the coords cannot."""
    step = 256 * 0.5 / 0.263
    cells = np.array([(i, j) for j in range(5) for i in range(6)])
    coords = np.round(37 + cells * step).astype(np.int64)
    true_order = tile_order(coords, "hilbert", step)
    assert true_order is not None
    assert (true_order != tile_order(coords, "hilbert", None)).any()  # the case that matters
    m = tiny("mamba", tile_order="hilbert").eval()
    seq = tiny("mamba").eval()  # the same weights (same seed), reading rows as given
    seq.load_state_dict(m.state_dict())
    x = torch.randn(len(coords), IN_DIM)
    with torch.no_grad():
        out = m(x, torch.from_numpy(coords), step)
        ref = seq(x[torch.from_numpy(true_order)])
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
