"""HeteroFL and FedRolex: aggregation by hand (overlapping submodels, label-wise output rows,
uncovered entries, FedRolex's official count weighting), the LR schedule, the sBN statistics
pass, the pre-activation models, and 3-round runs through ``simulate.run`` compiled once."""
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import width as W
from framp_jax.algorithms.fedrolex import fedrolex_defaults
from framp_jax.algorithms.heterofl import (Part, combine, combine_official_counts, heterofl_defaults,
                                           lr_at, sbn_statistics)
from framp_jax.config import ConfigError, base_config, validate
from framp_jax.data.image_modality import ImageModality
from framp_jax.models.preact import make_preact_cnn

# a toy model: hidden layer [2 inputs -> 4 units h] then classifier [h -> 3 classes]
SPEC = W.WidthSpec(("h",), (W.Bind(("hidden", "kernel"), 1, "h", "out"),
                            W.Bind(("hidden", "bias"), 0, "h", "vec"),
                            W.Bind(("classifier", "kernel"), 0, "h", "in")))


def _toy(fill):
    return {"hidden": {"kernel": jnp.full((2, 4), fill, jnp.float32),
                       "bias": jnp.full((4,), fill, jnp.float32)},
            "classifier": {"kernel": jnp.full((4, 3), fill, jnp.float32),
                           "bias": jnp.full((3,), fill, jnp.float32)}}


def _client(k, v):
    """Narrow params of a client holding k hidden units, every entry = v."""
    return {"hidden": {"kernel": jnp.full((2, k), v), "bias": jnp.full((k,), v)},
            "classifier": {"kernel": jnp.full((k, 3), v), "bias": jnp.full((3,), v)}}


def _stack(*trees):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _parts(per_client_idx=False):
    # level 1: client A (units {0, 1}, labels {0, 1}, value 1) + a padding slot (weight 0,
    # garbage values); level 2: client B (units {1, 2}, labels {1, 2}, value 3)
    a, pad, b = _client(2, 1.0), _client(2, 1e6), _client(2, 3.0)
    idx_a = {"h": jnp.array([0, 1])}
    if per_client_idx:
        idx_a = {"h": jnp.array([[0, 1], [2, 3]])}
    return [Part(_stack(a, pad), idx_a, jnp.array([1.0, 0.0]),
                 jnp.array([[1, 1, 0], [1, 1, 1]], jnp.float32)),
            Part(_stack(b), {"h": jnp.array([[2, 1]])[0]}, jnp.array([1.0]),
                 jnp.array([[0, 1, 1]], jnp.float32))]


@pytest.mark.parametrize("per_client_idx", [False, True])
def test_combine_overlapping_submodels_by_hand(per_client_idx):
    new = jax.jit(lambda g: combine(g, SPEC, _parts(per_client_idx)))(_toy(-5.0))
    # hidden unit 0: A only; unit 1: A and B; unit 2: B only (B's window is [2, 1]); 3: nobody
    np.testing.assert_allclose(new["hidden"]["kernel"], [[1, 2, 3, -5]] * 2)
    np.testing.assert_allclose(new["hidden"]["bias"], [1, 2, 3, -5])
    # output rows label-wise: class 0 only A has it, class 2 only B, class 1 both
    np.testing.assert_allclose(new["classifier"]["kernel"], [[1, 1, -5],    # unit 0: A
                                                             [1, 2, 3],     # unit 1: A, B
                                                             [-5, 3, 3],    # unit 2: B
                                                             [-5, -5, -5]])  # unit 3: nobody
    np.testing.assert_allclose(new["classifier"]["bias"], [1, 2, 3])


def test_combine_without_labelwise_rows_averages_every_holder():
    new = jax.jit(lambda g: combine(g, SPEC, _parts(), labelwise=False))(_toy(-5.0))
    np.testing.assert_allclose(new["classifier"]["bias"], [2, 2, 2])
    np.testing.assert_allclose(new["classifier"]["kernel"][0], [1, 1, 1])


