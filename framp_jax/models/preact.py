"""HeteroFL's models: the pre-activation ResNet-18 and a small-CNN analogue, with Scaler and
static BN whose evaluation statistics come from a server pass (sBN).

Pre-activation ResNet-18 (HeteroFL ``src/models/resnet.py``; SPEC §4.1):

* stem conv 3x3 (no bias, no norm), stages [2, 2, 2, 2] with widths ``ceil(r·[64,128,256,512])``
  and strides 1/2/2/2;
* block: ``out = relu(n1(scaler(x)))``; ``shortcut = conv1x1(out)`` when the shape changes, else
  ``x``; ``out = conv2(relu(n2(scaler(conv1(out))))) + shortcut``;
* head: ``relu(n4(scaler(out)))`` → global average pool [features] → linear.
* Init as PyTorch + HeteroFL ``init_param``: conv/linear weights ``U(±1/sqrt(fan_in))``, linear
  bias 0, BN scale 1 and offset 0.

Small CNN analogue (CPU presets): the layout of ``models/cnn.py`` with ``Scaler`` + BN after each
conv, as HeteroFL's ``src/models/conv.py`` block ``conv → scaler → norm → relu → pool``:
``[conv3x3(+bias) → scaler → BN → ReLU → pool] x3 → flatten → dense → ReLU [features] → linear``.

**Scaler** (HeteroFL ``src/modules/modules.py``): ``x / rate`` in training only, identity in
evaluation; ``rate`` = the model's width relative to the global model.

**BN statistics design.** The trainable params hold only BN ``scale``/``offset``. Running
statistics live in a separate pytree ``bn_stats`` (``{bn path: {"mean": [C], "var": [C]}}``) that
is never trained, pruned or aggregated; the algorithm computes it on the server and passes it to
``apply``:

* ``apply(params, x, train=True)``: BN uses batch statistics (HeteroFL trains with
  ``track_running_stats=False``);
* ``apply(params, x, train=False, bn_stats=S)``: BN normalises with ``S`` (sBN evaluation);
  with ``bn_stats=None`` it falls back to batch statistics (static BN, FedRolex's evaluation);
* ``batch_stats(params, x)``: the per-BN batch mean and *unbiased* variance of one batch, taken
  while propagating with batch statistics as in training (PyTorch's train-mode BN with
  ``momentum=None`` accumulates exactly the cumulative average of these). The Scaler runs as at
  evaluation (identity) so the statistics describe the BN inputs seen at evaluation; in HeteroFL's
  ``stats()`` pass the model has the global rate, whose Scaler is the identity too. (Every
  Scaler is followed by a BN, so in training its factor cancels up to BN's eps.)
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from framp_jax.models.cnn import cnn_like_spec, cnn_widths, pooled_size
from framp_jax.models.layers import conv2d, max_pool2, resolve_conv_impl, uniform_fan_in
from framp_jax.models.resnet import BLOCKS, FIRST_SHORTCUT
from framp_jax.width import BN_KEYS, SpecBuilder, WidthSpec

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
EPS = 1e-5


class SBNModel(NamedTuple):
    """``models.base.Model``'s fields (same order) plus what the width methods need."""
    name: str
    init: Callable
    apply: Callable          # apply(params, x, *, train=False, rng=None, bn_stats=None)
    prunable: Callable
    feature_dim: int
    num_classes: int
    batch_stats: Callable    # batch_stats(params, x) -> bn_stats pytree of one batch
    width_spec: WidthSpec    # channel units (framp_jax.width)
    rate: float              # Scaler rate (width relative to the global model)


def preact_cnn_spec(num_convs: int = 3) -> WidthSpec:
    """:func:`make_preact_cnn`'s units: as ``models.cnn.cnn_spec`` plus each conv's BN vectors."""
    return cnn_like_spec(num_convs, bn=True)


