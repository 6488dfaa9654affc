"""Client descriptors (SPEC §1.3): computed once, before round 0, on each client, and fixed.

``label_hist+budget`` (default): [n_i / sum(n_i) ; beta(s_i)] with beta(s) = log2(1/s) / 6.
``func_emb+budget``: the mean eval-mode feature of a briefly trained budget-s submodel of a
common seed model, L2-normalised, then beta(s).  ``onehot_budget``: a one-hot of the budget
level (no data information, an ablation); ``budget_only``: [beta(s)].
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

DESCRIPTORS = ("label_hist+budget", "func_emb+budget", "onehot_budget", "budget_only")


def budget_code(budget):
    """beta(s) = log2(1/s) / 6: 1 -> 0, 1/64 -> 1 (unseen budgets extrapolate smoothly)."""
    return jnp.log2(1.0 / jnp.asarray(budget, jnp.float32)) / 6.0


def label_hist_budget(label_counts, budgets, smoothing: float = 0.0):
    """[(n_ik + a) / (n_i + K a) ; beta(s_i)] (``a`` = ``smoothing``, 0 = the plain histogram)."""
    lc = jnp.asarray(label_counts, jnp.float32)
    if smoothing:
        lc = lc + smoothing
    tot = lc.sum(-1, keepdims=True)
    hist = lc / jnp.where(tot > 0, tot, 1.0)
    return jnp.concatenate([hist, budget_code(budgets)[:, None]], -1)


def onehot_budget(budgets, levels):
    b = np.asarray(budgets, np.float64)
    idx = np.array([int(np.argmin(np.abs(np.log2(np.asarray(levels)) - np.log2(x)))) for x in b])
    return jax.nn.one_hot(jnp.asarray(idx), len(levels), dtype=jnp.float32)


def func_emb_budget(model, ctx, data, steps: int):
    """FedSheafHN-style functional embedding: every client trains the top-k submodel (at its
    budget) of a common seed model for ``steps`` local steps, then averages its eval-mode
    features over its training data; L2-normalised, then the budget code is appended."""
    from framp_jax import masks as M
    from framp_jax.client import class_prototypes, local_train
    from framp_jax.losses import cross_entropy

    p0 = model.init(ctx.init_key())
    pr = model.prunable(p0)
    cfg = ctx.local._replace(steps=steps)

    def loss(p, x, y, rng):
        return cross_entropy(model.apply(p, x, train=True, rng=rng)[0], y)

    def one(x, y, n, budget, key):
        m = M.topk_mask(p0, pr, budget)
        p, _ = local_train(loss, M.apply_mask(p0, m), m, x, y, n, key, cfg)
        protos, counts = class_prototypes(model.apply, p, x, y, n, ctx.num_classes, cfg)
        emb = (counts[:, None] * protos).sum(0) / jnp.maximum(counts.sum(), 1.0)
        return emb / jnp.maximum(jnp.linalg.norm(emb), 1e-12)

    root = jax.random.fold_in(jax.random.key(ctx.seed), 3)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(ctx.num_clients))
    emb = jax.jit(jax.vmap(one))(data.train_x, data.train_y, data.train_count, data.budgets, keys)
    _warn_zero_embeddings(emb, data.budgets)
    return jnp.concatenate([emb, budget_code(data.budgets)[:, None]], -1)


def _warn_zero_embeddings(emb, budgets):
    """Global top-k of the seed model can prune a whole layer at a small budget (on the CIFAR-10
    CPU CNN the dense layer is gone at 1/16 and 1/64); those clients' features, and so their
    embeddings, are all zero, and their descriptor carries the budget code alone."""
    if isinstance(emb, jax.core.Tracer):
        return
    zero = np.flatnonzero(~np.any(np.asarray(emb) != 0, axis=-1))
    if zero.size:
        levels = sorted({float(b) for b in np.asarray(budgets)[zero]}, reverse=True)
        warnings.warn(
            f"framp.descriptor='func_emb+budget': {zero.size} of {emb.shape[0]} clients (budgets "
            f"{', '.join(f'{b:g}' for b in levels)}) have an all-zero functional embedding: the "
            "top-k submodel of the seed model at their budget has no nonzero feature (a layer "
            "is pruned whole), so their descriptor is the budget code alone", RuntimeWarning,
            stacklevel=3)


def compute_descriptors(kind, model, ctx, data, func_emb_steps: int = 50,
                        hist_smoothing: float = 0.0):
    if kind == "label_hist+budget":
        return label_hist_budget(data.label_counts, data.budgets, hist_smoothing)
    if kind == "onehot_budget":
        return onehot_budget(np.asarray(ctx.budgets), list(ctx.budget_levels))
    if kind == "budget_only":
        return budget_code(data.budgets)[:, None]
    if kind == "func_emb+budget":
        return func_emb_budget(model, ctx, data, func_emb_steps)
    raise ValueError(f"descriptor={kind!r}: allowed {DESCRIPTORS}")


DESCRIPTOR_CONTROLS = ("none", "permute", "random")


def control_descriptors(descriptors, kind, control, key):
    """Descriptors with their client-data part replaced, the budget code (last entry) kept: the
    controls that show whether the descriptor's content matters.

    ``permute``: client ``p[j]`` gets the data part of client ``p[j+1 mod N]`` for a random
    permutation ``p`` (one cycle through all clients: a derangement, so no client keeps its own
    and all stay distinct when the originals are). ``random``: a random code per client, from
    the descriptor's own family: a uniform-Dirichlet histogram (``label_hist+budget``) or a
    random unit vector (``func_emb+budget``). ``key`` fixes the draw."""
    if control == "none":
        return descriptors
    if kind not in ("label_hist+budget", "func_emb+budget"):
        raise ValueError(f"descriptor_control={control!r} needs a label_hist or func_emb "
                         f"descriptor, not {kind!r}")
    data_part, code = descriptors[:, :-1], descriptors[:, -1:]
    n = descriptors.shape[0]
    if control == "permute":
        p = jax.random.permutation(key, n)
        src = jnp.zeros((n,), jnp.int32).at[p].set(jnp.roll(p, -1))
        new = data_part[src]
    elif control == "random":
        if kind == "label_hist+budget":
            new = jax.random.dirichlet(key, jnp.ones((data_part.shape[1],)), (n,))
        else:
            g = jax.random.normal(key, data_part.shape)
            new = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    else:
        raise ValueError(f"descriptor_control={control!r}: allowed {DESCRIPTOR_CONTROLS}")
    return jnp.concatenate([new.astype(descriptors.dtype), code], -1)


def with_budget(descriptors, kind, budget, levels):
    """The same clients' descriptors at another budget (unseen-budget evaluation)."""
    if kind in ("label_hist+budget", "func_emb+budget"):
        return descriptors.at[:, -1].set(budget_code(budget))
    if kind == "budget_only":
        return jnp.full_like(descriptors, budget_code(budget))
    raise ValueError(f"descriptor={kind!r} cannot express the unseen budget {budget} "
                     "(a one-hot over the training levels); use label_hist+budget or budget_only")