def test_official_count_weighting_by_hand():
    """FedRolex's aliased tmp_counts: the j-th holder of a counted entry weighs T + j; T starts
    at 1 and grows by the number of holders; kernels of hidden layers are plain means."""
    g = _toy(-5.0)
    t0 = jax.tree.map(jnp.ones_like, g)
    step = jax.jit(lambda g, t: combine_official_counts(g, SPEC, _parts(), t))
    new, t1 = step(g, t0)
    # hidden bias unit 1: A (first, weight 1) and B (second, weight 2) -> (1 + 2·3) / 3
    np.testing.assert_allclose(new["hidden"]["bias"], [1, 7 / 3, 3, -5], rtol=1e-6)
    np.testing.assert_allclose(t1["hidden"]["bias"], [2, 3, 2, 1])
    # hidden kernel: not counted -> plain mean as in HeteroFL
    np.testing.assert_allclose(new["hidden"]["kernel"], [[1, 2, 3, -5]] * 2)
    # output layer (counted, label-wise): class 1 of unit 1 held by A then B
    np.testing.assert_allclose(new["classifier"]["kernel"][1], [1, 7 / 3, 3], rtol=1e-6)
    np.testing.assert_allclose(new["classifier"]["bias"], [1, 7 / 3, 3], rtol=1e-6)
    np.testing.assert_allclose(t1["classifier"]["bias"], [2, 3, 2])
    # a second round with carried counts: bias unit 1 now weighs 3 (A) and 4 (B)
    new2, _ = step(g, t1)
    np.testing.assert_allclose(new2["hidden"]["bias"][1], (3 * 1 + 4 * 3) / 7, rtol=1e-6)


def test_lr_schedule():
    f = lambda t, off=0: float(lr_at(jnp.int32(t), 0.1, (300, 500), 0.1, off))
    assert np.isclose(f(0), 0.1) and np.isclose(f(299), 0.1)
    assert np.isclose(f(300), 0.01) and np.isclose(f(499), 0.01) and np.isclose(f(500), 0.001)
    # FedRolex steps the scheduler before each round: round 299 already has the first decay
    assert np.isclose(f(299, 1), 0.01) and np.isclose(f(298, 1), 0.1)
    assert float(lr_at(jnp.int32(7), 0.05, (), 0.1)) == pytest.approx(0.05)


class _Data(NamedTuple):
    train_x: Any
    train_count: Any


