"""Functional layers shared by the vision models.

Convolutions come in two formulations with identical numerics (up to float rounding):
``"xla"`` (``lax.conv_general_dilated``) and ``"im2col"`` (shifted slices + one matmul).
On CPU the XLA convolution's weight gradient inside ``lax.scan`` is very slow, while the
im2col matmul is not; ``benchmarks/bench_conv.py`` measures both. On an NVIDIA GPU the im2col
matmuls also train ResNet-18 faster than cuDNN's convolutions in a whole federated round
(``benchmarks/bench_gpu.py``). ``conv_impl="auto"`` picks im2col on CPU and GPU and XLA's
convolution on other backends (TPU).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


AUTO_CONV_IMPL = {"cpu": "im2col", "gpu": "im2col"}  # backend -> formulation; others "xla"


def resolve_conv_impl(conv_impl: str) -> str:
    """``"auto"`` -> the formulation that is fastest on the default backend (AUTO_CONV_IMPL)."""
    if conv_impl == "auto":
        return AUTO_CONV_IMPL.get(jax.default_backend(), "xla")
    if conv_impl not in ("xla", "im2col"):
        raise ValueError(f"conv_impl={conv_impl!r}: allowed 'auto', 'xla', 'im2col'")
    return conv_impl


def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def conv2d(x, kernel, stride: int = 1, impl: str = "im2col"):
    """SAME-padded 2-D convolution, NHWC input, HWIO kernel, no bias."""
    kh, kw, cin, cout = kernel.shape
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if kh == 1 and kw == 1:
        return jnp.einsum("bhwc,co->bhwo", x[:, ::stride, ::stride, :], kernel[0, 0])
    h, w = x.shape[1], x.shape[2]
    ph, pw = _same_pads(h, kh, stride), _same_pads(w, kw, stride)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh, ow = -(-h // stride), -(-w // stride)
    cols = [xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1)  # [B, oh, ow, kh*kw*cin], (i, j, c) order = HWIO
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))


def max_pool2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def batch_norm(x, scale, offset, eps: float = 1e-5):
    """Static BN: always normalises with the current batch's statistics (no running stats)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
    return (x - mean) * lax.rsqrt(var + eps) * scale + offset


def he_normal(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / fan_in)


def uniform_fan_in(key, shape, fan_in):
    """PyTorch's default init for Linear/Conv (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
