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
from framp_jax.width import BN_KEYS, SpecBuilder, WidthSpec

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))
BLOCKS = 2  # BasicBlocks per stage
FIRST_SHORTCUT = (False, True, True, True)  # stage 1 keeps 64 channels at stride 1
FEATURE_UNITS = ("stage4",)  # the classifier's input in resnet18_spec


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


# ---------------------------------------------------------------------------------------------
# channel structure (framp_jax.width) and the model family

def resnet18_spec() -> WidthSpec:
    """:func:`make_resnet18`'s units (post-activation, BN after every conv): per block the inner
    channel (conv1 out / bn1 / conv2 in) and per stage the residual stream, which the stem (stage
    1), every block's conv2 + bn2 and the shortcut conv + BN write and the next convs read
    (HeteroFL ``src/fed.py``: the shortcut takes conv1's input indices and the block's output
    indices, so the stream shares one index set)."""
    s = SpecBuilder()
    stream = s.unit("stage1")
    s.out(("stem", "kernel"), 3, stream)
    s.vec(("stem_bn",), stream, BN_KEYS)
    for st in range(1, len(STAGES) + 1):
        new_stream = stream if st == 1 else s.unit(f"stage{st}")
        for b in range(BLOCKS):
            name = f"layer{st}_{b}"
            inner = s.unit(f"{name}.conv1")
            s.inp((name, "conv1", "kernel"), 2, stream)
            s.out((name, "conv1", "kernel"), 3, inner)
            s.vec((name, "bn1"), inner, BN_KEYS)
            s.inp((name, "conv2", "kernel"), 2, inner)
            s.out((name, "conv2", "kernel"), 3, new_stream)
            s.vec((name, "bn2"), new_stream, BN_KEYS)
            if b == 0 and FIRST_SHORTCUT[st - 1]:
                s.inp((name, "shortcut", "kernel"), 2, stream)
                s.out((name, "shortcut", "kernel"), 3, new_stream)
                s.vec((name, "shortcut_bn"), new_stream, BN_KEYS)
            stream = new_stream
    s.inp(("classifier", "kernel"), 0, stream)
    return s.build()


def family(num_classes: int, input_shape, *, conv_impl: str = "auto",
           compute_dtype: str = "float32"):
    """ResNet-18's :class:`~framp_jax.models.family.ModelFamily`: ``make(r)`` =
    :func:`make_resnet18` at ``width=r``, ``make_exits`` = ``exits.make_resnet18_exits``,
    ``make_preact`` = ``preact.make_preact_resnet18``, each computing in ``compute_dtype``."""
    from framp_jax.models import exits as E
    from framp_jax.models.family import image_family
    from framp_jax.models.preact import make_preact_resnet18, preact_resnet18_spec

    shape, k = tuple(int(s) for s in input_shape), int(num_classes)
    return image_family(
        "resnet18", shape, compute_dtype,
        make=lambda r: make_resnet18(k, shape, width=r, conv_impl=conv_impl),
        make_exits=lambda w, h: E.make_resnet18_exits(k, shape, w, h, conv_impl),
        make_preact=lambda r: make_preact_resnet18(k, shape, width=r, conv_impl=conv_impl),
        width_spec=resnet18_spec(), feature_units=FEATURE_UNITS,
        max_exits=E.MAX_EXITS["resnet18"], preact_spec=preact_resnet18_spec())
