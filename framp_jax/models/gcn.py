"""Two-layer GCN (Kipf & Welling) for subgraph clients, SPEC.md §2.4.

``GCNConv(in->h) -> ReLU -> dropout -> GCNConv(h->h) -> ReLU -> [features] -> dropout ->
Linear(h->K)``, with ``GCNConv(X) = Â X W + b`` and ``Â = D^-1/2 (A + I) D^-1/2`` (PyG's
``gcn_norm``: degrees counted at the receiver, one self loop per node).

The graph is anything with ``nodes`` [N, F], ``senders`` [E], ``receivers`` [E] (a
``jraph.GraphsTuple`` or any NamedTuple with those fields; ``n_node`` is not needed), or a
``ClientGraph`` (``x``, ``edge_index``). Shapes are static, so ``apply`` jits and vmaps over a
stacked padded batch (``framp_jax.data.graph_partition.pad_clients``).

Padding. ``pad_clients`` points every padding edge at a padding node, so no padding edge touches
a real node: a real node's neighbours, degree and output are exactly those of the unpadded
graph whatever the padding nodes hold. With ``node_mask`` (the ``node_mask=`` keyword, or a
``node_mask`` field on the graph) padding nodes and every edge touching one also get zero weight
(padding nodes then output the bias only), which keeps their values small and bounded.

Params: ``{"conv1": {"kernel", "bias"}, "conv2": {...}, "classifier": {...}}`` (+ ``"exit1"``
with ``early_exit=True``); Glorot-uniform kernels, zero biases. Prunable: all kernels and the
classifier/exit biases; the GCN conv biases are not (SPEC §1.5).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.models.base import Model
from framp_jax.width import SpecBuilder, WidthSpec, width_of

__all__ = ["make_gcn", "make_gcn_width", "gcn_normalization", "graph_arrays", "SparseFeatures",
           "sparse_features", "feature_matmul", "gcn_spec", "family"]

FEATURE_UNITS = ("conv2",)  # the classifier's input in gcn_spec

_glorot = jax.nn.initializers.glorot_uniform()


@jax.tree_util.register_pytree_node_class
class SparseFeatures:
    """Node features as coordinate lists (``nodes`` of a graph whose features are mostly zero).

    ``rows``/``cols``/``vals`` [..., nnz_pad]: entry (rows[k], cols[k]) of the [num_nodes,
    num_features] matrix holds vals[k]; padding entries hold 0 (any row/col). ``num_nodes`` and
    ``num_features`` are static (pytree aux data), so a client-stacked SparseFeatures vmaps and
    jits like the dense array it replaces. ``feature_matmul`` computes X @ W as a gather of W's
    rows and a segment sum: O(nnz · h) instead of O(num_nodes · num_features · h).
    """

    def __init__(self, rows, cols, vals, num_nodes: int, num_features: int):
        self.rows, self.cols, self.vals = rows, cols, vals
        self.num_nodes, self.num_features = int(num_nodes), int(num_features)

    def tree_flatten(self):
        return (self.rows, self.cols, self.vals), (self.num_nodes, self.num_features)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def shape(self):
        """As the dense array's: leading (client) axes, then (num_nodes, num_features)."""
        return tuple(self.rows.shape[:-1]) + (self.num_nodes, self.num_features)

    def todense(self):
        """The dense [num_nodes, num_features] matrix (one client; tests and small graphs)."""
        out = jnp.zeros((self.num_nodes, self.num_features), jnp.float32)
        return out.at[self.rows, self.cols].add(self.vals)


def sparse_features(x, pad_row: int | None = None, nnz_pad: int | None = None) -> SparseFeatures:
    """Coordinate lists of dense features ``x`` [C, N, F] (stacked clients) or [N, F], padded to
    a common ``nnz_pad`` (default: the largest client's count) with zero entries at row
    ``pad_row`` (default N - 1), column 0. numpy in, numpy leaves out."""
    x = np.asarray(x, np.float32)
    stacked = x.ndim == 3
    xs = x if stacked else x[None]
    c, n, f = xs.shape
    nz = [np.nonzero(xi) for xi in xs]
    need = max(1, max(r.shape[0] for r, _ in nz))
    nnz_pad = need if nnz_pad is None else int(nnz_pad)
    if nnz_pad < need:
        raise ValueError(f"nnz_pad={nnz_pad} < {need} nonzero features of the largest client")
    pad_row = n - 1 if pad_row is None else int(pad_row)
    rows = np.full((c, nnz_pad), pad_row, np.int32)
    cols = np.zeros((c, nnz_pad), np.int32)
    vals = np.zeros((c, nnz_pad), np.float32)
    for i, (r, cc) in enumerate(nz):
        k = r.shape[0]
        rows[i, :k], cols[i, :k], vals[i, :k] = r, cc, xs[i][r, cc]
    if not stacked:
        rows, cols, vals = rows[0], cols[0], vals[0]
    return SparseFeatures(rows, cols, vals, n, f)


