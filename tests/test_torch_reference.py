"""Whole vision models against PyTorch references built from ``torch.nn`` layers in the layout
of the official networks (``tests/fixtures/torch_models.py``): the logits, the loss and the
gradient of the summed cross-entropies with respect to every weight.

The references run wherever the suite runs: without torch (the README's test command and CI)
framp_jax is compared against the reference outputs recorded in
``tests/fixtures/torch_reference.npz`` by ``tests/fixtures/make_torch_fixtures.py``; where torch
is installed (``pip install torch==2.13.0``) against live torch too, and the recording against
live torch. Parameters and inputs are hashed (``tests/reference_cases.py``), identical on
every machine.

The formulas are compared in float64 (framp_jax under ``jax.enable_x64``, torch in double):
logits and loss to 1e-6, each leaf's gradient (norm, largest entry, three projections) to 1e-4
of its norm. float32 is only checked on the logits (2e-4): framp_jax's float32 gradients of the
pre-activation network at width 1/2 differ from torch's float64 ones by up to ~5e-2 of a leaf's
largest entry (layer2_0's n2 offset and conv1 kernel, and through them layer 1 and the stem;
the former float32 test failed there with torch 2.13), while framp_jax under x64 matches them
to ~1e-6 and torch's float32 CPU kernels to ~1e-6: float32 rounding in XLA's computation, not a
different formula.

* ``models/resnet.py``: the post-activation static-BN ResNet-18 (FIARSE's ``BetaResNet18_sbn``)
  at width 1/4 (and 1, slow);
* ``models/preact.py``: HeteroFL's pre-activation ResNet-18 with Scaler and BN, at width 1/2;
* ``models/exits.py``: ScaleFL's early-exit ResNet-18 at width 1/2, every exit's logits.

The hand-computed padding cases are in ``tests/test_conv_padding.py``.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import reference_cases as RC

HAVE_TORCH = importlib.util.find_spec("torch") is not None
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "torch_reference.npz")


def recorded(case: str) -> dict:
    with np.load(FIXTURE) as f:
        return {k[len(case) + 1:]: f[k] for k in f.files if k.startswith(case + "/")}


def live(case: str) -> dict:
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
    import torch_models
    return torch_models.torch_summary(case)


_SUMMARIES = {}


def summary(case: str, impl: str) -> dict:
    if (case, impl) not in _SUMMARIES:
        _SUMMARIES[case, impl] = RC.jax_summary(case, impl)
    return _SUMMARIES[case, impl]


def check(case: str, impl: str):
    got = summary(case, impl)
    refs = {"recorded": recorded(case)}
    if HAVE_TORCH:
        refs["live torch"] = live(case)
    for what, ref in refs.items():
        worst = RC.compare(got, ref)
        print(f"{case} [{impl}] vs {what}: max relative gradient difference {worst:.1e}, "
              f"float32 logits {float(np.abs(got['logits32'] - ref['logits']).max()):.1e}")


@pytest.mark.parametrize("case", ["resnet18", "preact", "exits"])
def test_model_matches_torch(case):
    check(case, "im2col")


@pytest.mark.slow
@pytest.mark.parametrize("case", ["resnet18", "preact", "exits"])
def test_model_matches_torch_xla_conv(case):
    check(case, "xla")


@pytest.mark.slow
def test_resnet18_full_width_matches_torch():
    check("resnet18_full", "im2col")


def test_a_wrong_model_fails_the_comparison():
    """The comparison can fail: one projection of one leaf off by 1e-3 of the leaf's norm, the
    float32 logits off by 1e-3, or another network's reference (the pre-activation ResNet's
    for the post-activation one's leaves)."""
    got = summary("exits", "im2col")
    ref = recorded("exits")
    RC.compare(got, ref)
    i = list(ref["names"]).index("['stem']['kernel']")
    bad = dict(got, grad_proj=got["grad_proj"].copy())
    bad["grad_proj"][i, 1] += 1e-3 * ref["grad_norm"][i]
    with pytest.raises(AssertionError, match="stem"):
        RC.compare(bad, ref)
    with pytest.raises(AssertionError):
        RC.compare(dict(got, logits32=got["logits32"] + 1e-3), ref)
    with pytest.raises(AssertionError, match="leaves changed"):
        RC.compare(got, recorded("preact"))


@pytest.mark.skipif(not HAVE_TORCH, reason="torch not installed: the recording is compared")
@pytest.mark.parametrize("case", list(RC.CASES))
def test_recording_is_current(case):
    """The recorded references are what the current torch models give (else rerun
    tests/fixtures/make_torch_fixtures.py)."""
    ref, now = recorded(case), live(case)
    assert list(ref["names"]) == list(now["names"])
    for k in ("logits", "loss", "grad_norm", "grad_maxabs", "grad_proj"):
        np.testing.assert_allclose(now[k], ref[k], rtol=1e-9, atol=1e-12, err_msg=k)
