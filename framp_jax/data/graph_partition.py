"""Disjoint subgraph clients (SPEC.md §2.1): the FED-PUB / FedSheafHN "disjoint" generator.

Steps, as in FedSheafHN ``data/generators/{utils,disjoint}.py``:

1. make the graph undirected (the loaders already store both directions; done again here so any
   edge list works) and keep the **largest connected component** (scipy ``connected_components``);
2. a seeded **random node split** over the LCC: the first ``round(0.4 n)`` nodes of a permutation
   are train, the next ``round(0.3 n)`` test, the rest val (FedSheafHN's order);
   ``np.random.default_rng(seed).permutation`` replaces ``torch.randperm``, so the split is
   deterministic for a seed but not the same nodes as the PyTorch code's;
3. a **METIS** partition of the LCC into ``n`` clients (``pymetis.part_graph`` on the CSR
   adjacency ``xadj``/``adjncy``,
   METIS' own default seed, so deterministic); each client keeps only its **intra-client edges**.

If ``pymetis`` cannot be imported, a deterministic fallback is used and a warning says so:
``method="bfs"``, a seeded BFS-grown balanced partition (each part grows breadth-first from a
random unassigned node until it holds ``ceil(remaining / parts_left)`` nodes, restarting from a
new random node when its frontier runs dry). It gives connected-ish, equal-size parts but larger
cuts than METIS.

FED-PUB/FedSheafHN also row-normalise the features of Cora/CiteSeer/PubMed/Amazon
(``T.NormalizeFeatures``) but not ogbn-arxiv; ``normalize_features="auto"`` does the same
(``True``/``False`` force it).

Then :func:`pad_clients` turns the list into one stacked, padded ``jraph.GraphsTuple`` with a
leading client axis (static shapes for ``jax.vmap``).
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from framp_jax.data.graphs import Graph
from framp_jax.data.locate import InvalidDatasetError

__all__ = [
    "ClientGraph",
    "PaddedGraphs",
    "largest_connected_component",
    "random_node_split",
    "metis_partition",
    "bfs_partition",
    "partition_graph",
    "check_clients",
    "summary",
    "pad_clients",
    "take_client",
]

# FED-PUB applies T.NormalizeFeatures to these (not to ogbn-arxiv; Coauthor is not in FED-PUB).
_ROW_NORMALISED = {"cora", "citeseer", "pubmed", "amazon_photo", "amazon_computers"}


class ClientGraph(NamedTuple):
    """One client's subgraph, numpy arrays, local node ids 0..n_i-1."""

    x: np.ndarray  # float32 [n_i, F]
    y: np.ndarray  # int32 [n_i]
    edge_index: np.ndarray  # int32 [2, e_i], local ids, intra-client edges only, both directions
    train_mask: np.ndarray  # bool [n_i]
    val_mask: np.ndarray  # bool [n_i]
    test_mask: np.ndarray  # bool [n_i]
    global_ids: np.ndarray  # int64 [n_i], node ids in the loaded (pre-LCC) graph, ascending
    client_id: int
    num_classes: int

    # the same fields as a whole Graph's, so the same counts (rows of x, columns of edge_index)
    num_nodes = Graph.num_nodes
    num_edges = Graph.num_edges


def _to_csr(edge_index: np.ndarray, n: int) -> sp.csr_matrix:
    """Symmetric 0/1 adjacency without self loops (sorted indices)."""
    src = np.asarray(edge_index[0], np.int64)
    dst = np.asarray(edge_index[1], np.int64)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    rows = np.concatenate([src, dst])
    cols = np.concatenate([dst, src])
    a = sp.csr_matrix((np.ones(rows.shape[0], np.int8), (rows, cols)), shape=(n, n))
    a.sum_duplicates()
    a.data[:] = 1
    a.sort_indices()
    return a


