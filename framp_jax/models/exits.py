"""Early-exit networks with a width factor and a depth (number of exits), for ScaleFL.

Two families, both following ScaleFL's conventions (git-disl/scale-fl ``models/resnet.py``,
``models/model_utils.py``):

- ``make_resnet18_exits``: the post-activation static-BN ResNet-18 of SPEC §2.4 (the one in
  ``models/resnet.py``) with early exits after stage 1, 2 and 3, each a global average pool +
  Linear (SPEC §4.3's ResNet-18 adaptation; ScaleFL's own 3-conv exit heads would dominate the
  small levels). Exit 4 is the network's own classifier.
- ``make_cnn_exits``: the small CNN of ``models/cnn.py`` with exits after the conv1 and conv2
  blocks (global average pool + Linear); exit 3 is the network's dense + classifier head.
- ``make_gcn_exits``: the 2-layer GCN of ``models/gcn.py`` (the graph analogue, issue 6) with an
  exit after layer 1 (a Linear head on layer 1's node embeddings, as ``make_gcn(early_exit=True)``);
  exit 2 is the network's classifier. Its "image shape" is ``(in_dim,)``.

``width`` scales every hidden width to ``max(1, int(width · C))`` (floor, as ScaleFL's
``int(16 * scale)``); the classifiers keep all outputs. A ``Scaler`` divides the output of every
hidden conv/dense layer by ``width`` in training *and* evaluation (ScaleFL ``Scaler``: no
train-only switch, unlike HeteroFL); in the ResNet it sits between conv and BN as in ScaleFL's
``BasicBlock`` (the 1x1 shortcut has none), in the CNN between the (conv + bias) and the ReLU.
``exits`` = h: the model holds only the layers up to its deepest exit h and the heads of exits
1..h, so a level's params are a genuinely smaller pytree.

Every leaf of a (width, exits) model is the *prefix* ``[:s0, :s1, ...]`` of the same leaf of the
full model (first channels; the CNN's dense kernel is stored as ``[H', W', C3, hidden]``, with
H', W' the size after three flooring 2x2 pools, so that its flattened input stays a prefix too): ``extract`` gathers a level's params from the
global model and ``embed_sum`` scatters them back for aggregation.

``apply(params, x, train, rng) -> (logits, features)`` follows the Model contract with the
deepest available exit; ``apply_exits(params, x, train, rng)`` returns every exit's logits,
shallowest first.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from framp_jax.models.layers import (batch_norm, conv2d, he_normal, max_pool2, resolve_conv_impl,
                                     uniform_fan_in)

RESNET_STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
MAX_EXITS = {"resnet18": 4, "cnn": 3, "gcn": 2}  # exits of each family's full-depth model


class ExitModel(NamedTuple):
    """``models.base.Model``'s fields (same order) plus the early-exit extras."""
    name: str
    init: Callable
    apply: Callable
    prunable: Callable
    feature_dim: int
    num_classes: int
    apply_exits: Callable        # (params, x, *, train, rng) -> [logits of exit 1..h]
    num_exits: int               # h: exits this model holds
    max_exits: int               # exits of the full-depth model
    width: float


def scaled(c: int, width: float) -> int:
    """ScaleFL's hidden width: ``int(scale · C)`` (floor), at least 1."""
    return max(1, int(width * c))


def _check(width, exits, max_exits):
    if not (0 < width <= 1):
        raise ValueError(f"width={width!r}: a width factor lies in (0, 1]")
    if not (isinstance(exits, int) and 1 <= exits <= max_exits):
        raise ValueError(f"exits={exits!r}: the number of exits lies in 1..{max_exits}")


def _scaler(width):
    # ScaleFL models/resnet.py: Scaler(scale) if scale < 1 else nn.Identity(), used in train and eval
    return (lambda h: h / width) if width < 1 else (lambda h: h)


def _linear(key, cin, k):
    kk, kb = jax.random.split(key)
    return {"kernel": uniform_fan_in(kk, (cin, k), cin), "bias": uniform_fan_in(kb, (k,), cin)}


