"""Computations behind reported numbers that the earlier tests let a wrong line through
(issue 32's surviving mutations), each against a hand computation:

* HeteroFL's label-masked logits (``losses.label_masked_logits``): absent classes' logits set
  to 0, not -1e9 — a case where the two give different predictions;
* the label-masked Local accuracy (HeteroFL's, now the ``local_masked/`` column of every
  method): the classes *absent* from the client are masked, through both modalities'
  ``local_accuracy`` and ``eval.masked_local_logits``, on hand-made logits whose correct
  counts differ between the right mask, the inverted mask, -1e9 and no mask;
* results.json's ``final``: the mean of the last ``eval_last`` evaluations (not the best, the
  last, or the mean of all);
* the chunked HN's per-entry scales (``hypernet.entry_scales``): He std sqrt(2 / fan_in) for
  kernels, 0.1 around 1 for norm scales, 0.01 for biases, by hand.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from framp_jax.data.graph_modality import graph_local_accuracy
from framp_jax.data.image_modality import local_accuracy
from framp_jax.hypernet import entry_scales
from framp_jax.losses import cross_entropy, label_masked_logits


# ---------------------------------------------------------------------------------------------
# label-masked logits

def test_label_masked_logits_set_absent_classes_to_zero():
    """Present classes {1, 2}: the absent classes 0 and 3 get logit 0 (HeteroFL's
    ``output.masked_fill(label_mask == 0, 0)``), the present ones keep theirs. With every
    present logit negative, the 0 of an absent class wins the argmax; -1e9 would not."""
    logits = jnp.array([[-3.0, -1.0, -2.0, -5.0],
                        [2.0, -4.0, 1.0, 0.5]])
    mask = jnp.array([0.0, 1.0, 1.0, 0.0])
    out = np.asarray(label_masked_logits(logits, mask))
    np.testing.assert_array_equal(out, [[0.0, -1.0, -2.0, 0.0], [0.0, -4.0, 1.0, 0.0]])
    assert np.argmax(out, -1).tolist() == [0, 2]       # with -1e9: [1, 2]
    # a boolean mask (the evaluation passes label_counts_row > 0) masks alike
    np.testing.assert_array_equal(np.asarray(label_masked_logits(logits, mask > 0)), out)
    # the masked CE of row 0 with label 1: logsumexp(0, -1, -2, 0) - (-1)
    want = math.log(2 + math.exp(-1) + math.exp(-2)) + 1.0
    got = float(cross_entropy(label_masked_logits(logits[:1], mask), jnp.array([1])))
    assert abs(got - want) < 1e-6


# Hand-made Local evaluation: K = 4 classes, the "model" of client i outputs the logits L stored
# in its test inputs (logits = input - 100, input = L + 100 as uint8 pixels of a 1x1 image with
# 4 channels, or a graph node's 4 features). For each test sample: its label, its logits, and
# whether it is correct with (the right mask, the inverted mask, absent -> -1e9, no mask).
#
# client 0, trained on classes {1, 2} (label counts [0, 5, 3, 0]):
#   y=1  L=[ 5, -1, -3,  2]  right [0,-1,-3,0] -> 0 x   inverted [5,0,0,2] -> 0 x   -1e9 -> 1 v   raw -> 0 x
#   y=2  L=[-4, -6, -2, -5]  right [0,-6,-2,0] -> 0 x   inverted [-4,0,0,-5] -> 1 x  -1e9 -> 2 v   raw -> 2 v
#   y=1  L=[ 1,  3,  2, -2]  right [0,3,2,0]  -> 1 v   inverted [1,0,0,-2] -> 0 x   -1e9 -> 1 v   raw -> 1 v
#   y=2  L=[-1, -5, -3, -2]  right [0,-5,-3,0] -> 0 x   inverted [-1,0,0,-2] -> 1 x  -1e9 -> 2 v   raw -> 0 x
#   (a 5th slot is padding: test count 4)
#   correct: right 1/4, inverted 0/4, -1e9 4/4, raw 2/4
# client 1, trained on classes {0, 3} (label counts [2, 0, 0, 7]):
#   y=0  L=[ 2,  5,  1, -3]  right [2,0,0,-3] -> 0 v    inverted [0,5,1,0] -> 1 x    -1e9 -> 0 v   raw -> 1 x
#   y=3  L=[-3, -1, -2, -2]  right [-3,0,0,-2] -> 1 x   inverted [0,-1,-2,0] -> 0 x  -1e9 -> 3 v   raw -> 1 x
#   correct: right 1/2, inverted 0/2, -1e9 2/2, raw 0/2
# client 2: no test data -> NaN
LOGITS = np.full((3, 5, 4), -9.0)
LABELS = np.full((3, 5), -1)
LOGITS[0, :4] = [[5, -1, -3, 2], [-4, -6, -2, -5], [1, 3, 2, -2], [-1, -5, -3, -2]]
LABELS[0, :4] = [1, 2, 1, 2]
LOGITS[1, :2] = [[2, 5, 1, -3], [-3, -1, -2, -2]]
LABELS[1, :2] = [0, 3]
COUNTS = np.array([4, 2, 0], np.int32)
LABEL_COUNTS = np.array([[0, 5, 3, 0], [2, 0, 0, 7], [1, 1, 1, 1]], np.float32)
WANT = {"right": [0.25, 0.5], "inverted": [0.0, 0.0], "minus_1e9": [1.0, 1.0], "raw": [0.5, 0.0]}

MASKS = {
    "right": lambda lg, row: label_masked_logits(lg, row > 0),
    "inverted": lambda lg, row: label_masked_logits(lg, row == 0),
    "minus_1e9": lambda lg, row: jnp.where(row[None, :] > 0, lg, -1e9),
    "raw": None,
}


def _check_local(acc_fn):
    got = {k: np.asarray(acc_fn(f)) for k, f in MASKS.items()}
    for k, want in WANT.items():
        np.testing.assert_allclose(got[k][:2], want, err_msg=k)
        assert np.isnan(got[k][2]), k
    # every alternative gives other counts than the right mask
    assert all(got[k][:2].tolist() != WANT["right"] for k in ("inverted", "minus_1e9", "raw"))


def test_image_local_accuracy_masks_the_absent_classes():
    x = np.clip(LOGITS + 100, 0, 255).astype(np.uint8)[:, :, None, None, :]  # [N, n, 1, 1, 4]
    params = {"shift": jnp.full((3,), 100.0)}

    def apply_fn(p, xb, train=False, rng=None):
        lg = xb[:, 0, 0, :] - p["shift"]
        return lg, lg
    # normalize(x) = (x / 255 - 0) / (1 / 255) = x (up to float rounding, far from any tie)
    _check_local(lambda f: local_accuracy(apply_fn, params, jnp.asarray(x), jnp.asarray(LABELS),
                                          jnp.asarray(COUNTS), 0.0, 1.0 / 255.0, batch=2,
                                          logits_fn=f, label_counts=jnp.asarray(LABEL_COUNTS)))


def test_graph_local_accuracy_masks_the_absent_classes():
    params = {"shift": jnp.full((3,), 100.0)}

    def apply_fn(p, g, train=False, rng=None):  # a "graph" of 5 nodes with 4 features each
        lg = g - p["shift"]
        return lg, lg
    _check_local(lambda f: graph_local_accuracy(apply_fn, params, jnp.asarray(LOGITS + 100.0),
                                                jnp.asarray(LABELS), jnp.asarray(COUNTS),
                                                logits_fn=f,
                                                label_counts=jnp.asarray(LABEL_COUNTS)))


def test_evaluator_masks_the_classes_absent_from_the_client():
    """``eval.masked_local_logits`` (every method's ``local_masked/`` column) masks the classes
    with zero training count."""
    from framp_jax.eval import masked_local_logits
    logits = jnp.array([[-3.0, -1.0, -2.0, -5.0]])
    out = np.asarray(masked_local_logits(logits, jnp.array([0.0, 5.0, 3.0, 0.0])))
    np.testing.assert_array_equal(out, [[0.0, -1.0, -2.0, 0.0]])


# ---------------------------------------------------------------------------------------------
# results.json: final = mean of the last eval_last evaluations

def _final(history, eval_last):
    from framp_jax.simulate import make_results
    c = mlc.ConfigDict(dict(method="m", dataset="d", seed=0, rounds=3, eval_last=eval_last))
    return make_results(c, history, 1.0, 1, SimpleNamespace(info={}))


def test_final_is_the_mean_of_the_last_eval_last_evaluations():
    """Three evaluations, eval_last=2: the mean of rounds 2 and 3 (0.7), not the best (0.9),
    the last (0.5), the worst (0.5) nor the mean of all three (0.533); a key only some of the
    last rows hold is averaged over those."""
    h = [{"round": 1, "local/1": 0.2, "local/mean": 0.2, "union/1": 0.1, "union/mean": 0.1},
         {"round": 2, "local/1": 0.9, "local/mean": 0.8, "union/1": 0.6, "union/mean": 0.6,
          "val/local/mean": 0.3},
         {"round": 3, "local/1": 0.5, "local/mean": 0.4, "union/1": 0.2, "union/mean": 0.3,
          "local_masked/mean": 0.75, "val/local/mean": 0.5}]
    r = _final(h, 2)
    np.testing.assert_allclose([r["final"]["local"]["1"], r["final"]["local"]["mean"],
                                r["final"]["union"]["1"], r["final"]["union"]["mean"],
                                r["final"]["val/local"]["mean"]],
                               [0.7, 0.6, 0.4, 0.45, 0.4], rtol=1e-12)
    assert r["final"]["local_masked"] == {"mean": 0.75}
    assert "rounds [2, 3]" in r["final_statistic"]
    # eval_last=1 is the last evaluation; more than there are takes all of them
    assert _final(h, 1)["final"]["local"]["1"] == 0.5
    np.testing.assert_allclose(_final(h, 5)["final"]["local"]["1"], (0.2 + 0.9 + 0.5) / 3)


# ---------------------------------------------------------------------------------------------
# the hypernetwork's per-entry scales

def test_entry_scales_by_hand():
    """theta = a + b * u: kernels a = 0, b = sqrt(2 / fan_in) (fan_in = every axis but the
    last: 3*3*4 for the conv, 72 for the dense); norm scales a = 1, b = 0.1; biases and norm
    offsets a = 0, b = 0.01; leaves not generated are left out; ``jax.tree`` leaf order."""
    z = jnp.zeros
    tpl = {"conv": {"kernel": z((3, 3, 4, 8)), "bias": z((8,))},
           "bn": {"scale": z((8,)), "offset": z((8,))},
           "dense": {"kernel": z((72, 5)), "bias": z((5,))}}
    gen = jax.tree.map(lambda _: True, tpl)
    gen["dense"]["bias"] = False
    a, b = entry_scales(tpl, gen)
    # leaf order: bn.offset, bn.scale, conv.bias, conv.kernel, (dense.bias), dense.kernel
    want_a = np.concatenate([np.zeros(8), np.ones(8), np.zeros(8), np.zeros(288), np.zeros(360)])
    want_b = np.concatenate([np.full(8, 0.01), np.full(8, 0.1), np.full(8, 0.01),
                             np.full(288, math.sqrt(2 / 36)), np.full(360, math.sqrt(2 / 72))])
    assert a.shape == want_a.shape and b.shape == want_b.shape
    np.testing.assert_array_equal(a, want_a)
    np.testing.assert_allclose(b, want_b, rtol=1e-6)
    # kernel_scale="model": a kernel's b is the std of the template's own values
    tpl2 = dict(tpl, conv=dict(tpl["conv"], kernel=jnp.asarray(
        np.where(np.arange(288) % 2, 0.3, -0.3).reshape(3, 3, 4, 8), jnp.float32)))
    _, b2 = entry_scales(tpl2, gen, "model")
    np.testing.assert_allclose(b2[24:312], 0.3, rtol=1e-6)
    np.testing.assert_allclose(b2[312:], 0.0, atol=0)  # the dense kernel is all zeros here
