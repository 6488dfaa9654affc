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


def _triton_requested(env) -> bool:
    """``FRAMP_TRITON_GEMM=1`` (or true/yes/on): keep XLA's Triton GEMM fusions."""
    return env.get("FRAMP_TRITON_GEMM", "0").strip().lower() in ("1", "true", "yes", "on")


def configure_xla_flags(environ=None) -> bool:
    """Append :data:`TRITON_FLAG` to ``XLA_FLAGS`` unless the user set the option or
    ``FRAMP_TRITON_GEMM=1``; returns whether it was added. Only effective before JAX creates its
    backend."""
    env = _os.environ if environ is None else environ
    if _triton_requested(env):
        return False
    flags = env.get("XLA_FLAGS", "")
    if "xla_gpu_enable_triton_gemm" in flags:
        return False
    env["XLA_FLAGS"] = f"{flags} {TRITON_FLAG}".strip()
    return True


def _jax_backend_started() -> bool:
    import sys
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # a JAX without this helper: assume the worst
        return True


_TRITON_ON_REQUEST = _triton_requested(_os.environ)
_ADDED = configure_xla_flags()
# Whether JAX's GPU backend runs without Triton GEMM fusions: the flag was in XLA_FLAGS before
# the backend started (set by the user, or added here before JAX created its backend).
TRITON_GEMM_DISABLED = ("xla_gpu_enable_triton_gemm=false" in _os.environ.get("XLA_FLAGS", "")
                        and not (_ADDED and _jax_backend_started()))


def triton_gemm_safe() -> bool:
    """True when im2col rounds can be compiled on a GPU: Triton GEMM fusions are off, or the
    user asked to keep them (``FRAMP_TRITON_GEMM=1``, e.g. to measure them)."""
    return TRITON_GEMM_DISABLED or _TRITON_ON_REQUEST
