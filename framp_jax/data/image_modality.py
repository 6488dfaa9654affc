"""The image modality (:class:`ImageModality`): uint8 NHWC client arrays, per-epoch shuffled
mini-batches drawn on the device, random crop + flip, per-channel normalisation, and batched
evaluation with fixed-size deterministic eval batches (SPEC §2.6: with static BN the accuracy
depends on the batch composition).

Everything is pure and vmappable over clients: a client's data are its padded uint8 array plus
a count; each step draws its batch from the step's key (epoch-wise shuffles of the valid
samples), augments and normalises inside the jitted step.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


# ---------------------------------------------------------------------------------------------
# shuffles


def _epoch_perm(key, count, n_max):
    """A uniformly random permutation of [0, count) in the first ``count`` slots."""
    r = jax.random.uniform(key, (n_max,))
    r = jnp.where(jnp.arange(n_max) < count, r, 2.0)
    return jnp.argsort(r)


def batch_indices(key, count, n_max: int, step, batch: int):
    """Indices of step ``step``'s batch: consecutive slices of per-epoch shuffles (cycling over the
    local data as a PyTorch DataLoader with shuffle=True does)."""
    pos = step * batch + jnp.arange(batch)
    epoch, off = pos // count, pos % count
    e0 = (step * batch) // count
    p0 = _epoch_perm(jax.random.fold_in(key, e0), count, n_max)
    p1 = _epoch_perm(jax.random.fold_in(key, e0 + 1), count, n_max)
    return jnp.where(epoch == e0, p0[off], p1[off])


def epoch_perms(key, count, n_max: int, local):
    """Every permutation ``batch_indices`` can read during ``local.steps`` steps, computed once:
    ``[E, n_max]`` with row e = the permutation of epoch e, E = the epochs reached by a client of
    ``local.min_count`` samples (a client with more samples reaches fewer). ``None`` (compute per
    step) when ``local.min_count`` is unknown or E exceeds the 2 permutations per step of the
    per-step path."""
    if local.min_count < 1:
        return None
    n_epochs = ((local.steps - 1) * local.batch_size) // local.min_count + 2  # up to e0 + 1
    if n_epochs > 2 * local.steps:
        return None
    return jax.vmap(lambda e: _epoch_perm(jax.random.fold_in(key, e), count, n_max))(
        jnp.arange(n_epochs))


def batch_indices_from(perms, count, step, batch: int):
    """``batch_indices`` reading precomputed ``epoch_perms`` (the same indices)."""
    pos = step * batch + jnp.arange(batch)
    epoch, off = pos // count, pos % count
    e0 = (step * batch) // count
    return jnp.where(epoch == e0, perms[e0, off], perms[e0 + 1, off])


# ---------------------------------------------------------------------------------------------
# pixels


def normalize(x_u8, mean, std):
    x = x_u8.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key, x, pad: int = 4):
    """Random crop (zero padding ``pad``) + horizontal flip, per image; x is [B, H, W, C]."""
    b, h, w, c = x.shape
    kc, kf = jax.random.split(key)
    offs = jax.random.randint(kc, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(kf, 0.5, (b,))
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(xp, offs)
    return jnp.where(flips[:, None, None, None], crop[:, :, ::-1, :], crop)


def augment_gather(key, x_u8, idx, mean, std, pad: int = 4):
    """``augment(key, normalize(x_u8[idx], mean, std), pad)`` bit for bit, in one gather: the
    same random crop offsets and flips, folded into per-image row/column source indices that
    read the uint8 images directly; pixels of the zero padding are set to 0.0 after the
    normalisation, as the padded normalised image holds there. x_u8 is [N, H, W, C]."""
    b, (_, h, w, _) = idx.shape[0], x_u8.shape
    kc, kf = jax.random.split(key)
    offs = jax.random.randint(kc, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(kf, 0.5, (b,))
    j = jnp.arange(w)
    rows = offs[:, 0:1] + jnp.arange(h) - pad                              # [b, h]
    cols = offs[:, 1:2] + jnp.where(flips[:, None], w - 1 - j, j) - pad    # [b, w], flip folded in
    inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
    px = x_u8[idx[:, None, None], jnp.clip(rows, 0, h - 1)[:, :, None],
              jnp.clip(cols, 0, w - 1)[:, None, :]]                        # [b, h, w, C] uint8
    return jnp.where(inside[..., None], normalize(px, mean, std), 0.0)


# ---------------------------------------------------------------------------------------------
# evaluation


def batch_for_eval(x, y, count, batch: int):
    """Reshape one split into [nb, batch, ...] batches in index order. The tail is padded by
    wrapping around real samples (so BN batch statistics only see real images) and marked
    invalid."""
    nb = -(-x.shape[0] // batch)
    pos = jnp.arange(nb * batch)
    idx = pos % jnp.maximum(count, 1)
    valid = pos < count
    return (x[idx].reshape((nb, batch) + x.shape[1:]), y[idx].reshape(nb, batch),
            valid.reshape(nb, batch))


def correct_count(apply_fn, params, xb, yb, vb, mean, std, logits_fn=None):
    """Number of correct predictions over pre-batched data [nb, batch, ...]."""
    def body(acc, b):
        x, y, v = b
        logits, _ = apply_fn(params, normalize(x, mean, std), train=False)
        if logits_fn is not None:
            logits = logits_fn(logits)
        return acc + jnp.sum((jnp.argmax(logits, -1) == y) & v), None
    out, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (xb, yb, vb))
    return out


def local_accuracy(apply_fn, params_stack, test_x, test_y, test_count, mean, std, batch=20,
                   logits_fn=None, label_counts=None, shared_params=False):
    """Accuracy of model i on client i's own test split; params_stack and test arrays share the
    leading client axis (``shared_params``: one model for every client). ``logits_fn(logits,
    label_counts_row)`` optionally transforms logits per client. Clients without test data get
    NaN."""
    lc = label_counts if label_counts is not None else jnp.zeros((test_x.shape[0], 1))

    def one(p, x, y, c, row):
        xb, yb, vb = batch_for_eval(x, y, c, batch)
        f = None if logits_fn is None else (lambda lg: logits_fn(lg, row))
        return correct_count(apply_fn, p, xb, yb, vb, mean, std, f)
    correct = jax.vmap(one, in_axes=(None if shared_params else 0, 0, 0, 0, 0))(
        params_stack, test_x, test_y, test_count, lc)
    return jnp.where(test_count > 0, correct / jnp.maximum(test_count, 1), jnp.nan)


def union_accuracy(apply_fn, params_stack, x, y, mean, std, batch=20, model_chunk=None):
    """Accuracy of each model of the stack on the same (union) test set."""
    xb, yb, vb = batch_for_eval(x, y, x.shape[0], batch)
    f = lambda p: correct_count(apply_fn, p, xb, yb, vb, mean, std)
    correct = jax.lax.map(f, params_stack, batch_size=model_chunk)
    return correct / x.shape[0]


def union_class_correct(apply_fn, params_stack, x, y, mean, std, num_classes: int, batch=20,
                        model_chunk=None):
    """Correct predictions of each model of the stack on the union test set, per true class:
    int32 ``[M, num_classes]`` (the same eval batches as :func:`union_accuracy`; row sums / the
    number of samples = its accuracies)."""
    xb, yb, vb = batch_for_eval(x, y, x.shape[0], batch)

    def per_model(p):
        def body(acc, b):
            xs, ys, v = b
            logits, _ = apply_fn(p, normalize(xs, mean, std), train=False)
            hit = (jnp.argmax(logits, -1) == ys) & v & (ys >= 0)
            return acc + jnp.sum(jax.nn.one_hot(ys, num_classes, dtype=jnp.int32)
                                 * hit[:, None].astype(jnp.int32), 0), None
        out, _ = jax.lax.scan(body, jnp.zeros((num_classes,), jnp.int32), (xb, yb, vb))
        return out
    return jax.lax.map(per_model, params_stack, batch_size=model_chunk)


# ---------------------------------------------------------------------------------------------
# the modality


class ImageModality(NamedTuple):
    """Images: ``x`` is a client's uint8 ``[n_max, H, W, C]`` array, ``count`` its real samples.
    ``mean``/``std`` normalise per channel; ``augment`` turns on random crop (4-pixel zero
    padding) + horizontal flip in training batches."""
    mean: tuple = CIFAR10_MEAN
    std: tuple = CIFAR10_STD
    augment: bool = True

    name = "image"

    def input_shape(self, x) -> tuple:
        """The model's input shape from a stacked ``[clients, n_max, H, W, C]`` array."""
        return tuple(int(s) for s in x.shape[2:])

    def epoch_perms(self, key, count, x, local):
        """Precomputed shuffles of the training-data key ``key`` (see :func:`epoch_perms`)."""
        return epoch_perms(jax.random.split(key)[0], count, x.shape[0], local)

    def train_batch(self, key, x, y, count, step, local, perms=None):
        """Step ``step``'s batch (normalised, augmented) and labels; ``perms`` = this key's
        :meth:`epoch_perms` (or None to draw the permutations in the step; the batch is the
        same)."""
        # the shuffle key must not depend on the step: batch_indices derives one permutation per
        # epoch from it, so the steps of an epoch take disjoint slices of the same shuffle
        kperm, kaug = jax.random.split(key)
        ka = jax.random.fold_in(kaug, step)
        if perms is None:
            idx = batch_indices(kperm, count, x.shape[0], step, local.batch_size)
        else:
            idx = batch_indices_from(perms, count, step, local.batch_size)
        if self.augment and x.ndim == 4:
            return augment_gather(ka, x, idx, self.mean, self.std), y[idx]
        return normalize(x[idx], self.mean, self.std), y[idx]

    def last_epoch_steps(self, count, local):
        """The local steps of a client's last local epoch, ``ceil(count / batch_size)`` clipped to
        ``[1, local.steps]``: the last steps of the run."""
        e = -(-jnp.asarray(count, jnp.int32) // local.batch_size)
        return jnp.clip(e, 1, local.steps)

    def head(self, x, y, count, n: int):
        """The client's first ``n`` samples (in stacked order) when it has more."""
        if n and n < y.shape[0]:
            return x[:n], y[:n], jnp.minimum(count, n)
        return x, y, count

    def prepare(self, x_u8, key=None):
        """Model inputs from raw samples: normalised, and augmented when ``key`` is given."""
        x = normalize(x_u8, self.mean, self.std)
        return x if key is None else augment(key, x)

    def class_prototypes(self, apply_fn, params, x, y, count, num_classes: int, batch: int = 100):
        """Eval-mode, un-augmented pass over a client's training data in batches of ``batch``:
        per-class mean features and class counts (SPEC §1.6 local prototypes)."""
        n_max = x.shape[0]
        nb = -(-n_max // batch)
        pad = nb * batch - n_max
        xs = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape((nb, batch) + x.shape[1:])
        ys = jnp.pad(y, (0, pad)).reshape(nb, batch)
        valid = (jnp.arange(nb * batch) < count).reshape(nb, batch)
        norm = lambda xb: normalize(xb, self.mean, self.std)

        def body(acc, b):
            xb, yb, vb = b
            _, f = apply_fn(params, norm(xb), train=False)
            oh = jax.nn.one_hot(yb, num_classes, dtype=f.dtype) * vb[:, None]
            return (acc[0] + oh.T @ f, acc[1] + oh.sum(0)), None

        f_dim = jax.eval_shape(lambda p, xb: apply_fn(p, norm(xb), train=False),
                               params, xs[0])[1].shape[-1]
        init = (jnp.zeros((num_classes, f_dim), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
        (sums, counts), _ = jax.lax.scan(body, init, (xs, ys, valid))
        return sums / jnp.maximum(counts, 1.0)[:, None], counts

    def local_accuracy(self, apply_fn, params_stack, x, y, count, batch, logits_fn=None,
                       label_counts=None, shared_params=False):
        return local_accuracy(apply_fn, params_stack, x, y, count, self.mean, self.std, batch,
                              logits_fn, label_counts, shared_params)

    def union_accuracy(self, apply_fn, params_stack, x, y, batch, model_chunk=None):
        return union_accuracy(apply_fn, params_stack, x, y, self.mean, self.std, batch,
                              model_chunk)

    def union_class_correct(self, apply_fn, params_stack, x, y, batch, num_classes,
                            model_chunk=None):
        return union_class_correct(apply_fn, params_stack, x, y, self.mean, self.std,
                                   num_classes, batch, model_chunk)
