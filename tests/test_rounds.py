"""The round building blocks (``framp_jax.algorithms.rounds``) against hand-computed values, and
the typed server states: field access and checkpoints of the former dict states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax.algorithms import rounds as R
from framp_jax.algorithms.base import Context, FedData

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _ctx(client_map="vmap", seed=3):
    budgets = np.array([1.0, 1.0, 0.25, 0.25, 0.25, 1.0], np.float32)
    return Context(model=None, family=None, modality=None, num_clients=6, num_classes=3,
                   budgets=budgets, budget_levels=(1.0, 0.25), train_ids=np.arange(6),
                   clients_per_round=4, local=None, seed=seed, client_map=client_map)


def _data():
    n = 6
    x = jnp.arange(n * 2 * 3, dtype=jnp.float32).reshape(n, 2, 3)
    y = jnp.arange(n * 2, dtype=jnp.int32).reshape(n, 2) % 3
    cnt = jnp.array([2, 1, 2, 2, 1, 2], jnp.int32)
    z = jnp.zeros((n,), jnp.float32)
    return FedData(x, y, cnt, x, y, cnt, z, jnp.zeros((n, 3)), x[0], y[0])


# ---------------------------------------------------------------------------------------------
# participants

def test_draw_cohort_is_the_sampled_clients_with_their_data_and_keys():
    ctx, data = _ctx(), _data()
    co = R.draw_cohort(ctx, data, 5)
    ids = ctx.sample_clients(5)
    np.testing.assert_array_equal(co.ids, ids)
    np.testing.assert_array_equal(co.x, data.train_x[ids])
    np.testing.assert_array_equal(co.y, data.train_y[ids])
    np.testing.assert_array_equal(co.count, data.train_count[ids])
    np.testing.assert_array_equal(jax.random.key_data(co.keys),
                                  jax.random.key_data(ctx.client_keys(5, ids)))
    assert co.valid.dtype == bool and bool(jnp.all(co.valid)) and co.valid.shape == (4,)


def test_draw_level_cohorts_follow_sample_clients_by_level():
    ctx, data = _ctx(), _data()
    t = jnp.int32(1)
    levels = R.draw_level_cohorts(ctx, data, t)
    want = ctx.sample_clients_by_level(t)
    assert [b for b, _ in levels] == [b for b, _, _ in want] == [1.0, 0.25]
    for (b, co), (_, ids, valid) in zip(levels, want):
        np.testing.assert_array_equal(co.ids, ids)
        np.testing.assert_array_equal(co.valid, valid)
        np.testing.assert_array_equal(co.x, data.train_x[ids])
        np.testing.assert_array_equal(jax.random.key_data(co.keys),
                                      jax.random.key_data(ctx.client_keys(t, ids)))
    both = R.concat_cohorts([co for _, co in levels])
    np.testing.assert_array_equal(both.ids, jnp.concatenate([ids for _, ids, _ in want]))
    np.testing.assert_array_equal(jax.random.key_data(both.keys),
                                  jax.random.key_data(ctx.client_keys(t, both.ids)))


@pytest.mark.parametrize("mode", ["vmap", "map"])
def test_train_cohort_maps_per_client_and_shared_arguments(mode):
    ctx, data = _ctx(mode), _data()
    co = R.draw_cohort(ctx, data, 0)
    per = jnp.arange(4, dtype=jnp.float32) * 10.0

    def client(x, y, n, key, p, s):
        return jnp.sum(x) + p + s, n

    out, n = jax.jit(lambda c: R.train_cohort(ctx, client, c, per, 0.5,
                                              extra_axes=(0, None)))(co)
    want = np.asarray(data.train_x[co.ids]).sum(axis=(1, 2)) + np.arange(4) * 10.0 + 0.5
    np.testing.assert_allclose(np.asarray(out), want)
    np.testing.assert_array_equal(n, data.train_count[co.ids])


# ---------------------------------------------------------------------------------------------
# selection

def test_finite_clients_and_keep_where():
    upd = {"a": jnp.array([[1.0, 2.0], [jnp.nan, 0.0], [3.0, 4.0]]),
           "b": jnp.array([1.0, 1.0, jnp.inf])}
    losses = jnp.array([0.5, 0.5, 0.5])
    assert R.finite_clients(upd, losses).tolist() == [True, False, False]
    assert R.finite_clients(upd, jnp.array([jnp.nan, 0.0, 0.0])).tolist() == [False] * 3
    ok = jnp.array([True, False, True])
    old = {"a": jnp.full((3, 2), 7.0), "b": jnp.full((3,), 8.0)}
    kept = R.keep_where(ok, upd, old)
    np.testing.assert_array_equal(kept["a"], [[1.0, 2.0], [7.0, 7.0], [3.0, 4.0]])
    np.testing.assert_array_equal(kept["b"], [1.0, 8.0, np.inf])
    zeroed = R.keep_where(ok, upd, 0.0)
    np.testing.assert_array_equal(zeroed["a"], [[1.0, 2.0], [0.0, 0.0], [3.0, 4.0]])


def test_take_and_put_clients():
    tree = {"w": jnp.arange(10.0).reshape(5, 2)}
    ids = jnp.array([3, 1])
    np.testing.assert_array_equal(R.take_clients(tree, ids)["w"], [[6, 7], [2, 3]])
    out = R.put_clients(tree, ids, {"w": -jnp.ones((2, 2))})
    np.testing.assert_array_equal(out["w"], [[0, 1], [-1, -1], [4, 5], [-1, -1], [8, 9]])


# ---------------------------------------------------------------------------------------------
# aggregation and metrics

def test_holders_mean():
    g = jnp.array([9.0, 9.0, 9.0])
    out = R.holders_mean(g, jnp.array([6.0, 0.0, 1.0]), jnp.array([3.0, 0.0, 4.0]))
    np.testing.assert_array_equal(out, [2.0, 9.0, 0.25])
    np.testing.assert_array_equal(R.holders_mean(0.0, jnp.array([1.0, 5.0]), jnp.array([0.0, 2.0])),
                                  [0.0, 2.5])


def test_round_metrics_by_hand():
    losses = jnp.array([1.0, 2.0, jnp.nan, 4.0])
    finite = jnp.array([True, True, False, True])
    m = R.round_metrics(losses, finite)
    assert float(m["train_loss"]) == pytest.approx(7.0 / 3)
    assert int(m["nan_clients"]) == 1
    assert m["train_loss"].dtype == jnp.float32 and m["nan_clients"].dtype == jnp.int32
    # padding slots (valid False) neither count in the loss nor as failed clients
    valid = jnp.array([True, False, False, True])
    m = R.round_metrics(losses, finite, valid)
    assert float(m["train_loss"]) == pytest.approx(2.5) and int(m["nan_clients"]) == 0
    assert m["nan_clients"].dtype == jnp.int32
    m = R.round_metrics(losses, jnp.zeros(4, bool))
    assert np.isnan(float(m["train_loss"])) and int(m["nan_clients"]) == 4
    # per-level lists: the same values, the sum accumulated level by level
    m = R.round_metrics([losses[:2], losses[2:]], [finite[:2], finite[2:]],
                        [jnp.array([True, True]), jnp.array([True, False])])
    assert float(m["train_loss"]) == pytest.approx(1.5) and int(m["nan_clients"]) == 1
    assert m["train_loss"].dtype == jnp.float32 and m["nan_clients"].dtype == jnp.int32


def test_round_metrics_matches_the_former_inline_versions_bit_for_bit():
    rng = np.random.RandomState(0)
    losses = jnp.asarray(rng.rand(7).astype(np.float32) * 3)
    finite = jnp.asarray(rng.rand(7) > 0.3)
    valid = jnp.asarray(rng.rand(7) > 0.2)
    # base.round_metrics before
    n_ok = jnp.sum(finite.astype(jnp.float32))
    old = jnp.where(n_ok > 0, jnp.sum(jnp.where(finite, losses, 0.0)) / jnp.maximum(n_ok, 1.0),
                    jnp.nan)
    assert np.asarray(R.round_metrics(losses, finite)["train_loss"]).tobytes() == \
        np.asarray(old).tobytes()
    # HeteroFL's inline metrics before (int count)
    ok = valid & finite
    n_i = jnp.sum(ok)
    old = jnp.where(n_i > 0, jnp.sum(jnp.where(ok, losses, 0.0)) / jnp.maximum(n_i, 1), jnp.nan)
    new = R.round_metrics(losses, finite, valid)
    assert np.asarray(new["train_loss"]).tobytes() == np.asarray(old).tobytes()
    assert int(new["nan_clients"]) == int(jnp.sum(valid & ~finite))
    # ScaleFL's level-by-level accumulation before
    cuts = [(0, 3), (3, 7)]
    s, n = 0.0, 0.0
    for a, b in cuts:
        s = s + jnp.sum(jnp.where(ok[a:b], losses[a:b], 0.0))
        n = n + jnp.sum(ok[a:b])
    old = jnp.where(n > 0, s / jnp.maximum(n, 1), jnp.nan)
    new = R.round_metrics([losses[a:b] for a, b in cuts], [finite[a:b] for a, b in cuts],
                          [valid[a:b] for a, b in cuts])
    assert np.asarray(new["train_loss"]).tobytes() == np.asarray(old).tobytes()


# ---------------------------------------------------------------------------------------------
# schedules, factors, groups, keys

def test_multistep_lr_by_hand():
    f = lambda t, **kw: float(R.multistep_lr(jnp.int32(t), 0.1, (3, 5), 0.5, **kw))
    assert [f(t) for t in (0, 2, 3, 4, 5, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert [f(t, offset=1) for t in (1, 2, 4)] == pytest.approx([0.1, 0.05, 0.025])
    assert f(4, integer_power=True) == pytest.approx(0.05)
    assert float(R.multistep_lr(jnp.int32(7), 0.05, (), 0.1)) == pytest.approx(0.05)
    assert R.multistep_lr(jnp.int32(7), 0.05, (), 0.1).dtype == jnp.float32


def test_multistep_lr_matches_the_former_schedules_bit_for_bit():
    ms = tuple(range(1, 10))
    for t in range(12):
        t = jnp.int32(t)
        n = jnp.sum(jnp.asarray(ms, jnp.int32) <= t + 1)  # HeteroFL/FedRolex (offset 1)
        old = 0.1 * jnp.asarray(0.1, jnp.float32) ** n.astype(jnp.float32)
        new = R.multistep_lr(t, 0.1, ms, 0.1, 1)
        assert np.asarray(new).tobytes() == np.asarray(old).tobytes()
        k = jnp.sum(jnp.asarray(t) >= jnp.asarray(ms, jnp.int32))  # ScaleFL
        old = jnp.asarray(0.1, jnp.float32) * jnp.asarray(0.1, jnp.float32) ** k
        new = R.multistep_lr(t, 0.1, ms, 0.1, integer_power=True)
        assert np.asarray(new).tobytes() == np.asarray(old).tobytes()


def test_fiarse_paper_factor_by_hand():
    a = jnp.array([1.0, 2.0, 0.0, 0.0])
    tau = jnp.array([1.0, 0.5, 0.0, 1.0])
    # 1 + 2τ|w|/(|w|+τ)²: 1 + 2/4; 1 + 2/6.25; 1 (|w| = τ = 0); 1 + 0
    np.testing.assert_allclose(R.fiarse_paper_factor(a, tau), [1.5, 1.32, 1.0, 1.0], rtol=1e-6)
    # unguarded (FRAMP): 0/0 is NaN, the same values elsewhere, bit for bit
    raw = np.asarray(R.fiarse_paper_factor(a, tau, guard_zero=False))
    assert np.isnan(raw[2])
    guarded = np.asarray(R.fiarse_paper_factor(a, tau))
    assert raw[[0, 1, 3]].tobytes() == guarded[[0, 1, 3]].tobytes()


def test_budget_groups():
    g = R.budget_groups(_ctx())
    assert list(g) == [0.25, 1.0]
    np.testing.assert_array_equal(g[0.25], [2, 3, 4])
    np.testing.assert_array_equal(g[1.0], [0, 1, 5])


def test_model_init_key_is_ctx_init_key_for_the_run_root_key():
    ctx = _ctx(seed=11)
    want = jax.random.key_data(ctx.init_key())
    np.testing.assert_array_equal(jax.random.key_data(R.model_init_key(ctx, jax.random.key(11))),
                                  want)
    np.testing.assert_array_equal(jax.random.key_data(R.model_init_key(ctx, None)), want)


# ---------------------------------------------------------------------------------------------
# typed states

def test_typed_states_read_fields_by_name():
    from framp_jax.algorithms.heterofl import WidthState
    st = WidthState({"w": jnp.ones(2)})
    assert st["params"] is st.params and st["t"] is None and st[0] is st.params
    with pytest.raises(KeyError):
        st["nope"]
    assert jax.tree.structure(st).num_leaves == 1


def test_dict_state_checkpoints_restore_into_typed_states(tmp_path):
    """Checkpoints written when the server states were dicts restore into the typed states
    (fields that are None in the target were absent from the dict), and typed states are stored
    as those dicts."""
    from framp_jax.algorithms.fedavg import FedAvgState, LocalState
    from framp_jax.algorithms.framp import FrampState
    from framp_jax.algorithms.heterofl import WidthState
    from framp_jax.checkpoint import CheckpointManager

    p = {"conv": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "bias": jnp.array([1.0, 2.0])}
    zeros = jax.tree.map(jnp.zeros_like, p)
    cases = [
        ({"params": p}, FedAvgState(zeros)),
        ({"params": p, "masks": jax.tree.map(jnp.ones_like, p)}, LocalState(zeros, zeros)),
        ({"params": p}, WidthState(zeros)),
        ({"params": p, "tmp_counts": jax.tree.map(jnp.ones_like, p),
          "t": jnp.asarray(4, jnp.int32)},
         WidthState(zeros, zeros, jnp.zeros((), jnp.int32))),
        ({"phi": p, "opt": (jnp.asarray(3, jnp.int32), {"mu": p}), "desc": jnp.ones((4, 2)),
          "protos": jnp.full((3, 2), 0.5), "proto_valid": jnp.array([True, False, True])},
         FrampState(zeros, (jnp.zeros((), jnp.int32), {"mu": zeros}), jnp.zeros((4, 2)),
                    jnp.zeros((3, 2)), jnp.zeros((3,), bool))),
    ]
    for i, (old, target) in enumerate(cases):
        with CheckpointManager(tmp_path / f"c{i}", keep=2) as m:
            m.save(1, old, {"config_hash": "h"})
            got, extra = m.restore(1, target=target, expected_config_hash="h")
            assert type(got) is type(target) and extra["round"] == 1
            for k, v in zip(target._fields, target):
                if v is None:
                    assert getattr(got, k) is None
                else:
                    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a),
                                                                            np.asarray(b)),
                                 getattr(got, k), old[k])
            # a typed state is stored as the dict state was: it restores into both
            m.save(2, got)
            again, _ = m.restore(2, target=target)
            assert type(again) is type(target)
            as_dict, _ = m.restore(2, target=jax.tree.map(jnp.zeros_like, old))
            assert isinstance(as_dict, dict) and set(as_dict) == set(old)
            raw, _ = m.restore(2)
            assert set(raw) == set(old)
