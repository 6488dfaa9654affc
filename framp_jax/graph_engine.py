"""Subgraph federated learning: graph datasets as framp_jax clients (SPEC §2.1, §2.3, §2.6).

``build_graph_problem(c)`` loads one whole graph (``c.dataset``), cuts it into ``c.num_clients``
disjoint subgraph clients with :func:`framp_jax.data.graph_partition.partition_graph` (largest
connected component, seeded 40/30/30 random node split, METIS, intra-client edges only), pads
them to one static shape and builds the same :class:`~framp_jax.simulate.Problem` the vision
path builds, so every method written against ``Context``/``FedData`` runs unchanged:

- ``train_x`` = ``test_x`` = ``union_x`` = one :class:`GraphClients` pytree (the stacked padded
  ``jraph.GraphsTuple`` plus the real-node mask), leading axis = client. The three fields are the
  *same* device arrays (no copies: Coauthor Physics' dense features alone are ~1.2 GB).
- ``train_y`` = node labels on train nodes, ``-1`` everywhere else (val, test, padding), so the
  cross-entropy (``losses.cross_entropy`` ignores labels < 0) only sees train nodes.
  ``train_count`` = train nodes per client.
- ``test_y`` = ``union_y`` = labels on test nodes, ``-1`` elsewhere; ``test_count`` = test nodes.
- ``label_counts`` = train-node class counts; ``budgets`` from ``config.assign_budgets``.

Local training is full batch (``LocalConfig.full_batch``: every local step is one epoch over the
client's whole subgraph, ``local_steps`` = local epochs) with Adam and L2 weight decay
(FedSheafHN's client recipe, SPEC §2.3).

Evaluation (SPEC §2.6): :func:`graph_local_accuracy` = model i on client i's test nodes;
:func:`graph_union_accuracy` = each model on every client's subgraph, correct test nodes pooled
over all clients and divided by the total number of test nodes. They replace ``eval.py``'s
batched image versions through ``Problem.eval_fns`` and keep their signatures (``mean``, ``std``
and ``batch`` are accepted and unused: a graph is evaluated whole).
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import config as C
from framp_jax.algorithms.base import Context, FedData

__all__ = [
    "GraphClients",
    "graph_fed_arrays",
    "graph_local_accuracy",
    "graph_union_accuracy",
    "build_graph_problem",
]


class GraphClients(NamedTuple):
    """Stacked padded client subgraphs (a pytree; leading axis = client when stacked).

    ``framp_jax.models.gcn.graph_arrays`` reads it directly (``graphs`` + ``node_mask``), so
    ``model.apply(params, GraphClients_of_one_client, ...)`` works as is.
    """

    graphs: Any       # jraph.GraphsTuple: nodes [C, n_pad, F] f32 (or SparseFeatures), senders/receivers [C, e_pad]
    node_mask: Any    # bool [C, n_pad]: real (non-padding) nodes


SPARSE_MAX_DENSITY = 0.05


def choose_features(mode: str, entries: int, nonzero: int) -> str:
    """"dense" or "sparse" for ``graph_features=mode``, given the number of ``entries`` of the
    stacked dense client features and how many are ``nonzero``.

    ``auto`` picks coordinate lists when under 5% of the features are nonzero: the bag-of-words
    graphs here (Cora 1.3%, CiteSeer 0.9%, Coauthor CS 0.9%, Physics 0.4%), not the Amazon ones
    (~35%). ``benchmarks/bench_graph_features.py`` measures the two side by side."""
    if mode != "auto":
        return mode
    return "sparse" if nonzero < SPARSE_MAX_DENSITY * entries else "dense"


def graph_fed_arrays(padded, budgets, num_classes: int, features: str = "dense") -> FedData:
    """FedData (device arrays) from a :class:`~framp_jax.data.graph_partition.PaddedGraphs`.

    Labels outside a split are ``-1``: ``train_y`` keeps train nodes only, ``test_y`` (= ``union_y``)
    test nodes only. The graph arrays are put on the device once and shared by the train, test
    and union fields. ``features="sparse"`` stores the node features as
    :class:`~framp_jax.models.gcn.SparseFeatures` (zero-valued padding entries at each client's
    last, padding node).
    """
    labels = np.asarray(padded.labels, np.int32)
    train_m = np.asarray(padded.train_mask, bool)
    test_m = np.asarray(padded.test_mask, bool)
    train_y = np.where(train_m, labels, -1).astype(np.int32)
    test_y = np.where(test_m, labels, -1).astype(np.int32)
    n = labels.shape[0]
    lc = np.zeros((n, num_classes), np.float32)
    for i in range(n):
        lc[i] = np.bincount(labels[i][train_m[i]], minlength=num_classes)[:num_classes]
    g = padded.graphs
    if features == "sparse":
        from framp_jax.models.gcn import sparse_features
        sf = sparse_features(g.nodes)
        nodes = jax.tree.map(jnp.asarray, sf)
    elif features == "dense":
        nodes = jnp.asarray(g.nodes)
    else:
        raise ValueError(f"features={features!r}: 'dense' or 'sparse'")
    graphs = g._replace(nodes=nodes, senders=jnp.asarray(g.senders),
                        receivers=jnp.asarray(g.receivers), n_node=jnp.asarray(g.n_node),
                        n_edge=jnp.asarray(g.n_edge))
    x = GraphClients(graphs, jnp.asarray(padded.node_mask, bool))
    test_y_dev = jnp.asarray(test_y)
    return FedData(
        train_x=x, train_y=jnp.asarray(train_y), train_count=jnp.asarray(train_m.sum(1), jnp.int32),
        test_x=x, test_y=test_y_dev, test_count=jnp.asarray(test_m.sum(1), jnp.int32),
        budgets=jnp.asarray(budgets, jnp.float32), label_counts=jnp.asarray(lc),
        union_x=x, union_y=test_y_dev)


def _correct(apply_fn, params, graph, y, logits_fn=None):
    """Correctly classified labelled nodes (y >= 0) of one subgraph, eval mode."""
    logits, _ = apply_fn(params, graph, train=False)
    if logits_fn is not None:
        logits = logits_fn(logits)
    return jnp.sum((jnp.argmax(logits, -1) == y) & (y >= 0)).astype(jnp.int32)


def graph_local_accuracy(apply_fn, params_stack, test_x, test_y, test_count, mean=None, std=None,
                         batch=None, logits_fn=None, label_counts=None, shared_params=False):
    """Accuracy of model i on client i's own test nodes (``test_y >= 0``), vmapped over clients.

    Same contract as :func:`framp_jax.eval.local_accuracy`: ``params_stack`` and the test arrays
    share the leading client axis unless ``shared_params`` (one model for all clients);
    ``logits_fn(logits, label_counts_row)`` optionally transforms a client's logits; clients
    without test nodes get NaN. ``mean``/``std``/``batch`` are unused (graphs are evaluated whole).
    """
    n = test_y.shape[0]
    lc = label_counts if label_counts is not None else jnp.zeros((n, 1))

    def one(p, g, y, row):
        f = None if logits_fn is None else (lambda lg: logits_fn(lg, row))
        return _correct(apply_fn, p, g, y, f)

    correct = jax.vmap(one, in_axes=(None if shared_params else 0, 0, 0, 0))(
        params_stack, test_x, test_y, lc)
    return jnp.where(test_count > 0, correct / jnp.maximum(test_count, 1), jnp.nan)


def graph_union_accuracy(apply_fn, params_stack, union_x, union_y, mean=None, std=None, batch=None,
                         model_chunk=None):
    """Union accuracy of each model of the stack (SPEC §2.6, graph): the model runs on every
    client's subgraph, and its correct test nodes are pooled over all subgraphs and divided by the
    total number of test nodes (``union_y >= 0``). ``lax.map`` over models (``model_chunk`` at a
    time), ``vmap`` over subgraphs."""
    total = jnp.maximum(jnp.sum(union_y >= 0), 1)

    def per_model(p):
        return jnp.sum(jax.vmap(lambda g, y: _correct(apply_fn, p, g, y))(union_x, union_y))

    correct = jax.lax.map(per_model, params_stack, batch_size=model_chunk)
    return correct / total


def _split_seed(c) -> int:
    return int(c.seed) if int(c.graph_split_seed) < 0 else int(c.graph_split_seed)


def build_graph_problem(c, verbose: bool = True):
    """Load, partition and pad ``c.dataset``; return a :class:`framp_jax.simulate.Problem`."""
    from framp_jax.client import LocalConfig
    from framp_jax.data import graph_partition as gp
    from framp_jax.data.graphs import load_graph
    from framp_jax.models.gcn import make_gcn
    from framp_jax.simulate import Problem, make_mesh

    t0 = time.time()
    graph = load_graph(str(c.dataset), c.data_dir or None)
    in_dim, k = int(graph.x.shape[1]), int(graph.num_classes)
    split_seed = _split_seed(c)
    clients = gp.partition_graph(graph, c.num_clients, seed=split_seed,
                                 ratio_train=float(c.graph_ratio_train), method=str(c.graph_partition))
    ginfo = {key: graph.info[key] for key in ("name", "file", "sha256") if key in graph.info}
    n_all = graph.num_nodes
    del graph  # the per-client copies are all that is needed from here on
    text = gp.summary(clients, str(c.dataset))
    padded = gp.pad_clients(clients)
    del clients
    budgets = C.assign_budgets(c)
    nodes = padded.graphs.nodes
    features = choose_features(str(c.graph_features), nodes.size, int(np.count_nonzero(nodes)))
    data = graph_fed_arrays(padded, budgets, k, features)
    n_pad, e_pad = int(padded.labels.shape[1]), int(padded.graphs.senders.shape[1])
    num_nodes, num_edges = padded.num_nodes.tolist(), padded.num_edges.tolist()
    del padded
    if verbose:
        print(f"graph data ready in {time.time() - t0:.1f} s (n_pad={n_pad}, e_pad={e_pad}, "
              f"{in_dim} features ({features}), {k} classes)")

    model = make_gcn(in_dim, k, hidden=int(c.gcn_hidden), dropout=float(c.dropout))
    held = np.concatenate(C.heldout_ids(c)) if c.heldout_frac > 0 else np.zeros((0,), int)
    train_ids = np.setdiff1d(np.arange(c.num_clients), held)
    local = LocalConfig(steps=c.local_steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, grad_clip=c.grad_clip, augment=False,
                        full_batch=True, optimizer="adam")
    ctx = Context(c, model, c.num_clients, k, budgets, train_ids, c.clients_per_round, local,
                  make_mesh(c))
    train_count = np.asarray(data.train_count)
    test_count = np.asarray(data.test_count)
    info = dict(ginfo)
    info.update(num_classes=k, num_features=in_dim, graph_nodes=int(n_all),
                client_nodes=num_nodes, client_edge_entries=num_edges,
                train_nodes=train_count.tolist(), test_nodes=test_count.tolist(),
                union_size=int(test_count.sum()), n_pad=n_pad, e_pad=e_pad,
                split_seed=split_seed, partition=str(c.graph_partition), features=features,
                heldout_ids=held.tolist())
    text += "\nbudgets per client: " + " ".join(f"{i}:{b:g}" for i, b in enumerate(budgets))
    return Problem(c, data, model, ctx, info, text,
                   eval_fns=(graph_local_accuracy, graph_union_accuracy))
