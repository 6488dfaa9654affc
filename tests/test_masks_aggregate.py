"""Budget masks (global and groupwise top-k) and count-averaged aggregation, against hand
computations."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import masks as M
from framp_jax.aggregate import masked_mean, masked_mean_jit
from framp_jax.simulate import TraceCounter


def _params(seed=0):
    """A multi-leaf pytree with distinct magnitudes (no ties); P = 3*4*5 + 7 + 6*5 = 97 prunable
    entries (97 is not divisible by 4, 16 or 64, so floor matters)."""
    rng = np.random.default_rng(seed)
    sizes = {("a", "kernel"): (3, 4, 5), ("a", "bias"): (5,), ("b", "kernel"): (7,),
             ("c", "kernel"): (6, 5), ("c", "scale"): (5,)}
    n = sum(math.prod(s) for s in sizes.values())
    vals = rng.permutation(np.arange(1, n + 1)).astype(np.float32) / n
    vals *= rng.choice([-1.0, 1.0], size=n).astype(np.float32)
    out, i = {}, 0
    for (k, leaf), s in sizes.items():
        m = math.prod(s)
        out.setdefault(k, {})[leaf] = jnp.asarray(vals[i:i + m].reshape(s))
        i += m
    prunable = {"a": {"kernel": True, "bias": False}, "b": {"kernel": True},
                "c": {"kernel": True, "scale": False}}
    return out, prunable


def _prunable_values(params, prunable):
    return np.concatenate([np.abs(np.asarray(x)).ravel() for x, f in
                           zip(jax.tree.leaves(params), jax.tree.leaves(prunable)) if f])


@pytest.mark.parametrize("budget", [1.0, 0.25, 1 / 16, 1 / 64])
def test_topk_mask_keeps_floor_budget_p_largest(budget):
    params, prunable = _params()
    P = M.num_prunable(params, prunable)
    assert P == 97
    mask = M.topk_mask(params, prunable, budget)
    k = max(1, math.floor(budget * P))
    flat_w = _prunable_values(params, prunable)
    flat_m = np.concatenate([np.asarray(m).ravel() for m, f in
                             zip(jax.tree.leaves(mask), jax.tree.leaves(prunable)) if f])
    assert flat_m.sum() == k
    # exactly the k largest magnitudes
    assert set(np.flatnonzero(flat_m)) == set(np.argsort(-flat_w)[:k])
    # non-prunable leaves: all ones
    np.testing.assert_array_equal(mask["a"]["bias"], np.ones(5))
    np.testing.assert_array_equal(mask["c"]["scale"], np.ones(5))
    assert float(M.kept_fraction(mask, prunable)) == pytest.approx(k / P)
    # the threshold is the smallest kept magnitude
    tau = float(M.topk_threshold(params, prunable, budget))
    assert tau == pytest.approx(np.sort(flat_w)[-k])
    masked = M.apply_mask(params, mask)
    np.testing.assert_array_equal(masked["b"]["kernel"],
                                  np.asarray(params["b"]["kernel"]) * np.asarray(mask["b"]["kernel"]))


def test_topk_mask_tiny_budget_keeps_at_least_one():
    params, prunable = _params()
    mask = M.topk_mask(params, prunable, 1e-6)
    assert sum(float(m.sum()) for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(prunable))
               if f) == 1


def test_topk_mask_ties_at_threshold_are_all_kept():
    # |w| = 4, 3, 2, 2, 2, 1 ; budget 1/2 -> k = 3, tau = 2: all three 2s are kept (>= tau)
    params = {"w": jnp.asarray([4.0, -3.0, 2.0, -2.0, 2.0, 1.0])}
    mask = M.topk_mask(params, {"w": True}, 0.5)
    np.testing.assert_array_equal(mask["w"], [1, 1, 1, 1, 1, 0])


def test_one_trace_serves_every_budget():
    params, prunable = _params(1)
    counter = TraceCounter(lambda p, b: M.topk_mask(p, prunable, b))
    fn = jax.jit(counter)
    P = M.num_prunable(params, prunable)
    for b in (1.0, 0.25, 0.0625, 0.015625, 0.5):
        mask = fn(params, jnp.float32(b))
        kept = sum(float(m.sum()) for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(prunable))
                   if f)
        assert kept == max(1, math.floor(b * P))
    assert counter.count == 1
    # vmapped over budgets too (Local-only builds every client's mask this way)
    stacked = jax.vmap(lambda b: M.topk_mask(params, prunable, b))(jnp.asarray([1.0, 0.25]))
    assert float(stacked["b"]["kernel"][0].sum()) == 7


def test_groupwise_thresholds_per_group():
    params, prunable = _params(2)
    # group 0: a.kernel (60 entries) + c.kernel (30); group 1: b.kernel (7)
    groups = {"a": {"kernel": 0, "bias": 0}, "b": {"kernel": 1}, "c": {"kernel": 0, "scale": 0}}
    budget = 0.25
    mask = M.topk_mask(params, prunable, budget, groups=groups)
    g0 = np.concatenate([np.abs(np.asarray(params["a"]["kernel"])).ravel(),
                         np.abs(np.asarray(params["c"]["kernel"])).ravel()])
    m0 = np.concatenate([np.asarray(mask["a"]["kernel"]).ravel(),
                         np.asarray(mask["c"]["kernel"]).ravel()])
    assert m0.sum() == math.floor(budget * 90) == 22
    assert set(np.flatnonzero(m0)) == set(np.argsort(-g0)[:22])
    mb = np.asarray(mask["b"]["kernel"])
    assert mb.sum() == max(1, math.floor(budget * 7)) == 1
    assert mb[np.argmax(np.abs(np.asarray(params["b"]["kernel"])))] == 1
    np.testing.assert_array_equal(mask["a"]["bias"], np.ones(5))
    # one global threshold would keep floor(0.25 * 97) = 24 entries, the two groups 22 + 1
    kept = lambda mk: sum(float(m.sum()) for m, f in zip(jax.tree.leaves(mk),
                                                          jax.tree.leaves(prunable)) if f)
    assert kept(mask) == 23 and kept(M.topk_mask(params, prunable, budget)) == 24


def test_stage_groups_one_group_per_prefix():
    params = {"stem": {"kernel": 0}, "layer1_0": {"k": 0, "b": 0}, "layer1_1": {"k": 0},
              "layer2_0": {"k": 0}, "classifier": {"kernel": 0, "bias": 0}}
    g = M.stage_groups(params)
    assert g["layer1_0"]["k"] == g["layer1_0"]["b"] == g["layer1_1"]["k"]
    ids = {g["stem"]["kernel"], g["layer1_0"]["k"], g["layer2_0"]["k"], g["classifier"]["kernel"]}
    assert len(ids) == 4
    assert g["classifier"]["bias"] == g["classifier"]["kernel"]


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.25, float("nan")])
def test_validate_budget_rejects(bad):
    with pytest.raises(ValueError, match="budget"):
        M.validate_budget(bad)


def test_validate_budget_accepts():
    assert M.validate_budget(1) == 1.0 and M.validate_budget(1 / 64) == 1 / 64


# ---------------------------------------------------------------------------------------------
# masked_mean


def _stack(*trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def test_masked_mean_two_clients_overlapping_masks_weights():
    g = {"w": jnp.asarray([10.0, 20.0, 30.0, 40.0])}
    p = _stack({"w": jnp.asarray([1.0, 2.0, 3.0, 4.0])}, {"w": jnp.asarray([5.0, 6.0, 7.0, 8.0])})
    m = _stack({"w": jnp.asarray([1.0, 1.0, 0.0, 0.0])}, {"w": jnp.asarray([0.0, 1.0, 1.0, 0.0])})
    out = masked_mean(g, p, m, jnp.asarray([1.0, 3.0]))
    # entry 0: client 0 only; entry 1: (1*2 + 3*6)/4; entry 2: client 1 only; entry 3: nobody
    np.testing.assert_allclose(out["w"], [1.0, 5.0, 7.0, 40.0], rtol=1e-6)
    # unweighted: entry 1 is the plain mean
    out = masked_mean(g, p, m)
    np.testing.assert_allclose(out["w"], [1.0, 4.0, 7.0, 40.0], rtol=1e-6)


def test_masked_mean_three_clients_multi_leaf():
    g = {"k": jnp.zeros((2, 2)), "b": jnp.full((3,), -1.0)}
    c = [{"k": jnp.asarray([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.asarray([1.0, 1.0, 1.0])},
         {"k": jnp.asarray([[5.0, 6.0], [7.0, 8.0]]), "b": jnp.asarray([2.0, 2.0, 2.0])},
         {"k": jnp.asarray([[9.0, 10.0], [11.0, 12.0]]), "b": jnp.asarray([3.0, 3.0, 3.0])}]
    m = [{"k": jnp.asarray([[1.0, 1.0], [1.0, 0.0]]), "b": jnp.asarray([1.0, 0.0, 0.0])},
         {"k": jnp.asarray([[1.0, 1.0], [0.0, 0.0]]), "b": jnp.asarray([1.0, 1.0, 0.0])},
         {"k": jnp.asarray([[1.0, 0.0], [0.0, 0.0]]), "b": jnp.asarray([1.0, 1.0, 0.0])}]
    w = jnp.asarray([2.0, 1.0, 1.0])
    out = masked_mean(g, _stack(*c), _stack(*m), w)
    k00 = (2 * 1 + 5 + 9) / 4
    k01 = (2 * 2 + 6) / 3
    k10 = 3.0
    np.testing.assert_allclose(out["k"], [[k00, k01], [k10, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [(2 * 1 + 2 + 3) / 4, (2 + 3) / 2, -1.0], rtol=1e-6)
    jitted = masked_mean_jit(g, _stack(*c), _stack(*m), w)
    np.testing.assert_allclose(jitted["k"], out["k"], rtol=1e-6)


def test_masked_mean_identical_clients_return_the_client():
    rng = np.random.default_rng(0)
    client = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    g = jax.tree.map(lambda x: x + 100.0, client)
    out = masked_mean(g, _stack(client, client, client), None, jnp.asarray([3.0, 1.0, 7.0]))
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(client)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_masked_mean_weight_zero_drops_client_even_if_nan():
    g = {"w": jnp.asarray([0.0, 0.0, 0.0])}
    p = _stack({"w": jnp.asarray([1.0, 2.0, 3.0])}, {"w": jnp.asarray([3.0, 4.0, 5.0])},
               {"w": jnp.asarray([jnp.nan, jnp.inf, 100.0])})
    out = masked_mean(g, p, None, jnp.asarray([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(out["w"], [2.0, 3.0, 4.0], rtol=1e-6)
    # with masks: the only client covering entry 2 has weight 0 -> the global value stays
    m = _stack({"w": jnp.asarray([1.0, 1.0, 0.0])}, {"w": jnp.asarray([1.0, 0.0, 0.0])},
               {"w": jnp.asarray([1.0, 1.0, 1.0])})
    out = masked_mean({"w": jnp.asarray([7.0, 8.0, 9.0])}, p, m, jnp.asarray([1.0, 1.0, 0.0]))
    np.testing.assert_allclose(out["w"], [2.0, 2.0, 9.0], rtol=1e-6)
    # all weights zero: the global model comes back unchanged
    out = masked_mean({"w": jnp.asarray([7.0, 8.0, 9.0])}, p, None, jnp.zeros(3))
    np.testing.assert_array_equal(out["w"], [7.0, 8.0, 9.0])
