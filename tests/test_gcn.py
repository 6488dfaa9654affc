"""The 2-layer GCN: normalisation, padding invariance, jit/vmap, dropout, early exit."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax.data import graph_partition as gp
from framp_jax.data import graphs as G
from framp_jax.models.gcn import gcn_normalization, make_gcn, make_gcn_width

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class SimpleGraph(NamedTuple):
    nodes: jnp.ndarray
    senders: jnp.ndarray
    receivers: jnp.ndarray
    n_node: jnp.ndarray


def _random_graph(n=9, f=5, p=0.35, seed=0):
    rng = np.random.default_rng(seed)
    a = np.triu(rng.random((n, n)) < p, 1)
    a = a | a.T
    s, r = np.nonzero(a)
    x = rng.standard_normal((n, f)).astype(np.float32)
    return a.astype(np.float64), SimpleGraph(jnp.asarray(x), jnp.asarray(s, jnp.int32), jnp.asarray(r, jnp.int32),
                                              jnp.array([n], jnp.int32))


def _dense_forward(params, a, x):
    n = a.shape[0]
    ah = a + np.eye(n)
    d = ah.sum(1)
    norm = ah / np.sqrt(d)[:, None] / np.sqrt(d)[None, :]
    p = jax.tree.map(lambda t: np.asarray(t, np.float64), params)
    h1 = np.maximum(norm @ x @ p["conv1"]["kernel"] + p["conv1"]["bias"], 0)
    h2 = np.maximum(norm @ h1 @ p["conv2"]["kernel"] + p["conv2"]["bias"], 0)
    return h2 @ p["classifier"]["kernel"] + p["classifier"]["bias"], h2, norm


def test_param_count_layout_and_prunable():
    m = make_gcn(128, 40)
    params = m.init(jax.random.key(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == 38184  # SPEC §2.4
    assert set(params) == {"conv1", "conv2", "classifier"}
    assert m.prunable(params) == {
        "conv1": {"kernel": True, "bias": False},
        "conv2": {"kernel": True, "bias": False},
        "classifier": {"kernel": True, "bias": True},
    }
    assert m.feature_dim == 128 and m.num_classes == 40
    assert not any(jnp.any(params[k]["bias"]) for k in params)
    k = params["conv1"]["kernel"]
    lim = np.sqrt(6 / (128 + 128))
    assert float(jnp.abs(k).max()) <= lim and float(k.std()) > 0.5 * lim / np.sqrt(3)
    w = make_gcn_width(128, 40, 32)
    assert w.init(jax.random.key(0))["conv2"]["kernel"].shape == (32, 32) and w.feature_dim == 32


def test_normalisation_matches_dense():
    a, g = _random_graph()
    a[3, :] = a[:, 3] = 0  # one isolated node: only its self loop
    s, r = np.nonzero(a)
    g = g._replace(senders=jnp.asarray(s, jnp.int32), receivers=jnp.asarray(r, jnp.int32))
    m = make_gcn(5, 3, hidden=8)
    params = m.init(jax.random.key(1))
    params = jax.tree.map(lambda t: t + 0.1, params)  # non-zero biases
    logits, feats = m.apply(params, g)
    want_logits, want_feats, norm = _dense_forward(params, a, np.asarray(g.nodes, np.float64))
    np.testing.assert_allclose(feats, want_feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    ec, sc = gcn_normalization(g.senders, g.receivers, 9)
    dense = np.zeros((9, 9))
    dense[np.asarray(g.receivers), np.asarray(g.senders)] = np.asarray(ec)
    dense[np.arange(9), np.arange(9)] += np.asarray(sc)
    np.testing.assert_allclose(dense, norm, rtol=1e-6, atol=1e-7)


def _client_graphs():
    """Small real subgraphs (Cora, 10 METIS clients) when the data exist, else synthetic."""
    if (SHARED / "cora" / "cora.npz").is_file():
        return gp.partition_graph(G.load_graph("cora", data_dir=SHARED), 10, seed=0)
    clients = []
    for i in range(4):
        a, g = _random_graph(n=7 + 3 * i, f=11, seed=i)
        clients.append(gp.ClientGraph(np.asarray(g.nodes), np.zeros(a.shape[0], np.int32),
                                      np.stack([np.asarray(g.senders), np.asarray(g.receivers)]),
                                      *(np.ones(a.shape[0], bool) for _ in range(3)),
                                      np.arange(a.shape[0]), i, 3))
    return clients


@pytest.fixture(scope="module")
def clients():
    return _client_graphs()


def test_padding_never_changes_real_nodes(clients):
    padded = gp.pad_clients(clients)
    g = padded.graphs
    junk = np.where(padded.node_mask[..., None], 0.0, 1e3 * np.random.default_rng(0).standard_normal(g.nodes.shape))
    g = g._replace(nodes=(g.nodes + junk).astype(np.float32))
    m = make_gcn(clients[0].x.shape[1], clients[0].num_classes, hidden=16)
    params = m.init(jax.random.key(2))
    apply = jax.jit(lambda p, gr, mask: m.apply(p, gr, node_mask=mask))
    apply_nomask = jax.jit(lambda p, gr: m.apply(p, gr))
    vm = jax.jit(jax.vmap(lambda gr, mask: m.apply(params, gr, node_mask=mask)))
    v_logits, v_feats = vm(g, padded.node_mask)
    v_logits_nm, _ = jax.jit(jax.vmap(lambda gr: m.apply(params, gr)))(g)
    for i in (0, len(clients) - 1):
        c = clients[i]
        k = c.num_nodes
        ref_logits, ref_feats = m.apply(params, c)  # unpadded ClientGraph
        gi = jax.tree.map(lambda a: a[i], g)
        for logits, feats in (apply(params, gi, padded.node_mask[i]), apply_nomask(params, gi)):
            np.testing.assert_allclose(logits[:k], ref_logits, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(feats[:k], ref_feats, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v_logits[i, :k], ref_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v_logits_nm[i, :k], ref_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v_feats[i, :k], ref_feats, rtol=1e-5, atol=1e-5)
        # with the mask, padding nodes output the bias path only (finite, small)
        assert np.all(np.isfinite(v_logits[i]))
        one = gp.take_client(padded._replace(graphs=g), i)
        np.testing.assert_allclose(m.apply(params, one)[0][:k], ref_logits, rtol=1e-5, atol=1e-5)


def test_grad_finite_through_padding(clients):
    padded = gp.pad_clients(clients[:3])
    m = make_gcn(clients[0].x.shape[1], clients[0].num_classes, hidden=16)
    params = m.init(jax.random.key(3))

    def loss(p, gr, mask, y, key):
        logits, _ = m.apply(p, gr, train=True, rng=key, node_mask=mask)
        ll = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.take_along_axis(ll, y[:, None], 1)[:, 0] * mask) / mask.sum()

    keys = jax.random.split(jax.random.key(0), 3)
    grads = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0, 0)))(
        params, padded.graphs, padded.train_mask, padded.labels, keys)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grads))


def test_dropout_and_eval_modes():
    a, g = _random_graph(n=12, f=6)
    m = make_gcn(6, 4, hidden=32, dropout=0.5)
    params = m.init(jax.random.key(0))
    ev1, ev2 = m.apply(params, g)[0], m.apply(params, g, train=False, rng=jax.random.key(5))[0]
    np.testing.assert_array_equal(ev1, ev2)
    t1 = m.apply(params, g, train=True, rng=jax.random.key(1))[0]
    t1b = m.apply(params, g, train=True, rng=jax.random.key(1))[0]
    t2 = m.apply(params, g, train=True, rng=jax.random.key(2))[0]
    np.testing.assert_array_equal(t1, t1b)
    assert not np.allclose(t1, t2) and not np.allclose(t1, ev1)
    with pytest.raises(ValueError, match="rng"):
        m.apply(params, g, train=True)
    # features are taken before the final dropout
    f_train = m.apply(params, g, train=True, rng=jax.random.key(1))[1]
    assert f_train.shape == (12, 32)


def test_early_exit_head():
    a, g = _random_graph(n=10, f=6)
    m = make_gcn(6, 3, hidden=16, early_exit=True)
    params = m.init(jax.random.key(0))
    assert params["exit1"]["kernel"].shape == (16, 3)
    assert m.prunable(params)["exit1"] == {"kernel": True, "bias": True}
    logits, feats, ex = jax.jit(lambda p: m.apply(p, g, return_exit1=True))(params)
    assert logits.shape == (10, 3) and feats.shape == (10, 16) and ex.shape == (10, 3)
    np.testing.assert_allclose(m.apply(params, g)[0], logits, rtol=1e-5, atol=1e-6)
    plain = make_gcn(6, 3, hidden=16)
    with pytest.raises(ValueError, match="exit1"):
        plain.apply(plain.init(jax.random.key(0)), g, return_exit1=True)


def test_sparse_features_give_the_dense_outputs_and_gradients(clients):
    """Coordinate-list features (graph_features='sparse') compute the same GCN as the dense
    matrix: logits, features and the conv1 kernel's gradient, vmapped over padded clients."""
    from framp_jax.models.gcn import SparseFeatures, sparse_features
    padded = gp.pad_clients(clients[:3])
    g = padded.graphs
    dense = np.asarray(g.nodes)
    sf = sparse_features(dense)
    assert isinstance(sf, SparseFeatures) and sf.rows.shape[0] == 3 and sf.shape == dense.shape
    nnz = [int(np.count_nonzero(d)) for d in dense]
    assert sf.rows.shape[1] == max(nnz)
    for i in range(3):  # round trip, and padding entries are zeros at the last (padding) node
        np.testing.assert_array_equal(np.asarray(jax.tree.map(lambda a: a[i], sf).todense()), dense[i])
        assert np.all(sf.vals[i, nnz[i]:] == 0) and np.all(sf.rows[i, nnz[i]:] == dense.shape[1] - 1)
    gs = g._replace(nodes=jax.tree.map(jnp.asarray, sf))
    m = make_gcn(dense.shape[-1], clients[0].num_classes, hidden=16)
    params = m.init(jax.random.key(5))
    out = lambda gr: jax.vmap(lambda x, mask: m.apply(params, x, node_mask=mask))(gr, padded.node_mask)
    (ld, fd), (ls, fs) = jax.jit(out)(g), jax.jit(out)(gs)
    np.testing.assert_allclose(ls, ld, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fs, fd, rtol=1e-5, atol=1e-5)

    def loss(p, gr, mask, y):
        logits, _ = m.apply(p, gr, node_mask=mask)
        ll = jax.nn.log_softmax(logits)
        return -jnp.sum(jnp.take_along_axis(ll, y[:, None], 1)[:, 0] * mask)

    grad = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0)))
    gd = grad(params, g, padded.train_mask, padded.labels)
    gsp = grad(params, gs, padded.train_mask, padded.labels)
    for a, b in zip(jax.tree.leaves(gsp), jax.tree.leaves(gd)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_choose_features_auto_rule():
    from framp_jax.data.graph_modality import choose_features
    assert choose_features("auto", 1000, 49) == "sparse"
    assert choose_features("auto", 1000, 50) == "dense"
    assert choose_features("sparse", 10, 10) == "sparse" and choose_features("dense", 10, 0) == "dense"
