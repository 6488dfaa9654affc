"""Cheaper formulations that must give exactly the original results: on-device batching (one
gather for crop + flip, epoch permutations drawn once per epoch) gives the batches of the
original per-step implementation for the same key, and the top-k threshold found by bitwise
selection equals the sorted entry."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import masks as M
from framp_jax.client import LocalConfig, local_train
from framp_jax.data.image_modality import (ImageModality, _epoch_perm, augment, augment_gather,
                                           epoch_perms, normalize)

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def reference_get_batch(key, x_u8, y, count, step, cfg):
    """The training batch as first written (``client.get_batch``, now
    ``ImageModality.train_batch``): two permutations sorted in every step, then the batch is
    normalised and augmented by ``image_modality.augment`` (the per-image
    pad + dynamic_slice + flip formulation, still used by HeteroFL's statistics pass)."""
    kperm, kaug = jax.random.split(key)
    ka = jax.random.fold_in(kaug, step)
    n_max, batch = x_u8.shape[0], cfg.batch_size
    pos = step * batch + jnp.arange(batch)
    epoch, off = pos // count, pos % count
    e0 = (step * batch) // count
    p0 = _epoch_perm(jax.random.fold_in(kperm, e0), count, n_max)
    p1 = _epoch_perm(jax.random.fold_in(kperm, e0 + 1), count, n_max)
    idx = jnp.where(epoch == e0, p0[off], p1[off])
    m = cfg.modality
    xb = normalize(x_u8[idx], m.mean, m.std)
    if m.augment:
        xb = augment(ka, xb)
    return xb, y[idx]


def _images(n, h=10, w=7, c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    return jnp.asarray(x), jnp.asarray(rng.integers(0, 10, size=n), jnp.int32)


@pytest.mark.parametrize("pad", [4, 2])
def test_augment_gather_equals_augment_of_normalised_batch(pad):
    x, _ = _images(40)
    idx = jnp.asarray([3, 0, 39, 3, 17, 8, 8, 21, 5, 30, 1, 2], jnp.int32)
    # both jitted, as inside the round (XLA may round a fused normalisation differently from
    # op-by-op execution, identically for both formulations)
    ref = jax.jit(lambda k, x, idx: augment(k, normalize(x[idx], MEAN, STD), pad))
    new = jax.jit(lambda k, x, idx: augment_gather(k, x, idx, MEAN, STD, pad))
    for i in range(6):
        k = jax.random.key(i)
        want, got = ref(k, x, idx), new(k, x, idx)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.asarray(got).tobytes() == np.asarray(want).tobytes(), i
    # the crops really vary (zero borders appear) and some images are flipped: not a no-op test
    assert np.any(np.asarray(got) == 0.0)


@pytest.mark.parametrize("count,batch,aug", [
    (40, 9, True), (5, 9, True), (40, 40, False),
    pytest.param(23, 9, True, marks=pytest.mark.slow), pytest.param(31, 4, True, marks=pytest.mark.slow)])
def test_train_batch_equals_reference_for_every_step(count, batch, aug):
    n_max, steps = 40, 12
    x, y = _images(n_max, seed=count)
    cfg = LocalConfig(steps=steps, batch_size=batch, modality=ImageModality(MEAN, STD, aug))
    cfg_fast = cfg._replace(min_count=count)
    get_batch = cfg.modality.train_batch
    for seed in range(3):
        key = jax.random.key(100 + seed)
        # the modality's epoch_perms splits the data key itself (as local_train passes it)
        perms = cfg_fast.modality.epoch_perms(key, jnp.int32(count), x, cfg_fast)
        want_perms = epoch_perms(jax.random.split(key)[0], jnp.int32(count), n_max, cfg_fast)
        assert (perms is None) == (want_perms is None)
        if perms is not None:
            assert np.array_equal(np.asarray(perms), np.asarray(want_perms))
        if count >= 23:  # few enough epochs to precompute
            assert perms is not None
        ref = jax.jit(lambda s: reference_get_batch(key, x, y, jnp.int32(count), s, cfg))
        new = jax.jit(lambda s: get_batch(key, x, y, jnp.int32(count), s, cfg))
        fast = jax.jit(lambda s, pm: get_batch(key, x, y, jnp.int32(count), s, cfg_fast, pm))
        for s in range(steps):
            want = ref(jnp.int32(s))
            for got in (new(jnp.int32(s)), fast(jnp.int32(s), perms)):
                assert np.asarray(got[0]).tobytes() == np.asarray(want[0]).tobytes(), (seed, s)
                assert np.array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_epoch_perms_only_when_cheaper():
    cfg = LocalConfig(steps=4, batch_size=10)
    k = jax.random.key(0)
    assert epoch_perms(k, jnp.int32(50), 50, cfg) is None                      # min_count unknown
    assert epoch_perms(k, jnp.int32(50), 50, cfg._replace(min_count=2)) is None  # 17 > 8 epochs
    p = epoch_perms(k, jnp.int32(50), 50, cfg._replace(min_count=50))
    assert p.shape == (2, 50) and sorted(np.asarray(p[0]).tolist()) == list(range(50))


def test_local_train_same_params_with_precomputed_permutations():
    x, y = _images(30, h=8, w=8)
    w0 = {"w": jax.random.normal(jax.random.key(0), (8 * 8 * 3, 10)) * 0.01}

    def loss(p, xb, yb, rng):
        logp = jax.nn.log_softmax(xb.reshape(xb.shape[0], -1) @ p["w"])
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], 1))
    cfg = LocalConfig(steps=9, batch_size=8, lr=0.1, modality=ImageModality(MEAN, STD))
    key = jax.random.key(7)
    a, la = jax.jit(lambda: local_train(loss, w0, None, x, y, jnp.int32(26), key, cfg))()
    b, lb = jax.jit(lambda: local_train(loss, w0, None, x, y, jnp.int32(26), key,
                                        cfg._replace(min_count=20)))()
    assert np.asarray(a["w"]).tobytes() == np.asarray(b["w"]).tobytes()
    assert float(la) == float(lb)