def feature_matmul(h, kernel):
    """``h @ kernel`` for dense ``h`` [N, F] or one client's :class:`SparseFeatures`."""
    if isinstance(h, SparseFeatures):
        msg = kernel[h.cols] * h.vals[:, None]
        return jax.ops.segment_sum(msg, h.rows, num_segments=h.num_nodes)
    return h @ kernel


def graph_arrays(graph: Any):
    """(nodes [N, F], senders [E], receivers [E], node_mask [N] or None) of a graph-like object."""
    if hasattr(graph, "graphs") and hasattr(graph, "node_mask"):  # one client of a PaddedGraphs
        g = graph.graphs
        return g.nodes, g.senders, g.receivers, graph.node_mask
    if hasattr(graph, "nodes"):
        nodes, senders, receivers = graph.nodes, graph.senders, graph.receivers
    elif hasattr(graph, "x") and hasattr(graph, "edge_index"):
        nodes, senders, receivers = graph.x, graph.edge_index[0], graph.edge_index[1]
    else:
        raise TypeError(f"cannot read nodes/senders/receivers from {type(graph).__name__}")
    return nodes, senders, receivers, getattr(graph, "node_mask", None)


def gcn_normalization(senders, receivers, num_nodes: int, node_mask=None):
    """Coefficients of Â = D^-1/2 (A + I) D^-1/2 as (edge_coef [E], self_coef [N]).

    ``Â X`` is ``segment_sum(edge_coef * X[senders], receivers) + self_coef * X``. With a
    ``node_mask``, edges touching a masked node and masked nodes' self loops weigh 0.
    """
    e = senders.shape[0]
    if node_mask is None:
        w_edge = jnp.ones((e,), jnp.float32)
        w_self = jnp.ones((num_nodes,), jnp.float32)
    else:
        m = jnp.asarray(node_mask).astype(jnp.float32)
        w_edge = m[senders] * m[receivers]
        w_self = m
    deg = jax.ops.segment_sum(w_edge, receivers, num_segments=num_nodes) + w_self
    dinv = jnp.where(deg > 0, jax.lax.rsqrt(jnp.maximum(deg, 1e-12)), 0.0)
    edge_coef = dinv[senders] * w_edge * dinv[receivers]
    self_coef = dinv * dinv * w_self
    return edge_coef, self_coef


def _propagate(h, senders, receivers, edge_coef, self_coef):
    msg = h[senders] * edge_coef[:, None]
    return jax.ops.segment_sum(msg, receivers, num_segments=h.shape[0]) + h * self_coef[:, None]


def _dropout(x, rate: float, key):
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def gcn_dims(model) -> tuple[int, int]:
    """(input features, hidden width) of a GCN ``Model``, from its parameter shapes (no compute)."""
    in_dim, hidden = jax.eval_shape(model.init, jax.random.key(0))["conv1"]["kernel"].shape
    return int(in_dim), int(hidden)


def gcn_layers(params, graph, *, train: bool, rng, dropout: float, node_mask=None,
               scale=None, depth: int = 2):
    """The GCN convolutions ``conv1..conv<depth>`` of ``params`` on ``graph``: per layer
    ``(f, h)`` with ``f = relu(scale(Â h_prev W + b))`` and ``h`` = ``f`` after dropout (train
    mode only). ``scale`` (default identity) is ScaleFL's Scaler for ``models/exits.py``; one
    dropout key per layer from ``rng`` (``train=True`` with ``dropout > 0`` needs it)."""
    nodes, senders, receivers, graph_mask = graph_arrays(graph)
    if node_mask is None:
        node_mask = graph_mask
    h = nodes if isinstance(nodes, SparseFeatures) else jnp.asarray(nodes, jnp.float32)
    edge_coef, self_coef = gcn_normalization(senders, receivers, h.shape[0], node_mask)
    use_dropout = train and dropout > 0.0
    if use_dropout and rng is None:
        raise ValueError("apply(train=True) with dropout > 0 needs rng")
    keys = jax.random.split(rng, 2) if use_dropout else None
    out = []
    for i in range(depth):
        p = params[f"conv{i + 1}"]
        z = _propagate(feature_matmul(h, p["kernel"]), senders, receivers, edge_coef, self_coef) + p["bias"]
        f = jax.nn.relu(z if scale is None else scale(z))
        h = _dropout(f, dropout, keys[i]) if use_dropout else f
        out.append((f, h))
    return out


