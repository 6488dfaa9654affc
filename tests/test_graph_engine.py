"""The graph path: FedData built from subgraph clients, graph Local/Union accuracy, CE on train
nodes only, and a short FedAvg run on real Cora through ``simulate.run``."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import config as C
from framp_jax.algorithms.fedavg import ce_loss
from framp_jax.data import graph_partition as gp
from framp_jax.data.graphs import Graph
from framp_jax.data.graph_modality import (GraphClients, GraphModality, graph_fed_arrays,
                                           graph_local_accuracy, graph_union_accuracy)
from framp_jax.models.gcn import make_gcn

from conftest import load_script

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_cora = pytest.mark.skipif(not (SHARED / "cora" / "cora.npz").is_file(),
                                reason="shared/data/cora absent")


# --------------------------------------------------------------------------- hand-built eval
def _hand_graphs():
    """3 clients x 5 node slots (the last one padding). Node features are one-hot 'predictions'
    for a fake linear model logits = nodes @ w."""
    import jraph
    preds = np.array([[0, 1, 2, 0, 0], [2, 2, 1, 0, 0], [1, 1, 1, 1, 0]])
    nodes = np.eye(3, dtype=np.float32)[preds]
    nodes[:, 4] = 0.0  # padding node (its argmax would be class 0)
    mask = np.array([[1, 1, 1, 1, 0]] * 3, bool)
    s = np.zeros((3, 2), np.int32)
    g = jraph.GraphsTuple(nodes=jnp.asarray(nodes), edges=None, senders=jnp.asarray(s),
                          receivers=jnp.asarray(s), globals=None,
                          n_node=jnp.asarray([[4, 1]] * 3, jnp.int32),
                          n_edge=jnp.asarray([[2, 0]] * 3, jnp.int32))
    # test labels: -1 = not a test node (padding, train, val)
    y = jnp.asarray([[0, 2, -1, 0, -1],    # preds 0,1,_,0 -> 2 of 3 correct
                     [2, -1, 1, -1, -1],   # preds 2,_,1   -> 2 of 2 correct
                     [-1, -1, -1, -1, -1]], jnp.int32)  # no test nodes
    return GraphClients(g, jnp.asarray(mask)), y, jnp.asarray([3, 2, 0], jnp.int32)


def _fake_apply(params, graph, *, train=False, rng=None):
    x = graph.graphs.nodes
    return x @ params["w"], x


ID = jnp.eye(3)
SHIFT = jnp.roll(jnp.eye(3), 1, axis=1)  # predicts (c + 1) % 3 for a one-hot c


def test_graph_local_accuracy_hand_built():
    x, y, cnt = _hand_graphs()
    local = jax.jit(lambda p: graph_local_accuracy(_fake_apply, p, x, y, cnt, shared_params=True))
    acc = np.asarray(local({"w": ID}))
    np.testing.assert_allclose(acc[:2], [2 / 3, 1.0], rtol=1e-6)
    assert np.isnan(acc[2])  # no test nodes
    # per-client models: client 1 gets the shifted model (preds 0,_,2 vs labels 2,1: 0 correct)
    stack = {"w": jnp.stack([ID, SHIFT, ID])}
    acc = np.asarray(graph_local_accuracy(_fake_apply, stack, x, y, cnt))
    np.testing.assert_allclose(acc[:2], [2 / 3, 0.0], rtol=1e-6)
    # logits_fn gets each client's label-count row: client 0 lacks class 0 -> 0 of 3 correct
    rows = jnp.asarray([[0, 1, 1], [1, 1, 1], [1, 1, 1]], jnp.float32)
    fn = lambda lg, row: lg - 10.0 * (row == 0)
    acc = np.asarray(graph_local_accuracy(_fake_apply, {"w": ID}, x, y, cnt, fn, rows, True))
    np.testing.assert_allclose(acc[:2], [0.0, 1.0], rtol=1e-6)
    # the modality's method (the evaluator's entry point; the eval batch size is ignored)
    acc_m = np.asarray(GraphModality(3).local_accuracy(_fake_apply, {"w": ID}, x, y, cnt, 20, fn,
                                                       rows, True))
    np.testing.assert_array_equal(acc_m, acc)


def test_graph_union_accuracy_pools_test_nodes():
    x, y, _ = _hand_graphs()
    stack = {"w": jnp.stack([ID, SHIFT])}
    acc = np.asarray(jax.jit(lambda p: graph_union_accuracy(_fake_apply, p, x, y))(stack))
    # 5 test nodes in all; identity model: 2 + 2 correct; shifted: client 0 node 1 only
    np.testing.assert_allclose(acc, [4 / 5, 1 / 5], rtol=1e-6)
    acc1 = np.asarray(graph_union_accuracy(_fake_apply, stack, x, y, 1))
    np.testing.assert_allclose(acc1, acc)  # model_chunk does not change the result
    acc_m = np.asarray(GraphModality(3).union_accuracy(_fake_apply, stack, x, y, 20, 1))
    np.testing.assert_allclose(acc_m, acc)  # the modality's method, eval batch size ignored


# --------------------------------------------------------------------------- synthetic graph
def _synthetic_graph(n=60, k=3, f=6, seed=0):
    """Two-community-ish random graph whose features are noisy one-hot labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n).astype(np.int32)
    x = (np.eye(k)[y] @ rng.standard_normal((k, f)) + 0.3 * rng.standard_normal((n, f)))
    src = np.concatenate([np.arange(n - 1), rng.integers(0, n, 2 * n)])
    dst = np.concatenate([np.arange(1, n), rng.integers(0, n, 2 * n)])
    keep = src != dst
    e = np.unique(np.concatenate([np.stack([src[keep], dst[keep]]),
                                  np.stack([dst[keep], src[keep]])], 1), axis=1)
    return Graph(x.astype(np.float32), y, e.astype(np.int32), k, {"name": "synthetic"})