def test_sbn_statistics_equal_the_population_statistics_of_the_first_bn():
    """The first BN's input (conv1 + bias) does not depend on the batch, so the cumulative
    average of the batch means / unbiased variances over equal batches is the population mean
    and (up to the per-batch unbiasing) the mean of within-batch variances."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 12, 8, 8, 3)).astype(np.uint8)
    counts = np.array([12, 4, 8])  # 24 valid samples = 3 batches of 8
    m = make_preact_cnn(4, (8, 8, 3), width=0.25)
    p = m.init(jax.random.key(0))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    data = _Data(jnp.asarray(x), jnp.asarray(counts))
    modality = ImageModality(mean, std)
    stats = jax.jit(lambda p, d, cap, b: sbn_statistics(m, p, d, np.arange(3), cap, b, modality,
                                                         False, jax.random.key(1)),
                    static_argnums=(2, 3))
    st = stats(p, data, 0, 8)
    xs = np.concatenate([x[i, :c] for i, c in enumerate(counts)]).astype(np.float32) / 255
    xs = (xs - 0.5) / 0.25
    k = np.asarray(p["conv1"]["kernel"])
    xp = np.pad(xs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    pre = sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + 8, j:j + 8], k[i, j])
              for i in range(3) for j in range(3)) + np.asarray(p["conv1"]["bias"])
    np.testing.assert_allclose(st["bn1"]["mean"], pre.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    n = 8 * 8 * 8
    var = np.mean([pre[b * 8:(b + 1) * 8].var(axis=(0, 1, 2)) * n / (n - 1) for b in range(3)], 0)
    np.testing.assert_allclose(st["bn1"]["var"], var, rtol=1e-4)
    # capped at 4 per client -> only the first 4 samples of every client (12 = 1.5 batches)
    st4 = stats(p, data, 4, 4)
    first4 = np.concatenate([pre[0:4], pre[12:16], pre[16:20]])
    np.testing.assert_allclose(st4["bn1"]["mean"], first4.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_preact_scaler_and_bn_modes():
    m = make_preact_cnn(4, (8, 8, 3), width=0.5)
    p = m.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 8, 8, 3))

    @jax.jit
    def outputs(p, x):
        train, _ = m.apply(p, x, train=True)
        st = m.batch_stats(p, x)
        ev, _ = m.apply(p, x, train=False, bn_stats=st)
        shifted = jax.tree.map(lambda a: a + 1.0, st)
        return (train, ev, m.apply(p, x, train=False, bn_stats=shifted)[0],
                m.apply(p, x, train=False)[0])

    train, ev, ev_shifted, ev_batch = outputs(p, x)
    # eval with the batch's own statistics reproduces training up to the unbiased variance and
    # BN's eps (the Scaler's 1/rate is cancelled by the BN that follows it)
    np.testing.assert_allclose(ev, train, rtol=0.05, atol=0.02)
    # other statistics change the eval output; no statistics = batch statistics
    assert not np.allclose(ev_shifted, ev, atol=1e-3)
    np.testing.assert_allclose(ev_batch, train, rtol=1e-3, atol=1e-4)
    assert m.rate == 0.5


# ---------------------------------------------------------------------------------------------
# end to end on a tiny npz data set (8x8x3 images, 4 classes)

def _tiny_npz(path):
    rng = np.random.default_rng(7)

    def make(n):
        y = np.arange(n) % 4
        x = rng.integers(0, 96, (n, 8, 8, 3))
        for c in range(3):
            x[y == c, :, :, c] += 140
        x[y == 3, 3:5] += 150
        return np.clip(x, 0, 255).astype(np.uint8), y
    xtr, ytr = make(240)
    xte, yte = make(80)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return str(path)


def _config(npz, method, **opts):
    c = base_config()
    c.method = method
    c.dataset = f"npz:{npz}"
    c.model = "cnn"
    c.num_clients = 4
    c.clients_per_round = 2
    c.rounds = 3
    c.local_steps = 2
    c.batch_size = 10
    c.lr = 0.1
    c.alpha = 0.5
    c.budget_levels = (1.0, 0.0625)
    c.budget_dist = (1, 1)
    c.eval_every = 1
    c.eval_batch = 10
    c.checkpoint_every = 100
    d = heterofl_defaults() if method == "heterofl" else fedrolex_defaults()
    d.rates = (1.0, 0.25)
    d.sbn_batch = 20
    for k, v in opts.items():
        d[k] = v
    c[method] = d
    return c


@pytest.mark.parametrize("method,opts", [("heterofl", {}),
                                         ("fedrolex", {"official_count_bug": True,
                                                       "eval_window": "last"})])
def test_three_rounds_compile_once(tmp_path, method, opts):
    from framp_jax.simulate import run
    npz = _tiny_npz(tmp_path / "tiny.npz")
    res = run(_config(npz, method, **opts), str(tmp_path / "run"), progress=False,
              log=lambda *_: None)
    assert res["compiles"] == 1 and res["rounds"] == 3 and res["method"] == method
    with open(tmp_path / "run" / "results.json") as f:
        saved = json.load(f)
    for split in ("local", "union"):
        assert set(saved["final"][split]) == {"1", "1/16", "mean"}
        assert all(0.0 <= v <= 1.0 for v in saved["final"][split].values())
    rows = open(tmp_path / "run" / "metrics.csv").read().strip().splitlines()
    assert len(rows) == 4 and os.path.isdir(tmp_path / "run" / "checkpoints")


def test_fedrolex_count_bug_and_last_window_by_value(tmp_path):
    """What test_three_rounds_compile_once's FedRolex options do, by hand on one round at
    t = 1 (one client per level: budget 1 at rate 1, budget 1/16 at rate 1/4, window
    (j - 1) mod C for j < ceil(C / 4)).

    official_count_bug: the running counts start at 1 and grow by the holders of each counted
    entry: every 1-D leaf gets 2 + [channel in the window], the output bias 1 + the clients
    holding that label, hidden kernels (not counted) stay 1; without the option there are none.
    eval_window="last": after t_done rounds the 1/16 level is evaluated on the window of round
    t_done - 1, roll0 on the prefix."""
    from framp_jax.algorithms.heterofl import backbone_family
    from framp_jax.problem import build_algorithm, build_problem
    npz = _tiny_npz(tmp_path / "tiny.npz")
    c = _config(npz, "fedrolex", official_count_bug=True, eval_window="last", eval_bn="batch")
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    state = alg.init(None, prob.data)
    assert all(bool(jnp.all(x == 1)) for x in jax.tree.leaves(state.tmp_counts))
    new, _ = jax.jit(alg.round)(state, prob.data, jnp.int32(1))
    levels = prob.ctx.sample_clients_by_level(jnp.int32(1))
    assert [int(v.sum()) for _, _, v in levels] == [1, 1]
    has = np.asarray(prob.data.label_counts)[[int(ids[0]) for _, ids, _ in levels]] > 0
    for (path, cnt), p in zip(jax.tree_util.tree_leaves_with_path(new.tmp_counts),
                              jax.tree.leaves(new.params)):
        name = jax.tree_util.keystr(path)
        cnt = np.asarray(cnt)
        if name == "['classifier']['bias']":
            np.testing.assert_array_equal(cnt, 1 + has.sum(0))
        elif cnt.ndim == 1:
            n = cnt.shape[0]
            window = (np.arange(W.width_of(n, 0.25)) - 1) % n
            want = np.full(n, 2.0)
            want[window] = 3.0
            np.testing.assert_array_equal(cnt, want, err_msg=name)
        elif name != "['classifier']['kernel']":
            assert (cnt == 1).all(), name
    c_plain = _config(npz, "fedrolex", eval_bn="batch")
    assert build_algorithm(prob.ctx, c_plain).init(None, prob.data).tmp_counts is None
    # evaluation windows: the state after 3 completed rounds
    spec = backbone_family(prob.ctx.family, "preact").spec
    st3 = new._replace(t=jnp.int32(3))
    sizes = W.unit_sizes(st3.params, spec)
    small = [g for g in alg.eval_groups(st3, prob.data)
             if np.isclose(prob.ctx.budgets[g.client_ids[0]], 0.0625)][0]
    for got, want in zip(jax.tree.leaves(small.params["params"]), jax.tree.leaves(
            W.gather(st3.params, spec, W.rolling_indices(sizes, 0.25, 2)))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert all(int(ix[0]) == n - 2 for ix, n in zip(W.rolling_indices(sizes, 0.25, 2).values(),
                                                    sizes.values()))  # not the prefix
    roll0 = build_algorithm(prob.ctx, c_plain)
    small0 = [g for g in roll0.eval_groups(new._replace(t=None, tmp_counts=None), prob.data)
              if np.isclose(prob.ctx.budgets[g.client_ids[0]], 0.0625)][0]
    for got, want in zip(jax.tree.leaves(small0.params["params"]), jax.tree.leaves(
            W.gather(new.params, spec, W.prefix_indices(sizes, 0.25)))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rolling_round_moves_the_window(tmp_path):
    """One FedRolex round at t = 1 with one 1/16-budget client only (rate 1/4 of conv1's 16
    channels = 4): conv1 output channels (j - 1) mod 16 for j < 4 = {15, 0, 1, 2} change, the
    others keep the global value."""
    from framp_jax.problem import build_algorithm, build_problem
    npz = _tiny_npz(tmp_path / "tiny.npz")
    c = _config(npz, "fedrolex", label_mask=False)
    c.clients_per_round = 1
    c.budget_levels = (0.0625,)
    c.budget_dist = (1,)
    c.fedrolex.rates = (0.25,)
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    state = alg.init(None, prob.data)
    old = state["params"]["conv1"]["kernel"]
    new_state, m = jax.jit(alg.round)(state, prob.data, jnp.int32(1))
    changed = np.flatnonzero(np.any(np.asarray(new_state["params"]["conv1"]["kernel"] != old),
                                    axis=(0, 1, 2)))
    assert changed.tolist() == [0, 1, 2, 15]
    assert np.isfinite(float(m["train_loss"]))


def test_bad_options_are_rejected(tmp_path):
    from framp_jax.problem import build_problem
    npz = _tiny_npz(tmp_path / "tiny.npz")
    for method, opts, field in [("fedrolex", {"algo": "window"}, "fedrolex.algo"),
                                ("heterofl", {"rates": (1.0,)}, "heterofl.rates"),
                                ("heterofl", {"lr_milestones": (500, 300)}, "heterofl.lr_milestones"),
                                ("fedrolex", {"eval_bn": "none"}, "fedrolex.eval_bn"),
                                ("fedrolex", {"algo": "random", "eval_window": "last"},
                                 "fedrolex.eval_window")]:
        with pytest.raises(ConfigError) as e:  # the width options fail in config.validate
            validate(_config(npz, method, **opts))
        assert e.value.field == field
        with pytest.raises(ConfigError) as e:  # so before build_problem loads any data
            build_problem(_config(npz, method, **opts), verbose=False)
        assert e.value.field == field