def make_gcn(
    in_dim: int,
    num_classes: int,
    hidden: int = 128,
    dropout: float = 0.5,
    *,
    early_exit: bool = False,
) -> Model:
    """The 2-layer GCN target model (SPEC §2.4; P = 38 184 for in 128, hidden 128, K 40).

    ``apply(params, graph, *, train=False, rng=None, node_mask=None, return_exit1=False)``
    returns ``(logits [N, K], features [N, hidden])``; with ``return_exit1=True`` (params must
    hold ``"exit1"``, i.e. ``early_exit=True``) it returns ``(logits, features, exit1_logits)``,
    where ``exit1`` is a linear head on layer 1's hidden output (after ReLU and dropout), for the
    ScaleFL-style graph analogue. ``train=True`` with ``dropout > 0`` needs ``rng``.
    """
    in_dim, num_classes, hidden = int(in_dim), int(num_classes), int(hidden)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")

    def init(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        params = {
            "conv1": {"kernel": _glorot(k1, (in_dim, hidden), jnp.float32), "bias": jnp.zeros((hidden,), jnp.float32)},
            "conv2": {"kernel": _glorot(k2, (hidden, hidden), jnp.float32), "bias": jnp.zeros((hidden,), jnp.float32)},
            "classifier": {
                "kernel": _glorot(k3, (hidden, num_classes), jnp.float32),
                "bias": jnp.zeros((num_classes,), jnp.float32),
            },
        }
        if early_exit:
            params["exit1"] = {
                "kernel": _glorot(k4, (hidden, num_classes), jnp.float32),
                "bias": jnp.zeros((num_classes,), jnp.float32),
            }
        return params

    def apply(params, graph, *, train: bool = False, rng=None, node_mask=None, return_exit1: bool = False):
        (_, h1), (features, h2) = gcn_layers(params, graph, train=train, rng=rng, dropout=dropout,
                                             node_mask=node_mask)
        logits = h2 @ params["classifier"]["kernel"] + params["classifier"]["bias"]
        if return_exit1:
            if "exit1" not in params:
                raise ValueError("return_exit1=True needs params with 'exit1' (make_gcn(..., early_exit=True))")
            exit1 = h1 @ params["exit1"]["kernel"] + params["exit1"]["bias"]
            return logits, features, exit1
        return logits, features

    def prunable(params):
        def layer(name, p):
            conv = name.startswith("conv")
            return {k: (k == "kernel") or not conv for k in p}

        return {name: layer(name, p) for name, p in params.items()}

    name = f"gcn(h={hidden}{',exit1' if early_exit else ''})"
    return Model(name, init, apply, prunable, hidden, num_classes)


def make_gcn_width(in_dim: int, num_classes: int, hidden: int, dropout: float = 0.5, *, early_exit: bool = False) -> Model:
    """``make_gcn`` at another hidden width (width-scaled baselines: HeteroFL, FedRolex, ScaleFL)."""
    return make_gcn(in_dim, num_classes, hidden=hidden, dropout=dropout, early_exit=early_exit)


# ---------------------------------------------------------------------------------------------
# channel structure (framp_jax.width) and the model family

def gcn_spec() -> WidthSpec:
    """:func:`make_gcn`'s units: the two hidden widths (conv1 out / conv2 in, conv2 out /
    classifier in); node features and classes are never cut."""
    s = SpecBuilder()
    h1 = s.unit("conv1")
    s.out(("conv1", "kernel"), 1, h1)
    s.vec(("conv1",), h1, ("bias",))
    s.inp(("conv2", "kernel"), 0, h1)
    h2 = s.unit("conv2")
    s.out(("conv2", "kernel"), 1, h2)
    s.vec(("conv2",), h2, ("bias",))
    s.inp(("classifier", "kernel"), 0, h2)
    return s.build()


def family(num_classes: int, input_shape, *, hidden: int = 128, dropout: float = 0.5,
           compute_dtype: str = "float32"):
    """The GCN's :class:`~framp_jax.models.family.ModelFamily` for ``input_shape = (in_dim,)``:
    ``make(r)`` = :func:`make_gcn` at hidden width ``width_of(hidden, r)`` (``make(1.0)`` is
    ``make_gcn(in_dim, K, hidden, dropout)``), ``make_exits`` = ``exits.make_gcn_exits``; no
    pre-activation variant. The GCN computes in float32 only (never wrapped): another
    ``compute_dtype`` raises ValueError."""
    from framp_jax.models import exits as E
    from framp_jax.models.family import ModelFamily, per_width, per_width_exits

    if compute_dtype != "float32":
        raise ValueError(f"compute_dtype={compute_dtype!r}: the GCN computes in 'float32' only "
                         "(bfloat16 is for the image models)")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 1:
        raise ValueError(f"input_shape={tuple(input_shape)}: the GCN takes (in_dim,)")
    in_dim, k, hidden, dropout = shape[0], int(num_classes), int(hidden), float(dropout)
    return ModelFamily(
        name="gcn",
        make=per_width(lambda r: make_gcn_width(in_dim, k, width_of(hidden, r), dropout)),
        width_spec=gcn_spec(),
        feature_units=FEATURE_UNITS,
        make_exits=per_width_exits(lambda w, h: E.make_gcn_exits(k, in_dim, hidden, w, h,
                                                                 dropout)),
        max_exits=E.MAX_EXITS["gcn"],
        make_preact=None,
        preact_spec=None,
        input_shape=shape)