def preact_resnet18_spec() -> WidthSpec:
    """:func:`make_preact_resnet18`'s units (HeteroFL ``src/models/resnet.py``): the stem conv
    (no norm) writes stage 1; a block's ``n1`` normalises its input stream, ``n2`` its inner
    channel; the shortcut conv (first block of stages 2-4) reads the input stream and writes the
    new one; ``n4`` and the classifier read the last stream."""
    s = SpecBuilder()
    stream = s.unit("stage1")
    s.out(("stem", "kernel"), 3, stream)
    for st in range(1, len(STAGES) + 1):
        new_stream = stream if st == 1 else s.unit(f"stage{st}")
        for b in range(BLOCKS):
            name = f"layer{st}_{b}"
            inner = s.unit(f"{name}.conv1")
            s.vec((name, "n1"), stream, BN_KEYS)
            s.inp((name, "conv1", "kernel"), 2, stream)
            s.out((name, "conv1", "kernel"), 3, inner)
            s.vec((name, "n2"), inner, BN_KEYS)
            s.inp((name, "conv2", "kernel"), 2, inner)
            s.out((name, "conv2", "kernel"), 3, new_stream)
            if b == 0 and FIRST_SHORTCUT[st - 1]:
                s.inp((name, "shortcut", "kernel"), 2, stream)
                s.out((name, "shortcut", "kernel"), 3, new_stream)
            stream = new_stream
    s.vec(("n4",), stream, BN_KEYS)
    s.inp(("classifier", "kernel"), 0, stream)
    return s.build()


def _bn_params(c):
    return {"scale": jnp.ones((c,), jnp.float32), "offset": jnp.zeros((c,), jnp.float32)}


def _set_path(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class _Norm:
    """BN + Scaler for one forward pass in one of three modes: ``train`` (scaler on, batch
    stats), ``eval`` (scaler off, running stats if given), ``collect`` (scaler off, batch stats,
    records each BN's batch mean and unbiased variance)."""

    def __init__(self, mode: str, rate: float, stats=None):
        self.mode, self.rate, self.stats = mode, rate, stats
        self.record: dict = {}

    def scale(self, x):
        return x / self.rate if self.mode == "train" else x

    def __call__(self, path, x, p):
        axes = tuple(range(x.ndim - 1))
        dtype, x = x.dtype, x.astype(jnp.float32)  # statistics in float32 (bfloat16 compute)
        if self.mode == "eval" and self.stats is not None:
            s = self.stats
            for k in path:
                s = s[k]
            mean, var = s["mean"], s["var"]
        else:
            mean = jnp.mean(x, axis=axes)
            var = jnp.mean(jnp.square(x - mean), axis=axes)
            if self.mode == "collect":
                n = math.prod(x.shape[:-1])
                _set_path(self.record, path, {"mean": mean, "var": var * (n / max(n - 1, 1))})
        return ((x - mean) * lax.rsqrt(var + EPS) * p["scale"] + p["offset"]).astype(dtype)


def _make(name, init, forward, prunable, feature_dim, num_classes, spec, rate):
    def apply(params, x, *, train: bool = False, rng=None, bn_stats=None):
        del rng
        return forward(params, x, _Norm("train" if train else "eval", rate, bn_stats))

    def batch_stats(params, x):
        norm = _Norm("collect", rate)
        forward(params, x, norm)
        return norm.record

    return SBNModel(name, init, apply, prunable, feature_dim, num_classes, batch_stats, spec, rate)


def _prunable(params):
    # conv/linear kernels and the classifier bias, as the other vision models
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[-1].key == "kernel"
        or (path[0].key == "classifier" and path[-1].key == "bias"), params)


