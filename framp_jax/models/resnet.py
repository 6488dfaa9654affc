"""CIFAR ResNet-18 with static batch norm (SPEC §2.4, FIARSE ``BetaResNet18_sbn``).

Post-activation BasicBlocks, 3x3 stem with 64 channels and no max-pool, stages [2,2,2,2] with
widths 64/128/256/512 and strides 1/2/2/2, 1x1 conv + BN shortcut when the shape changes,
global average pool and Linear(512, K). BN always uses batch statistics (train and eval).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from framp_jax.models.base import Model
from framp_jax.models.layers import batch_norm, conv2d, he_normal, resolve_conv_impl, uniform_fan_in

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))


def make_resnet18(num_classes: int, image_shape=(32, 32, 3), width: float = 1.0,
                  conv_impl: str = "auto") -> Model:
    impl = resolve_conv_impl(conv_impl)
    cin = image_shape[-1]
    widths = [max(1, math.ceil(width * c)) for c, _ in STAGES]

    def _bn(c):
        return {"scale": jnp.ones((c,), jnp.float32), "offset": jnp.zeros((c,), jnp.float32)}

    def init(key):
        keys = iter(jax.random.split(key, 64))
        params = {"stem": {"kernel": he_normal(next(keys), (3, 3, cin, widths[0]), 9 * cin)},
                  "stem_bn": _bn(widths[0])}
        c_prev = widths[0]
        for s, ((_, stride), c) in enumerate(zip(STAGES, widths)):
            for b in range(2):
                st = stride if b == 0 else 1
                blk = {"conv1": {"kernel": he_normal(next(keys), (3, 3, c_prev, c), 9 * c_prev)},
                       "bn1": _bn(c),
                       "conv2": {"kernel": he_normal(next(keys), (3, 3, c, c), 9 * c)},
                       "bn2": _bn(c)}
                if st != 1 or c_prev != c:
                    blk["shortcut"] = {"kernel": he_normal(next(keys), (1, 1, c_prev, c), c_prev)}
                    blk["shortcut_bn"] = _bn(c)
                params[f"layer{s + 1}_{b}"] = blk
                c_prev = c
        params["classifier"] = {"kernel": uniform_fan_in(next(keys), (c_prev, num_classes), c_prev),
                                "bias": uniform_fan_in(next(keys), (num_classes,), c_prev)}
        return params

    def apply(params, x, *, train: bool = False, rng=None):
        del train, rng
        bn = lambda h, p: batch_norm(h, p["scale"], p["offset"])
        h = jax.nn.relu(bn(conv2d(x, params["stem"]["kernel"], 1, impl), params["stem_bn"]))
        for s, (_, stride) in enumerate(STAGES):
            for b in range(2):
                blk = params[f"layer{s + 1}_{b}"]
                st = stride if b == 0 else 1
                out = jax.nn.relu(bn(conv2d(h, blk["conv1"]["kernel"], st, impl), blk["bn1"]))
                out = bn(conv2d(out, blk["conv2"]["kernel"], 1, impl), blk["bn2"])
                sc = h
                if "shortcut" in blk:
                    sc = bn(conv2d(h, blk["shortcut"]["kernel"], st, impl), blk["shortcut_bn"])
                h = jax.nn.relu(out + sc)
        feats = jnp.mean(h, axis=(1, 2))
        logits = feats @ params["classifier"]["kernel"] + params["classifier"]["bias"]
        return logits, feats

    def prunable(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key in ("kernel", "bias"), params)

    return Model(f"resnet18(w={width})", init, apply, prunable, widths[-1], num_classes)
