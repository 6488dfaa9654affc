"""Mixed precision (``config.compute_dtype``): float32 is the unchanged default; bfloat16 runs
the convs/matmuls/activations in bf16 while parameters, optimizer state, BN statistics, losses
and aggregation stay float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from framp_jax import config as C
from framp_jax import simulate
from framp_jax.eval import make_evaluator
from framp_jax.models.cnn import make_cnn
from framp_jax.models.layers import batch_norm, with_compute_dtype
from framp_jax.models.preact import make_preact_resnet18
from framp_jax.models.resnet import make_resnet18
from framp_jax.problem import build_algorithm, build_problem


def _dot_dtypes(fn, *args):
    """Operand dtypes of every dot_general / conv in the jaxpr of ``fn`` (sub-jaxprs included)."""
    found = set()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("dot_general", "conv_general_dilated"):
                found.add(tuple(str(v.aval.dtype) for v in e.invars))
            for p in e.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else (p,)):
                    if hasattr(sub, "eqns"):  # Jaxpr
                        walk(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # ClosedJaxpr
                        walk(sub.jaxpr)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_float32_wrapper_is_the_model_itself():
    m = make_cnn(4, (8, 8, 3))
    assert with_compute_dtype(m, "float32") is m
    with pytest.raises(ValueError, match="float16"):
        with_compute_dtype(m, "float16")


def test_batch_norm_float32_is_bit_identical_to_the_plain_formula():
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 7)) * 3 + 1
    scale = jax.random.uniform(jax.random.key(1), (7,))
    offset = jax.random.normal(jax.random.key(2), (7,))

    def old(x, scale, offset, eps=1e-5):  # batch_norm before the float32-statistics change
        mean = jnp.mean(x, axis=(0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
        return (x - mean) * lax.rsqrt(var + eps) * scale + offset
    a = jax.jit(batch_norm)(x, scale, offset)
    b = jax.jit(old)(x, scale, offset)
    assert a.dtype == jnp.float32
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # bf16 input: statistics in float32, output back in bf16, close to the float32 result
    h = jax.jit(batch_norm)(x.astype(jnp.bfloat16), scale, offset)
    assert h.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(a), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("name", ["cnn", "resnet18",
                                  pytest.param("preact_resnet18", marks=pytest.mark.slow)])
def test_bf16_forward_matches_float32(name):
    shape = (8, 8, 3)
    m = {"cnn": lambda: make_cnn(10, shape),
         "resnet18": lambda: make_resnet18(10, shape),
         "preact_resnet18": lambda: make_preact_resnet18(10, shape)}[name]()
    mb = with_compute_dtype(m, "bfloat16")
    p = m.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (8,) + shape)
    for train in ((True, False) if name == "preact_resnet18" else (True,)):
        l32, f32 = jax.jit(lambda p, x: m.apply(p, x, train=train))(p, x)
        l16, f16 = jax.jit(lambda p, x: mb.apply(p, x, train=train))(p, x)
        assert l16.dtype == jnp.float32 and f16.dtype == jnp.float32  # outputs back in float32
        # relative L2 errors: bf16 rounding (8-bit mantissa) through 3 (CNN) or 18 (ResNet,
        # batch-stat BN over 8 samples at 1x1 in the last stage) layers
        tol = 0.02 if name == "cnn" else 0.08
        for a, b in ((l16, l32), (f16, f32)):
            rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            assert 0 < rel <= tol, (name, train, rel)  # bf16 really used, and close
    # every conv/matmul of forward and backward runs on bf16 operands; grads come back float32
    loss = lambda p, x: jnp.sum(mb.apply(p, x, train=True)[0])
    assert _dot_dtypes(jax.grad(loss), p, x) == {("bfloat16", "bfloat16")}
    assert _dot_dtypes(jax.grad(lambda p, x: jnp.sum(m.apply(p, x, train=True)[0])), p, x) == {
        ("float32", "float32")}
    g = jax.eval_shape(jax.grad(loss), p, x)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g))
    if name == "preact_resnet18":  # sBN statistics in float32
        st = jax.eval_shape(mb.batch_stats, p, x)
        assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(st))


def test_compute_dtype_is_validated(tiny_config):
    c = tiny_config(compute_dtype="float16")
    with pytest.raises(C.ConfigError, match="compute_dtype") as e:
        C.validate(c)
    assert "float16" in str(e.value) and "bfloat16" in str(e.value)
    C.validate(tiny_config(compute_dtype="bfloat16"))


def _train(c, rounds):
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    counter = simulate.TraceCounter(alg.round)
    rnd = jax.jit(counter)
    state = alg.init(jax.random.key(c.seed), prob.data)
    losses = []
    for t in range(rounds):
        state, m = rnd(state, prob.data, jnp.int32(t))
        losses.append(float(m["train_loss"]))
    la, ua = make_evaluator(alg, prob.ctx, c.eval_batch, c.eval_model_chunk)(
        state, prob.data, prob.data.union_x, prob.data.union_y)
    return state, losses, np.asarray(la), np.asarray(ua), counter.count


def test_float32_default_equals_a_config_without_the_field(tiny_config):
    """A config from before the field existed (no ``compute_dtype``) and the float32 default
    train to bit-identical states; the config hash is unchanged by the float32 default."""
    c_new = tiny_config()
    c_old = tiny_config()
    del c_old["compute_dtype"]
    assert simulate.config_hash(c_new) == simulate.config_hash(c_old)
    assert simulate.config_hash(tiny_config(compute_dtype="bfloat16")) != simulate.config_hash(c_new)
    s1, l1, *_ = _train(c_new, 2)
    s2, l2, *_ = _train(c_old, 2)
    assert l1 == l2
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_bf16_run_trains_with_float32_state(tiny_config):
    method = "fedavg"
    c = tiny_config(method=method, compute_dtype="bfloat16", rounds=5)
    state, losses, local, union, compiles = _train(c, 5)
    assert compiles == 1
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] * 0.8, losses
    assert np.nanmean(union) > 0.4 and np.nanmean(local) > 0.4, (local, union)  # 4 classes
    floats = [a for a in jax.tree.leaves(state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and all(a.dtype == jnp.float32 for a in floats)
    # the same run in float32 differs (bf16 was really used) but trains alike
    _, l32, _, u32, _ = _train(tiny_config(method=method, rounds=5), 5)
    assert losses != l32
    assert abs(np.nanmean(union) - np.nanmean(u32)) < 0.25