def make_preact_resnet18(num_classes: int, image_shape=(32, 32, 3), width: float = 1.0,
                         rate: float | None = None, conv_impl: str = "auto") -> SBNModel:
    """HeteroFL's pre-activation ResNet-18 at width ``width`` (Scaler rate ``rate``, default
    ``width``: the global model has width 1)."""
    impl = resolve_conv_impl(conv_impl)
    cin = image_shape[-1]
    widths = [max(1, math.ceil(width * c)) for c, _ in STAGES]
    rate = float(width if rate is None else rate)

    def init(key):
        keys = iter(jax.random.split(key, 64))
        conv = lambda shape: uniform_fan_in(next(keys), shape, shape[0] * shape[1] * shape[2])
        params = {"stem": {"kernel": conv((3, 3, cin, widths[0]))}}
        c_prev = widths[0]
        for s, ((_, stride), c) in enumerate(zip(STAGES, widths)):
            for b in range(2):
                st = stride if b == 0 else 1
                blk = {"n1": _bn_params(c_prev), "conv1": {"kernel": conv((3, 3, c_prev, c))},
                       "n2": _bn_params(c), "conv2": {"kernel": conv((3, 3, c, c))}}
                if st != 1 or c_prev != c:
                    blk["shortcut"] = {"kernel": conv((1, 1, c_prev, c))}
                params[f"layer{s + 1}_{b}"] = blk
                c_prev = c
        params["n4"] = _bn_params(c_prev)
        params["classifier"] = {"kernel": uniform_fan_in(next(keys), (c_prev, num_classes), c_prev),
                                "bias": jnp.zeros((num_classes,), jnp.float32)}
        return params

    def forward(params, x, norm: _Norm):
        h = conv2d(x, params["stem"]["kernel"], 1, impl)
        for s, (_, stride) in enumerate(STAGES):
            for b in range(2):
                name = f"layer{s + 1}_{b}"
                blk = params[name]
                st = stride if b == 0 else 1
                out = jax.nn.relu(norm((name, "n1"), norm.scale(h), blk["n1"]))
                sc = conv2d(out, blk["shortcut"]["kernel"], st, impl) if "shortcut" in blk else h
                out = conv2d(out, blk["conv1"]["kernel"], st, impl)
                out = jax.nn.relu(norm((name, "n2"), norm.scale(out), blk["n2"]))
                h = conv2d(out, blk["conv2"]["kernel"], 1, impl) + sc
        h = jax.nn.relu(norm(("n4",), norm.scale(h), params["n4"]))
        feats = jnp.mean(h, axis=(1, 2))
        logits = feats @ params["classifier"]["kernel"] + params["classifier"]["bias"]
        return logits, feats

    return _make(f"preact_resnet18(w={width})", init, forward, _prunable, widths[-1], num_classes,
                 preact_resnet18_spec(), rate)


def make_preact_cnn(num_classes: int, image_shape=(32, 32, 3), channels=(16, 32, 64),
                    hidden=128, width: float = 1.0, rate: float | None = None,
                    conv_impl: str = "auto") -> SBNModel:
    """The small CNN of ``models/cnn.py`` with Scaler + BN after each conv (widths
    ``ceil(width·C)`` as ``cnn_widths``)."""
    impl = resolve_conv_impl(conv_impl)
    chans, hid = cnn_widths(channels, hidden, width)
    (fh, fw), cin = pooled_size(image_shape, len(chans)), image_shape[-1]
    flat = fh * fw * chans[-1]
    rate = float(width if rate is None else rate)

    def init(key):
        ks = jax.random.split(key, len(chans) + 2)
        params, c_prev = {}, cin
        for i, c in enumerate(chans):
            params[f"conv{i + 1}"] = {"kernel": uniform_fan_in(ks[i], (3, 3, c_prev, c), 9 * c_prev),
                                      "bias": jnp.zeros((c,), jnp.float32)}
            params[f"bn{i + 1}"] = _bn_params(c)
            c_prev = c
        params["dense"] = {"kernel": uniform_fan_in(ks[-2], (flat, hid), flat),
                           "bias": jnp.zeros((hid,), jnp.float32)}
        params["classifier"] = {"kernel": uniform_fan_in(ks[-1], (hid, num_classes), hid),
                                "bias": jnp.zeros((num_classes,), jnp.float32)}
        return params

    def forward(params, x, norm: _Norm):
        for i in range(len(chans)):
            p = params[f"conv{i + 1}"]
            x = conv2d(x, p["kernel"], 1, impl) + p["bias"]
            x = norm((f"bn{i + 1}",), norm.scale(x), params[f"bn{i + 1}"])
            x = max_pool2(jax.nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        feats = jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])
        logits = feats @ params["classifier"]["kernel"] + params["classifier"]["bias"]
        return logits, feats

    return _make(f"preact_cnn(w={width})", init, forward, _prunable, hid, num_classes,
                 preact_cnn_spec(len(chans)), rate)
