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


_WARNED = []


def _warn_triton_once():
    if not _WARNED:
        _WARNED.append(True)
        import warnings
        warnings.warn("framp_jax: XLA's Triton GEMM fusions are on in this process (JAX's GPU "
                      "backend started before framp_jax was imported, or XLA_FLAGS turns them "
                      "on), and they abort the compiler on FRAMP's im2col round; conv_impl='auto' uses "
                      "XLA's convolution (slower). Import framp_jax before using JAX, or set "
                      "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false before starting Python.",
                      RuntimeWarning, stacklevel=3)


def resolve_conv_impl(conv_impl: str) -> str:
    """``"auto"`` -> the formulation that is fastest on the default backend (AUTO_CONV_IMPL)."""
    if conv_impl == "auto":
        backend = jax.default_backend()
        impl = AUTO_CONV_IMPL.get(backend, "xla")
        if backend == "gpu" and impl == "im2col":
            import framp_jax
            if not framp_jax.triton_gemm_safe():
                # JAX started its GPU backend before framp_jax could turn off XLA's Triton GEMM
                # fusions, which abort the compiler on FRAMP's im2col round: take XLA's conv.
                _warn_triton_once()
                impl = "xla"
        return impl
    if conv_impl not in ("xla", "im2col"):
        raise ValueError(f"conv_impl={conv_impl!r}: allowed 'auto', 'xla', 'im2col'")
    return conv_impl


def torch_pads(k: int) -> tuple[int, int]:
    """Per-side padding of PyTorch's ``Conv2d(kernel_size=k, padding=(k - 1) // 2)``: symmetric,
    (1, 1) for 3x3 and (0, 0) for 1x1 whatever the stride, as in every official model framp_jax
    mirrors. (TensorFlow's ``"SAME"`` pads a stride-2 3x3 conv on an even input by (0, 1), which
    shifts every output pixel by one input pixel.)"""
    return (k - 1) // 2, (k - 1) // 2


def conv_out_size(size: int, k: int, stride: int) -> int:
    """Output size of PyTorch's ``Conv2d(k, stride, padding=(k - 1) // 2)``."""
    lo, hi = torch_pads(k)
    return (size + lo + hi - k) // stride + 1


def conv2d(x, kernel, stride: int = 1, impl: str = "im2col"):
    """2-D convolution padded like PyTorch's ``Conv2d(k, stride, padding=(k - 1) // 2)``
    (:func:`torch_pads`), NHWC input, HWIO kernel, no bias. Both formulations pad the same."""
    kh, kw, cin, cout = kernel.shape
    ph, pw = torch_pads(kh), torch_pads(kw)
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), (ph, pw), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if kh == 1 and kw == 1:
        return jnp.einsum("bhwc,co->bhwo", x[:, ::stride, ::stride, :], kernel[0, 0])
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    oh, ow = conv_out_size(h, kh, stride), conv_out_size(w, kw, stride)
    cols = [xp[:, i:i + (oh - 1) * stride + 1:stride, j:j + (ow - 1) * stride + 1:stride, :]
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1)  # [B, oh, ow, kh*kw*cin], (i, j, c) order = HWIO
    return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))


def pool_out_size(size: int) -> int:
    """Output size of PyTorch's ``MaxPool2d(2)``: floor(size / 2)."""
    return size // 2


def max_pool2(x):
    """2x2 max-pool with stride 2, NHWC; an odd last row/column is dropped, as PyTorch's
    ``MaxPool2d(2)`` (floor mode) does."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        x = x[:, :h - h % 2, :w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def batch_norm(x, scale, offset, eps: float = 1e-5):
    """Static BN: always normalises with the current batch's statistics (no running stats).
    Statistics and normalisation run in float32 whatever ``x``'s dtype; the output has
    ``x``'s dtype (a no-op for float32 inputs)."""
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes)
    var = jnp.mean(jnp.square(xf - mean), axis=axes)
    return ((xf - mean) * lax.rsqrt(var + eps) * scale + offset).astype(x.dtype)


def he_normal(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) * math.sqrt(2.0 / fan_in)


def uniform_fan_in(key, shape, fan_in):
    """PyTorch's default init for Linear/Conv (kaiming_uniform with a=sqrt(5))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


COMPUTE_DTYPES = ("float32", "bfloat16")


def _cast_floating(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
                        else a, tree)


def with_compute_dtype(model, compute_dtype: str = "float32"):
    """``model`` (any NamedTuple model of framp_jax.models) computing in ``compute_dtype``.

    ``"float32"`` returns ``model`` itself. ``"bfloat16"`` wraps ``apply`` (and ``apply_exits``,
    ``batch_stats`` where the model has them): the float32 parameters and the input batch are
    cast to bfloat16 on entry, so every conv, matmul and activation runs in bfloat16, and the
    floating outputs (logits, features, statistics) are cast back to float32 for the losses,
    prototypes and aggregation. Gradients flow through the casts, so they arrive in float32 for
    the float32 master parameters and optimizer state. Batch-norm statistics are computed (and
    sBN statistics passed as ``bn_stats`` are kept) in float32 by the layers themselves."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: allowed {COMPUTE_DTYPES}")
    if compute_dtype == "float32":
        return model
    dtype = jnp.dtype(compute_dtype)

    def wrap(fn):
        def cast_fn(params, x, *args, **kwargs):
            out = fn(_cast_floating(params, dtype), _cast_floating(x, dtype), *args, **kwargs)
            return _cast_floating(out, jnp.float32)
        return cast_fn

    fields = {f: wrap(getattr(model, f)) for f in ("apply", "apply_exits", "batch_stats")
              if callable(getattr(model, f, None))}
    return model._replace(**fields)