def _sorted_threshold(a, budget):  # masks._threshold as first written
    n = a.shape[0]
    k = jnp.clip(jnp.floor(budget * n).astype(jnp.int32), 1, n)
    return jnp.sort(a)[n - k]


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "tiny", "nan"])
def test_threshold_equals_sorted_entry(kind):
    rng = np.random.default_rng(0)
    n = 5003
    a = np.abs(rng.normal(size=n)).astype(np.float32)
    if kind == "ties":      # few distinct values: the k-th largest sits inside a run of ties
        a = rng.integers(0, 7, size=n).astype(np.float32) / 4
    elif kind == "zeros":   # mostly zeros (a masked model), -0.0 included
        a = np.where(rng.random(n) < 0.9, 0.0, a).astype(np.float32)
        a[:10] = -0.0
        a = np.abs(a)
    elif kind == "tiny":    # subnormals and huge values
        a = (a * np.float32(1e-39)).astype(np.float32)
        a[:5] = [np.inf, 3e38, 1e-45, 0.0, 1.0]
    elif kind == "nan":
        a[rng.integers(0, n, 20)] = np.nan
    a = jnp.asarray(a)
    budgets = [1.0, 0.999, 0.5, 0.25, 1 / 16, 1 / 64, 1 / 256, 1.0 / n, 1e-9, 0.1234567]
    new = jax.jit(M._threshold)
    old = jax.jit(_sorted_threshold)
    mask = jax.jit(lambda a, t: a >= t)  # compared as the masks compare, on the device
    tiny = np.finfo(np.float32).tiny
    for b in budgets:
        t_new, t_old = new(a, jnp.float32(b)), old(a, jnp.float32(b))
        same = np.asarray(t_new).tobytes() == np.asarray(t_old).tobytes()
        both_nan = bool(np.isnan(t_new) and np.isnan(t_old))
        # a backend that flushes subnormals to zero sorts them as ties of 0.0, so the sorted
        # entry may be any of them while the bitwise selection gives the exact k-th largest;
        # both are then 0 to the device's comparisons
        flushed = bool(abs(t_new) < tiny and abs(t_old) < tiny)
        assert same or both_nan or flushed, (kind, b, t_new, t_old)
        # same mask, ties included
        assert np.array_equal(np.asarray(mask(a, t_new)), np.asarray(mask(a, t_old))), (kind, b)
    # a vector of budgets (and under vmap) gives the per-budget thresholds
    bv = jnp.asarray(budgets, jnp.float32)
    want = jnp.stack([old(a, b) for b in bv])
    for got in (jax.jit(M._threshold)(a, bv), jax.jit(jax.vmap(M._threshold, (None, 0)))(a, bv)):
        assert np.array_equal(np.asarray(got), np.asarray(jnp.stack([new(a, b) for b in bv])),
                              equal_nan=True)
        for g, w in zip(got, want):
            assert np.array_equal(np.asarray(mask(a, g)), np.asarray(mask(a, w)))


def test_topk_mask_keeps_the_largest_entries_by_hand():
    params = {"a": jnp.asarray([[0.5, -2.0], [1.0, 1.0]]), "b": jnp.asarray([-1.0, 3.0, 0.0])}
    prunable = {"a": True, "b": True}
    # |w| = 0.5 2 1 1 1 3 0: k = floor(0.5 * 7) = 3 -> tau = 1 (ties: all three 1s kept)
    m = M.topk_mask(params, prunable, 0.5)
    assert np.asarray(m["a"]).tolist() == [[0.0, 1.0], [1.0, 1.0]]
    assert np.asarray(m["b"]).tolist() == [1.0, 1.0, 0.0]
    assert float(M.topk_threshold(params, prunable, 2 / 7)) == 2.0