def _head(p, h):
    feats = jnp.mean(h, axis=(1, 2))
    return feats @ p["kernel"] + p["bias"], feats


def _prunable(params):
    """Conv/linear kernels and the exits' (classifiers') biases; BN scale/offset and the hidden
    conv/dense biases of the CNN are not (as in ``models/resnet.py`` and ``models/cnn.py``)."""
    def flag(path, _):
        layer, leaf = path[0].key, path[-1].key
        return leaf == "kernel" or (leaf == "bias" and (layer == "classifier" or layer.startswith("exit")))
    return jax.tree_util.tree_map_with_path(flag, params)


def _image_appliers(forward):
    """``apply`` (the deepest exit's ``(logits, features)``) and ``apply_exits`` (every exit's
    logits, shallowest first) of an image exit model whose ``forward(params, x)`` returns the
    ``(logits, features)`` of each exit; ``train`` and ``rng`` are unused (no dropout, static
    BN)."""
    def apply(params, x, *, train: bool = False, rng=None):
        del train, rng
        return forward(params, x)[-1]

    def apply_exits(params, x, *, train: bool = False, rng=None):
        del train, rng
        return [lg for lg, _ in forward(params, x)]

    return apply, apply_exits


def make_resnet18_exits(num_classes: int, image_shape=(32, 32, 3), width: float = 1.0,
                        exits: int = 4, conv_impl: str = "auto") -> ExitModel:
    _check(width, exits, MAX_EXITS["resnet18"])
    impl = resolve_conv_impl(conv_impl)
    cin = image_shape[-1]
    widths = [scaled(c, width) for c, _ in RESNET_STAGES]
    n_stages = exits  # exit j sits after stage j; exit 4 is the final classifier
    sc = _scaler(width)

    def _bn(c):
        return {"scale": jnp.ones((c,), jnp.float32), "offset": jnp.zeros((c,), jnp.float32)}

    def init(key):
        # one fixed key per leaf position, whatever (width, exits): a level's init has the same
        # structure as the prefix of the full model's (values are never used: levels are
        # gathered from the global model)
        k = lambda *ix: jax.random.fold_in(key, sum(v * 16 ** n for n, v in enumerate(ix)))
        params = {"stem": {"kernel": he_normal(k(0), (3, 3, cin, widths[0]), 9 * cin)},
                  "stem_bn": _bn(widths[0])}
        c_prev = widths[0]
        for s in range(n_stages):
            c, stride = widths[s], RESNET_STAGES[s][1]
            for b in range(2):
                st = stride if b == 0 else 1
                blk = {"conv1": {"kernel": he_normal(k(s, b, 1), (3, 3, c_prev, c), 9 * c_prev)},
                       "bn1": _bn(c),
                       "conv2": {"kernel": he_normal(k(s, b, 2), (3, 3, c, c), 9 * c)},
                       "bn2": _bn(c)}
                if st != 1 or c_prev != c:
                    blk["shortcut"] = {"kernel": he_normal(k(s, b, 3), (1, 1, c_prev, c), c_prev)}
                    blk["shortcut_bn"] = _bn(c)
                params[f"layer{s + 1}_{b}"] = blk
                c_prev = c
            name = "classifier" if s == 3 else f"exit{s + 1}"
            params[name] = _linear(k(s, 9), c, num_classes)
        return params

    def forward(params, x):
        bn = lambda h, p: batch_norm(h, p["scale"], p["offset"])
        h = jax.nn.relu(bn(sc(conv2d(x, params["stem"]["kernel"], 1, impl)), params["stem_bn"]))
        outs = []
        for s in range(n_stages):
            stride = RESNET_STAGES[s][1]
            for b in range(2):
                blk = params[f"layer{s + 1}_{b}"]
                st = stride if b == 0 else 1
                out = jax.nn.relu(bn(sc(conv2d(h, blk["conv1"]["kernel"], st, impl)), blk["bn1"]))
                out = bn(sc(conv2d(out, blk["conv2"]["kernel"], 1, impl)), blk["bn2"])
                r = h
                if "shortcut" in blk:  # ScaleFL BasicBlock: shortcut conv + BN, no Scaler
                    r = bn(conv2d(h, blk["shortcut"]["kernel"], st, impl), blk["shortcut_bn"])
                h = jax.nn.relu(out + r)
            outs.append(_head(params["classifier" if s == 3 else f"exit{s + 1}"], h))
        return outs

    apply, apply_exits = _image_appliers(forward)
    return ExitModel(f"resnet18_exits(w={width},h={exits})", init, apply, _prunable,
                     widths[n_stages - 1], num_classes, apply_exits, exits,
                     MAX_EXITS["resnet18"], width)


