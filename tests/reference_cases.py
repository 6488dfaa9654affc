"""The vision models compared against PyTorch references (``tests/test_torch_reference.py``),
without torch: the cases, their parameters and inputs, and the summaries compared.

Parameters and inputs come from a counter-based hash (splitmix64 of the entry index and a
per-leaf salt), not from a model's ``init`` nor a NumPy generator, so they are the same on every
machine and NumPy version, and a change of a model's initialisation does not invalidate the
recorded references (``tests/fixtures/torch_reference.npz``, written by
``tests/fixtures/make_torch_fixtures.py``).

A reference holds, per case, the float64 logits and loss of the PyTorch model and, per
framp_jax parameter leaf (``jax.tree`` order), the L2 norm, the largest |entry| and three
projections ``<g, r_k>`` of the gradient on fixed hashed vectors ``r_k`` (entries uniform with
unit variance): a wrong entry anywhere in a leaf moves a projection by about its error, while
the file stays a few KB per model instead of a copy of every gradient.
"""
from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.models.exits import make_resnet18_exits
from framp_jax.models.preact import make_preact_resnet18
from framp_jax.models.resnet import make_resnet18

N_PROJ = 3
BATCH, NUM_CLASSES, SHAPE = 4, 10, (32, 32, 3)

# case -> (builder, width, the torch reference's channel widths, how the logits are taken)
CASES = {
    # FIARSE's post-activation static-BN ResNet-18 at width 1/4, training mode
    "resnet18": dict(kind="post", width=0.25, widths=[math.ceil(0.25 * c) for c in (64, 128, 256, 512)]),
    # the same at full width (slow test only)
    "resnet18_full": dict(kind="post", width=1.0, widths=[64, 128, 256, 512], batch=2),
    # HeteroFL's pre-activation ResNet-18 with Scaler and static BN at width 1/2, training mode
    "preact": dict(kind="preact", width=0.5, widths=[math.ceil(0.5 * c) for c in (64, 128, 256, 512)]),
    # ScaleFL's early-exit ResNet-18 at width 1/2, every exit, eval mode (static BN, Scaler on)
    "exits": dict(kind="exits", width=0.5, widths=[int(0.5 * c) for c in (64, 128, 256, 512)]),
}


