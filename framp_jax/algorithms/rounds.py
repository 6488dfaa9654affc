"""The building blocks of a federated round, shared by every method.

A method's ``round(state, data, t)`` is composed of these small pure functions:

1. draw the round's participants with their data and keys: :func:`draw_cohort` (uniform
   sampling, ``ctx.sample_clients``) or :func:`draw_level_cohorts` (one static-shape
   :class:`Cohort` per budget level, ``ctx.sample_clients_by_level``);
2. map the method's client function over the cohort: :func:`train_cohort`;
3. find the clients whose update is usable: :func:`finite_clients`, and drop or replace the
   others: :func:`keep_where`;
4. aggregate (method-specific), with :func:`holders_mean` for "the mean over the clients that
   hold an entry, else keep the global value";
5. report :func:`round_metrics` (``train_loss``, ``nan_clients``) and the bytes communicated,
   :func:`comm_metrics` (``comm/down_bytes``, ``comm/up_bytes``, ``comm/mask_bytes``; entries
   per client from :func:`per_client_size`).

Per-client rows of a stacked pytree are read and written with :func:`take_clients` and
:func:`put_clients`; :func:`budget_groups` lists the evaluation groups of the global-model
methods; :func:`multistep_lr` is the MultiStepLR schedule of HeteroFL, FedRolex and ScaleFL;
:func:`fiarse_paper_factor` is FIARSE's threshold-aware gradient factor (FIARSE and FRAMP's
``mask_grad="fiarse_paper"``); :func:`model_init_key` is the key every method initialises its
model with.

Every function here computes exactly what the methods computed inline before (same random
keys, same reductions in the same order, same dtypes), so composing them changes no number.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.client import is_finite_tree


# ---------------------------------------------------------------------------------------------
# keys

def model_init_key(ctx, key):
    """The key a method initialises its model with, from the run's root key ``key`` that
    ``Algorithm.init(key, data)`` receives (the engine passes ``jax.random.key(seed)``):
    ``fold_in(key, 2)``, which for the engine's key is ``ctx.init_key()``. ``key=None`` stands
    for the root key of ``ctx.seed``."""
    if key is None:
        key = jax.random.key(ctx.seed)
    return jax.random.fold_in(key, 2)


# ---------------------------------------------------------------------------------------------
# participants

class Cohort(NamedTuple):
    """The participants of a round (or of one budget level of it) with their training data."""
    ids: Any      # int32 [M] client ids
    x: Any        # stacked training inputs [M, n_max, ...] (a graph pytree for graph data)
    y: Any        # int32 [M, n_max]
    count: Any    # int32 [M] samples per client
    keys: Any     # [M] per-client PRNG keys, ``ctx.client_keys(t, ids)``
    valid: Any    # bool [M]: a real participant (False: a padding slot of a budget level)


def cohort_of(ctx, data, t, ids, valid=None) -> Cohort:
    """The cohort of clients ``ids`` in round ``t``: their data (``ctx.gather``) and keys
    (``ctx.client_keys``); ``valid`` defaults to every slot."""
    x, y, n = ctx.gather(data, ids)
    keys = ctx.client_keys(t, ids)
    if valid is None:
        valid = jnp.ones(ids.shape, bool)
    return Cohort(ids, x, y, n, keys, valid)


def draw_cohort(ctx, data, t) -> Cohort:
    """Round ``t``'s participants, drawn uniformly without replacement (``ctx.sample_clients``)."""
    return cohort_of(ctx, data, t, ctx.sample_clients(t))


def draw_level_cohorts(ctx, data, t) -> list:
    """Round ``t``'s participants per budget level (``ctx.sample_clients_by_level``):
    ``[(budget, Cohort)]`` in level order, each padded to its level's static size (padding slots
    have ``valid`` False)."""
    return [(budget, cohort_of(ctx, data, t, ids, valid))
            for budget, ids, valid in ctx.sample_clients_by_level(t)]


def concat_cohorts(cohorts) -> Cohort:
    """One cohort of several (e.g. every level's), concatenated in order along the client axis."""
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *cohorts)


def train_cohort(ctx, client_fn, cohort: Cohort, *extra, extra_axes=None):
    """``client_fn(x, y, count, key, *extra)`` mapped over the cohort's clients
    (``ctx.vmap_clients``: vmapped, or one after another, or sharded over a mesh); its outputs
    come back stacked on a leading client axis. ``extra_axes`` gives each extra argument's axis:
    0 (one row per client) or None (shared by all); default 0 for every one."""
    axes = (0,) * len(extra) if extra_axes is None else tuple(extra_axes)
    train = ctx.vmap_clients(client_fn, in_axes=(0, 0, 0, 0) + axes)
    return train(cohort.x, cohort.y, cohort.count, cohort.keys, *extra)


# ---------------------------------------------------------------------------------------------
# per-client selection

def finite_clients(updates, losses):
    """bool [M]: the clients whose stacked ``updates`` (any pytree with a leading client axis)
    hold only finite values and whose loss is finite."""
    return jax.vmap(is_finite_tree)(updates) & jnp.isfinite(losses)


def _per_client(ok, a):
    return ok.reshape(ok.shape + (1,) * (a.ndim - ok.ndim))


def keep_where(ok, new, old):
    """Per client, ``new``'s row where ``ok`` [M], else ``old``'s: ``old`` is a pytree like
    ``new`` or a scalar (e.g. 0.0, to zero a failed client's update)."""
    if isinstance(old, (int, float)):
        return jax.tree.map(lambda a: jnp.where(_per_client(ok, a), a, old), new)
    return jax.tree.map(lambda a, o: jnp.where(_per_client(ok, a), a, o), new, old)


