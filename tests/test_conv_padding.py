"""Convolution padding against hand computations: both formulations pad like PyTorch's
``Conv2d(k, stride, padding=(k - 1) // 2)`` (symmetric), not like TensorFlow's ``"SAME"`` (which
pads a stride-2 3x3 conv on an even input by (0, 1)). Whole models against PyTorch references:
``tests/test_torch_reference.py``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax.models.layers import conv2d, conv_out_size, torch_pads

IMPLS = ("xla", "im2col")


@pytest.mark.parametrize("impl", IMPLS)
def test_stride2_3x3_pads_one_pixel_each_side(impl):
    # x[r, c] = 4r + c on a 4x4 input, all-ones 3x3 kernel, stride 2, padding (1, 1):
    # output (i, j) sums rows 2i-1..2i+1 and columns 2j-1..2j+1 of x (zeros outside).
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    out = conv2d(x, jnp.ones((3, 3, 1, 1), jnp.float32), 2, impl)
    # (0,0): 0+1+4+5; (0,1): 1+2+3+5+6+7; (1,0): 4+5+8+9+12+13; (1,1): 5+6+7+9+10+11+13+14+15
    np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), [[10.0, 24.0], [51.0, 90.0]])


@pytest.mark.parametrize("impl", IMPLS)
def test_stride2_1x1_takes_even_pixels(impl):
    x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
    out = conv2d(x, jnp.full((1, 1, 1, 1), 2.0, jnp.float32), 2, impl)
    np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), [[0.0, 4.0], [16.0, 20.0]])


@pytest.mark.parametrize("impl", IMPLS)
def test_stride2_odd_input_and_asymmetric_kernel(impl):
    # 5x5 input, stride 2: 3 outputs per side, centred on inputs 0, 2, 4. The kernel holds 1 at
    # (0, 0) only, so output (i, j) = x[2i - 1, 2j - 1] (0 outside).
    x = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
    k = jnp.zeros((3, 3, 1, 1), jnp.float32).at[0, 0, 0, 0].set(1.0)
    out = np.asarray(conv2d(x, k, 2, impl)[0, :, :, 0])
    expect = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            r, c = 2 * i - 1, 2 * j - 1
            expect[i, j] = 5 * r + c if r >= 0 and c >= 0 else 0.0
    np.testing.assert_array_equal(out, expect)
    assert conv_out_size(5, 3, 2) == 3 and conv_out_size(32, 3, 2) == 16 and torch_pads(3) == (1, 1)


def test_formulations_agree_with_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 6, 7, 3))
    k = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    for stride in (1, 2):
        f = {i: (lambda kk, i=i: jnp.sum(jnp.sin(conv2d(x, kk, stride, i)))) for i in IMPLS}
        np.testing.assert_allclose(conv2d(x, k, stride, "xla"), conv2d(x, k, stride, "im2col"),
                                   rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(jax.grad(f["xla"])(k), jax.grad(f["im2col"])(k), rtol=1e-4, atol=1e-4)
