"""FIARSE (Wu et al., NeurIPS 2024): importance-aware submodel extraction by weight magnitude.

One global model. Each round, every sampled client gets a threshold τ from a top-k over the
*global* model's |w| at the client's budget (one τ for all prunable leaves, or one per stage
group with ``scope="groupwise"``). Local training runs on the full-shape weights, but every
forward uses ``w_eff = w · 1[|w| >= τ]`` re-evaluated on the *moving* weights, so entries can
leave (or join) the submodel during local training. Pruned entries get zero gradient. The client
returns ``delta = w_start − w_end`` and the server averages each entry over the clients whose
delta is non-zero, then steps ``w ← w − server_lr · avg`` (SPEC §4.4, §4.7).

Options (``config.fiarse``):
  scope      "global" (one τ; official ``fiarse/``) | "groupwise" (one τ per stage group from
             ``masks.stage_groups``; official ``fiarse_layerwise/``)
  mask_grad  "masked" (default; the gradient the official code actually computes, g·1[|w|>=τ])
             | "fiarse_paper" (the paper's threshold-aware gradient, kept entries get
             g·(1 + 2τ|w|/(|w|+τ)²))
  server_lr  the global step size (official ``--lr-global``, default 1.0)

Bytes communicated per round (metrics ``comm/down_bytes``, ``comm/up_bytes``,
``comm/mask_bytes``; float32 = 4 bytes per value, valid participants only): each client
receives the kept entries of the global model at its budget (``|w| >= τ``, ties included) and
every unmasked (non-prunable) entry, and sends back its update on the same support (entries can
only leave the submodel during local training, never join: pruned entries get no gradient) plus
the unmasked entries. ``comm/mask_bytes`` is 0: the official code sends no mask (``server.py``
hands the client the model and ``generate_mask`` computes the top-k on it; ``worker.py`` returns
the update as a dense state_dict and the server finds its support with ``grad != 0``), and a
client can recover the mask from the values it receives (τ is the smallest kept magnitude).
Sending it explicitly would cost P/8 bytes per client, FRAMP's ``comm/mask_bytes`` accounting.
"""
from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc

from framp_jax import masks as M
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup
from framp_jax.algorithms.registry import Method
from framp_jax.algorithms.rounds import (budget_groups, comm_metrics, draw_cohort,
                                         fiarse_paper_factor, finite_clients, holders_mean,
                                         keep_where, model_init_key, round_metrics, state_item,
                                         train_cohort)
from framp_jax.client import local_train
from framp_jax.config import check
from framp_jax.losses import cross_entropy

SCOPES = ("global", "groupwise")
MASK_GRADS = ("masked", "fiarse_paper")


def fiarse_defaults() -> mlc.ConfigDict:
    o = mlc.ConfigDict()
    o.scope = "global"
    o.mask_grad = "masked"
    o.server_lr = 1.0
    return o


def validate_options(c, opts) -> None:
    """FIARSE's options (``config.fiarse`` over :func:`fiarse_defaults`) and what FIARSE needs
    of the run's config."""
    check(opts.scope in SCOPES, "fiarse.scope", opts.scope, f"one of {SCOPES}")
    check(opts.mask_grad in MASK_GRADS, "fiarse.mask_grad", opts.mask_grad, f"one of {MASK_GRADS}")
    check(float(opts.server_lr) > 0, "fiarse.server_lr", opts.server_lr, "a global step size > 0")
    # optax's decay would shrink pruned entries too, so they would count as trained at the
    # server and leave the budget; the official worker runs plain SGD (fiarse/worker.py).
    check(not c.weight_decay, "weight_decay", c.weight_decay,
          "0 for FIARSE (its clients train with plain SGD)")


# ---------------------------------------------------------------------------------------------
# The threshold-masked forward and its two gradients


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def threshold_mask(w, tau, paper: bool = False):
    """``w · 1[|w| >= τ]`` with FIARSE's gradient: ``g·1[|w|>=τ]`` (paper=False, what the
    official ``Bern`` executes: it returns a bool tensor, which autograd treats as a constant,
    fiarse/model/model_utils.py) or ``g·1[|w|>=τ]·(1 + 2τ|w|/(|w|+τ)²)`` (paper=True, the
    intended ``Bern.backward``: d/d|w| of the mask is 2τ/(|w|+τ)², times w·sign(w) = |w|, NaN→0).
    τ gets no gradient."""
    return w * (jnp.abs(w) >= tau).astype(w.dtype)


