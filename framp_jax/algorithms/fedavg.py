"""FedAvg (full model for every client) and its per-budget evaluation.

Every sampled client trains the full global model; the server averages parameters weighted by
sample counts. FedAvg ignores compute budgets while training (a reference point); evaluation
extracts the global model at each client's budget with global top-k magnitude masking, the rule
SPEC §2.6 gives for global-model baselines.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import masks as M
from framp_jax.aggregate import masked_mean
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup, round_metrics
from framp_jax.client import is_finite_tree, local_train
from framp_jax.losses import cross_entropy


def ce_loss(model):
    def loss(params, x, y, rng):
        logits, _ = model.apply(params, x, train=True, rng=rng)
        return cross_entropy(logits, y)
    return loss


def budget_groups(ctx: Context):
    """Static {budget: client ids} over all clients."""
    return {float(b): np.flatnonzero(np.isclose(ctx.budgets, b)) for b in np.unique(ctx.budgets)}


def fedavg(ctx: Context) -> Algorithm:
    model, cfg = ctx.model, ctx.local
    loss_fn = ce_loss(model)

    def init(key, data):
        return {"params": model.init(ctx.init_key())}

    def round_fn(state, data, t):
        ids = ctx.sample_clients(t)
        x, y, n = ctx.gather(data, ids)
        keys = ctx.client_keys(t, ids)
        params = state["params"]
        train = ctx.vmap_clients(lambda xx, yy, nn, kk: local_train(loss_fn, params, None, xx, yy, nn, kk, cfg))
        new, losses = train(x, y, n, keys)
        finite = jax.vmap(is_finite_tree)(new) & jnp.isfinite(losses)
        w = n.astype(jnp.float32) * finite
        agg = masked_mean(params, new, None, w)
        return {"params": agg}, round_metrics(losses, finite)

    def eval_groups(state, data):
        p = state["params"]
        pr = model.prunable(p)
        return [EvalGroup(model.apply, M.apply_mask(p, M.topk_mask(p, pr, b)), ids, per_client=False)
                for b, ids in budget_groups(ctx).items()]

    return Algorithm("fedavg", init, round_fn, eval_groups)


def local_only(ctx: Context) -> Algorithm:
    """Each client trains its own budget-masked model on its own data only (no communication).
    All clients start from the same initial model, masked by top-k at their budget *per layer
    group* (``masks.stage_groups``): a global top-k over a freshly initialised model would drop
    whole layers whose init scale is small (the small CNN's dense layer keeps no weight at 1/16),
    leaving those clients unable to learn."""
    model, cfg = ctx.model, ctx.local
    loss_fn = ce_loss(model)
    n_clients = ctx.num_clients

    def init(key, data):
        p0 = model.init(ctx.init_key())
        pr = model.prunable(p0)
        groups = M.stage_groups(p0)
        masks = jax.vmap(lambda b: M.topk_mask(p0, pr, b, groups))(jnp.asarray(ctx.budgets, jnp.float32))
        params = jax.tree.map(lambda a, m: a[None] * m, p0, masks)
        return {"params": params, "masks": masks}

    def round_fn(state, data, t):
        ids = ctx.sample_clients(t)
        x, y, n = ctx.gather(data, ids)
        keys = ctx.client_keys(t, ids)
        take = lambda tree: jax.tree.map(lambda a: a[ids], tree)
        p_i, m_i = ctx.shard_clients((take(state["params"]), take(state["masks"])))
        train = ctx.vmap_clients(lambda p, m, xx, yy, nn, kk: local_train(loss_fn, p, m, xx, yy, nn, kk, cfg))
        new, losses = train(p_i, m_i, x, y, n, keys)
        finite = jax.vmap(is_finite_tree)(new) & jnp.isfinite(losses)
        keep = lambda a_new, a_old: jnp.where(finite.reshape((-1,) + (1,) * (a_new.ndim - 1)), a_new, a_old)
        new = jax.tree.map(keep, new, p_i)
        params = jax.tree.map(lambda a, u: a.at[ids].set(u), state["params"], new)
        return {"params": params, "masks": state["masks"]}, round_metrics(losses, finite)

    def eval_groups(state, data):
        return [EvalGroup(model.apply, state["params"], np.arange(n_clients), per_client=True)]

    return Algorithm("local", init, round_fn, eval_groups)
