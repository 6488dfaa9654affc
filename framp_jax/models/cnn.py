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
