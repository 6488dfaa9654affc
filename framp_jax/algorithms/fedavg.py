"""FedAvg (full model for every client) and its per-budget evaluation.

Every sampled client trains the full global model; the server averages parameters weighted by
sample counts. FedAvg ignores compute budgets while training (a reference point); evaluation
extracts the global model at each client's budget with global top-k magnitude masking, the rule
SPEC §2.6 gives for global-model baselines.

Bytes communicated per round (metrics ``comm/down_bytes``, ``comm/up_bytes``,
``comm/mask_bytes``, float32 = 4 bytes per value, valid participants only, as FRAMP's): FedAvg
sends every participant the whole model and gets its whole trained model back, 4 · (number of
parameters) bytes each way per client, no mask; Local communicates nothing (0 bytes).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import masks as M
from framp_jax.aggregate import masked_mean
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup
from framp_jax.algorithms.registry import Method
from framp_jax.algorithms.rounds import (budget_groups, comm_metrics, draw_cohort, finite_clients,
                                         keep_where, model_init_key, put_clients, round_metrics,
                                         state_item, take_clients, train_cohort)
from framp_jax.client import local_train
from framp_jax.losses import cross_entropy


class FedAvgState(NamedTuple):
    params: Any               # the global model
    __getitem__ = state_item  # state["params"] reads the field (as the former dict state)


class LocalState(NamedTuple):
    params: Any               # every client's model, stacked [N, ...]
    masks: Any                # every client's fixed budget mask, stacked [N, ...]
    __getitem__ = state_item


def ce_loss(model):
    def loss(params, x, y, rng):
        logits, _ = model.apply(params, x, train=True, rng=rng)
        return cross_entropy(logits, y)
    return loss


def fedavg(ctx: Context, opts=None) -> Algorithm:
    model, cfg = ctx.model, ctx.local
    loss_fn = ce_loss(model)

    def init(key, data):
        return FedAvgState(model.init(model_init_key(ctx, key)))

    def round_fn(state, data, t):
        co = draw_cohort(ctx, data, t)
        params = state.params
        new, losses = train_cohort(
            ctx, lambda x, y, n, k: local_train(loss_fn, params, None, x, y, n, k, cfg), co)
        finite = finite_clients(new, losses)
        w = co.count.astype(jnp.float32) * finite
        metrics = round_metrics(losses, finite)
        metrics.update(comm_bytes(params, co.valid))
        return FedAvgState(masked_mean(params, new, None, w)), metrics

    def eval_groups(state, data):
        p = state.params
        pr = model.prunable(p)
        return [EvalGroup(model.apply, M.apply_mask(p, M.topk_mask(p, pr, b)), ids, per_client=False)
                for b, ids in budget_groups(ctx).items()]

    return Algorithm("fedavg", init, round_fn, eval_groups)


def comm_bytes(params, valid):
    """A whole model of ``params``' size down and up to every valid client, no mask."""
    n = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    total = 4.0 * n * jnp.sum(valid.astype(jnp.float32))
    return comm_metrics(total, total)


def local_only(ctx: Context, opts=None) -> Algorithm:
    """Each client trains its own budget-masked model on its own data only (no communication).
    All clients start from the same initial model, masked by top-k at their budget *per layer
    group* (``masks.stage_groups``): a global top-k over a freshly initialised model would drop
    whole layers whose init scale is small (the small CNN's dense layer keeps no weight at 1/16),
    leaving those clients unable to learn."""
    model, cfg = ctx.model, ctx.local
    loss_fn = ce_loss(model)
    n_clients = ctx.num_clients

    def init(key, data):
        p0 = model.init(model_init_key(ctx, key))
        pr = model.prunable(p0)
        groups = M.stage_groups(p0)
        masks = jax.vmap(lambda b: M.topk_mask(p0, pr, b, groups))(jnp.asarray(ctx.budgets, jnp.float32))
        params = jax.tree.map(lambda a, m: a[None] * m, p0, masks)
        return LocalState(params, masks)

    def round_fn(state, data, t):
        co = draw_cohort(ctx, data, t)
        p_i, m_i = ctx.shard_clients((take_clients(state.params, co.ids),
                                      take_clients(state.masks, co.ids)))
        new, losses = train_cohort(
            ctx, lambda x, y, n, k, p, m: local_train(loss_fn, p, m, x, y, n, k, cfg), co, p_i, m_i)
        finite = finite_clients(new, losses)
        params = put_clients(state.params, co.ids, keep_where(finite, new, p_i))
        # no communication: every byte count is 0
        return LocalState(params, state.masks), {**round_metrics(losses, finite),
                                                 **comm_metrics(0.0, 0.0, 0.0)}

    def eval_groups(state, data):
        return [EvalGroup(model.apply, state.params, np.arange(n_clients), per_client=True)]

    return Algorithm("local", init, round_fn, eval_groups)


FEDAVG = Method("fedavg", fedavg)
LOCAL = Method("local", local_only)
