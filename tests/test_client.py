"""The shared client update: on-device batching, augmentation, masked local SGD, prototypes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import client as CL
from framp_jax.client import LocalConfig, local_train
from framp_jax.data import image_modality as IM
from framp_jax.data.image_modality import ImageModality, augment, batch_indices, normalize
from framp_jax.losses import cross_entropy

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PLAIN = ImageModality(MEAN, STD, augment=False)
AUG = ImageModality(MEAN, STD, augment=True)


# ---------------------------------------------------------------------------------------------
# batching


@pytest.mark.parametrize("count,n_max,batch", [(7, 10, 3), (10, 10, 4), (5, 12, 5), (9, 9, 2)])
def test_batch_indices_cover_each_epoch_once(count, n_max, batch):
    key = jax.random.key(3)
    steps = (3 * count) // batch + 1  # at least three full epochs of positions
    idx = np.concatenate([np.asarray(batch_indices(key, jnp.int32(count), n_max, s, batch))
                          for s in range(steps)])
    assert idx.min() >= 0 and idx.max() < count  # never a padding slot
    epochs = [idx[e * count:(e + 1) * count] for e in range(3)]
    for e in epochs:  # positions e*count .. (e+1)*count-1 form one permutation of the data
        np.testing.assert_array_equal(np.sort(e), np.arange(count))
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled per epoch


def test_batch_indices_jit_with_traced_count_and_step():
    f = jax.jit(lambda k, c, s: batch_indices(k, c, 16, s, 4))
    key = jax.random.key(0)
    idx = np.concatenate([np.asarray(f(key, jnp.int32(6), jnp.int32(s))) for s in range(3)])
    np.testing.assert_array_equal(np.sort(idx[:6]), np.arange(6))
    np.testing.assert_array_equal(np.sort(idx[6:12]), np.arange(6))


def test_epoch_perm_puts_padding_after_count():
    p = np.asarray(IM._epoch_perm(jax.random.key(1), jnp.int32(7), 10))
    np.testing.assert_array_equal(np.sort(p[:7]), np.arange(7))
    np.testing.assert_array_equal(np.sort(p[7:]), [7, 8, 9])


def test_normalize_hand_values():
    x = jnp.asarray([[[[0, 255, 51]]]], jnp.uint8)
    out = np.asarray(normalize(x, MEAN, STD))
    np.testing.assert_allclose(out.ravel(), [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25,
                                             (0.2 - 0.5) / 0.25], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# augmentation


def _distinct_images(b, h=6, w=5, c=2):
    return jnp.arange(1, b * h * w * c + 1, dtype=jnp.float32).reshape(b, h, w, c)


def test_augment_flip_only_preserves_pixels():
    x = _distinct_images(32)
    out = np.asarray(augment(jax.random.key(0), x, pad=0))
    flips = 0
    for a, o in zip(np.asarray(x), out):
        assert np.array_equal(np.sort(a.ravel()), np.sort(o.ravel()))  # same pixel multiset
        if np.array_equal(o, a[:, ::-1, :]):
            flips += 1
        else:
            np.testing.assert_array_equal(o, a)
    assert 0 < flips < 32  # both outcomes occur


def test_augment_crop_is_a_window_of_the_zero_padded_image():
    pad, b = 2, 48
    x = _distinct_images(b)
    out = np.asarray(augment(jax.random.key(7), x, pad=pad))
    h, w = x.shape[1:3]
    seen = set()
    for a, o in zip(np.asarray(x), out):
        ap = np.pad(a, ((pad, pad), (pad, pad), (0, 0)))
        hits = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                for f in (0, 1)
                if np.array_equal(o, (ap[dy:dy + h, dx:dx + w] if not f
                                      else ap[dy:dy + h, dx:dx + w][:, ::-1]))]
        assert hits, "output is not a (flipped) window of the padded image"
        seen.add(hits[0][:2])
    assert len(seen) > 5  # offsets are random per image


def test_augment_same_key_same_output():
    x = _distinct_images(8)
    a = augment(jax.random.key(1), x)
    np.testing.assert_array_equal(a, augment(jax.random.key(1), x))
    assert not np.array_equal(a, augment(jax.random.key(2), x))


# ---------------------------------------------------------------------------------------------
# local training (a linear softmax classifier on 4x4x3 images keeps compiles small)


def _linear_problem(n_max=12, count=9, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n_max, 4, 4, 3)).astype(np.uint8)
    y = rng.integers(0, k, size=(n_max,)).astype(np.int32)
    x[count:] = 0
    y[count:] = 0
    params = {"w": jnp.asarray(rng.normal(size=(48, k)) * 0.1, jnp.float32),
              "b": jnp.asarray(rng.normal(size=(k,)) * 0.1, jnp.float32)}

    def loss_fn(p, xb, yb, rng_):
        logits = xb.reshape(xb.shape[0], -1) @ p["w"] + p["b"]
        return cross_entropy(logits, yb)

    return loss_fn, params, jnp.asarray(x), jnp.asarray(y), jnp.int32(count)


def test_one_full_batch_step_is_plain_sgd():
    loss_fn, p0, x, y, n = _linear_problem()
    cfg = LocalConfig(steps=1, batch_size=9, lr=0.1, modality=PLAIN)
    p1, loss = local_train(loss_fn, p0, None, x, y, n, jax.random.key(0), cfg)
    xv = normalize(x[:9], MEAN, STD)
    want_loss, g = jax.value_and_grad(loss_fn)(p0, xv, y[:9], None)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    for k in p0:
        np.testing.assert_allclose(p1[k], p0[k] - 0.1 * g[k], rtol=1e-5, atol=1e-6)


def test_lr_override_and_grad_transform():
    loss_fn, p0, x, y, n = _linear_problem()
    cfg = LocalConfig(steps=3, batch_size=4, lr=0.1, modality=PLAIN)
    key = jax.random.key(5)
    frozen, _ = local_train(loss_fn, p0, None, x, y, n, key, cfg, lr=0.0)
    for k in p0:
        np.testing.assert_array_equal(frozen[k], p0[k])
    # a gradient transform that doubles g == doubling the learning rate (plain SGD)
    doubled, _ = local_train(loss_fn, p0, None, x, y, n, key, cfg,
                             grad_transform=lambda p, g: jax.tree.map(lambda a: 2 * a, g))
    fast, _ = local_train(loss_fn, p0, None, x, y, n, key, cfg._replace(lr=0.2))
    for k in p0:
        np.testing.assert_allclose(doubled[k], fast[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("start_zero", [True, False])
def test_mask_freezes_masked_entries_exactly(start_zero):
    loss_fn, p0, x, y, n = _linear_problem()
    rng = np.random.default_rng(1)
    mask = {"w": jnp.asarray(rng.random((48, 3)) < 0.3, jnp.float32),
            "b": jnp.asarray([1.0, 0.0, 1.0])}
    if start_zero:
        p0 = jax.tree.map(lambda p, m: p * m, p0, mask)
    # momentum, weight decay and clipping all act on the masked entries if the mask leaks
    cfg = LocalConfig(steps=6, batch_size=4, lr=0.5, momentum=0.9, weight_decay=0.1,
                      grad_clip=1.0, modality=AUG)
    p1, loss = local_train(loss_fn, p0, mask, x, y, n, jax.random.key(2), cfg)
    assert np.isfinite(float(loss))
    for k in p0:
        m = np.asarray(mask[k]) == 0
        np.testing.assert_array_equal(np.asarray(p1[k])[m], np.asarray(p0[k])[m])
        assert np.all(np.asarray(p1[k])[~m] != np.asarray(p0[k])[~m])  # the rest trained


def test_same_key_same_result_different_key_different():
    loss_fn, p0, x, y, n = _linear_problem()
    cfg = LocalConfig(steps=4, batch_size=4, lr=0.1, modality=AUG)
    train = jax.jit(lambda k: local_train(loss_fn, p0, None, x, y, n, k, cfg))
    a, la = train(jax.random.key(11))
    b, lb = train(jax.random.key(11))
    c, lc = train(jax.random.key(12))
    for k in p0:
        np.testing.assert_array_equal(a[k], b[k])
    assert float(la) == float(lb)
    assert not np.array_equal(np.asarray(a["w"]), np.asarray(c["w"]))


def test_vmapped_clients_match_single_client_runs():
    loss_fn, p0, x, y, _ = _linear_problem(count=12)
    cfg = LocalConfig(steps=3, batch_size=4, lr=0.1, modality=PLAIN)
    xs, ys = jnp.stack([x, x[::-1]]), jnp.stack([y, y[::-1]])
    ns = jnp.asarray([12, 5], jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(2))
    out, losses = jax.vmap(lambda xx, yy, nn, kk: local_train(loss_fn, p0, None, xx, yy, nn, kk,
                                                                 cfg))(xs, ys, ns, keys)
    for i in range(2):
        single, l1 = local_train(loss_fn, p0, None, xs[i], ys[i], ns[i], keys[i], cfg)
        np.testing.assert_allclose(out["w"][i], single["w"], rtol=1e-5, atol=1e-7)
        assert float(losses[i]) == pytest.approx(float(l1), rel=1e-5)


def test_is_finite_tree():
    assert bool(CL.is_finite_tree({"a": jnp.ones(3), "b": jnp.zeros((2, 2))}))
    assert not bool(CL.is_finite_tree({"a": jnp.ones(3), "b": jnp.asarray([0.0, jnp.nan])}))
    assert not bool(CL.is_finite_tree({"a": jnp.asarray([jnp.inf])}))


# ---------------------------------------------------------------------------------------------
# prototypes


def test_class_prototypes_hand_computed():
    # features = (pixel 0 channel 0, pixel 0 channel 1) after normalize(mean 0, std 1)
    def apply(params, x, *, train=False, rng=None):
        f = x[:, 0, 0, :2] * params
        return jnp.zeros((x.shape[0], 3)), f

    vals = np.array([[10, 20], [30, 40], [50, 60], [70, 80], [90, 100], [200, 250], [255, 255]])
    y = np.array([0, 1, 0, 2, 0, 1, 1], np.int32)
    count = 5  # slots 5, 6 are padding (label 1) and must not count
    x = np.zeros((7, 2, 2, 3), np.uint8)
    x[:, 0, 0, :2] = vals
    cfg = LocalConfig(modality=ImageModality(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)))
    protos, counts = CL.class_prototypes(apply, jnp.float32(255.0), jnp.asarray(x), jnp.asarray(y),
                                         jnp.int32(count), 4, cfg, batch=3)
    np.testing.assert_array_equal(counts, [3, 1, 1, 0])
    want = np.array([[(10 + 50 + 90) / 3, (20 + 60 + 100) / 3], [30, 40], [70, 80], [0, 0]])
    np.testing.assert_allclose(protos, want, rtol=1e-5)


def test_train_batch_steps_of_an_epoch_are_disjoint():
    """Consecutive steps slice one per-epoch shuffle: 4 batches of 10 over 40 samples cover all
    40 exactly once, and the next epoch is a different order."""
    n = 40
    x = jnp.zeros((48, 4, 4, 3), jnp.uint8)  # padded to 48 slots
    y = jnp.arange(48, dtype=jnp.int32)
    cfg = LocalConfig(batch_size=10, modality=ImageModality(augment=False))
    get_batch = cfg.modality.train_batch
    key = jax.random.key(3)
    seen = [int(v) for s in range(4) for v in get_batch(key, x, y, n, s, cfg)[1]]
    assert sorted(seen) == list(range(n))
    nxt = [int(v) for s in range(4, 8) for v in get_batch(key, x, y, n, s, cfg)[1]]
    assert sorted(nxt) == list(range(n)) and nxt != seen
