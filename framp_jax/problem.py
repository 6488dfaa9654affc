"""From a validated config to a :class:`Problem`: the data loaded, partitioned and stacked on the
device (:class:`~framp_jax.algorithms.base.FedData`), its modality, the model family and the
:class:`~framp_jax.algorithms.base.Context` a method factory gets. One builder per modality
(:func:`build_image_problem`, :func:`build_graph_problem`); :func:`build_problem` picks it.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import config as C
from framp_jax.algorithms.base import Context, FedData
from framp_jax.client import LocalConfig
from framp_jax.errors import DataError


class Problem(NamedTuple):
    """Everything built from a config before the first round."""
    config: Any
    data: FedData
    model: Any
    ctx: Context
    info: dict
    summary: str


def make_mesh(c):
    """The ``clients`` device mesh of ``config.mesh_clients`` devices (None for one device)."""
    n_dev = len(jax.devices())
    n = n_dev if c.mesh_clients == 0 else c.mesh_clients
    if n == 1:
        return None
    if n > n_dev:
        raise C.ConfigError("mesh_clients", c.mesh_clients, f"at most the {n_dev} available devices")
    if c.clients_per_round % n:
        raise C.ConfigError("clients_per_round", c.clients_per_round,
                            f"a multiple of the {n} devices on the 'clients' mesh axis")
    from jax.sharding import AxisType
    return jax.make_mesh((n,), ("clients",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def _train_ids(c):
    held = np.concatenate(C.heldout_ids(c)) if c.heldout_frac > 0 else np.zeros((0,), int)
    return held, np.setdiff1d(np.arange(c.num_clients), held)


def make_context(c, family, modality, num_classes, budgets, train_ids, local) -> Context:
    return Context(model=family.make(1.0), family=family, modality=modality,
                   num_clients=c.num_clients, num_classes=num_classes, budgets=budgets,
                   budget_levels=tuple(float(b) for b in c.budget_levels), train_ids=train_ids,
                   clients_per_round=c.clients_per_round, local=local, seed=int(c.seed),
                   rounds=int(c.rounds), client_map=c.get("client_map", "auto"),
                   mesh=make_mesh(c))


def build_problem(c, verbose=True) -> Problem:
    """Load data, partition, stack client arrays on the device and build the model/context."""
    C.validate(c)
    if str(c.dataset) in C.GRAPH_DATASETS:
        return build_graph_problem(c, verbose)
    return build_image_problem(c)


def build_image_problem(c) -> Problem:
    from framp_jax.data.clients import label_counts, stack_clients, summary, validation_split
    from framp_jax.data.image_modality import ImageModality
    from framp_jax.data.partition import partition_vision
    from framp_jax.data.vision import get_normalization, load_vision_dataset
    from framp_jax.models.family import model_family

    ds = load_vision_dataset(c.dataset, c.data_dir or None)
    try:  # data-dependent limits (e.g. more clients than test samples): one line, not a trace
        part = partition_vision(ds.y_train, ds.y_test, c.num_clients, c.partition, c.alpha,
                                c.seed, c.test_prior, c.classes_per_client, ds.num_classes)
        # each client's share of validation data, cut from its training data (val_frac)
        train_ids, val_ids = validation_split(ds.y_train, part.train, float(c.val_frac), c.seed)
        tr = stack_clients(ds.x_train, ds.y_train, train_ids)
        te = stack_clients(ds.x_test, ds.y_test, part.test)
        va = None
        if c.val_frac > 0:
            empty = [i for i, v in enumerate(val_ids) if len(v) == 0]
            if empty:
                raise ValueError(f"val_frac={c.val_frac} leaves client(s) {empty[:5]} without "
                                 "validation samples (too few training samples); raise "
                                 "val_frac or lower num_clients")
            va = stack_clients(ds.x_train, ds.y_train, val_ids)
    except ValueError as e:
        raise DataError(f"{c.dataset} ({ds.info.get('file')}) cannot be split into "
                        f"num_clients={c.num_clients} clients with partition={c.partition}: "
                        f"{e}") from e
    lc_train = label_counts(ds.y_train, train_ids, ds.num_classes)
    lc_test = label_counts(ds.y_test, part.test, ds.num_classes)
    budgets = C.assign_budgets(c)
    union_idx = np.sort(np.concatenate([np.asarray(i) for i in part.test]))
    mean, std = get_normalization(str(c.dataset), ds.x_train.shape[-1])
    data = FedData(
        train_x=jnp.asarray(tr.x), train_y=jnp.asarray(tr.y, jnp.int32),
        train_count=jnp.asarray(tr.count, jnp.int32),
        test_x=jnp.asarray(te.x), test_y=jnp.asarray(te.y, jnp.int32),
        test_count=jnp.asarray(te.count, jnp.int32),
        budgets=jnp.asarray(budgets, jnp.float32),
        label_counts=jnp.asarray(lc_train, jnp.float32),
        union_x=jnp.asarray(ds.x_test[union_idx]), union_y=jnp.asarray(ds.y_test[union_idx], jnp.int32))
    if va is not None:
        val_union = np.sort(np.concatenate(val_ids))
        data = data._replace(
            val_x=jnp.asarray(va.x), val_y=jnp.asarray(va.y, jnp.int32),
            val_count=jnp.asarray(va.count, jnp.int32),
            union_val_x=jnp.asarray(ds.x_train[val_union]),
            union_val_y=jnp.asarray(ds.y_train[val_union], jnp.int32))
    modality = ImageModality(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                             augment=bool(c.augment))
    family = model_family(c.model, ds.num_classes, ds.x_train.shape[1:], conv_impl=c.conv_impl,
                          compute_dtype=c.get("compute_dtype", "float32"))
    held, train_ids = _train_ids(c)
    local = LocalConfig(steps=c.local_steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, grad_clip=c.grad_clip,
                        min_count=int(np.min(tr.count)), modality=modality)
    ctx = make_context(c, family, modality, ds.num_classes, budgets, train_ids, local)
    info = dict(ds.info)
    info.update(num_classes=ds.num_classes, union_size=int(len(union_idx)),
                heldout_ids=held.tolist(), val_frac=float(c.val_frac),
                val_size=int(sum(len(v) for v in val_ids)), test_size=int(len(ds.y_test)))
    text = summary(lc_train, lc_test, budgets)
    return Problem(c, data, ctx.model, ctx, info, text)


def _split_seed(c) -> int:
    return int(c.seed) if int(c.graph_split_seed) < 0 else int(c.graph_split_seed)


def build_graph_problem(c, verbose: bool = True) -> Problem:
    """Load one whole graph (``c.dataset``), cut it into ``c.num_clients`` disjoint subgraph
    clients (:func:`framp_jax.data.graph_partition.partition_graph`: largest connected component,
    seeded random node split, METIS or BFS, intra-client edges only), pad them to one static
    shape and stack them (:func:`framp_jax.data.graph_modality.graph_fed_arrays`). Clients train
    full batch with Adam and L2 weight decay (FedSheafHN's client recipe, SPEC §2.3)."""
    from framp_jax.data import graph_partition as gp
    from framp_jax.data.graph_modality import GraphModality, choose_features, graph_fed_arrays
    from framp_jax.data.graphs import load_graph
    from framp_jax.models.family import model_family

    t0 = time.time()
    graph = load_graph(str(c.dataset), c.data_dir or None)
    in_dim, k = int(graph.x.shape[1]), int(graph.num_classes)
    split_seed = _split_seed(c)
    clients = gp.partition_graph(graph, c.num_clients, seed=split_seed,
                                 ratio_train=float(c.graph_ratio_train), method=str(c.graph_partition))
    gp.check_clients(clients, str(c.dataset), float(c.graph_ratio_train), str(c.graph_partition))
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

    modality = GraphModality(in_dim)
    family = model_family("gcn", k, (in_dim,), gcn_hidden=int(c.gcn_hidden),
                          dropout=float(c.dropout))
    held, train_ids = _train_ids(c)
    local = LocalConfig(steps=c.local_steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, grad_clip=c.grad_clip, optimizer="adam",
                        modality=modality)
    ctx = make_context(c, family, modality, k, budgets, train_ids, local)
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
    return Problem(c, data, ctx.model, ctx, info, text)


def build_algorithm(ctx: Context, c):
    """The config's method built on ``ctx`` with its resolved options."""
    from framp_jax.algorithms.registry import resolve
    method, opts = resolve(c)
    return method.factory(ctx, opts)