def _fed(graph, num_clients=3):
    clients = gp.partition_graph(graph, num_clients, seed=5, method="bfs")
    padded = gp.pad_clients(clients)
    return clients, padded, graph_fed_arrays(padded, np.ones(num_clients), graph.num_classes)


def test_fed_arrays_splits_and_counts():
    graph = _synthetic_graph()
    clients, padded, d = _fed(graph)
    ty, vy = np.asarray(d.train_y), np.asarray(d.test_y)
    assert d.train_x is d.test_x is d.union_x  # one copy of the graphs on the device
    for i, cg in enumerate(clients):
        k = cg.num_nodes
        np.testing.assert_array_equal(ty[i, :k], np.where(cg.train_mask, cg.y, -1))
        np.testing.assert_array_equal(vy[i, :k], np.where(cg.test_mask, cg.y, -1))
        assert (ty[i, k:] == -1).all() and (vy[i, k:] == -1).all()  # padding
        assert not ((ty[i] >= 0) & (vy[i] >= 0)).any()
        assert int(d.train_count[i]) == cg.train_mask.sum()
        assert int(d.test_count[i]) == cg.test_mask.sum()
        np.testing.assert_array_equal(np.asarray(d.label_counts[i]),
                                      np.bincount(cg.y[cg.train_mask], minlength=3))
    np.testing.assert_array_equal(np.asarray(d.union_y), vy)
    # every labelled LCC node is train, val or test; 40 % train
    n_lcc = sum(c.num_nodes for c in clients)
    assert int(np.sum(np.asarray(d.train_count))) == round(0.4 * n_lcc)
    assert int(np.sum(np.asarray(d.test_count))) == round(0.3 * n_lcc)


def test_ce_sees_train_nodes_only():
    graph = _synthetic_graph()
    clients, padded, d = _fed(graph)
    model = make_gcn(graph.x.shape[1], graph.num_classes, hidden=8, dropout=0.5)
    params = model.init(jax.random.key(0))
    loss = jax.jit(ce_loss(model))
    one = lambda tree, i: jax.tree.map(lambda a: a[i], tree)
    rng = jax.random.key(3)
    base = float(loss(params, one(d.train_x, 0), d.train_y[0], rng))
    # the hand-computed mean CE over client 0's train nodes (same dropout key)
    logits, _ = model.apply(params, one(d.train_x, 0), train=True, rng=rng)
    logp = np.asarray(jax.nn.log_softmax(logits))
    tr = np.flatnonzero(padded.train_mask[0])
    np.testing.assert_allclose(base, -np.mean(logp[tr, padded.labels[0, tr]]), rtol=1e-5)

    def loss_with(labels):
        pg = padded._replace(labels=labels)
        dd = graph_fed_arrays(pg, np.ones(3), graph.num_classes)
        return float(loss(params, one(dd.train_x, 0), dd.train_y[0], rng))

    te = int(np.flatnonzero(padded.test_mask[0])[0])
    lab = padded.labels.copy()
    lab[0, te] = (lab[0, te] + 1) % graph.num_classes
    assert loss_with(lab) == base  # a test node's label is invisible to training
    j = tr[np.argmax(np.ptp(logp[tr], axis=1))]  # a train node whose logits are not all equal
    lab = padded.labels.copy()
    lab[0, j] = int(np.argmin(logp[j])) if lab[0, j] != np.argmin(logp[j]) else int(np.argmax(logp[j]))
    assert abs(loss_with(lab) - base) > 1e-4  # a train node's label is not


