"""A small CNN for fast CPU presets.

conv3x3(c1) → ReLU → pool → conv3x3(c2) → ReLU → pool → conv3x3(c3) → ReLU → pool →
flatten → dense(hidden) → ReLU [features] → dense(K). ``width`` scales every hidden width
(``ceil(width·C)``), which the width-based baselines use for their narrower submodels.
Any image size from 8x8 up and any channel count: the 3x3 convs keep H and W, each pool floors
them as PyTorch's ``MaxPool2d(2)`` (28 -> 14 -> 7 -> 3), and the dense layer's input size is
derived from the result (:func:`pooled_size`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from framp_jax.models.base import Model
from framp_jax.models.layers import (conv2d, max_pool2, pool_out_size, resolve_conv_impl,
                                     uniform_fan_in)
from framp_jax.width import BN_KEYS, SpecBuilder, WidthSpec

FEATURE_UNITS = ("dense",)  # the classifier's input in cnn_spec


def pooled_size(image_shape, num_pools: int = 3) -> tuple[int, int]:
    """(H, W) after ``num_pools`` conv (size-preserving) + 2x2 max-pool blocks, each pool
    flooring as PyTorch's ``MaxPool2d(2)``: 32 -> 4, 28 -> 3, 15 -> 1. Raises ValueError for
    shapes that are not (H, W, C) or too small to keep a pixel (InputShapeError, a DataError)."""
    from framp_jax.errors import InputShapeError  # a ValueError
    if len(tuple(image_shape)) != 3 or min(image_shape) < 1:
        raise InputShapeError(f"image_shape={tuple(image_shape)}: expected (H, W, C) with positive "
                         "sizes")
    h, w = int(image_shape[0]), int(image_shape[1])
    for _ in range(num_pools):
        h, w = pool_out_size(h), pool_out_size(w)
    if h < 1 or w < 1:
        raise InputShapeError(f"image_shape={tuple(image_shape)}: the small CNN halves H and W "
                         f"{num_pools} times (2x2 max-pools), so it needs H and W >= "
                         f"{2 ** num_pools} (model='resnet18' takes any size)")
    return h, w


def cnn_widths(channels=(16, 32, 64), hidden=128, width=1.0):
    return tuple(max(1, math.ceil(width * c)) for c in channels), max(1, math.ceil(width * hidden))


def make_cnn(num_classes: int, image_shape=(32, 32, 3), channels=(16, 32, 64), hidden=128,
             width: float = 1.0, conv_impl: str = "auto") -> Model:
    impl = resolve_conv_impl(conv_impl)
    chans, hid = cnn_widths(channels, hidden, width)
    (fh, fw), cin = pooled_size(image_shape, len(chans)), image_shape[-1]
    flat = fh * fw * chans[-1]

    def init(key):
        ks = jax.random.split(key, 5)
        params, c_prev = {}, cin
        for i, c in enumerate(chans):
            fan = 9 * c_prev
            params[f"conv{i + 1}"] = {"kernel": uniform_fan_in(ks[i], (3, 3, c_prev, c), fan),
                                      "bias": jnp.zeros((c,), jnp.float32)}
            c_prev = c
        params["dense"] = {"kernel": uniform_fan_in(ks[3], (flat, hid), flat),
                           "bias": jnp.zeros((hid,), jnp.float32)}
        params["classifier"] = {"kernel": uniform_fan_in(ks[4], (hid, num_classes), hid),
                                "bias": jnp.zeros((num_classes,), jnp.float32)}
        return params

    def apply(params, x, *, train: bool = False, rng=None):
        del train, rng
        for i in range(len(chans)):
            p = params[f"conv{i + 1}"]
            x = max_pool2(jax.nn.relu(conv2d(x, p["kernel"], 1, impl) + p["bias"]))
        x = x.reshape(x.shape[0], -1)
        feats = jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])
        logits = feats @ params["classifier"]["kernel"] + params["classifier"]["bias"]
        return logits, feats

    def prunable(params):
        # kernels and the classifier bias, as FIARSE masks the linear bias; hidden biases play
        # the role of the (unmasked) normalisation offsets of the ResNet.
        return {k: {n: (n == "kernel" or k == "classifier") for n in v} for k, v in params.items()}

    return Model(f"cnn(w={width})", init, apply, prunable, hid, num_classes)


# ---------------------------------------------------------------------------------------------
# channel structure (framp_jax.width) and the model family

def cnn_like_spec(num_convs: int, bn: bool) -> WidthSpec:
    """Units ``conv1..conv<num_convs>`` and ``dense`` of the small CNN's layout; with ``bn`` each
    conv ``i`` also has the BN vectors ``bn<i>`` (``models/preact.py``)."""
    s = SpecBuilder()
    prev = None
    for i in range(1, num_convs + 1):
        u = s.unit(f"conv{i}")
        s.out((f"conv{i}", "kernel"), 3, u)
        s.vec((f"conv{i}",), u, ("bias",))
        if bn:
            s.vec((f"bn{i}",), u, BN_KEYS)
        if prev is not None:
            s.inp((f"conv{i}", "kernel"), 2, prev)
        prev = u
    # NHWC flatten: dense row p * C + c reads channel c at spatial position p
    s.inp(("dense", "kernel"), 0, prev, blocks=True)
    u = s.unit("dense")
    s.out(("dense", "kernel"), 1, u)
    s.vec(("dense",), u, ("bias",))
    s.inp(("classifier", "kernel"), 0, u)
    return s.build()


def cnn_spec(num_convs: int = 3) -> WidthSpec:
    """:func:`make_cnn`'s units: conv1..conv3 outputs and the dense (hidden) output; the input
    image channels and the classes are never cut."""
    return cnn_like_spec(num_convs, bn=False)


def family(num_classes: int, input_shape, *, conv_impl: str = "auto",
           compute_dtype: str = "float32"):
    """The small CNN's :class:`~framp_jax.models.family.ModelFamily`: ``make(r)`` =
    :func:`make_cnn` at ``width=r``, ``make_exits`` = ``exits.make_cnn_exits``, ``make_preact`` =
    ``preact.make_preact_cnn``, each computing in ``compute_dtype``."""
    from framp_jax.models import exits as E
    from framp_jax.models.family import image_family
    from framp_jax.models.preact import make_preact_cnn, preact_cnn_spec

    shape, k = tuple(int(s) for s in input_shape), int(num_classes)
    return image_family(
        "cnn", shape, compute_dtype,
        make=lambda r: make_cnn(k, shape, width=r, conv_impl=conv_impl),
        make_exits=lambda w, h: E.make_cnn_exits(k, shape, width=w, exits=h, conv_impl=conv_impl),
        make_preact=lambda r: make_preact_cnn(k, shape, width=r, conv_impl=conv_impl),
        width_spec=cnn_spec(), feature_units=FEATURE_UNITS, max_exits=E.MAX_EXITS["cnn"],
        preact_spec=preact_cnn_spec())
