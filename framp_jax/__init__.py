"""framp_jax: FRAMP and model-heterogeneous federated learning baselines in pure-functional JAX.

Importing framp_jax adds ``--xla_gpu_enable_triton_gemm=false`` to ``XLA_FLAGS`` (see
:func:`configure_xla_flags`): with Triton GEMM fusions enabled, XLA's GPU compiler aborts on
FRAMP's im2col round (``triton_tiling_propagation.cc ... Check failed``). Import framp_jax
before JAX initialises its backend (before the first array or ``jax.devices()`` call) for the
flag to take effect. It is left alone when ``XLA_FLAGS`` already says something about
``xla_gpu_enable_triton_gemm``, and ``FRAMP_TRITON_GEMM=1`` keeps XLA's default (Triton on).
XLA ignores GPU flags on other backends.
"""
import os as _os

__version__ = "0.1.0"

TRITON_FLAG = "--xla_gpu_enable_triton_gemm=false"


def configure_xla_flags(environ=None) -> bool:
    """Append :data:`TRITON_FLAG` to ``XLA_FLAGS`` unless the user set the option or
    ``FRAMP_TRITON_GEMM=1``; returns whether it was added. Only effective before JAX creates its
    backend."""
    env = _os.environ if environ is None else environ
    if env.get("FRAMP_TRITON_GEMM", "0").strip().lower() in ("1", "true", "yes", "on"):
        return False
    flags = env.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} {TRITON_FLAG}".strip()
    return True


configure_xla_flags()
