"""The Triton GEMM flag is only trusted when it was in XLA_FLAGS before JAX started its backend;
otherwise ``conv_impl='auto'`` on a GPU falls back to XLA's convolution with a warning."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import framp_jax
from framp_jax.models import layers

PROBE = "import framp_jax; print(framp_jax.TRITON_GEMM_DISABLED, framp_jax.triton_gemm_safe())"


def _probe(code, **env_over):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FRAMP_TRITON_GEMM")}
    env.update(env_over)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_flag_effective_only_before_the_backend_starts():
    assert _probe(PROBE) == ["True", "True"]                      # framp_jax first: in effect
    assert _probe("import jax; jax.devices(); " + PROBE) == ["False", "False"]  # too late
    assert _probe("import jax; jax.devices(); " + PROBE,          # the user's own flag
                  XLA_FLAGS="--xla_gpu_enable_triton_gemm=false") == ["True", "True"]
    assert _probe(PROBE, FRAMP_TRITON_GEMM="1") == ["False", "True"]  # asked for Triton


@pytest.mark.parametrize("safe, expect", [(True, "im2col"), (False, "xla")])
def test_auto_on_gpu_avoids_im2col_when_triton_is_on(monkeypatch, safe, expect):
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(framp_jax, "triton_gemm_safe", lambda: safe)
    monkeypatch.setattr(layers, "_WARNED", [])
    if safe:
        assert layers.resolve_conv_impl("auto") == expect
    else:
        with pytest.warns(RuntimeWarning, match="Triton GEMM"):
            assert layers.resolve_conv_impl("auto") == expect
    assert layers.resolve_conv_impl("im2col") == "im2col"  # an explicit choice is kept
