"""ScaleFL: level sizes, the exit-weighted KD loss, prefix extraction, aggregation, the round."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax.algorithms import scalefl as S
from framp_jax.config import ConfigError, base_config, validate
from framp_jax.models import exits as E
from framp_jax.models.family import model_family

# ------------------------------------------------------------------------------------------
# level sizes (no training)

SPEC_FRACTIONS = {  # SPEC §4.3: (width, exits) -> measured parameter fraction of ResNet-18
    (1.0, 1): 0.0134, (1.0, 2): 0.0604, (1.0, 3): 0.2484, (1.0, 4): 1.0,
    (0.5, 1): 0.0034, (0.5, 2): 0.0152, (0.5, 3): 0.0622, (0.5, 4): 0.2502,
}


def test_resnet18_level_fractions_match_spec():
    levels = {i: (h, w) for i, (w, h) in enumerate(SPEC_FRACTIONS)}
    family = model_family("resnet18", 10, (32, 32, 3))
    fr = S.level_fractions(family, levels)
    for i, key in enumerate(SPEC_FRACTIONS):
        assert abs(fr[i] - SPEC_FRACTIONS[key]) <= 1e-3, (key, fr[i])
    # the default map of SPEC §4.3
    c = _tiny_config("npz:/dev/null", model="resnet18")
    d = S.level_fractions(family, _level_map(c))
    for b, want in {0.015625: 0.0152, 0.0625: 0.0622, 0.25: 0.2484, 1.0: 1.0}.items():
        assert abs(d[b] - want) <= 1e-3


def test_widths_are_floor_and_layers_stop_at_the_deepest_exit():
    m = E.make_resnet18_exits(10, width=0.7, exits=2)
    sh = E.param_shapes(m)
    assert sh["stem"]["kernel"].shape == (3, 3, 3, 44)          # int(0.7 * 64) = 44 (floor)
    assert sh["layer2_1"]["conv2"]["kernel"].shape == (3, 3, 89, 89)  # int(0.7 * 128)
    assert set(sh) == {"stem", "stem_bn", "layer1_0", "layer1_1", "layer2_0", "layer2_1",
                       "exit1", "exit2"}
    assert sh["exit2"]["kernel"].shape == (89, 10)
    c = E.param_shapes(E.make_cnn_exits(10, (8, 8, 3), width=0.01, exits=1))
    assert c["conv1"]["kernel"].shape == (3, 3, 3, 1) and set(c) == {"conv1", "exit1"}


# ------------------------------------------------------------------------------------------
# the loss on fixed logits

def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_exit_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    outs = [rng.standard_normal((4, 5)).astype(np.float32) * 2 for _ in range(3)]
    y = np.array([0, 3, 1, 4])
    gamma, T = 0.7, 3.0
    ce = [-_np_log_softmax(o.astype(np.float64))[np.arange(4), y].mean() for o in outs]
    p = np.exp(_np_log_softmax(outs[2] / T))
    kl = [np.sum(p * (np.log(p) - _np_log_softmax(o / T))) / (4 * 5) for o in outs[:2]]
    want = (1 * (ce[0] + gamma * T * T * kl[0]) + 2 * (ce[1] + gamma * T * T * kl[1]) + 3 * ce[2]) / 6
    got = S.exit_loss([jnp.asarray(o) for o in outs], jnp.asarray(y), True, gamma, T)
    assert np.isclose(float(got), want, rtol=1e-5)
    off = (ce[0] + 2 * ce[1] + 3 * ce[2]) / 6
    assert np.isclose(float(S.exit_loss([jnp.asarray(o) for o in outs], jnp.asarray(y), False, gamma, T)),
                      off, rtol=1e-5)
    assert np.isclose(float(S.exit_loss([jnp.asarray(o) for o in outs], jnp.asarray(y), True, 0.0, T)),
                      off, rtol=1e-5)
    # a single exit is plain CE
    assert np.isclose(float(S.exit_loss([jnp.asarray(outs[0])], jnp.asarray(y), True, gamma, T)), ce[0],
                      rtol=1e-5)
    # the teacher (deepest exit) is not detached: the KD term moves it
    g = jax.grad(lambda t: S.kd_term(jnp.asarray(outs[0]), t, T))(jnp.asarray(outs[2]))
    assert float(jnp.abs(g).sum()) > 1e-4


def test_lr_multistep():
    lr = [float(S.lr_at(jnp.int32(t), 0.1, (100, 200), 0.1)) for t in (0, 99, 100, 199, 200, 799)]
    np.testing.assert_allclose(lr, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    assert float(S.lr_at(jnp.int32(500), 0.05)) == pytest.approx(0.05)


# ------------------------------------------------------------------------------------------
# prefix extraction

@pytest.mark.parametrize("family,w,h", [("resnet18", 0.5, 2), ("resnet18", 0.25, 4),
                                        ("cnn", 0.5, 3), ("cnn", 1.0, 1)])
def test_extract_gives_the_level_model_shapes_and_first_channels(family, w, h):
    shape = (8, 8, 3)
    full = E.make_exits_model(family, 10, shape, 1.0, S.MAX_EXITS[family], "xla")
    lvl = E.make_exits_model(family, 10, shape, w, h, "xla")
    rng = np.random.default_rng(1)  # numpy-filled global params (a full init is slow on CPU)
    g = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.1),
                     E.param_shapes(full))
    p = E.extract(g, E.param_shapes(lvl))
    assert jax.tree.structure(p) == jax.tree.structure(E.param_shapes(lvl))
    for a, s in zip(jax.tree.leaves(p), jax.tree.leaves(E.param_shapes(lvl))):
        assert a.shape == s.shape
    k = p["stem"]["kernel"] if family == "resnet18" else p["conv1"]["kernel"]
    g0 = g["stem"]["kernel"] if family == "resnet18" else g["conv1"]["kernel"]
    np.testing.assert_array_equal(k, g0[..., : k.shape[-1]])
    x = jax.random.normal(jax.random.key(3), (4,) + shape)
    outs = jax.jit(lvl.apply_exits)(p, x)
    assert len(outs) == h and all(o.shape == (4, 10) for o in outs)
    if w == 1.0:  # a depth-only level computes exactly the global model's first h exits
        for a, b in zip(outs, jax.jit(full.apply_exits)(g, x)[:h]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_scaler_divides_in_train_and_eval():
    """CNN at width 0.5 built from a global model whose dropped channels are zero: the kept
    pre-activations are the global ones divided by 0.5 (Scaler), in eval as in train."""
    shape = (8, 8, 3)
    full = E.make_cnn_exits(10, shape, width=1.0, exits=1, conv_impl="xla")
    half = E.make_cnn_exits(10, shape, width=0.5, exits=1, conv_impl="xla")
    g = full.init(jax.random.key(0))
    p = E.extract(g, E.param_shapes(half))
    x = jax.random.normal(jax.random.key(1), (3,) + shape)
    conv = lambda k, b, s: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) / s + b / s
    h = jax.nn.relu(conv(p["conv1"]["kernel"], p["conv1"]["bias"], 0.5))
    h = h.reshape(3, 4, 2, 4, 2, -1).max(axis=(2, 4)).mean(axis=(1, 2))
    want = h @ p["exit1"]["kernel"] + p["exit1"]["bias"]
    for train in (True, False):
        got = jax.jit(lambda p, x: half.apply(p, x, train=train)[0])(p, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# aggregation

def test_aggregate_two_overlapping_submodels_by_hand():
    g = {"a": {"kernel": jnp.full((2, 3), 9.0)}, "b": {"bias": jnp.full((2,), 7.0)}}
    # level 1 holds a[:1, :2]; two slots: one client (all 1.0) and a padding slot (NaN, weight 0)
    lvl1 = {"a": {"kernel": jnp.stack([jnp.ones((1, 2)), jnp.full((1, 2), jnp.nan)])}}
    # level 2 holds a[:2, :2] and b; one client (a = 4, b = [2, 6])
    lvl2 = {"a": {"kernel": jnp.full((1, 2, 2), 4.0)}, "b": {"bias": jnp.array([[2.0, 6.0]])}}
    out = S.aggregate(g, [(lvl1, jnp.array([1.0, 0.0])), (lvl2, jnp.array([1.0]))])
    np.testing.assert_allclose(out["a"]["kernel"], [[2.5, 2.5, 9.0], [4.0, 4.0, 9.0]])
    np.testing.assert_allclose(out["b"]["bias"], [2.0, 6.0])
    # nobody trained: everything keeps its value
    out0 = S.aggregate(g, [(lvl1, jnp.zeros(2)), (lvl2, jnp.zeros(1))])
    np.testing.assert_allclose(out0["a"]["kernel"], g["a"]["kernel"])


# ------------------------------------------------------------------------------------------
# rounds on a tiny npz dataset

def _tiny_npz(tmp_path, n_train=240, n_test=80, k=4):
    rng = np.random.default_rng(0)
    yt, ys = rng.integers(0, k, n_train), rng.integers(0, k, n_test)
    # class-dependent mean colour so that something is learnable
    mk = lambda y: np.clip(rng.normal(60 * y[:, None, None, None] + 40, 30, (len(y), 8, 8, 3)), 0, 255)
    p = tmp_path / "tiny.npz"
    np.savez(p, x_train=mk(yt).astype(np.uint8), y_train=yt, x_test=mk(ys).astype(np.uint8), y_test=ys)
    return f"npz:{p}"


def _level_map(c):
    return S.level_map(c.model, c.budget_levels, c.scalefl)


def _tiny_config(dataset, model="cnn", **kw):
    c = base_config()
    c.method = "scalefl"
    c.dataset = dataset
    c.model = model
    c.num_clients = 8
    c.clients_per_round = 4
    c.rounds = 3
    c.local_steps = 2
    c.batch_size = 4
    c.lr = 0.05
    c.eval_every = 1
    c.eval_batch = 10
    c.checkpoint_every = 100
    c.conv_impl = "xla"
    c.scalefl = S.default_options()
    for k, v in kw.items():
        c.scalefl[k] = v
    return c


def test_config_errors(tmp_path):
    c = _tiny_config(_tiny_npz(tmp_path), exits=(3, 2), widths=(1.0, 0.5))
    with pytest.raises(ConfigError, match="scalefl.exits"):
        _level_map(c)
    with pytest.raises(ConfigError, match="scalefl.exits"):  # before any data load
        validate(c)
    c = _tiny_config(_tiny_npz(tmp_path), exits=(3, 4, 2, 1), widths=(1.0, 1.0, 0.5, 0.5))
    with pytest.raises(ConfigError, match="1..3"):
        _level_map(c)
    with pytest.raises(ConfigError, match="1..3"):
        validate(c)
    c = _tiny_config(_tiny_npz(tmp_path))
    c.budget_levels = (1.0, 0.5)
    c.budget_dist = (1, 1)
    with pytest.raises(ConfigError, match="default map"):
        _level_map(c)
    with pytest.raises(ConfigError, match="default map"):
        validate(c)


def test_round_aggregates_only_covered_entries(tmp_path):
    from framp_jax.problem import build_algorithm, build_problem
    c = _tiny_config(_tiny_npz(tmp_path), kd_gamma=1.0)
    c.clients_per_round = 2  # 4 levels, 2 clients: two levels sit out each round
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    state = alg.init(None, prob.data)
    g = jax.tree.map(np.asarray, state["params"])
    new, m = jax.jit(alg.round)(state, prob.data, jnp.int32(0))
    new = new["params"]
    assert np.isfinite(float(m["train_loss"]))
    trained = {s: bool(np.asarray(v).any()) for s, _, v in prob.ctx.sample_clients_by_level(jnp.int32(0))}
    assert sum(trained.values()) == 2
    # CNN levels: 1 → (3 exits, w 1), 1/4 → (3, 0.5), 1/16 → (2, 1), 1/64 → (2, 0.5)
    same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
    dk_old, dk_new = g["dense"]["kernel"], new["dense"]["kernel"]
    assert same(dk_old[:, :, 32:, 64:], dk_new[:, :, 32:, 64:]) == (not trained[1.0])
    assert same(dk_old[:, :, :32, :64], dk_new[:, :, :32, :64]) == (not (trained[1.0] or trained[0.25]))
    wide2 = trained[1.0] or trained[0.0625]  # conv2 channels 16.. are held by the width-1 levels
    assert same(g["conv2"]["kernel"][..., 16:], new["conv2"]["kernel"][..., 16:]) == (not wide2)
    assert not same(g["exit1"]["kernel"][:8], new["exit1"]["kernel"][:8])  # every level holds it


def test_kd_switches_on_after_a_quarter_of_the_rounds():
    # train.py: gamma_active = round > num_rounds * 0.25 (0-based round)
    assert not bool(S.kd_active(jnp.int32(2), 0.25, 8)) and bool(S.kd_active(jnp.int32(3), 0.25, 8))
    m = E.make_cnn_exits(4, (8, 8, 3), width=0.5, exits=3, conv_impl="xla")
    p = m.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
    y = jnp.arange(6) % 4
    outs = jax.jit(m.apply_exits)(p, x)
    loss_at = jax.jit(lambda t: S.level_loss(m, S.kd_active(t, 0.25, 8), 0.5, 3.0)(p, x, y, None))
    off, on = loss_at(jnp.int32(2)), loss_at(jnp.int32(3))
    assert np.isclose(float(off), float(S.exit_loss(outs, y, False, 0.5, 3.0)), rtol=1e-6)
    assert np.isclose(float(on), float(S.exit_loss(outs, y, True, 0.5, 3.0)), rtol=1e-6)
    assert float(on) > float(off)


def test_three_rounds_through_simulate_run(tmp_path):
    from framp_jax.simulate import run
    c = _tiny_config(_tiny_npz(tmp_path), kd_gamma=0.05, kd_start=0.0, lr_milestones=(1, 2))
    res = run(c, str(tmp_path / "run"), progress=False, log=lambda *a: None)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["compiles"] == res["compiles"] == 1
    assert saved["method"] == "scalefl" and saved["rounds"] == 3
    for split in ("local", "union"):
        assert set(saved["final"][split]) == {"1", "1/4", "1/16", "1/64", "mean"}
        assert all(0.0 <= v <= 1.0 for v in saved["final"][split].values())
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4 and "lr" in rows[0]


# ------------------------------------------------------------------------------------------
# the GCN analogue (graph benchmark): an exit after layer 1

def _tiny_graph():
    from types import SimpleNamespace
    # 5 nodes, undirected edges 0-1, 1-2, 2-3 (node 4 isolated): both directions listed
    und = [(0, 1), (1, 2), (2, 3)]
    s = np.array([a for a, b in und] + [b for a, b in und], np.int32)
    r = np.array([b for a, b in und] + [a for a, b in und], np.int32)
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    A = np.zeros((5, 5), np.float32)
    A[r, s] = 1.0
    A += np.eye(5, dtype=np.float32)
    d = A.sum(1) ** -0.5
    return SimpleNamespace(nodes=jnp.asarray(x), senders=jnp.asarray(s), receivers=jnp.asarray(r)), \
        d[:, None] * A * d[None, :], x


def test_gcn_exits_match_a_dense_hand_computation_with_scaler():
    g, ahat, x = _tiny_graph()
    full = E.make_exits_model("gcn", 3, (6,), 1.0, 2, hidden=8, dropout=0.5)
    half = E.make_exits_model("gcn", 3, (6,), 0.5, 1, hidden=8, dropout=0.5)
    assert full.max_exits == 2 and half.num_exits == 1 and half.feature_dim == 4
    gp = full.init(jax.random.key(0))
    p = E.extract(gp, E.param_shapes(half))
    assert set(p) == {"conv1", "exit1"} and p["conv1"]["kernel"].shape == (6, 4)
    np.testing.assert_array_equal(p["conv1"]["kernel"], gp["conv1"]["kernel"][:, :4])
    # width 0.5, one exit: relu((Â X W1 + b1) / 0.5) W_e + b_e
    h1 = np.maximum((ahat @ x @ np.asarray(p["conv1"]["kernel"]) + np.asarray(p["conv1"]["bias"])) / 0.5, 0)
    want = h1 @ np.asarray(p["exit1"]["kernel"]) + np.asarray(p["exit1"]["bias"])
    got, feats = half.apply(p, g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feats, h1, rtol=1e-5, atol=1e-5)
    # width 1, two exits: the same function as models/gcn.py's GCN with its exit1 head
    from framp_jax.models.gcn import make_gcn
    ref = make_gcn(6, 3, hidden=8, early_exit=True)
    lg, f, e1 = ref.apply(gp, g, return_exit1=True)
    outs = full.apply_exits(gp, g)
    np.testing.assert_allclose(outs[0], e1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs[1], lg, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(full.apply(gp, g)[1], f, rtol=1e-5, atol=1e-5)
    # dropout in training needs a key and changes the output; eval ignores it
    with pytest.raises(ValueError, match="rng"):
        full.apply(gp, g, train=True)
    tr = full.apply(gp, g, train=True, rng=jax.random.key(1))[0]
    assert not np.allclose(tr, lg)


def test_gcn_level_map_and_fractions_by_hand():
    c = base_config()
    c.model, c.budget_levels = "gcn", (1.0, 0.25, 0.0625, 0.015625)
    c.scalefl = S.default_options()
    lv = _level_map(c)
    assert lv == S.DEFAULT_LEVELS["gcn"]
    fr = S.level_fractions(model_family("gcn", 7, (1433,), gcn_hidden=128), lv)
    # prunable: conv kernels + exit/classifier kernels and biases (conv biases not)
    tot = 1433 * 128 + 128 * 128 + 2 * (128 * 7 + 7)
    want = {1.0: 1.0, 0.25: (1433 * 32 + 32 * 32 + 2 * (32 * 7 + 7)) / tot,
            0.0625: (1433 * 8 + 8 * 7 + 7) / tot, 0.015625: (1433 * 2 + 2 * 7 + 7) / tot}
    for b, v in want.items():
        assert fr[b] == pytest.approx(v, rel=1e-9), b
    c.scalefl.exits, c.scalefl.widths = (3, 2, 1, 1), (1.0, 0.25, 0.0625, 0.015625)
    with pytest.raises(ConfigError, match="1..2"):
        _level_map(c)
