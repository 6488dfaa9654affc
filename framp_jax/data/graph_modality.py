"""The graph modality (:class:`GraphModality`): subgraph clients (SPEC §2.1, §2.3, §2.6).

A client's ``x`` is its padded subgraph, a :class:`GraphClients` pytree (the stacked padded
``jraph.GraphsTuple`` plus the real-node mask), leading axis = client when stacked:

- ``train_x`` = ``test_x`` = ``union_x`` = the *same* device arrays (no copies: Coauthor
  Physics' dense features alone are ~1.2 GB);
- ``train_y`` = node labels on train nodes, ``-1`` everywhere else (val, test, padding), so the
  cross-entropy (``losses.cross_entropy`` ignores labels < 0) only sees train nodes;
  ``train_count`` = train nodes per client;
- ``test_y`` = ``union_y`` = labels on test nodes, ``-1`` elsewhere; ``test_count`` = test nodes.

Local training is full batch: every local step is one epoch over the client's whole subgraph
(``local_steps`` = local epochs). Evaluation (SPEC §2.6): Local = model i on client i's test
nodes; Union = each model on every client's subgraph, correct test nodes pooled over all clients
and divided by the total number of test nodes.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.algorithms.base import FedData

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
    test nodes only, ``val_y`` (= ``union_val_y``) validation nodes only. The graph arrays are put on the device once and shared by the train, test
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
    val_m = np.asarray(padded.val_mask, bool)
    val_y = jnp.asarray(np.where(val_m, labels, -1).astype(np.int32))
    return FedData(
        train_x=x, train_y=jnp.asarray(train_y), train_count=jnp.asarray(train_m.sum(1), jnp.int32),
        test_x=x, test_y=test_y_dev, test_count=jnp.asarray(test_m.sum(1), jnp.int32),
        budgets=jnp.asarray(budgets, jnp.float32), label_counts=jnp.asarray(lc),
        union_x=x, union_y=test_y_dev,
        val_x=x, val_y=val_y, val_count=jnp.asarray(val_m.sum(1), jnp.int32),
        union_val_x=x, union_val_y=val_y)


def _correct(apply_fn, params, graph, y, logits_fn=None):
    """Correctly classified labelled nodes (y >= 0) of one subgraph, eval mode."""
    logits, _ = apply_fn(params, graph, train=False)
    if logits_fn is not None:
        logits = logits_fn(logits)
    return jnp.sum((jnp.argmax(logits, -1) == y) & (y >= 0)).astype(jnp.int32)


def graph_local_accuracy(apply_fn, params_stack, test_x, test_y, test_count, logits_fn=None,
                         label_counts=None, shared_params=False):
    """Accuracy of model i on client i's own test nodes (``test_y >= 0``), vmapped over clients.

    ``params_stack`` and the test arrays share the leading client axis unless ``shared_params``
    (one model for all clients); ``logits_fn(logits, label_counts_row)`` optionally transforms a
    client's logits; clients without test nodes get NaN.
    """
    n = test_y.shape[0]
    lc = label_counts if label_counts is not None else jnp.zeros((n, 1))

    def one(p, g, y, row):
        f = None if logits_fn is None else (lambda lg: logits_fn(lg, row))
        return _correct(apply_fn, p, g, y, f)

    correct = jax.vmap(one, in_axes=(None if shared_params else 0, 0, 0, 0))(
        params_stack, test_x, test_y, lc)
    return jnp.where(test_count > 0, correct / jnp.maximum(test_count, 1), jnp.nan)


def graph_union_accuracy(apply_fn, params_stack, union_x, union_y, model_chunk=None):
    """Union accuracy of each model of the stack (SPEC §2.6, graph): the model runs on every
    client's subgraph, and its correct test nodes are pooled over all subgraphs and divided by the
    total number of test nodes (``union_y >= 0``). ``lax.map`` over models (``model_chunk`` at a
    time), ``vmap`` over subgraphs."""
    total = jnp.maximum(jnp.sum(union_y >= 0), 1)

    def per_model(p):
        return jnp.sum(jax.vmap(lambda g, y: _correct(apply_fn, p, g, y))(union_x, union_y))

    correct = jax.lax.map(per_model, params_stack, batch_size=model_chunk)
    return correct / total


def graph_union_class_correct(apply_fn, params_stack, union_x, union_y, num_classes: int,
                              model_chunk=None):
    """Correct test nodes (``union_y >= 0``) of each model of the stack, pooled over every
    client's subgraph as in :func:`graph_union_accuracy`, per true class: int32
    ``[M, num_classes]``."""
    def one(p, g, y):
        logits, _ = apply_fn(p, g, train=False)
        hit = (jnp.argmax(logits, -1) == y) & (y >= 0)
        return jnp.sum(jax.nn.one_hot(y, num_classes, dtype=jnp.int32)
                       * hit[:, None].astype(jnp.int32), 0)

    def per_model(p):
        return jnp.sum(jax.vmap(lambda g, y: one(p, g, y))(union_x, union_y), 0)

    return jax.lax.map(per_model, params_stack, batch_size=model_chunk)


class GraphModality(NamedTuple):
    """Subgraph clients (see the module docstring). ``in_dim`` = node feature size."""
    in_dim: int

    name = "graph"

    def input_shape(self, x) -> tuple:
        return (self.in_dim,)

    def epoch_perms(self, key, count, x, local):
        return None

    def train_batch(self, key, x, y, count, step, local, perms=None):
        """The whole padded subgraph; labels < 0 mark the nodes the loss ignores."""
        return x, y

    def last_epoch_steps(self, count, local):
        """A full-batch step is an epoch."""
        return jnp.ones((), jnp.int32)

    def head(self, x, y, count, n: int):
        """A subgraph is used whole (``n`` is ignored)."""
        return x, y, count

    def prepare(self, x, key=None):
        return x

    def class_prototypes(self, apply_fn, params, x, y, count, num_classes: int, batch: int = 100):
        """One eval-mode pass over the whole subgraph; labels < 0 (non-train nodes) are left out."""
        _, f = apply_fn(params, x, train=False)
        oh = jax.nn.one_hot(y, num_classes, dtype=f.dtype)  # all-zero rows for y < 0
        counts = oh.sum(0)
        return (oh.T @ f) / jnp.maximum(counts, 1.0)[:, None], counts

    def local_accuracy(self, apply_fn, params_stack, x, y, count, batch, logits_fn=None,
                       label_counts=None, shared_params=False):
        return graph_local_accuracy(apply_fn, params_stack, x, y, count, logits_fn, label_counts,
                                    shared_params)

    def union_accuracy(self, apply_fn, params_stack, x, y, batch, model_chunk=None):
        return graph_union_accuracy(apply_fn, params_stack, x, y, model_chunk)

    def union_class_correct(self, apply_fn, params_stack, x, y, batch, num_classes,
                            model_chunk=None):
        return graph_union_class_correct(apply_fn, params_stack, x, y, num_classes, model_chunk)