# --------------------------------------------------------------------------- configs
def _preset(name):
    return load_script(Path(__file__).resolve().parents[1] / "experiments" / "configs"
                       / f"{name}.py").get_config()


def test_graph_config_validation():
    c = _preset("fedavg_cora")
    C.validate(c)
    assert list(C.assign_budgets(c)) == [1, 1, 1, 0.25, 0.25, 0.25, 0.0625, 0.0625, 0.015625, 0.015625]
    for field, bad in (("union_subset", 100), ("dropout", 1.0), ("graph_partition", "random"),
                       ("graph_split_seed", -2), ("gcn_hidden", 0)):
        c = _preset("fedavg_cora")
        setattr(c, field, bad)
        with pytest.raises(C.ConfigError) as e:
            C.validate(c)
        assert e.value.field == field
    # identical data/clients/rounds/seed across the graph method presets
    keys = ("dataset", "seed", "graph_split_seed", "num_clients", "clients_per_round", "rounds",
            "local_steps", "lr", "weight_decay", "dropout", "budget_levels", "budget_dist")
    ref = _preset("fedavg_cora")
    for name in ("local_cora", "framp_cora", "hybrid_cora", "fiarse_cora", "scalefl_cora",
                 "heterofl_cora", "fedrolex_cora"):
        c = _preset(name)
        # FIARSE refuses weight decay (pruned entries would move and count as trained)
        same = [k for k in keys if not (name == "fiarse_cora" and k == "weight_decay")]
        assert all(c[k] == ref[k] for k in same), name
        assert c.method == {"hybrid": "framp"}.get(name.split("_")[0], name.split("_")[0])


@needs_cora
def test_build_problem_cora_and_citeseer_override():
    from framp_jax.problem import build_problem
    c = _preset("fedavg_cora")
    c.data_dir = str(SHARED)
    p = build_problem(c, verbose=False)
    assert p.info["num_features"] == 1433 and p.ctx.num_classes == 7
    assert p.data.train_x.graphs.nodes.shape[:2] == (10, p.info["n_pad"])
    assert int(jnp.sum(p.data.union_y >= 0)) == p.info["union_size"] == sum(p.info["test_nodes"])
    json.dumps(p.info)  # goes into config.json
    c.dataset = "citeseer"
    p = build_problem(c, verbose=False)
    assert p.info["num_features"] == 3703 and p.ctx.num_classes == 6
    assert p.model.num_classes == 6


@needs_cora
@pytest.mark.parametrize("method", ["fedavg", "local", "framp", "heterofl", "fedrolex", "fiarse",
                                    "scalefl"])