def make_cnn_exits(num_classes: int, image_shape=(32, 32, 3), channels=(16, 32, 64), hidden=128,
                   width: float = 1.0, exits: int = 3, conv_impl: str = "auto") -> ExitModel:
    from framp_jax.models.cnn import pooled_size

    _check(width, exits, MAX_EXITS["cnn"])
    impl = resolve_conv_impl(conv_impl)
    (fh, fw), cin = pooled_size(image_shape, 3), image_shape[-1]
    chans = [scaled(c, width) for c in channels]
    hid = scaled(hidden, width)
    n_conv = exits  # exit j (j < 3) after conv block j; exit 3 = conv3 block + dense + classifier
    sc = _scaler(width)

    def init(key):
        k = lambda *ix: jax.random.fold_in(key, sum(v * 16 ** n for n, v in enumerate(ix)))
        params, c_prev = {}, cin
        for i in range(n_conv):
            c = chans[i]
            params[f"conv{i + 1}"] = {"kernel": uniform_fan_in(k(i, 0), (3, 3, c_prev, c), 9 * c_prev),
                                      "bias": jnp.zeros((c,), jnp.float32)}
            if i < 2:
                params[f"exit{i + 1}"] = _linear(k(i, 1), c, num_classes)
            c_prev = c
        if exits == 3:
            flat = fh * fw * chans[2]
            params["dense"] = {"kernel": uniform_fan_in(k(3, 0), (fh, fw, chans[2], hid), flat),
                               "bias": jnp.zeros((hid,), jnp.float32)}
            params["classifier"] = _linear(k(4, 0), hid, num_classes)
        return params

    def forward(params, x):
        outs = []
        for i in range(n_conv):
            p = params[f"conv{i + 1}"]
            x = max_pool2(jax.nn.relu(sc(conv2d(x, p["kernel"], 1, impl) + p["bias"])))
            if i < 2:
                outs.append(_head(params[f"exit{i + 1}"], x))
        if exits == 3:
            d = params["dense"]
            feats = jax.nn.relu(sc(jnp.einsum("bhwc,hwcd->bd", x, d["kernel"]) + d["bias"]))
            c = params["classifier"]
            outs.append((feats @ c["kernel"] + c["bias"], feats))
        return outs

    apply, apply_exits = _image_appliers(forward)
    fdim = hid if exits == 3 else chans[exits - 1]
    return ExitModel(f"cnn_exits(w={width},h={exits})", init, apply, _prunable, fdim, num_classes,
                     apply_exits, exits, MAX_EXITS["cnn"], width)