def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniform(n: int, salt: str) -> np.ndarray:
    """``n`` float64 values uniform in [-sqrt(3), sqrt(3)) (unit variance), a pure function of
    ``salt`` and the index."""
    s = np.uint64(zlib.crc32(salt.encode()))
    z = _mix(np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + s)
    u = (z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53
    return (2.0 * u - 1.0) * math.sqrt(3.0)


def leaf_names(tree):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def hashed_params(template):
    """``template``'s structure with hashed float64 values at init-like scales: kernels
    sqrt(2 / fan_in), norm scales 1 + 0.2 u, biases and norm offsets 0.1 u."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in paths:
        name = jax.tree_util.keystr(path)
        u = hash_uniform(int(np.prod(leaf.shape)), "param" + name).reshape(leaf.shape)
        last = getattr(path[-1], "key", "")
        if last == "kernel":
            v = u * math.sqrt(2.0 / max(int(np.prod(leaf.shape[:-1])), 1))
        elif last == "scale":
            v = 1.0 + 0.2 * u
        else:
            v = 0.1 * u
        out.append(v)
    return jax.tree_util.tree_unflatten(treedef, out)


def inputs(case: str):
    """The case's batch: float64 NHWC images and int labels."""
    b = CASES[case].get("batch", BATCH)
    x = hash_uniform(b * int(np.prod(SHAPE)), "x").reshape((b,) + SHAPE)
    y = (_mix(np.arange(b, dtype=np.uint64) + np.uint64(17)) % np.uint64(NUM_CLASSES)).astype(np.int32)
    return x, y


def make_model(case: str, impl: str = "im2col"):
    spec = CASES[case]
    if spec["kind"] == "post":
        return make_resnet18(NUM_CLASSES, SHAPE, width=spec["width"], conv_impl=impl)
    if spec["kind"] == "preact":
        return make_preact_resnet18(NUM_CLASSES, SHAPE, width=spec["width"], conv_impl=impl)
    return make_resnet18_exits(NUM_CLASSES, SHAPE, width=spec["width"], exits=4, conv_impl=impl)


def logits_fn(case: str, model):
    """params, x -> the list of logits the reference compares (one per exit)."""
    if CASES[case]["kind"] == "exits":
        return lambda p, x: model.apply_exits(p, x, train=False)
    return lambda p, x: [model.apply(p, x, train=True)[0]]


def projections(g, name: str) -> np.ndarray:
    g = np.asarray(g, np.float64).ravel()
    return np.array([float(g @ hash_uniform(g.size, f"proj{k}{name}")) for k in range(N_PROJ)])


def summarize(names, grads, logits, loss) -> dict:
    """The recorded quantities of one case (``grads``: leaves in ``names`` order, framp_jax
    layout)."""
    g = [np.asarray(a, np.float64) for a in grads]
    return {"logits": np.stack([np.asarray(l, np.float64) for l in logits]),
            "loss": np.float64(loss),
            "grad_norm": np.array([np.linalg.norm(a) for a in g]),
            "grad_maxabs": np.array([np.abs(a).max() for a in g]),
            "grad_proj": np.stack([projections(a, n) for a, n in zip(g, names)]),
            "names": np.array(names)}


def jax_summary(case: str, impl: str):
    """framp_jax's float64 logits, loss and gradients of the summed cross-entropies for the
    case's hashed parameters and batch (the comparison of the formulas), and its float32 logits
    (the dtype runs train in)."""
    model = make_model(case, impl)
    template = jax.eval_shape(model.init, jax.random.key(0))
    params = hashed_params(template)
    x, y = inputs(case)
    fn = logits_fn(case, model)
    names = leaf_names(template)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)

        def loss(p):
            logits = fn(p, x64)
            return sum(jnp.mean(-jax.nn.log_softmax(lg)[jnp.arange(len(y)), y])
                       for lg in logits), logits
        (val, logits64), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p64)
        out = summarize(names, [np.asarray(a) for a in jax.tree.leaves(grads)],
                        [np.asarray(l) for l in logits64], float(val))
    p32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    out["logits32"] = np.stack([np.asarray(l, np.float64)
                                for l in jax.jit(fn)(p32, jnp.asarray(x, jnp.float32))])
    return out


def compare(got: dict, ref: dict, rtol: float = 1e-4, logit_atol32: float = 2e-4):
    """Asserts ``got`` (:func:`jax_summary`) matches the reference; returns the worst relative
    gradient difference. float64: logits and loss to 1e-6, each leaf's norm, largest entry and
    projections to ``rtol`` of the leaf's reference norm (framp_jax's static BN runs in float32
    even under x64, which bounds the agreement near 1e-6). float32 logits to ``logit_atol32``."""
    assert list(got["names"]) == [str(n) for n in ref["names"]], "the model's leaves changed"
    np.testing.assert_allclose(got["logits"], ref["logits"], rtol=0, atol=1e-6)
    assert abs(float(got["loss"]) - float(ref["loss"])) < 1e-6
    worst32 = float(np.abs(got["logits32"] - ref["logits"]).max())
    assert worst32 < logit_atol32, worst32
    worst = 0.0
    for i, name in enumerate(got["names"]):
        scale = max(float(ref["grad_norm"][i]), 1e-12)
        err = max(abs(float(got["grad_norm"][i] - ref["grad_norm"][i])),
                  abs(float(got["grad_maxabs"][i] - ref["grad_maxabs"][i])),
                  float(np.abs(got["grad_proj"][i] - ref["grad_proj"][i]).max())) / scale
        assert err < rtol, (name, err)
        worst = max(worst, err)
    return worst