def test_short_cora_run(tmp_path, method):
    """Every method's Cora preset runs (3 short rounds, one compile) and writes its results."""
    from framp_jax.simulate import run
    c = _preset(f"{method}_cora")
    c.data_dir = str(SHARED)
    c.rounds, c.eval_every, c.eval_last, c.local_steps, c.gcn_hidden = 3, 1, 2, 2, 16
    res = run(c, str(tmp_path), progress=False, log=lambda *a: None)
    assert res["compiles"] == 1
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["compiles"] == 1 and on_disk["rounds"] == 3
    assert set(on_disk["final"]["local"]) == {"1", "1/4", "1/16", "1/64", "mean"}
    for split in ("local", "union"):
        for v in on_disk["final"][split].values():
            assert 0.0 <= v <= 1.0
    rows = (tmp_path / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 4  # header + 3 evaluations
    header = rows[0].split(",")
    last = dict(zip(header, rows[-1].split(",")))
    assert int(float(last["union_samples"])) == json.loads(
        (tmp_path / "config.json").read_text())["_resolved"]["data"]["union_size"]
    if method == "fedavg":  # one global model: its union accuracy at budget 1 is a single value
        assert float(last["union/1"]) > 0
    # final = the mean of the last eval_last=2 evaluations (rows of rounds 2 and 3)
    r2, r3 = (dict(zip(header, r.split(","))) for r in rows[-2:])
    for split in ("local", "union"):
        for k, v in on_disk["final"][split].items():
            assert abs(v - (float(r2[f"{split}/{k}"]) + float(r3[f"{split}/{k}"])) / 2) < 1e-6, k
    # the last row summarises results.json's per-client accuracies by budget: local/<s> the
    # mean over the level's clients, local/mean over all clients, union/mean over the levels
    pc = on_disk["per_client"]
    b = np.asarray(pc["budget"], float)
    loc, uni = np.asarray(pc["local"], float), np.asarray(pc["union"], float)
    levels = ((1.0, "1"), (0.25, "1/4"), (0.0625, "1/16"), (1 / 64, "1/64"))
    for s, lab in levels:
        sel = np.isclose(b, s)
        assert abs(float(last[f"local/{lab}"]) - np.nanmean(loc[sel])) < 1e-6, lab
        assert abs(float(last[f"union/{lab}"]) - np.mean(uni[sel])) < 1e-6, lab
    assert abs(float(last["local/mean"]) - np.nanmean(loc)) < 1e-6
    assert abs(float(last["union/mean"]) - np.mean([np.mean(uni[np.isclose(b, s)])
                                                    for s, _ in levels])) < 1e-6
    # what each method evaluates: one model per budget level (the same Union accuracy for the
    # level's clients) for the global-model methods, a model per client for Local (FRAMP's
    # generated GCNs can all still predict one class after 3 rounds, so its per-client models
    # are checked in test_framp.py instead)
    distinct = [len(set(np.round(uni[np.isclose(b, s)], 7).tolist())) for s, _ in levels]
    if method == "local":
        assert max(distinct) > 1, distinct
    elif method != "framp":
        assert distinct == [1, 1, 1, 1], distinct


@needs_cora
@pytest.mark.parametrize("preset", ["framp_cora", "hybrid_cora"])
def test_short_cora_framp_run_with_diagnostics(tmp_path, preset):
    """config.diagnostics on a graph run (union labels are a [clients, nodes] grid): the Union
    split into present/absent classes and the cosines are recorded, for SPEC's FRAMP and for the
    preset (framp.base="fedavg", shared head)."""
    from framp_jax.rundir import read_metrics_csv
    from framp_jax.simulate import run
    c = _preset(preset)
    c.data_dir = str(SHARED)
    c.rounds, c.eval_every, c.local_steps, c.gcn_hidden = 2, 1, 2, 16
    c.diagnostics = True
    assert (c.framp.base == "fedavg") == (preset == "hybrid_cora")
    res = run(c, str(tmp_path), progress=False, log=lambda *a: None)
    assert res["compiles"] == 1
    rows = read_metrics_csv(str(tmp_path / "metrics.csv"))
    assert len(rows) == 2
    for r in rows:
        for name in ("union_present", "union_absent"):
            assert 0.0 <= r[f"diag/{name}/mean"] <= 1.0
        assert -1.0 <= r["diag/cos_same_budget"] <= 1.0 + 1e-6


def test_fedproto_alignment_ignores_unlabelled_nodes():
    """Graph clients' non-train/padding nodes carry label -1: they add nothing to the FedProto
    alignment term and do not count in its denominator (protos[-1] would otherwise pull them to
    the last class's prototype)."""
    from framp_jax.losses import proto_align_fedproto
    f = jnp.asarray([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0], [3.0, 3.0]])
    protos = jnp.asarray([[0.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    valid = jnp.asarray([True, True, True])
    y = jnp.asarray([0, 1, -1, -1])
    # (|[1,0]-[0,0]|^2 + |[0,2]-[0,1]|^2) / (2 labelled nodes x 2 dims)
    np.testing.assert_allclose(float(proto_align_fedproto(f, y, protos, valid)), 2.0 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(proto_align_fedproto(f[:2], y[:2], protos, valid)), 2.0 / 4,
                               rtol=1e-6)
