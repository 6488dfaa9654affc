"""Local and Union accuracy (SPEC §2.6) with a fake model whose predictions are known: it
predicts ``(pixel[0, 0, 0] + shift) mod 4``, and predicts wrong for a whole batch if the batch
holds a padding image (marker pixel [0, 0, 1] == 0), so feeding padding slots is detected."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import config as C
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup, FedData
from framp_jax.client import LocalConfig
from framp_jax.data.image_modality import (ImageModality, batch_for_eval, local_accuracy,
                                           union_accuracy)
from framp_jax.eval import budget_label, eval_metrics, make_evaluator, summarize

K = 4
# normalize(x) = (x/255 - 0) / (1/255) = x: the fake model reads raw pixel values
MEAN, STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)


def fake_apply(params, x, *, train=False, rng=None):
    pix = jnp.round(x[:, 0, 0, 0]).astype(jnp.int32)
    pred = (pix + params["shift"].astype(jnp.int32)) % K
    padding_in_batch = jnp.any(jnp.round(x[:, 0, 0, 1]) == 0)
    pred = jnp.where(padding_in_batch, (pred + 1) % K, pred)  # static-BN leak -> all wrong
    return jax.nn.one_hot(pred, K) * 10.0, x.reshape(x.shape[0], -1)


def images(pixels, n_max=None):
    """uint8 images [n_max, 2, 2, 3]: pixel [0,0,0] = value, marker [0,0,1] = 1; zero padding."""
    n_max = n_max or len(pixels)
    x = np.zeros((n_max, 2, 2, 3), np.uint8)
    x[:len(pixels), 0, 0, 0] = pixels
    x[:len(pixels), 0, 0, 1] = 1
    return x


def labels(y, n_max):
    out = np.zeros((n_max,), np.int32)
    out[:len(y)] = y
    return out


N_MAX, BATCH = 10, 4
# client 0: 7 samples, sample 3 mislabelled for shift 0 -> 6/7 (the tail batch wraps around)
Y0 = [0, 1, 2, 3, 0, 1, 2]
P0 = [0, 1, 2, 0, 0, 1, 2]
# client 1: 10 samples (no padding), pixels = label - 1 for the first 5 -> shift 1 gets 5/10
Y1 = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
P1 = [3, 0, 1, 2, 3, 1, 2, 3, 0, 1]
# client 2: no test data -> NaN
# client 3: 3 samples, pixel = label - 2 -> shift 2 gets 3/3
Y3 = [1, 2, 3]
P3 = [3, 0, 1]
COUNTS = [7, 10, 0, 3]


def client_arrays():
    tx = np.stack([images(P0, N_MAX), images(P1, N_MAX), images([], N_MAX), images(P3, N_MAX)])
    ty = np.stack([labels(Y0, N_MAX), labels(Y1, N_MAX), labels([], N_MAX), labels(Y3, N_MAX)])
    # padding slots carry labels the model would get right if they were counted
    ty[0, 7:] = 0
    ty[3, 3:] = 1
    return jnp.asarray(tx), jnp.asarray(ty), jnp.asarray(COUNTS, jnp.int32)


def shifts(*s):
    return {"shift": jnp.asarray(s, jnp.float32)}


# union: 9 images; pixel = label - s_j with s_j = 0,0,0,0,0,1,1,2,3
UY = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0], np.int32)
US = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3])
UNION_ACC = {0: 5 / 9, 1: 2 / 9, 2: 1 / 9, 3: 1 / 9}  # accuracy of the model with that shift


def union_arrays():
    return jnp.asarray(images((UY - US) % K)), jnp.asarray(UY)


def test_batch_for_eval_wraps_real_samples_and_marks_them_invalid():
    x = jnp.arange(10)[:, None] * 1.0
    y = jnp.arange(10)
    xb, yb, vb = batch_for_eval(x, y, jnp.int32(7), 4)
    assert xb.shape == (3, 4, 1)
    np.testing.assert_array_equal(yb.ravel(), [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(vb.ravel(), [1] * 7 + [0] * 5)


def test_local_accuracy_hand_example():
    tx, ty, tc = client_arrays()
    acc = np.asarray(local_accuracy(fake_apply, shifts(0, 1, 0, 2), tx, ty, tc, MEAN, STD, BATCH))
    np.testing.assert_allclose(acc[[0, 1, 3]], [6 / 7, 5 / 10, 1.0], rtol=1e-6)
    assert math.isnan(acc[2])


def test_local_accuracy_shared_params_and_batch_size_independence():
    tx, ty, tc = client_arrays()
    for batch in (1, 3, 4, 10, 16):
        acc = np.asarray(local_accuracy(fake_apply, {"shift": jnp.float32(0)}, tx, ty, tc,
                                        MEAN, STD, batch, shared_params=True))
        # shift 0: client 0 6/7; client 1 pixels == labels for samples 5..9 -> 5/10; client 3 0/3
        np.testing.assert_allclose(acc[[0, 1, 3]], [6 / 7, 5 / 10, 0.0], rtol=1e-6)
        assert math.isnan(acc[2])


def test_local_logits_fn_gets_the_clients_label_counts():
    tx, ty, tc = client_arrays()
    # each client's row is a one-hot of one class; logits_fn forces that class
    rows = jnp.asarray(np.eye(K, dtype=np.float32)[[0, 3, 1, 2]])
    acc = np.asarray(local_accuracy(fake_apply, shifts(0, 0, 0, 0), tx, ty, tc, MEAN, STD, BATCH,
                                    lambda lg, row: lg + 100.0 * row, rows))
    # fraction of each client's labels equal to the forced class
    np.testing.assert_allclose(acc[[0, 1, 3]], [2 / 7, 2 / 10, 1 / 3], rtol=1e-6)


@pytest.mark.parametrize("chunk", [None, 2])
def test_union_accuracy_each_model_on_the_union(chunk):
    ux, uy = union_arrays()
    acc = np.asarray(union_accuracy(fake_apply, shifts(0, 1, 2, 3), ux, uy, MEAN, STD, BATCH, chunk))
    np.testing.assert_allclose(acc, [UNION_ACC[s] for s in range(4)], rtol=1e-6)


def test_make_evaluator_routes_groups_to_their_clients():
    tx, ty, tc = client_arrays()
    ux, uy = union_arrays()
    modality = ImageModality(mean=MEAN, std=STD)
    ctx = Context(model=None, family=None, modality=modality, num_clients=4, num_classes=K,
                  budgets=np.array([1.0, 0.25, 0.25, 1.0]), budget_levels=(1.0, 0.25),
                  train_ids=np.arange(4), clients_per_round=2,
                  local=LocalConfig(modality=modality))

    def eval_groups(state, data):
        return [EvalGroup(fake_apply, shifts(0, 2), np.array([0, 3]), per_client=True),
                EvalGroup(fake_apply, {"shift": jnp.float32(1)}, np.array([1, 2]),
                          per_client=False)]

    alg = Algorithm("fake", None, None, eval_groups)

    z = jnp.zeros((4, 1))
    data = FedData(z, z, z, tx, ty, tc, jnp.asarray(ctx.budgets), jnp.ones((4, K)), ux, uy)
    local, union = make_evaluator(alg, ctx, BATCH, model_chunk=0)(None, data, ux, uy)
    local, union = np.asarray(local), np.asarray(union)
    np.testing.assert_allclose(local[[0, 1, 3]], [6 / 7, 5 / 10, 1.0], rtol=1e-6)
    assert math.isnan(local[2])
    np.testing.assert_allclose(union, [UNION_ACC[0], UNION_ACC[1], UNION_ACC[1], UNION_ACC[2]],
                               rtol=1e-6)


def test_budget_label():
    assert [budget_label(b) for b in (1.0, 0.25, 0.0625, 0.015625, 0.5, 1 / 3)] == \
        ["1", "1/4", "1/16", "1/64", "1/2", "1/3"]


def test_summarize_per_budget():
    budgets = [1.0, 1.0, 1.0, 0.25, 0.0625, 0.0625]
    local = [0.5, 0.7, np.nan, 0.2, 0.9, 0.1]
    union = [0.6, 0.6, 0.6, 0.3, 0.8, 0.7]
    out = summarize(budgets, local, union, levels=[1.0, 0.25, 0.0625, 0.015625])
    assert set(out) == {"local/1", "local/1/4", "local/1/16", "local/mean",
                        "union/1", "union/1/4", "union/1/16", "union/mean"}  # no 1/64 clients
    assert out["local/1"] == pytest.approx(0.6)        # NaN client excluded
    assert out["local/1/4"] == pytest.approx(0.2)
    assert out["local/1/16"] == pytest.approx(0.5)
    assert out["local/mean"] == pytest.approx((0.5 + 0.7 + 0.2 + 0.9 + 0.1) / 5)  # over clients
    assert out["union/1/16"] == pytest.approx(0.75)
    assert out["union/mean"] == pytest.approx((0.6 + 0.3 + 0.75) / 3)  # over levels, not clients


def test_eval_metrics_splits_unseen_clients():
    c = C.base_config()
    c.num_clients, c.budget_levels, c.budget_dist, c.heldout_frac = 8, (1.0, 0.25), (1, 1), 0.25
    budgets = C.assign_budgets(c)
    np.testing.assert_array_equal(budgets, [1, 1, 1, 1, 0.25, 0.25, 0.25, 0.25])
    held = [ids.tolist() for ids in C.heldout_ids(c)]
    assert held == [[3], [7]]  # the last client of each level
    ctx = Context(model=None, family=None, modality=ImageModality(), num_clients=8,
                  num_classes=K, budgets=budgets, budget_levels=(1.0, 0.25),
                  train_ids=np.array([0, 1, 2, 4, 5, 6]), clients_per_round=2,
                  local=LocalConfig())
    local = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.5, 0.6, 0.8])
    union = local / 2
    m = eval_metrics(c, ctx, local, union)
    assert m["local/1"] == pytest.approx(0.2) and m["local/1/4"] == pytest.approx(0.5)
    assert m["local/mean"] == pytest.approx(np.mean([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert m["union/mean"] == pytest.approx((0.1 + 0.25) / 2)
    assert m["unseen/local/1"] == pytest.approx(0.9) and m["unseen/local/1/4"] == pytest.approx(0.8)
    assert m["unseen/union/mean"] == pytest.approx((0.45 + 0.4) / 2)