def _tm_fwd(w, tau, paper):
    return threshold_mask(w, tau, paper), (w, tau)


def _tm_bwd(paper, res, g):
    w, tau = res
    a = jnp.abs(w)
    keep = (a >= tau).astype(g.dtype)
    if paper:
        keep = keep * fiarse_paper_factor(a, tau)
    return g * keep, jnp.zeros_like(tau)


threshold_mask.defvjp(_tm_fwd, _tm_bwd)


def gradient_factor(w, tau, mode: str):
    """The factor d w_eff / d w elementwise (diagonal), for inspection and tests."""
    return jax.grad(lambda v: jnp.sum(threshold_mask(v, tau, mode == "fiarse_paper")))(w)


# ---------------------------------------------------------------------------------------------
# Thresholds


def group_ids(params, scope: str):
    """Per-leaf int group ids: all 0 (global) or ``masks.stage_groups`` (groupwise)."""
    if scope == "global":
        return jax.tree.map(lambda _: 0, params)
    return M.stage_groups(params)


def leaf_thresholds(params, prunable, groups, budgets):
    """Per-leaf τ (a pytree of arrays shaped like ``budgets``; 0 on non-prunable leaves).

    Each group's |w| is sorted once, then every budget in ``budgets`` (a traced scalar or
    vector) reads its own τ: ``k = floor(b·P_g)`` (at least 1), ``τ = sort(|w|)[P_g − k]``,
    the k-th largest magnitude, exactly ``masks.topk_threshold`` per group
    (fiarse/model/resnet_masked.py ``generate_mask``; fiarse_layerwise ``layer_wise_generate_mask``
    does the same per stage group).
    """
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(prunable)
    gids = jax.tree.leaves(groups)
    budgets = jnp.asarray(budgets, jnp.float32)
    taus = {}
    for g in sorted({gid for gid, f in zip(gids, flags) if f}):
        flat = jnp.concatenate([jnp.abs(x).ravel() for x, f, gid in zip(leaves, flags, gids)
                                if f and gid == g])
        n = flat.shape[0]
        k = jnp.clip(jnp.floor(budgets * n).astype(jnp.int32), 1, n)
        taus[g] = jnp.sort(flat)[n - k]
    out = [taus[gid] if f else jnp.zeros_like(budgets) for f, gid in zip(flags, gids)]
    return jax.tree.unflatten(treedef, out)


def effective_params(params, taus, prunable, paper: bool):
    """``w_eff`` of the forward: prunable leaves thresholded at their τ, others unchanged."""
    return jax.tree.map(lambda w, t, f: threshold_mask(w, t, paper) if f else w,
                        params, taus, prunable)


def threshold_masks(params, taus, prunable):
    """{0,1} masks ``|w| >= τ`` (ones on non-prunable leaves)."""
    return jax.tree.map(lambda w, t, f: (jnp.abs(w) >= t).astype(w.dtype) if f else jnp.ones_like(w),
                        params, taus, prunable)


# ---------------------------------------------------------------------------------------------
# Server rule


def server_update(global_params, deltas, finite, server_lr):
    """``avg = Σ_i delta_i / Σ_i 1[delta_i != 0]`` per entry (0 where no client changed it),
    ``w ← w − server_lr · avg`` (fiarse/server.py). ``deltas`` are stacked ``w_start − w_end``
    [M, ...]; clients with ``finite`` False are left out of both sums."""
    def leaf(g, d):
        cnt = jnp.sum((d != 0).astype(d.dtype), axis=0)
        return g - server_lr * holders_mean(0.0, jnp.sum(d, axis=0), cnt)
    return jax.tree.map(leaf, global_params, keep_where(finite, deltas, 0.0))


# ---------------------------------------------------------------------------------------------


class FiarseState(NamedTuple):
    params: Any               # the global model
    __getitem__ = state_item  # state["params"] reads the field (as the former dict state)