def largest_connected_component(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """Ascending node ids of the largest connected component (ties: the lowest component label)."""
    a = _to_csr(edge_index, num_nodes)
    _, comp = csgraph.connected_components(a, directed=False)
    counts = np.bincount(comp)
    return np.flatnonzero(comp == int(np.argmax(counts)))


def random_node_split(n: int, seed: int, ratio_train: float = 0.4):
    """(train, val, test) boolean masks: perm[:n_tr] train, next round(n (1-r)/2) test, rest val."""
    ratio_test = (1.0 - ratio_train) / 2.0
    n_train = round(n * ratio_train)
    n_test = round(n * ratio_test)
    perm = np.random.default_rng(seed).permutation(n)
    train, val, test = (np.zeros(n, bool) for _ in range(3))
    train[perm[:n_train]] = True
    test[perm[n_train : n_train + n_test]] = True
    val[perm[n_train + n_test :]] = True
    return train, val, test


def metis_partition(adj: sp.csr_matrix, num_parts: int) -> np.ndarray:
    """METIS k-way membership [n] via pymetis (raises ImportError when pymetis is missing)."""
    import pymetis  # noqa: PLC0415

    if num_parts == 1:
        return np.zeros(adj.shape[0], np.int64)
    xadj = adj.indptr.astype(np.int64)
    adjncy = adj.indices.astype(np.int64)
    if hasattr(pymetis, "CSRAdjacency"):  # pymetis >= 2025.2 (xadj=/adjncy= is deprecated there)
        _, membership = pymetis.part_graph(num_parts, pymetis.CSRAdjacency(xadj, adjncy))
    else:
        _, membership = pymetis.part_graph(num_parts, xadj=xadj, adjncy=adjncy)
    return np.asarray(membership, np.int64)


def bfs_partition(adj: sp.csr_matrix, num_parts: int, seed: int = 0) -> np.ndarray:
    """Deterministic seeded BFS-grown balanced partition (the no-pymetis fallback).

    Part p grows breadth-first over unassigned nodes from a random unassigned start until it
    holds ``ceil(remaining / parts_left)`` nodes; when its frontier empties it restarts from
    another random unassigned node. Sizes differ by at most one.
    """
    n = adj.shape[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)  # restart candidates, in a seeded random order
    member = np.full(n, -1, np.int64)
    indptr, indices = adj.indptr, adj.indices
    cursor = 0
    remaining = n
    for p in range(num_parts):
        target = math.ceil(remaining / (num_parts - p))
        size = 0
        queue: list[int] = []
        head = 0
        while size < target:
            if head == len(queue):  # frontier empty: restart from the next unassigned node
                while member[order[cursor]] != -1:
                    cursor += 1
                start = int(order[cursor])
                member[start] = p
                size += 1
                queue, head = [start], 0
                continue
            u = queue[head]
            head += 1
            for v in indices[indptr[u] : indptr[u + 1]]:
                if size >= target:
                    break
                if member[v] == -1:
                    member[v] = p
                    size += 1
                    queue.append(int(v))
        remaining -= size
    return member


def _row_normalise(x: np.ndarray) -> np.ndarray:
    s = x.sum(axis=1, keepdims=True)
    return (x / np.where(s == 0, 1, s)).astype(np.float32)


def partition_graph(
    graph: Graph,
    num_clients: int,
    *,
    seed: int = 123,
    ratio_train: float = 0.4,
    method: str = "metis",
    normalize_features: bool | str = "auto",
) -> list[ClientGraph]:
    """Split ``graph`` into ``num_clients`` disjoint subgraph clients (SPEC §2.1).

    Args:
      graph: a :class:`framp_jax.data.graphs.Graph`.
      num_clients: number of METIS parts (10 or 20 in FedSheafHN).
      seed: seeds the node split (and the BFS fallback); FedSheafHN's generator used 123.
      ratio_train: train fraction; test and val each get half of the rest.
      method: ``"metis"`` (falls back to ``"bfs"`` with a warning when pymetis is missing) or
        ``"bfs"``.
      normalize_features: ``"auto"`` row-normalises as FED-PUB does (Cora, CiteSeer, Amazon);
        ``True``/``False`` force it.

    Returns: a list of :class:`ClientGraph`, client ``i`` = METIS part ``i``. Nodes whose label is
    negative (unlabelled) are in no mask.
    """
    if num_clients < 1:
        raise ValueError("num_clients must be >= 1")
    n_all = graph.num_nodes
    lcc = largest_connected_component(graph.edge_index, n_all)
    n = lcc.shape[0]
    if n < num_clients:
        raise InvalidDatasetError(
            f"{graph.info.get('name', 'the graph')} cannot be split into num_clients="
            f"{num_clients} clients: its largest connected component has {n} nodes, fewer than "
            "the clients; lower config.num_clients")
    # relabel to LCC-local ids and keep only edges inside the LCC
    local = np.full(n_all, -1, np.int64)
    local[lcc] = np.arange(n)
    src, dst = local[graph.edge_index[0]], local[graph.edge_index[1]]
    keep = (src >= 0) & (dst >= 0)
    adj = _to_csr(np.stack([src[keep], dst[keep]]), n)

    train, val, test = random_node_split(n, seed, ratio_train)
    y = graph.y[lcc].astype(np.int32)
    labelled = y >= 0
    train, val, test = train & labelled, val & labelled, test & labelled

    if method == "metis":
        try:
            member = metis_partition(adj, num_clients)
        except ImportError:
            warnings.warn(
                "pymetis is not importable: partitioning with the deterministic seeded BFS-grown "
                "balanced fallback (method='bfs') instead of METIS. Client subgraphs differ from "
                "the FED-PUB/FedSheafHN ones and cut more edges. `pip install pymetis` to fix.",
                RuntimeWarning,
                stacklevel=2,
            )
            print("WARNING: pymetis unavailable; using the seeded BFS balanced partition fallback.")
            member = bfs_partition(adj, num_clients, seed)
    elif method == "bfs":
        member = bfs_partition(adj, num_clients, seed)
    else:
        raise ValueError(f"unknown partition method {method!r} (metis | bfs)")
    if len(np.unique(member)) != num_clients:
        raise InvalidDatasetError(
            f"{graph.info.get('name', 'the graph')} cannot be split into num_clients="
            f"{num_clients} clients with graph_partition={method}: the partition has "
            f"{len(np.unique(member))} non-empty parts; lower config.num_clients")

    if normalize_features == "auto":
        normalize_features = str(graph.info.get("name", "")).lower() in _ROW_NORMALISED
    coo = adj.tocoo()
    e_src, e_dst = coo.row.astype(np.int64), coo.col.astype(np.int64)  # sorted by (row, col)
    same = member[e_src] == member[e_dst]
    e_src, e_dst = e_src[same], e_dst[same]
    e_part = member[e_src]
    pos = np.empty(n, np.int64)  # a node's index inside its own client
    clients = []
    for c in range(num_clients):
        nodes = np.flatnonzero(member == c)  # ascending LCC ids
        pos[nodes] = np.arange(nodes.shape[0])
        sel = e_part == c
        ei = np.stack([pos[e_src[sel]], pos[e_dst[sel]]]).astype(np.int32)
        gids = lcc[nodes]
        x = graph.x[gids]
        if normalize_features:
            x = _row_normalise(x)
        clients.append(
            ClientGraph(
                x=np.ascontiguousarray(x, dtype=np.float32),
                y=y[nodes],
                edge_index=ei,
                train_mask=train[nodes],
                val_mask=val[nodes],
                test_mask=test[nodes],
                global_ids=gids.astype(np.int64),
                client_id=c,
                num_classes=int(graph.num_classes),
            )
        )
    return clients


def check_clients(clients: Sequence[ClientGraph], name: str, ratio_train: float,
                  method: str) -> None:
    """Every client needs train, validation and test nodes (the image data's rule: a client
    without test nodes has no Local accuracy, and one without train nodes trains on nothing);
    :class:`InvalidDatasetError` (a one-line ``DataError``) naming the clients, the split and
    the fields to change otherwise."""
    splits = (("test", "test_mask"), ("train", "train_mask"), ("validation", "val_mask"))
    for what, mask in splits:
        counts = np.array([int(np.sum(getattr(c, mask))) for c in clients])
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            shown = ", ".join(str(int(i)) for i in empty[:8]) + (
                f", ... ({empty.size} in all)" if empty.size > 8 else "")
            rest = (1.0 - ratio_train) / 2
            raise InvalidDatasetError(
                f"{name} cannot be split into num_clients={len(clients)} clients with "
                f"graph_partition={method} and graph_ratio_train={ratio_train:g}: client(s) "
                f"{shown} have no {what} nodes ({int(counts.sum())} {what} nodes in all; each "
                f"node is train/test/validation with probability {ratio_train:g}/{rest:g}/"
                f"{rest:g}); every client needs train, validation and test nodes: lower "
                "config.num_clients or " + ("raise" if what == "train" else "lower")
                + " config.graph_ratio_train")


def summary(clients: Sequence[ClientGraph], name: str = "") -> str:
    """A printable table: nodes, edges (directed entries), classes present, train/val/test nodes."""
    head = f"{name}: " if name else ""
    tot_n = sum(c.num_nodes for c in clients)
    tot_e = sum(c.num_edges for c in clients)
    lines = [
        f"{head}{len(clients)} clients, {tot_n} nodes, {tot_e} intra-client edge entries "
        f"({tot_e // 2} undirected), {clients[0].num_classes if clients else 0} classes",
        f"{'client':>6} {'nodes':>7} {'edges':>8} {'classes':>7} {'train':>6} {'val':>6} {'test':>6}",
    ]
    for c in clients:
        present = len(np.unique(c.y[c.y >= 0]))
        lines.append(
            f"{c.client_id:>6} {c.num_nodes:>7} {c.num_edges:>8} {present:>7} "
            f"{int(c.train_mask.sum()):>6} {int(c.val_mask.sum()):>6} {int(c.test_mask.sum()):>6}"
        )
    ns = [c.num_nodes for c in clients]
    es = [c.num_edges for c in clients]
    if clients:
        lines.append(f"nodes/client {min(ns)}..{max(ns)}, edge entries/client {min(es)}..{max(es)}")
    return "\n".join(lines)


class PaddedGraphs(NamedTuple):
    """All clients as one stacked, padded ``jraph.GraphsTuple`` (leading axis = client).

    ``graphs`` leaves: ``nodes`` [C, n_pad, F] float32 (padding rows 0), ``senders``/``receivers``
    [C, e_pad] int32 (padding edges are self edges of node ``n_pad - 1``, always a padding node),
    ``n_node`` [C, 2] = (real, padding) nodes, ``n_edge`` [C, 2] = (real, padding) edges,
    ``edges`` and ``globals`` None. jraph's convention holds per client: the last graph is the
    padding graph. ``n_pad >= max n_i + 1`` so every client has at least one padding node.
    """

    graphs: object  # jraph.GraphsTuple with a leading client axis on every leaf
    labels: np.ndarray  # int32 [C, n_pad] (0 on padding and unlabelled nodes)
    node_mask: np.ndarray  # bool [C, n_pad]: real nodes
    train_mask: np.ndarray  # bool [C, n_pad]
    val_mask: np.ndarray  # bool [C, n_pad]
    test_mask: np.ndarray  # bool [C, n_pad]
    global_ids: np.ndarray  # int64 [C, n_pad], -1 on padding
    num_nodes: np.ndarray  # int32 [C]
    num_edges: np.ndarray  # int32 [C]
    num_classes: int

    @property
    def num_clients(self) -> int:
        return int(self.labels.shape[0])


def pad_clients(
    clients: Sequence[ClientGraph], n_pad: int | None = None, e_pad: int | None = None
) -> PaddedGraphs:
    """Pad every client to ``n_pad`` nodes / ``e_pad`` edges and stack along a client axis.

    Defaults: ``n_pad = max n_i + 1`` and ``e_pad = max(max e_i, 1)``. Larger values may be passed
    (e.g. to share shapes with held-out clients). Arrays are numpy; ``jax.device_put`` them (or
    let jit do it). No jraph helper that still calls the removed ``jax.tree_map`` is used.
    """
    import jraph  # noqa: PLC0415

    if not clients:
        raise ValueError("no clients to pad")
    need_n = max(c.num_nodes for c in clients) + 1
    need_e = max(max(c.num_edges for c in clients), 1)
    n_pad = need_n if n_pad is None else int(n_pad)
    e_pad = need_e if e_pad is None else int(e_pad)
    if n_pad < need_n or e_pad < need_e:
        raise ValueError(f"n_pad/e_pad must be at least {need_n}/{need_e}, got {n_pad}/{e_pad}")
    C = len(clients)
    F = clients[0].x.shape[1]
    nodes = np.zeros((C, n_pad, F), np.float32)
    senders = np.full((C, e_pad), n_pad - 1, np.int32)
    receivers = np.full((C, e_pad), n_pad - 1, np.int32)
    labels = np.zeros((C, n_pad), np.int32)
    node_mask, train, val, test = (np.zeros((C, n_pad), bool) for _ in range(4))
    gids = np.full((C, n_pad), -1, np.int64)
    nn = np.array([c.num_nodes for c in clients], np.int32)
    ne = np.array([c.num_edges for c in clients], np.int32)
    for i, c in enumerate(clients):
        k, e = c.num_nodes, c.num_edges
        nodes[i, :k] = c.x
        senders[i, :e] = c.edge_index[0]
        receivers[i, :e] = c.edge_index[1]
        labels[i, :k] = np.maximum(c.y, 0)
        node_mask[i, :k] = True
        train[i, :k], val[i, :k], test[i, :k] = c.train_mask, c.val_mask, c.test_mask
        gids[i, :k] = c.global_ids
    graphs = jraph.GraphsTuple(
        nodes=nodes,
        edges=None,
        senders=senders,
        receivers=receivers,
        globals=None,
        n_node=np.stack([nn, n_pad - nn], axis=1).astype(np.int32),
        n_edge=np.stack([ne, e_pad - ne], axis=1).astype(np.int32),
    )
    return PaddedGraphs(
        graphs=graphs,
        labels=labels,
        node_mask=node_mask,
        train_mask=train,
        val_mask=val,
        test_mask=test,
        global_ids=gids,
        num_nodes=nn,
        num_edges=ne,
        num_classes=int(clients[0].num_classes),
    )


def take_client(padded: PaddedGraphs, i: int) -> PaddedGraphs:
    """Client ``i`` of a stacked :class:`PaddedGraphs` (leaves indexed with ``jax.tree.map``)."""
    import jax  # noqa: PLC0415

    leaves = {k: getattr(padded, k) for k in PaddedGraphs._fields if k != "num_classes"}
    sliced = jax.tree.map(lambda a: a[i], leaves)
    return PaddedGraphs(**sliced, num_classes=padded.num_classes)
