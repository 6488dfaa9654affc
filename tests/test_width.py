"""Width extraction (framp_jax.width): index makers by hand, gather/scatter adjointness, narrow
shapes equal to the width-w models, and the narrow CNN computing the channel-masked full CNN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import width as W
from framp_jax.models.cnn import cnn_spec, make_cnn
from framp_jax.models.gcn import gcn_spec, make_gcn, make_gcn_width
from framp_jax.models.preact import (make_preact_cnn, make_preact_resnet18, preact_cnn_spec,
                                     preact_resnet18_spec)
from framp_jax.models.resnet import make_resnet18, resnet18_spec


def _np(d):
    return {k: np.asarray(v).tolist() for k, v in d.items()}


def test_prefix_indices_by_hand():
    assert _np(W.prefix_indices({"a": 64}, 1 / 8)) == {"a": list(range(8))}
    # ceil for sizes that do not divide: 3·0.5 = 1.5 -> 2, 5·0.25 = 1.25 -> 2, 1·0.125 -> 1
    assert _np(W.prefix_indices({"a": 3, "b": 5, "c": 1}, 0.5)) == {"a": [0, 1], "b": [0, 1, 2],
                                                                   "c": [0]}
    assert _np(W.prefix_indices({"b": 5, "c": 1}, 0.25)) == {"b": [0, 1], "c": [0]}
    assert _np(W.prefix_indices({"a": 64, "b": 512}, 1.0)) == {"a": list(range(64)),
                                                              "b": list(range(512))}


@pytest.mark.parametrize("t,expected", [(0, [0, 1]), (1, [7, 0]), (7, [1, 2]), (9, [7, 0])])
def test_rolling_window_by_hand(t, expected):
    # torch.roll(arange(8), t % 8)[:2]: t=1 -> [7,0,1,..][:2]; t=7 -> [1,2,..,7,0][:2]
    assert _np(W.rolling_indices({"u": 8}, 0.25, t))["u"] == expected
    # t traced under jit, each unit with its own size: O=3, k=ceil(0.25·3)=1 -> (0 - t) mod 3
    f = jax.jit(lambda tt: W.rolling_indices({"u": 8, "v": 3}, 0.25, tt))
    out = _np(f(jnp.int32(t)))
    assert out["u"] == expected and out["v"] == [(-t) % 3]


def test_norm_topk_by_hand_ties_to_lower_index():
    spec = W.WidthSpec(("h",), (W.Bind(("l", "kernel"), 1, "h", "out"),
                                W.Bind(("l", "bias"), 0, "h", "vec"),
                                W.Bind(("m", "kernel"), 0, "h", "in")))

    def params(cols):
        k = np.zeros((2, len(cols)), np.float32)
        k[0] = cols  # column norms = |cols|
        return {"l": {"kernel": jnp.asarray(k), "bias": jnp.full((len(cols),), 100.0)},
                "m": {"kernel": jnp.ones((len(cols), 3))}}

    # bias ("vec") and the next layer's input rows do not count in the norm
    assert _np(W.norm_topk_indices(params([1, 3, 3, 2]), spec, 0.5))["h"] == [1, 2]
    assert _np(W.norm_topk_indices(params([2, 1, 2, 2]), spec, 0.5))["h"] == [0, 2]
    assert _np(W.norm_topk_indices(params([1, 5, 2, 4, 3]), spec, 0.5))["h"] == [1, 3, 4]


def test_flatten_rows_by_hand():
    # dense input = NHWC flatten of a 2x2 map with C3 = 4: channel c at position p -> row 4p + c
    spec = W.WidthSpec(("c3", "d"), (W.Bind(("conv3", "kernel"), 3, "c3", "out"),
                                     W.Bind(("dense", "kernel"), 0, "c3", "in", True),
                                     W.Bind(("dense", "kernel"), 1, "d", "out")))
    p = {"conv3": {"kernel": jnp.zeros((3, 3, 2, 4))},
         "dense": {"kernel": jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)}}
    nar = W.gather(p, spec, {"c3": jnp.array([3, 1]), "d": jnp.array([2])})
    rows = np.asarray(nar["dense"]["kernel"][:, 0] - 2) / 3
    assert rows.tolist() == [3, 1, 7, 5, 11, 9, 15, 13]
    assert nar["conv3"]["kernel"].shape == (3, 3, 2, 2)


FAMILIES = [
    ("cnn", lambda w: make_cnn(10, (16, 16, 3), width=w), cnn_spec()),
    ("resnet18", lambda w: make_resnet18(10, (32, 32, 3), width=w), resnet18_spec()),
    ("preact_cnn", lambda w: make_preact_cnn(10, (16, 16, 3), width=w), preact_cnn_spec()),
    ("preact_resnet18", lambda w: make_preact_resnet18(10, (32, 32, 3), width=w),
     preact_resnet18_spec()),
    ("gcn", lambda w: make_gcn_width(12, 5, W.width_of(16, w)), gcn_spec()),
]
# gather/scatter are spec-agnostic; their algebra is checked on the small families (the ResNet
# specs are checked structurally above, at every width)
SMALL = [f for f in FAMILIES if f[0] in ("cnn", "preact_cnn", "gcn")]


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("name,make,spec", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_prefix_gather_has_the_width_model_structure(name, make, spec):
    full = jax.eval_shape(make(1.0).init, jax.random.key(0))
    sizes = W.check_spec(full, spec)
    for r in (0.5, 0.25, 0.125, 0.3):
        nar = jax.eval_shape(lambda p: W.gather(p, spec, W.prefix_indices(sizes, r)), full)
        ref = jax.eval_shape(make(r).init, jax.random.key(0))
        assert jax.tree.structure(nar) == jax.tree.structure(ref)
        assert _shapes(nar) == _shapes(ref), (name, r)
    if name.endswith("resnet18"):
        assert sizes["stage1"] == 64 and sizes["stage4"] == 512 and sizes["layer4_1.conv1"] == 512
        assert len(sizes) == 12  # 4 residual streams + 8 block-inner units


@pytest.mark.parametrize("name,make,spec", SMALL, ids=[f[0] for f in SMALL])
def test_gather_scatter_adjoint_and_roundtrip(name, make, spec):
    full = jax.eval_shape(make(1.0).init, jax.random.key(1))
    sizes = W.unit_sizes(full, spec)

    idx = W.rolling_indices(sizes, 0.25, 5)  # unsorted windows
    rng = np.random.default_rng(0)
    x = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), full)
    nar_shape = jax.eval_shape(lambda p: W.gather(p, spec, idx), full)
    y = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), nar_shape)

    @jax.jit
    def check(x, y):
        nar = W.gather(x, spec, idx)
        dot = lambda a, b: sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        zeros = jax.tree.map(jnp.zeros_like, x)
        lhs, rhs = dot(nar, y), dot(x, W.scatter(zeros, y, spec, idx))
        # scatter(x, gather(x)) == x; writing new values moves exactly the covered entries
        back = W.scatter(x, nar, spec, idx)
        rt = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(x))]))
        cov = W.coverage(x, spec, idx)
        moved = W.scatter(x, jax.tree.map(lambda a: a + 1.0, nar), spec, idx)
        mv = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b - c)) for a, b, c in
                                zip(jax.tree.leaves(moved), jax.tree.leaves(x), jax.tree.leaves(cov))]))
        n_cov = sum(jnp.sum(c) for c in jax.tree.leaves(cov))
        return lhs, rhs, rt, mv, n_cov, sum(a.size for a in jax.tree.leaves(nar))

    lhs, rhs, rt, mv, n_cov, n_nar = jax.device_get(check(x, y))
    assert np.isclose(lhs, rhs, rtol=1e-4, atol=1e-3)
    assert rt < 1e-6 and mv < 1e-5
    assert int(n_cov) == int(n_nar) < sum(a.size for a in jax.tree.leaves(full))


@pytest.mark.parametrize("rate,t", [(0.5, 0), (0.125, 11)])
def test_narrow_cnn_computes_the_channel_masked_full_cnn(rate, t):
    """Zeroing the unkept channels of the full (BN-free) CNN silences them exactly (relu(0) = 0,
    max-pool of zeros), so the narrow model must give the same logits; this checks every
    binding, the flatten rows included, for an unsorted window."""
    full_m = make_cnn(10, (16, 16, 3), width=1.0)
    spec = cnn_spec()
    p = full_m.init(jax.random.key(3))
    p = jax.tree.map(lambda a: a + 0.05, p)  # non-zero biases
    idx = W.rolling_indices(W.unit_sizes(p, spec), rate, t)
    nar = W.gather(p, spec, idx)
    masked = jax.tree.map(jnp.multiply, p, W.coverage(p, spec, idx))
    x = jax.random.normal(jax.random.key(4), (5, 16, 16, 3))
    narrow_logits, _ = make_cnn(10, (16, 16, 3), width=rate).apply(nar, x)
    full_logits, _ = full_m.apply(masked, x)
    np.testing.assert_allclose(np.asarray(narrow_logits), np.asarray(full_logits), rtol=1e-4, atol=1e-5)


def test_gcn_spec_matches_the_gcn():
    full = make_gcn(12, 5, hidden=16).init(jax.random.key(0))
    assert W.unit_sizes(full, gcn_spec()) == {"conv1": 16, "conv2": 16}


def test_bad_spec_is_reported():
    p = make_cnn(10, (16, 16, 3)).init(jax.random.key(0))
    bad = W.WidthSpec(("conv1",), (W.Bind(("conv1", "kernel"), 3, "conv1", "out"),
                                   W.Bind(("conv2", "kernel"), 3, "conv1", "in")))
    with pytest.raises(ValueError, match="conv2/kernel"):
        W.check_spec(p, bad)