def fiarse(ctx: Context, opts) -> Algorithm:
    model, cfg = ctx.model, ctx.local
    paper = opts.mask_grad == "fiarse_paper"
    server_lr = float(opts.server_lr)
    shapes = jax.eval_shape(model.init, ctx.init_key())
    prunable = model.prunable(shapes)
    groups = group_ids(shapes, opts.scope)
    n_prunable = M.num_prunable(shapes, prunable)
    n_unmasked = sum(x.size for x, f in zip(jax.tree.leaves(shapes), jax.tree.leaves(prunable))
                     if not f)

    def loss_with(taus):
        def loss(params, x, y, rng):
            logits, _ = model.apply(effective_params(params, taus, prunable, paper), x,
                                    train=True, rng=rng)
            return cross_entropy(logits, y)
        return loss

    def kept(mask):
        return sum(jnp.sum(m) for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(prunable))
                   if f)

    def client(params, taus, x, y, n, key):
        new, loss = local_train(loss_with(taus), params, None, x, y, n, key, cfg)
        delta = jax.tree.map(lambda a, b: a - b, params, new)
        m0, m1 = threshold_masks(params, taus, prunable), threshold_masks(new, taus, prunable)
        churn = sum(jnp.sum(jnp.abs(a - b)) for a, b, f in
                    zip(jax.tree.leaves(m0), jax.tree.leaves(m1), jax.tree.leaves(prunable)) if f)
        return delta, loss, kept(m0) / n_prunable, churn / n_prunable

    def init(key, data):
        return FiarseState(model.init(model_init_key(ctx, key)))

    def round_fn(state, data, t):
        co = draw_cohort(ctx, data, t)
        params = state.params
        # one τ per client from the global model at the client's (traced) budget
        taus = ctx.shard_clients(leaf_thresholds(params, prunable, groups, data.budgets[co.ids]))
        deltas, losses, kept0, churn = train_cohort(
            ctx, lambda x, y, n, k, tt: client(params, tt, x, y, n, k), co, taus)
        finite = finite_clients(deltas, losses)
        new = server_update(params, deltas, finite, server_lr)
        m = round_metrics(losses, finite)
        nf = jnp.maximum(jnp.sum(finite), 1)
        # realised kept fraction at the start (ties can exceed the budget) and the fraction of
        # prunable entries that left or joined the submodel during local training
        m["kept_frac"] = jnp.sum(jnp.where(finite, kept0, 0.0)) / nf
        m["mask_churn"] = jnp.sum(jnp.where(finite, churn, 0.0)) / nf
        m.update(comm_bytes(params, taus, co.valid))
        return FiarseState(new), m

    def comm_bytes(params, taus, valid):
        """The round's bytes (module docstring): 4 · (kept + unmasked entries) per valid
        participant each way; the kept count is recounted here in int32 (exact)."""
        def kept_count(tt):
            return sum(jnp.sum((jnp.abs(w) >= tau).astype(jnp.int32)) for w, tau, f in
                       zip(jax.tree.leaves(params), jax.tree.leaves(tt), jax.tree.leaves(prunable))
                       if f)
        payload = jax.vmap(kept_count)(taus) + n_unmasked
        total = 4.0 * jnp.sum(jnp.where(valid, payload, 0).astype(jnp.float32))
        return comm_metrics(total, total, 0.0)

    def round_masks(state, data, t):
        """Round ``t``'s masks (``Algorithm.round_masks``): the top-k masks ``|w| >= τ_i`` of
        the global model before the round at each participant's budget, exactly the masks its
        clients start local training from (the forward re-evaluates them on the moving weights,
        so entries may leave them during the round: metric ``mask_churn``)."""
        co = draw_cohort(ctx, data, t)
        budgets = data.budgets[co.ids]
        taus = leaf_thresholds(state.params, prunable, groups, budgets)
        masks = jax.vmap(lambda tt: threshold_masks(state.params, tt, prunable))(taus)
        return masks, budgets, co.valid

    def eval_groups(state, data):
        p = state.params
        out = []
        for b, ids in budget_groups(ctx).items():
            taus = leaf_thresholds(p, prunable, groups, b)
            out.append(EvalGroup(model.apply, M.apply_mask(p, threshold_masks(p, taus, prunable)),
                                 ids, per_client=False))
        return out

    return Algorithm("fiarse", init, round_fn, eval_groups, round_masks=round_masks)


METHOD = Method("fiarse", fiarse, fiarse_defaults, validate_options)