def take_clients(tree, ids):
    """The rows ``ids`` of every leaf of a per-client pytree."""
    return jax.tree.map(lambda a: a[ids], tree)


def put_clients(tree, ids, rows):
    """``tree`` with its rows ``ids`` replaced by ``rows``."""
    return jax.tree.map(lambda a, r: a.at[ids].set(r), tree, rows)


# ---------------------------------------------------------------------------------------------
# aggregation

def holders_mean(global_value, num, den):
    """``num / den`` where ``den > 0`` (the mean over the clients that hold an entry), else
    ``global_value`` (an array like ``num`` or a scalar): entries nobody holds keep their value.
    One leaf; map it over a pytree."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), global_value)


# ---------------------------------------------------------------------------------------------
# metrics

def round_metrics(losses, finite, valid=None):
    """``train_loss``: the mean loss of the clients that count (finite, and valid when
    ``valid`` is given), NaN when none does; ``nan_clients`` (int32): the (valid) clients whose
    update was not finite.

    ``losses``, ``finite`` and ``valid`` are [M] arrays, or lists of per-level arrays; with
    lists the loss sum is accumulated level by level (ScaleFL's order), otherwise one sum."""
    if isinstance(losses, (list, tuple)):
        valid = [None] * len(losses) if valid is None else valid
        levels = list(zip(losses, finite, valid))
    else:
        levels = [(losses, finite, valid)]
    loss_sum, n_ok, n_bad = None, None, None
    for l, f, v in levels:
        ok = f if v is None else f & v
        s = jnp.sum(jnp.where(ok, l, 0.0))
        c = jnp.sum(ok.astype(jnp.float32))
        b = jnp.sum((~f if v is None else v & ~f).astype(jnp.int32))
        loss_sum = s if loss_sum is None else loss_sum + s
        n_ok = c if n_ok is None else n_ok + c
        n_bad = b if n_bad is None else n_bad + b
    loss = loss_sum / jnp.maximum(n_ok, 1.0)
    return {"train_loss": jnp.where(n_ok > 0, loss, jnp.nan), "nan_clients": n_bad}


def per_client_size(stacked) -> int:
    """Entries of one client's row of a pytree stacked on a leading client axis (static)."""
    return int(sum(np.size(x) // x.shape[0] for x in jax.tree.leaves(stacked)))


def comm_metrics(down, up, mask=None) -> dict:
    """The round's bytes communicated (float32 scalars): ``comm/down_bytes`` (server to the
    participants), ``comm/up_bytes`` (back), ``comm/mask_bytes`` (masks or index sets sent
    besides the values; ``None`` = 0). Methods count 4 bytes per float32 value sent and only
    valid participants (FRAMP's accounting, SPEC §1.9)."""
    f = lambda v: jnp.asarray(0.0 if v is None else v, jnp.float32)
    return {"comm/down_bytes": f(down), "comm/up_bytes": f(up), "comm/mask_bytes": f(mask)}


# ---------------------------------------------------------------------------------------------
# evaluation groups, schedules, gradient factors

def budget_groups(ctx) -> dict:
    """Static ``{budget: client ids}`` over all clients, budgets ascending."""
    return {float(b): np.flatnonzero(np.isclose(ctx.budgets, b)) for b in np.unique(ctx.budgets)}


def multistep_lr(t, base, milestones, gamma, offset: int = 0, integer_power: bool = False):
    """MultiStepLR with a traced round ``t``:
    ``base · gamma^#{m ∈ milestones : m ≤ t + offset}`` (float32). ``integer_power``: raise
    ``gamma`` to the count as an int32 (ScaleFL's ``adjust_learning_rate``) instead of a float32
    (HeteroFL, FedRolex); XLA's two ``pow``\\ s can differ in the last bit from the fourth decay
    on, so each method keeps its own."""
    if not milestones:
        return jnp.asarray(base, jnp.float32)
    n = jnp.sum(jnp.asarray(milestones, jnp.int32) <= t + offset)
    if not integer_power:
        n = n.astype(jnp.float32)
    return jnp.asarray(base, jnp.float32) * jnp.asarray(gamma, jnp.float32) ** n


def fiarse_paper_factor(abs_w, tau, guard_zero: bool = True):
    """FIARSE's threshold-aware gradient factor of a kept entry, ``1 + 2τ|w| / (|w| + τ)²``
    (the paper's ``Bern.backward``). Where ``|w| = τ = 0`` the formula is 0/0: ``guard_zero``
    gives 1 there (FIARSE); without it the factor is NaN there (FRAMP's
    ``mask_grad="fiarse_paper"``, whose client then fails the finite check and is left out)."""
    den = jnp.square(abs_w + tau)
    if not guard_zero:
        return 1.0 + 2.0 * tau * abs_w / den
    return 1.0 + jnp.where(den > 0, 2.0 * tau * abs_w / jnp.where(den > 0, den, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# typed server states

def state_item(state, key):
    """``state["params"]`` reads a field of a typed (NamedTuple) server state by name, as the
    dict states of earlier versions were read; integers and slices index the tuple."""
    if isinstance(key, str):
        try:
            return getattr(state, key)
        except AttributeError:
            raise KeyError(key) from None
    return tuple.__getitem__(state, key)
