"""The shared client update: a ``lax.scan`` of local steps over batches the client's modality
draws (:mod:`framp_jax.data.modality`), pure and vmappable over clients. Masked gradients keep
pruned entries at exactly zero.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from framp_jax.data.image_modality import ImageModality


class LocalConfig(NamedTuple):
    """A client's local training recipe and the modality its batches come from."""
    steps: int = 20
    batch_size: int = 20
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0          # global-norm clip; 0 disables
    optimizer: str = "sgd"          # sgd | adam
    # the smallest training-sample count of any client (0 = unknown). With it, the image
    # modality draws each epoch's permutation once before the scan instead of two per step; the
    # batches are the same. Only pass a client whose count is at least this.
    min_count: int = 0
    modality: Any = ImageModality()  # framp_jax.data.modality.Modality


def make_optimizer(local: LocalConfig, lr=None) -> optax.GradientTransformation:
    parts = []
    if local.grad_clip and local.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(local.grad_clip))
    if local.weight_decay:
        parts.append(optax.add_decayed_weights(local.weight_decay))
    rate = local.lr if lr is None else lr
    if local.optimizer == "adam":
        parts.append(optax.adam(rate))
    else:
        parts.append(optax.sgd(rate, momentum=local.momentum if local.momentum else None))
    return optax.chain(*parts)


LossFn = Callable  # loss_fn(params, x, y, rng) -> scalar


def local_train(loss_fn: LossFn, params, mask, x, y, count, key, local: LocalConfig,
                grad_transform=None, lr=None, proto_classes: int = 0):
    """Run ``local.steps`` SGD steps of ``loss_fn`` from ``params`` on one client's data.

    ``mask`` (a {0,1} pytree or None) multiplies gradients and updates, so masked-out entries
    stay where they started (zero, for masked submodels). ``grad_transform(params, grads)`` lets
    a method reshape gradients (FIARSE's threshold-aware factor). Returns (params, mean loss).

    ``proto_classes=K > 0`` (FedProto's prototype timing): ``loss_fn`` returns ``(loss,
    features)`` and a third output ``(sums [K, F], counts [K])`` holds the per-class sums and
    counts of the training-mode features of the last local epoch (``modality.last_epoch_steps``),
    each computed in that step's forward pass, i.e. with the parameters before its update.
    Labels < 0 (graph clients' non-train and padding nodes) are left out.
    """
    opt = make_optimizer(local, lr)
    kdata = jax.random.fold_in(key, 0)
    kloss = jax.random.fold_in(key, 1)
    collect = proto_classes > 0
    data = local.modality
    first = local.steps - data.last_epoch_steps(count, local) if collect else 0
    perms = data.epoch_perms(kdata, count, x, local)  # once per run where the modality can

    def step(carry, s):
        p, opt_state, acc = carry
        xb, yb = data.train_batch(kdata, x, y, count, s, local, perms)
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
        f_dim = jax.eval_shape(lambda: loss_fn(params, *data.train_batch(kdata, x, y, count, 0, local),
                                               kloss))[1].shape[-1]
        acc0 = (jnp.zeros((proto_classes, f_dim), jnp.float32),
                jnp.zeros((proto_classes,), jnp.float32))
    (params, _, acc), losses = jax.lax.scan(step, (params, opt.init(params), acc0),
                                            jnp.arange(local.steps))
    if collect:
        return params, jnp.mean(losses), acc
    return params, jnp.mean(losses)


def is_finite_tree(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def class_prototypes(apply_fn, params, x, y, count, num_classes: int, local: LocalConfig,
                     batch: int = 100):
    """Eval-mode, un-augmented pass over a client's training data: per-class mean features and
    class counts (SPEC §1.6 local prototypes), as the client's modality computes them."""
    return local.modality.class_prototypes(apply_fn, params, x, y, count, num_classes, batch)