def make_gcn_exits(num_classes: int, in_dim: int, hidden: int = 128, width: float = 1.0,
                   exits: int = 2, dropout: float = 0.5) -> ExitModel:
    """The GCN of ``models/gcn.py`` at hidden width ``int(width · hidden)`` with ``exits`` (1 or
    2) exits: exit 1 = Linear on layer 1's output (after ReLU and dropout), exit 2 = conv2 +
    ReLU + dropout + classifier. ScaleFL's Scaler divides each conv's output by ``width`` (train
    and eval), before the ReLU. Features (``apply``'s second output) are the deepest hidden
    embedding the level holds (before dropout)."""
    from framp_jax.models.gcn import _glorot, gcn_layers

    _check(width, exits, MAX_EXITS["gcn"])
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    hid = scaled(int(hidden), width)
    sc = _scaler(width)

    def init(key):
        k = lambda i: jax.random.fold_in(key, i)
        lin = lambda i, a, b: {"kernel": _glorot(k(i), (a, b), jnp.float32),
                               "bias": jnp.zeros((b,), jnp.float32)}
        params = {"conv1": lin(0, in_dim, hid), "exit1": lin(1, hid, num_classes)}
        if exits == 2:
            params["conv2"] = lin(2, hid, hid)
            params["classifier"] = lin(3, hid, num_classes)
        return params

    def forward(params, graph, train, rng):
        layers = gcn_layers(params, graph, train=train, rng=rng, dropout=dropout, scale=sc, depth=exits)
        dense = lambda h, p: h @ p["kernel"] + p["bias"]
        heads = ("exit1", "classifier")
        return [(dense(h, params[heads[i]]), f) for i, (f, h) in enumerate(layers)]

    def apply(params, graph, *, train: bool = False, rng=None):
        return forward(params, graph, train, rng)[-1]

    def apply_exits(params, graph, *, train: bool = False, rng=None):
        return [lg for lg, _ in forward(params, graph, train, rng)]

    def prunable(params):  # as models/gcn.py: the conv biases are not prunable
        return {n: {k: k == "kernel" or not n.startswith("conv") for k in p} for n, p in params.items()}

    return ExitModel(f"gcn_exits(w={width},h={exits})", init, apply, prunable, hid, num_classes,
                     apply_exits, exits, MAX_EXITS["gcn"], width)


def make_exits_model(model: str, num_classes: int, image_shape, width: float, exits: int,
                     conv_impl: str = "auto", *, hidden: int = 128, dropout: float = 0.5) -> ExitModel:
    """The (width, exits) model of ``model``; for ``"gcn"`` ``image_shape`` is ``(in_dim,)`` and
    ``hidden``/``dropout`` are the GCN's."""
    if model == "resnet18":
        return make_resnet18_exits(num_classes, image_shape, width, exits, conv_impl)
    if model == "cnn":
        return make_cnn_exits(num_classes, image_shape, width=width, exits=exits, conv_impl=conv_impl)
    if model == "gcn":
        return make_gcn_exits(num_classes, int(image_shape[0]), hidden, width, exits, dropout)
    raise ValueError(f"model={model!r}: early-exit variants exist for 'resnet18', 'cnn' and 'gcn'")


# ---------------------------------------------------------------------------------------------
# Prefix gather / scatter between a level's pytree and the global one.

def param_shapes(m: ExitModel) -> Any:
    """The level's params as a pytree of ShapeDtypeStruct (no compute)."""
    return jax.eval_shape(m.init, jax.random.key(0))


def num_params(m: ExitModel, prunable_only: bool = False) -> int:
    """Parameter count; ``prunable_only`` counts the leaves a budget measures (kernels and
    classifier biases, as ``masks.topk_mask`` does: SPEC §4.3's fractions are over these)."""
    shapes = param_shapes(m)
    flags = jax.tree.leaves(m.prunable(shapes)) if prunable_only else None
    leaves = jax.tree.leaves(shapes)
    return int(sum(math.prod(s.shape) for i, s in enumerate(leaves) if flags is None or flags[i]))


def extract(global_params, shapes):
    """The level's params: for every leaf the level holds, the first ``shape`` entries of the
    global leaf along every axis (ScaleFL ``get_downscale_index``: the kept channels are the first
    ``int(scale · C)``)."""
    if isinstance(shapes, dict):
        return {k: extract(global_params[k], v) for k, v in shapes.items()}
    return global_params[tuple(slice(0, s) for s in shapes.shape)]


def embed_sum(global_like, level_tree, fill=0.0):
    """Scatter a level pytree into the global structure: every leaf the level holds becomes a
    zero-padded (global-shape) array, every leaf it does not hold is ``fill``. Used to sum
    client parameters and coverage counts entry by entry."""
    def rec(g, l):
        if isinstance(g, dict):
            return {k: rec(g[k], l[k] if (l is not None and k in l) else None) for k in g}
        if l is None:
            return jnp.full(g.shape, fill, g.dtype)
        return jnp.pad(l, [(0, gs - ls) for gs, ls in zip(g.shape, l.shape)])
    return rec(global_like, level_tree)
