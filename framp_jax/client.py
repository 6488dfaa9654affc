"""The shared client update: on-device batching, augmentation and a ``lax.scan`` of local steps.

Everything here is pure and vmappable over clients: a client's data are its padded uint8 array
plus a count; each step draws its batch from the step's key (epoch-wise shuffles of the valid
samples), augments (random crop with 4-pixel padding + horizontal flip) and normalises inside
the jitted step. Masked gradients keep pruned entries at exactly zero.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class LocalConfig(NamedTuple):
    steps: int = 20
    batch_size: int = 20
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0          # global-norm clip; 0 disables
    augment: bool = True
    full_batch: bool = False        # graphs: every step uses the client's whole (sub)graph
    optimizer: str = "sgd"          # sgd | adam
    mean: tuple = (0.4914, 0.4822, 0.4465)
    std: tuple = (0.2023, 0.1994, 0.2010)
    # the smallest training-sample count of any client (0 = unknown). With it, local_train draws
    # each epoch's permutation once before its scan (``epoch_perms``) instead of two per step;
    # the batches are the same. Only pass a client whose count is at least this.
    min_count: int = 0


def make_optimizer(cfg: LocalConfig, lr=None) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    if cfg.weight_decay:
        parts.append(optax.add_decayed_weights(cfg.weight_decay))
    rate = cfg.lr if lr is None else lr
    if cfg.optimizer == "adam":
        parts.append(optax.adam(rate))
    else:
        parts.append(optax.sgd(rate, momentum=cfg.momentum if cfg.momentum else None))
    return optax.chain(*parts)


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


def epoch_perms(key, count, n_max: int, cfg: LocalConfig):
    """Every permutation ``batch_indices`` can read during ``cfg.steps`` steps, computed once:
    ``[E, n_max]`` with row e = the permutation of epoch e, E = the epochs reached by a client of
    ``cfg.min_count`` samples (a client with more samples reaches fewer). ``None`` (compute per
    step) when ``cfg.min_count`` is unknown or E exceeds the 2 permutations per step of the
    per-step path."""
    if cfg.full_batch or cfg.min_count < 1:
        return None
    n_epochs = ((cfg.steps - 1) * cfg.batch_size) // cfg.min_count + 2  # up to e0 + 1 of the last
    if n_epochs > 2 * cfg.steps:
        return None
    return jax.vmap(lambda e: _epoch_perm(jax.random.fold_in(key, e), count, n_max))(
        jnp.arange(n_epochs))


def batch_indices_from(perms, count, step, batch: int):
    """``batch_indices`` reading precomputed ``epoch_perms`` (the same indices)."""
    pos = step * batch + jnp.arange(batch)
    epoch, off = pos // count, pos % count
    e0 = (step * batch) // count
    return jnp.where(epoch == e0, perms[e0, off], perms[e0 + 1, off])


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


def get_batch(key, x_u8, y, count, step, cfg: LocalConfig, perms=None):
    """Step ``step``'s batch (normalised, augmented) and labels; ``perms`` = this key's
    ``epoch_perms`` (or None to draw the permutations in the step; the batch is the same)."""
    if cfg.full_batch:  # graph clients: the whole padded subgraph; y < 0 marks non-train nodes
        return x_u8, y
    # the shuffle key must not depend on the step: batch_indices derives one permutation per
    # epoch from it, so the steps of an epoch take disjoint slices of the same shuffle
    kperm, kaug = jax.random.split(key)
    ka = jax.random.fold_in(kaug, step)
    if perms is None:
        idx = batch_indices(kperm, count, x_u8.shape[0], step, cfg.batch_size)
    else:
        idx = batch_indices_from(perms, count, step, cfg.batch_size)
    if cfg.augment and x_u8.ndim == 4:
        return augment_gather(ka, x_u8, idx, cfg.mean, cfg.std), y[idx]
    return normalize(x_u8[idx], cfg.mean, cfg.std), y[idx]


LossFn = Callable  # loss_fn(params, x, y, rng) -> scalar


def last_epoch_steps(count, cfg: LocalConfig):
    """The local steps of a client's last local epoch: one epoch's worth of steps,
    ``ceil(count / batch_size)`` (every step for full-batch graph clients is an epoch, so 1),
    clipped to ``[1, cfg.steps]``. They are the last steps of the run."""
    if cfg.full_batch:
        return jnp.ones((), jnp.int32)
    e = -(-jnp.asarray(count, jnp.int32) // cfg.batch_size)
    return jnp.clip(e, 1, cfg.steps)


def local_train(loss_fn: LossFn, params, mask, x_u8, y, count, key, cfg: LocalConfig,
                grad_transform=None, lr=None, proto_classes: int = 0):
    """Run ``cfg.steps`` SGD steps of ``loss_fn`` from ``params`` on one client's data.

    ``mask`` (a {0,1} pytree or None) multiplies gradients and updates, so masked-out entries
    stay where they started (zero, for masked submodels). ``grad_transform(params, grads)`` lets
    a method reshape gradients (FIARSE's threshold-aware factor). Returns (params, mean loss).

    ``proto_classes=K > 0`` (FedProto's prototype timing): ``loss_fn`` returns ``(loss,
    features)`` and a third output ``(sums [K, F], counts [K])`` holds the per-class sums and
    counts of the training-mode features of the last local epoch (:func:`last_epoch_steps`),
    each computed in that step's forward pass, i.e. with the parameters before its update.
    Labels < 0 (graph clients' non-train and padding nodes) are left out.
    """
    opt = make_optimizer(cfg, lr)
    kdata = jax.random.fold_in(key, 0)
    kloss = jax.random.fold_in(key, 1)
    collect = proto_classes > 0
    first = cfg.steps - last_epoch_steps(count, cfg) if collect else 0
    # get_batch's shuffle key is split(kdata)[0]; its permutations once per epoch if possible
    perms = None if cfg.full_batch else epoch_perms(jax.random.split(kdata)[0], count,
                                                    x_u8.shape[0], cfg)

    def step(carry, s):
        p, opt_state, acc = carry
        xb, yb = get_batch(kdata, x_u8, y, count, s, cfg, perms)
        rng = jax.random.fold_in(kloss, s)
        if collect:
            (loss, feats), g = jax.value_and_grad(loss_fn, has_aux=True)(p, xb, yb, rng)
            oh = jax.nn.one_hot(yb, proto_classes, dtype=jnp.float32)  # zero rows for y < 0
            oh = oh * (s >= first).astype(jnp.float32)
            acc = (acc[0] + oh.T @ feats.astype(jnp.float32), acc[1] + oh.sum(0))
        else:
            loss, g = jax.value_and_grad(loss_fn)(p, xb, yb, rng)
        if grad_transform is not None:
            g = grad_transform(p, g)
        if mask is not None:
            g = jax.tree.map(lambda a, m: a * m, g, mask)
        upd, opt_state = opt.update(g, opt_state, p)
        if mask is not None:
            upd = jax.tree.map(lambda a, m: a * m, upd, mask)
        return (optax.apply_updates(p, upd), opt_state, acc), loss

    acc0 = ()
    if collect:
        f_dim = jax.eval_shape(lambda: loss_fn(params, *get_batch(kdata, x_u8, y, count, 0, cfg),
                                               kloss))[1].shape[-1]
        acc0 = (jnp.zeros((proto_classes, f_dim), jnp.float32),
                jnp.zeros((proto_classes,), jnp.float32))
    (params, _, acc), losses = jax.lax.scan(step, (params, opt.init(params), acc0),
                                            jnp.arange(cfg.steps))
    if collect:
        return params, jnp.mean(losses), acc
    return params, jnp.mean(losses)


def is_finite_tree(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def class_prototypes(apply_fn, params, x_u8, y, count, num_classes: int, cfg: LocalConfig,
                     batch: int = 100):
    """Eval-mode, un-augmented pass over a client's training data: per-class mean features and
    class counts (SPEC §1.6 local prototypes). Graph clients (``cfg.full_batch``): one pass
    over the whole subgraph; labels < 0 (non-train nodes) are left out."""
    if cfg.full_batch:
        _, f = apply_fn(params, x_u8, train=False)
        oh = jax.nn.one_hot(y, num_classes, dtype=f.dtype)  # all-zero rows for y < 0
        counts = oh.sum(0)
        return (oh.T @ f) / jnp.maximum(counts, 1.0)[:, None], counts
    n_max = x_u8.shape[0]
    nb = -(-n_max // batch)
    pad = nb * batch - n_max
    xs = jnp.pad(x_u8, ((0, pad),) + ((0, 0),) * (x_u8.ndim - 1)).reshape((nb, batch) + x_u8.shape[1:])
    ys = jnp.pad(y, (0, pad)).reshape(nb, batch)
    valid = (jnp.arange(nb * batch) < count).reshape(nb, batch)

    def body(acc, b):
        xb, yb, vb = b
        _, f = apply_fn(params, normalize(xb, cfg.mean, cfg.std), train=False)
        oh = jax.nn.one_hot(yb, num_classes, dtype=f.dtype) * vb[:, None]
        return (acc[0] + oh.T @ f, acc[1] + oh.sum(0)), None

    init = (jnp.zeros((num_classes, _feat_dim(apply_fn, params, xs[0], cfg)), jnp.float32),
            jnp.zeros((num_classes,), jnp.float32))
    (sums, counts), _ = jax.lax.scan(body, init, (xs, ys, valid))
    return sums / jnp.maximum(counts, 1.0)[:, None], counts


def _feat_dim(apply_fn, params, xb, cfg):
    out = jax.eval_shape(lambda p, x: apply_fn(p, normalize(x, cfg.mean, cfg.std), train=False),
                         params, xb)
    return out[1].shape[-1]
