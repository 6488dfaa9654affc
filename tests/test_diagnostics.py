"""Evaluation diagnostics (``config.diagnostics``, framp_jax/diagnostics.py) against hand and
numpy computations: per-class correct counts on the union set (image and graph modality), the
Union accuracy split by class presence, cosine similarity of the clients' models, and an end to
end run that writes the diag/ columns and still compiles its round function once.

The fake image model (as in test_eval.py) predicts ``(pixel[0, 0, 0] + shift) mod 4``, and
predicts wrong for a whole batch holding a padding image (marker pixel [0, 0, 1] == 0)."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import config as C
from framp_jax import simulate
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup, FedData
from framp_jax.client import LocalConfig
from framp_jax.data.graph_modality import GraphModality
from framp_jax.data.image_modality import ImageModality, union_accuracy
from framp_jax.diagnostics import make_diagnostics
from framp_jax.rundir import read_metrics_csv

K = 4
MEAN, STD = (0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255)  # normalize(x) = x
MODALITY = ImageModality(mean=MEAN, std=STD)


def fake_apply(params, x, *, train=False, rng=None):
    pix = jnp.round(x[:, 0, 0, 0]).astype(jnp.int32)
    pred = (pix + params["shift"].astype(jnp.int32)) % K
    padding_in_batch = jnp.any(jnp.round(x[:, 0, 0, 1]) == 0)
    pred = jnp.where(padding_in_batch, (pred + 1) % K, pred)
    return jax.nn.one_hot(pred, K) * 10.0, x.reshape(x.shape[0], -1)


def images(pixels):
    x = np.zeros((len(pixels), 2, 2, 3), np.uint8)
    x[:, 0, 0, 0] = pixels
    x[:, 0, 0, 1] = 1
    return x


# union: 9 images with pixel = label - s_j: the model with shift s gets exactly the samples
# with s_j = s right. Per true class (labels 0..3):
UY = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0], np.int32)
US = np.array([0, 0, 0, 0, 0, 1, 1, 2, 3])
CLASS_CORRECT = {0: [2, 1, 1, 1],   # samples 0..4, labels 0 1 2 3 0
                 1: [0, 1, 1, 0],   # samples 5, 6: labels 1 2
                 2: [0, 0, 0, 1],   # sample 7: label 3
                 3: [1, 0, 0, 0]}   # sample 8: label 0
CLASS_TOTAL = [3, 2, 2, 2]


def union_arrays():
    return jnp.asarray(images((UY - US) % K)), jnp.asarray(UY)


# ---------------------------------------------------------------------------------------------
# union_class_correct


@pytest.mark.parametrize("batch,chunk", [(4, None), (9, 2), (2, None)])
def test_image_union_class_correct_hand_and_numpy(batch, chunk):
    ux, uy = union_arrays()
    shifts = np.array([0, 1, 2, 3, 2], np.float32)
    got = np.asarray(MODALITY.union_class_correct(fake_apply, {"shift": jnp.asarray(shifts)},
                                                  ux, uy, batch, K, chunk))
    assert got.shape == (5, K) and got.dtype == np.int32
    np.testing.assert_array_equal(got, [CLASS_CORRECT[int(s)] for s in shifts])
    # numpy: predictions from the pixels, correct ones counted per true class
    pix = (UY - US) % K
    ref = np.stack([np.bincount(UY[(pix + int(s)) % K == UY], minlength=K) for s in shifts])
    np.testing.assert_array_equal(got, ref)
    # row sums are union_accuracy's correct counts
    acc = np.asarray(union_accuracy(fake_apply, {"shift": jnp.asarray(shifts)}, ux, uy, MEAN,
                                    STD, batch, chunk))
    np.testing.assert_allclose(got.sum(1) / len(UY), acc, rtol=1e-6)


def graph_apply(params, g, *, train=False, rng=None):
    """Fake node classifier: predicts (feature + shift) mod K per node."""
    pred = (g["feat"] + params["shift"].astype(jnp.int32)) % K
    return jax.nn.one_hot(pred, K) * 10.0, None


def test_graph_union_class_correct_numpy():
    rng = np.random.default_rng(0)
    n_clients, n_pad = 3, 7
    feat = rng.integers(0, K, (n_clients, n_pad)).astype(np.int32)
    y = rng.integers(0, K, (n_clients, n_pad)).astype(np.int32)
    y[rng.random((n_clients, n_pad)) < 0.4] = -1      # non-test nodes (never counted)
    shifts = np.array([0, 1, 3], np.float32)
    got = np.asarray(GraphModality(in_dim=1).union_class_correct(
        graph_apply, {"shift": jnp.asarray(shifts)}, {"feat": jnp.asarray(feat)},
        jnp.asarray(y), 0, K, None))
    ref = np.zeros((len(shifts), K), int)
    for m, s in enumerate(shifts):
        hit = ((feat + int(s)) % K == y) & (y >= 0)
        ref[m] = np.bincount(y[hit], minlength=K)
    assert ref.sum() > 0 and (y < 0).any()
    np.testing.assert_array_equal(got, ref)
    # chunked over models: the same
    got2 = GraphModality(in_dim=1).union_class_correct(
        graph_apply, {"shift": jnp.asarray(shifts)}, {"feat": jnp.asarray(feat)},
        jnp.asarray(y), 0, K, 2)
    np.testing.assert_array_equal(np.asarray(got2), ref)


# ---------------------------------------------------------------------------------------------
# make_diagnostics with a fake algorithm

BUDGETS = np.array([1.0, 0.25, 0.25, 1.0])
# train label histograms: client 0 trained on {0, 1}, client 1 on {1, 2, 3}, client 2 on all,
# client 3 on {3}
LABEL_COUNTS = np.array([[5, 2, 0, 0], [0, 1, 1, 4], [1, 1, 1, 1], [0, 0, 0, 9]], np.float32)
W_PER = np.array([[[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]],
                  [[2.0, 1.0, 1.0], [0.0, 1.0, -2.0]]], np.float32)   # clients 0 and 3
W_SHARED = np.array([[1.0, 0.0, 1.0], [2.0, 2.0, -1.0]], np.float32)  # clients 1 and 2


def make_ctx(train_ids=(0, 1, 2, 3)):
    return Context(model=None, family=None, modality=MODALITY, num_clients=4, num_classes=K,
                   budgets=BUDGETS, budget_levels=(1.0, 0.25), train_ids=np.asarray(train_ids),
                   clients_per_round=2, local=LocalConfig(modality=MODALITY))


def make_data():
    ux, uy = union_arrays()
    z = jnp.zeros((4, 1))
    return FedData(z, z, z, z, z, z, jnp.asarray(BUDGETS, jnp.float32),
                   jnp.asarray(LABEL_COUNTS), ux, uy)


def fake_alg(shared_w=W_SHARED, diagnostic_params=None):
    """Clients 0 and 3: their own models (shifts 0 and 2); clients 1 and 2 share one (shift 1).
    The ``w`` leaf only enters the cosine similarity."""
    def eval_groups(state, data):
        return [EvalGroup(fake_apply, {"shift": jnp.asarray([0.0, 2.0]), "w": jnp.asarray(W_PER)},
                          np.array([0, 3]), per_client=True),
                EvalGroup(fake_apply, {"shift": jnp.float32(1), "w": jnp.asarray(shared_w)},
                          np.array([1, 2]), per_client=False)]
    return Algorithm("fake", None, None, eval_groups, diagnostic_params=diagnostic_params)


def diagnose(alg, ctx=None, batch=4):
    data = make_data()
    return make_diagnostics(alg, ctx or make_ctx(), batch)(None, data, data.union_x, data.union_y)


def test_union_present_absent_hand_example():
    m = diagnose(fake_alg())
    # by hand, union class totals [3, 2, 2, 2]:
    # client 0 (shift 0, correct [2,1,1,1]): present {0,1}: 3/5, absent {2,3}: 2/4
    # client 1 (shift 1, correct [0,1,1,0]): present {1,2,3}: 2/6, absent {0}: 0/3
    # client 2 (shift 1): present all: 2/9, absent none: NaN
    # client 3 (shift 2, correct [0,0,0,1]): present {3}: 1/2, absent {0,1,2}: 0/7
    assert m["diag/union_present/1"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    assert m["diag/union_present/1/4"] == pytest.approx((2 / 6 + 2 / 9) / 2)
    assert m["diag/union_present/mean"] == pytest.approx(((3 / 5 + 1 / 2) / 2
                                                          + (2 / 6 + 2 / 9) / 2) / 2)
    assert m["diag/union_absent/1"] == pytest.approx((2 / 4 + 0.0) / 2)
    assert m["diag/union_absent/1/4"] == pytest.approx(0.0)   # client 2's NaN left out
    assert m["diag/union_absent/mean"] == pytest.approx(0.125)


def test_union_present_absent_leaves_out_heldout_clients():
    m = diagnose(fake_alg(), make_ctx(train_ids=(0, 1, 3)))  # client 2 held out
    assert m["diag/union_present/1/4"] == pytest.approx(2 / 6)
    assert m["diag/union_present/1"] == pytest.approx((3 / 5 + 1 / 2) / 2)
    m = diagnose(fake_alg(), make_ctx(train_ids=(0, 2, 3)))  # client 1 held out
    assert math.isnan(m["diag/union_absent/1/4"])            # client 2 has no absent class
    assert m["diag/union_absent/mean"] == pytest.approx(0.25)  # the levels with a value


def cos(a, b):
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def flat(shift, w):
    return np.concatenate([[shift], np.ravel(w)]).astype(np.float64)


def test_cosine_metrics_per_client_and_shared_groups():
    m = diagnose(fake_alg())
    v = {0: flat(0, W_PER[0]), 3: flat(2, W_PER[1]), 1: flat(1, W_SHARED), 2: flat(1, W_SHARED)}
    c03, c01, c13 = cos(v[0], v[3]), cos(v[0], v[1]), cos(v[1], v[3])
    assert m["diag/cos_within/1"] == pytest.approx(c03, rel=1e-6)
    assert m["diag/cos_within/1/4"] == 1.0            # clients 1 and 2 share their model
    assert m["diag/cos_same_budget"] == pytest.approx((c03 + 1.0) / 2, rel=1e-6)
    # cross pairs (0,1), (0,2), (1,3), (2,3)
    assert m["diag/cos_cross_budget"] == pytest.approx((2 * c01 + 2 * c13) / 4, rel=1e-6)
    assert not any(k.startswith("diag/gen_cos") for k in m)


def test_cosine_skips_pairs_of_different_shapes():
    m = diagnose(fake_alg(shared_w=np.ones((3, 3), np.float32)))
    assert m["diag/cos_within/1"] == pytest.approx(cos(flat(0, W_PER[0]), flat(2, W_PER[1])),
                                                   rel=1e-6)
    assert m["diag/cos_within/1/4"] == 1.0
    assert math.isnan(m["diag/cos_cross_budget"])     # every cross pair mixes the two shapes


def test_cosine_of_diagnostic_params():
    rng = np.random.default_rng(3)
    gen = {"a": rng.normal(size=(4, 5)).astype(np.float32),
           "b": rng.normal(size=(4, 2, 3)).astype(np.float32)}
    alg = fake_alg(diagnostic_params=lambda state, data: jax.tree.map(jnp.asarray, gen))
    m = diagnose(alg, make_ctx(train_ids=(0, 1, 2)))  # client 3 held out
    v = [np.concatenate([gen["a"][i], gen["b"][i].ravel()]).astype(np.float64) for i in range(4)]
    assert m["diag/gen_cos_within/1/4"] == pytest.approx(cos(v[1], v[2]), rel=1e-5)
    assert math.isnan(m["diag/gen_cos_within/1"])     # client 3 held out: no pair at budget 1
    assert m["diag/gen_cos_same_budget"] == pytest.approx(cos(v[1], v[2]), rel=1e-5)
    assert m["diag/gen_cos_cross_budget"] == pytest.approx((cos(v[0], v[1]) + cos(v[0], v[2])) / 2,
                                                           rel=1e-5)
    # the evaluated models' metrics leave client 3 out as well
    assert math.isnan(m["diag/cos_within/1"])


# ---------------------------------------------------------------------------------------------
# config and end to end


@pytest.mark.parametrize("field", ["diagnostics", "record_mask_reuse"])
def test_config_field_validated_and_hash_stable(tiny_config, field):
    """The opt-in bool fields added after runs existed: False by default, left out of the config
    hash at False, and validated as bools."""
    c = tiny_config()
    assert c[field] is False
    old = tiny_config()
    del old[field]
    assert simulate.config_hash(c) == simulate.config_hash(old)
    assert simulate.config_hash(tiny_config(**{field: True})) != simulate.config_hash(c)
    bad = tiny_config()
    del bad[field]
    bad[field] = 1
    with pytest.raises(C.ConfigError, match=field):
        C.validate(bad)


def test_run_records_diag_metrics(tiny_config, tmp_path):
    c = tiny_config(rounds=2, diagnostics=True)
    res = simulate.run(c, str(tmp_path), progress=False, log=lambda *a, **k: None)
    assert res["compiles"] == 1
    rows = read_metrics_csv(os.path.join(tmp_path, "metrics.csv"))
    assert len(rows) == 2
    labels = ("1", "1/4", "1/16", "1/64")
    for r in rows:
        for name in ("union_present", "union_absent"):
            for s in labels + ("mean",):
                assert f"diag/{name}/{s}" in r
        for k in ("diag/cos_same_budget", "diag/cos_cross_budget"):
            assert k in r
        # FedAvg: one shared model per budget level, so clients of a level have cosine 1
        for s in labels:
            assert r[f"diag/cos_within/{s}"] == pytest.approx(1.0)
        assert r["diag/cos_same_budget"] == pytest.approx(1.0)
        assert -1.0 <= r["diag/cos_cross_budget"] < 1.0
        present = [r[f"diag/union_present/{s}"] for s in labels]
        assert all(0.0 <= x <= 1.0 for x in present)


def test_union_class_totals_images_and_graph_label_grids():
    from framp_jax.diagnostics import union_class_totals
    # images: a flat label vector
    np.testing.assert_array_equal(np.asarray(union_class_totals(jnp.array([0, 2, 2, 1, 2]), 4)),
                                  [1, 1, 3, 0])
    # graphs: [clients, padded nodes], -1 = not a test node / padding
    uy = jnp.array([[0, -1, 3, 3], [-1, -1, 1, 0], [2, 2, 2, -1]])
    want = np.bincount(np.asarray(uy)[np.asarray(uy) >= 0], minlength=4)
    np.testing.assert_array_equal(np.asarray(union_class_totals(uy, 4)), want)
    assert want.tolist() == [2, 1, 3, 2]


@pytest.mark.parametrize("method", ["framp"])
def test_diagnostics_leave_training_unchanged(tiny_config, tmp_path, method):
    """Recording the diagnostics only adds metrics: every training loss and every accuracy of a
    run equals, bit for bit, that of the same run without them (so a run with diagnostics stands
    for the run without, as the sweeps' FRAMP rows do)."""
    rows = {}
    for diag in (False, True):
        c = tiny_config(rounds=3, method=method, diagnostics=diag)
        if method == "framp":
            c.framp.base = "fedavg"
            c.framp.residual_head = False
        wd = str(tmp_path / f"{method}_{diag}")
        res = simulate.run(c, wd, progress=False, log=lambda *a, **k: None)
        rows[diag] = (read_metrics_csv(os.path.join(wd, "metrics.csv")), res["final"])
    (plain, plain_final), (diag_rows, diag_final) = rows[False], rows[True]
    assert plain_final == diag_final
    assert len(plain) == len(diag_rows) == 3
    for a, b in zip(plain, diag_rows):
        assert any(k.startswith("diag/") for k in b) and not any(k.startswith("diag/") for k in a)
        for k, v in a.items():
            if k.endswith("_s") or "time" in k or "wall" in k:
                continue  # timings
            assert b[k] == v, k
