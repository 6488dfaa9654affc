"""FIARSE: the threshold-masked forward and its gradients, thresholds, the server rule and an
end-to-end run on a tiny npz dataset."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import masks as M
from framp_jax.algorithms import fiarse as F
from framp_jax.algorithms.registry import resolve
from framp_jax.client import LocalConfig, local_train
from framp_jax.config import ConfigError, base_config, validate
from framp_jax.data.image_modality import ImageModality

W = jnp.array([0.1, -0.5, 2.0])
TAU = jnp.float32(0.5)


def test_forward_keeps_entries_at_or_above_tau():
    np.testing.assert_allclose(F.threshold_mask(W, TAU, False), [0.0, -0.5, 2.0])
    np.testing.assert_allclose(F.threshold_mask(W, TAU, True), [0.0, -0.5, 2.0])


@pytest.mark.parametrize("mode,expected", [
    ("masked", [0.0, 1.0, 1.0]),
    # kept: 1 + 2τ|w|/(|w|+τ)²: |w|=0.5 -> 1 + 0.5/1 = 1.5 ; |w|=2 -> 1 + 2/6.25 = 1.32
    ("fiarse_paper", [0.0, 1.5, 1.32]),
])
def test_gradient_factor_by_hand(mode, expected):
    np.testing.assert_allclose(F.gradient_factor(W, TAU, mode), expected, rtol=1e-6)
    # the chain rule through a loss: d/dw Σ c·w_eff = c · factor, τ gets no gradient
    c = jnp.array([3.0, -2.0, 0.7])
    paper = mode == "fiarse_paper"
    gw, gt = jax.jit(jax.grad(lambda w, t: jnp.sum(c * F.threshold_mask(w, t, paper)),
                              argnums=(0, 1)))(W, TAU)
    np.testing.assert_allclose(gw, np.asarray(c) * np.asarray(expected), rtol=1e-6)
    assert float(gt) == 0.0


def test_paper_factor_is_one_at_zero_threshold():
    # budget 1.0 with a zero weight gives τ = 0: 0/0 in the official backward is NaN -> 0
    w = jnp.array([0.0, 0.3, -1.0])
    np.testing.assert_allclose(F.gradient_factor(w, jnp.float32(0.0), "fiarse_paper"), [1, 1, 1])


def test_weight_shrinking_below_tau_leaves_the_forward():
    """Loss Σ (w_eff − target)²: w[1] = 0.6 is pulled toward 0; one SGD step (lr 0.1, gradient
    2·0.6) takes it to 0.48 < τ = 0.5, after which its forward value is 0 and it gets no
    gradient: it stays at 0.48 for the remaining steps while w[0] keeps training."""
    params = {"layer": {"kernel": jnp.array([1.0, 0.6])}}
    prunable = {"layer": {"kernel": True}}
    taus = {"layer": {"kernel": jnp.float32(0.5)}}
    target = jnp.array([2.0, 0.0])

    def loss(p, x, y, rng):
        w_eff = F.effective_params(p, taus, prunable, False)["layer"]["kernel"]
        return jnp.sum((w_eff - target) ** 2)

    cfg = LocalConfig(steps=5, batch_size=2, lr=0.1, modality=ImageModality(augment=False))
    x = jnp.zeros((4, 8, 8, 3), jnp.uint8)
    y = jnp.zeros((4,), jnp.int32)
    new, _ = local_train(loss, params, None, x, y, jnp.int32(4), jax.random.key(0), cfg)
    w = np.asarray(new["layer"]["kernel"])
    assert w[1] == pytest.approx(0.48, abs=1e-7)
    expected0 = 1.0
    for _ in range(5):
        expected0 -= 0.1 * 2 * (expected0 - 2.0)
    assert w[0] == pytest.approx(expected0, rel=1e-6)
    eff = F.effective_params(new, taus, prunable, False)["layer"]["kernel"]
    np.testing.assert_allclose(eff, [w[0], 0.0])


def test_server_rule_by_hand():
    g = {"a": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array([[5.0]])}
    deltas = {"a": jnp.array([[0.2, 0.0, 0.0],      # client 0 changed entry 0 only
                              [0.4, 0.6, 0.0],      # client 1 changed entries 0 and 1
                              [jnp.nan, 9.0, 9.0]]),  # client 2 diverged: dropped
              "b": jnp.array([[[0.0]], [[0.0]], [[1.0]]])}
    finite = jnp.array([True, True, False])
    new = F.server_update(g, deltas, finite, 1.0)
    # entry 0: mean of 0.2 and 0.4; entry 1: only client 1's 0.6; entry 2 and b: unchanged
    np.testing.assert_allclose(new["a"], [1.0 - 0.3, 2.0 - 0.6, 3.0], rtol=1e-6)
    np.testing.assert_allclose(new["b"], [[5.0]])
    half = F.server_update(g, deltas, finite, 0.5)
    np.testing.assert_allclose(half["a"], [1.0 - 0.15, 2.0 - 0.3, 3.0], rtol=1e-6)


def _toy_tree():
    params = {"a_0": {"kernel": jnp.array([1.0, -2.0, 3.0, 4.0])},
              "a_1": {"kernel": jnp.array([[5.0, -6.0]])},
              "b": {"kernel": jnp.array([0.1, 0.2, -0.3, 0.4]), "bias": jnp.array([10.0])},
              "bn": {"scale": jnp.array([100.0])}}
    prunable = {"a_0": {"kernel": True}, "a_1": {"kernel": True},
                "b": {"kernel": True, "bias": True}, "bn": {"scale": False}}
    return params, prunable


def test_global_vs_groupwise_thresholds_by_hand():
    params, prunable = _toy_tree()
    # global: 11 prunable entries, k = floor(0.5·11) = 5; sorted |w| = .1 .2 .3 .4 1 2 3 4 5 6 10
    # -> τ = sorted[11 − 5] = 3: all of group b's kernel is pruned, its bias 10 kept
    tg = F.leaf_thresholds(params, prunable, F.group_ids(params, "global"), 0.5)
    for leaf in ("a_0", "a_1", "b"):
        assert float(tg[leaf]["kernel"]) == 3.0
    assert float(M.topk_threshold(params, prunable, 0.5)) == 3.0
    # groupwise: group a = {1..6}: k = 3, τ = sorted[3] = 4; group b = {.1 .2 .3 .4 10}: k = 2,
    # τ = sorted[3] = 0.4
    groups = F.group_ids(params, "groupwise")
    tw = F.leaf_thresholds(params, prunable, groups, 0.5)
    assert float(tw["a_0"]["kernel"]) == 4.0 and float(tw["a_1"]["kernel"]) == 4.0
    assert float(tw["b"]["kernel"]) == pytest.approx(0.4) and float(tw["b"]["bias"]) == pytest.approx(0.4)
    mg = F.threshold_masks(params, tw, prunable)
    np.testing.assert_array_equal(mg["a_0"]["kernel"], [0, 0, 0, 1])
    np.testing.assert_array_equal(mg["a_1"]["kernel"], [[1, 1]])
    np.testing.assert_array_equal(mg["b"]["kernel"], [0, 0, 0, 1])
    np.testing.assert_array_equal(mg["bn"]["scale"], [1])
    # the same masks as masks.topk_mask (global and groupwise scope)
    for scope, g in (("global", None), ("groupwise", M.stage_groups(params))):
        t = F.leaf_thresholds(params, prunable, F.group_ids(params, scope), 0.5)
        ref = M.topk_mask(params, prunable, 0.5, groups=g)
        jax.tree.map(np.testing.assert_array_equal, F.threshold_masks(params, t, prunable), ref)


def test_thresholds_for_a_vector_of_budgets_match_topk_threshold():
    p = {"x": {"kernel": jax.random.normal(jax.random.key(1), (37, 11))},
         "y": {"kernel": jax.random.normal(jax.random.key(2), (53,)), "scale": jnp.ones(3)}}
    pr = {"x": {"kernel": True}, "y": {"kernel": True, "scale": False}}
    budgets = jnp.array([1.0, 0.25, 0.0625, 0.015625, 0.25])
    t = jax.jit(lambda q, b: F.leaf_thresholds(q, pr, F.group_ids(q, "global"), b))(p, budgets)
    for i, b in enumerate(np.asarray(budgets)):
        assert float(t["x"]["kernel"][i]) == float(M.topk_threshold(p, pr, b))
        frac = float(M.kept_fraction(F.threshold_masks(p, jax.tree.map(lambda a: a[i], t), pr), pr))
        assert frac == pytest.approx(np.floor(b * 460) / 460)


def test_bad_options_are_rejected():
    c = base_config()
    c.method = "fiarse"
    import ml_collections as mlc
    options = lambda c: resolve(c)[1]  # config.fiarse over fiarse_defaults(), validated
    c.fiarse = mlc.ConfigDict({"scope": "layer", "mask_grad": "masked", "server_lr": 1.0})
    with pytest.raises(ConfigError, match="fiarse.scope"):
        options(c)
    with pytest.raises(ConfigError, match="fiarse.scope"):
        validate(c)
    c.fiarse.scope = "groupwise"
    c.fiarse.mask_grad = "ste"
    with pytest.raises(ConfigError, match="fiarse.mask_grad"):
        options(c)
    c.fiarse.mask_grad = "fiarse_paper"
    assert options(c)["scope"] == "groupwise"
    validate(c)
    c.weight_decay = 1e-4
    with pytest.raises(ConfigError, match="weight_decay"):
        options(c)
    with pytest.raises(ConfigError, match="weight_decay") as e:  # before any data load
        validate(c)
    assert e.value.field == "weight_decay"


# ---------------------------------------------------------------------------------------------
# end to end on a tiny npz dataset


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("fiarse") / "tiny.npz"
    ytr, yte = rng.integers(0, 4, 160), rng.integers(0, 4, 80)
    # class-dependent colour so the task is learnable
    mk = lambda y: np.clip(rng.normal(60 * y[:, None, None, None] + 40, 30, (len(y), 8, 8, 3)),
                           0, 255).astype(np.uint8)
    np.savez(path, x_train=mk(ytr), y_train=ytr, x_test=mk(yte), y_test=yte)
    return str(path)


def _tiny_config(npz, **fiarse_opts):
    import ml_collections as mlc
    c = base_config()
    c.method = "fiarse"
    c.dataset = "npz:" + npz
    c.model = "cnn"
    c.num_clients = 8
    c.clients_per_round = 4
    c.rounds = 3
    c.local_steps = 3
    c.batch_size = 4
    c.lr = 0.05
    c.eval_every = 1
    c.eval_last = 1
    c.eval_batch = 4
    c.checkpoint_every = 50
    c.fiarse = mlc.ConfigDict(dict(F.fiarse_defaults().to_dict(), **fiarse_opts))
    return c


def test_run_three_rounds_compiles_once(tiny_npz, tmp_path):
    from framp_jax.simulate import run
    c = _tiny_config(tiny_npz, scope="groupwise", mask_grad="fiarse_paper")
    res = run(c, str(tmp_path / "run"), progress=False, log=lambda *_: None)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["compiles"] == 1 and res["compiles"] == 1
    assert on_disk["method"] == "fiarse" and on_disk["rounds"] == 3
    for split in ("local", "union"):
        assert set(on_disk["final"][split]) == {"1", "1/4", "1/16", "1/64", "mean"}
        assert all(0.0 <= v <= 1.0 for v in on_disk["final"][split].values())
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4 and "mask_churn" in rows[0]


def test_round_leaves_untrained_entries_unchanged(tiny_npz):
    """All clients at budget 1/4: an entry below every client's threshold (all share the global
    model's τ) is never in a forward, gets no gradient, so no client changes it and the server
    keeps it; kept entries and the unmasked hidden biases move."""
    from framp_jax.problem import build_algorithm, build_problem
    c = _tiny_config(tiny_npz)
    c.budget_levels = (0.25,)
    c.budget_dist = (1,)
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    state = alg.init(jax.random.key(0), prob.data)
    p0 = jax.tree.map(np.asarray, state["params"])
    new, m = jax.jit(alg.round)(state, prob.data, jnp.int32(0))
    pr = prob.model.prunable(p0)
    tau = float(M.topk_threshold(p0, pr, 0.25))
    assert float(m["nan_clients"]) == 0
    assert float(m["kept_frac"]) == pytest.approx(0.25, abs=1e-3)
    n_pruned_moved = n_kept_moved = 0
    for a, b, f in zip(jax.tree.leaves(p0), jax.tree.leaves(new["params"]), jax.tree.leaves(pr)):
        moved = np.asarray(b) != a
        if f:
            n_pruned_moved += int(np.sum(moved & (np.abs(a) < tau)))
            n_kept_moved += int(np.sum(moved & (np.abs(a) >= tau)))
    assert n_pruned_moved == 0
    assert n_kept_moved > 0
    assert np.any(np.asarray(new["params"]["dense"]["bias"]) != p0["dense"]["bias"])
