"""Shared fixtures: a tiny synthetic image data set, a matching small config, and a persistent
XLA compilation cache for the session.

The data set is an ``npz:PATH`` file (the user-data format of ``framp_jax.data.vision``) of
8x8x3 uint8 images in 4 classes whose class is their colour, so the small CNN learns it within
a few rounds.

Compilation cache: end-to-end tests run the same round function several times (determinism,
resume, the CLI in a subprocess); with a per-session on-disk cache every identical program is
compiled once. It changes no result (the cached executable is the one a fresh compile gives; the
determinism test compares a fresh compile with a cached one) and no trace count. Set
``FRAMP_TEST_JIT_CACHE=0`` to disable it, or ``JAX_COMPILATION_CACHE_DIR`` to use your own.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

import jax
import numpy as np
import pytest

from framp_jax.config import base_config


def load_script(path, name=None):
    """The module of a script outside the package (benchmarks/, experiments/), loaded by path."""
    path = str(path)
    spec = importlib.util.spec_from_file_location(
        name or os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# -- session-wide compilation cache ---------------------------------------------------------
# Set at import, before any test compiles anything: jax decides once per process whether the
# persistent cache is used (jax/_src/compilation_cache.py, is_cache_used).
_OWN_JIT_CACHE = None
if os.environ.get("FRAMP_TEST_JIT_CACHE", "1") != "0":
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _OWN_JIT_CACHE = tempfile.mkdtemp(prefix="framp_jax_test_jit_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_JIT_CACHE  # inherited by subprocesses
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def pytest_unconfigure(config):
    if _OWN_JIT_CACHE:
        shutil.rmtree(_OWN_JIT_CACHE, ignore_errors=True)


# -- tiny image data set --------------------------------------------------------------------
TINY_CLASSES = 4
TINY_SHAPE = (8, 8, 3)


def make_tiny_images(n: int, rng: np.random.Generator, num_classes: int = TINY_CLASSES):
    """``n`` noisy images whose class is their colour: class c in 0..2 brightens channel c,
    class 3 brightens all three (white); per-pixel noise in [0, 64). Balanced classes."""
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    x = rng.integers(0, 64, size=(n,) + TINY_SHAPE)
    for c in range(num_classes):
        x[y == c, :, :, c if c < 3 else slice(None)] += 176
    return x.astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory):
    """Path of the tiny data set: 400 train / 200 test images, 4 classes, 8x8x3 uint8."""
    rng = np.random.default_rng(1234)
    x_train, y_train = make_tiny_images(400, rng)
    x_test, y_test = make_tiny_images(200, rng)
    path = tmp_path_factory.mktemp("tiny_data") / "tiny.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


# Fields the tiny config sets on top of base_config() (besides the dataset).
TINY_FIELDS = dict(
    model="cnn",
    num_clients=8,            # budgets 1, 1/4, 1/16, 1/64: two clients each
    clients_per_round=4,
    rounds=3,
    local_steps=5,            # one epoch of each client's 50 samples
    batch_size=10,
    lr=0.3,                   # learns the colours within ~4 rounds
    alpha=0.5,
    eval_every=1,
    eval_batch=10,
    union_subset=0,
    checkpoint_every=100,
    keep_checkpoints=5,
)


def build_tiny_config(npz_path: str, **overrides):
    """``base_config()`` for the tiny data set (``TINY_FIELDS``) with ``overrides`` applied."""
    c = base_config()
    c.dataset = f"npz:{npz_path}"
    for k, v in {**TINY_FIELDS, **overrides}.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope="session")
def tiny_config(tiny_npz):
    """``tiny_config(**overrides)`` -> a fresh config for the tiny data set."""
    return lambda **overrides: build_tiny_config(tiny_npz, **overrides)
