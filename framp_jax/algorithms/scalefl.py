"""ScaleFL (Ilhan et al., CVPR 2023): width + depth scaled submodels with early exits and
self-distillation (SPEC §4.3, §4.7), after git-disl/scale-fl ``fed.py`` and ``train.py``.

Each budget level s maps to a (number of exits h, width factor r). A level's model is a genuinely
smaller pytree (``models/exits.py``): the first ``int(r · C)`` channels of every hidden layer of
the global model and only the layers up to its deepest exit h. Per round:

1. participants are drawn per level (``ctx.sample_clients_by_level``); every level is vmapped at
   its own static shape, all its clients starting from the level's gather of the global model;
2. local loss (``train.py`` ``execute_epoch``): over the level's h exits (0-based j), exit j is
   weighted by j+1 and the sum is divided by h(h+1)/2; every exit has a CE term and the earlier
   exits add ``γ · T² · KLDiv(log_softmax(out_j/T), softmax(out_last/T))`` with KLDivLoss's mean
   reduction (``models/model_utils.py`` ``KDLoss``; CE not scaled by 1-γ, teacher not detached),
   on only when round > 0.25 · rounds and γ ≠ 0 (γ = ``kd_gamma``, default 0 as ``args.py``);
3. aggregation (``fed.py`` ``average_weights``): every entry becomes the unweighted mean over the
   clients whose copy of it received a gradient, i.e. whose submodel holds it (padding slots and
   clients with a NaN update count 0); entries nobody held keep their old value.

The client learning rate follows ``utils.adjust_learning_rate``'s multistep rule,
``lr · decay^(#milestones ≤ round)`` with the round traced, so N rounds compile once.
Evaluation: per budget level, the global model extracted at that level, predicting from its
deepest available exit (``predict.py`` ``local_validate`` with ``exit_idx`` = the level's h).

Default level maps (``scalefl.exits``/``scalefl.widths`` empty):
- ResNet-18 (SPEC §4.3): 1/64 → (2 exits, 0.5), 1/16 → (3, 0.5), 1/4 → (3, 1.0), 1 → (4, 1.0);
  parameter fractions 0.0152, 0.0623, 0.2485, 1.
- small CNN (3 exits; our choice, same widths {0.5, 1}): 1/64 → (2, 0.5), 1/16 → (2, 1.0),
  1/4 → (3, 0.5), 1 → (3, 1.0); fractions 0.0104, 0.0354, 0.2536, 1 (each level's most
  parameters within 1.02 × its budget, among the CNN's (exits, width ∈ {0.5, 1}) models).
- GCN (graph analogue: an exit after layer 1; our choice): 1 → (2, 1), 1/4 → (2, 1/4),
  1/16 → (1, 1/16), 1/64 → (1, 1/64). The in_dim × hidden first layer dominates a GCN's
  parameters, so the width carries the budget (Cora: fractions 1, 0.235, 0.057, 0.014).
Fractions count the prunable parameters (kernels and classifier biases), the entries a budget
measures elsewhere in framp_jax; ``init`` prints each level's measured fraction.

Bytes communicated per round (metrics ``comm/down_bytes``, ``comm/up_bytes``,
``comm/mask_bytes``; float32 = 4 bytes per value, valid participants only, as FRAMP's): every
participant receives its level's sub-network (its layers, width and exits: every entry of the
level's params pytree) and sends the trained one back, 4 · (its entries) bytes each way; no mask
(the level's shape is fixed by the client's budget).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from framp_jax.algorithms.base import Algorithm, Context, EvalGroup
from framp_jax.algorithms.registry import Method
from framp_jax.algorithms.rounds import (budget_groups, comm_metrics, draw_level_cohorts,
                                         finite_clients, holders_mean, keep_where, model_init_key,
                                         multistep_lr, per_client_size, round_metrics, state_item,
                                         train_cohort)
from framp_jax.client import local_train
from framp_jax.config import ConfigError
from framp_jax.losses import cross_entropy
from framp_jax.models import exits as E

# budget -> (exits, width)
DEFAULT_LEVELS = {
    "resnet18": {1.0: (4, 1.0), 0.25: (3, 1.0), 0.0625: (3, 0.5), 0.015625: (2, 0.5)},
    "cnn": {1.0: (3, 1.0), 0.25: (3, 0.5), 0.0625: (2, 1.0), 0.015625: (2, 0.5)},
    "gcn": {1.0: (2, 1.0), 0.25: (2, 0.25), 0.0625: (1, 0.0625), 0.015625: (1, 0.015625)},
}
MAX_EXITS = {"resnet18": 4, "cnn": 3, "gcn": 2}


def default_options() -> mlc.ConfigDict:
    """``config.scalefl``: every option a preset may override."""
    o = mlc.ConfigDict()
    o.exits = ()            # per budget level (config order); () = DEFAULT_LEVELS[model]
    o.widths = ()           # per budget level; () = DEFAULT_LEVELS[model]
    o.kd_gamma = 0.0        # args.py --KD_gamma default 0
    o.kd_T = 3.0            # args.py --KD_T default 3
    o.kd_start = 0.25       # train.py: KD on when round > kd_start · rounds
    o.lr_milestones = ()    # config.py CIFAR: (100, 200)
    o.lr_decay = 0.1
    return o


def level_map(model: str, budget_levels, o) -> dict:
    """{budget: (exits, width)} for every budget level of ``model``'s ScaleFL options ``o``,
    validated."""
    if model not in MAX_EXITS:
        raise ConfigError("model", model, "ScaleFL has early-exit variants of 'cnn', 'resnet18' and 'gcn'")
    levels = [float(b) for b in budget_levels]
    if len(o.exits) == 0 and len(o.widths) == 0:
        d = DEFAULT_LEVELS[model]
        miss = [b for b in levels if not any(np.isclose(b, k) for k in d)]
        if miss:
            raise ConfigError("scalefl.exits", tuple(o.exits),
                              f"one (exits, width) per budget level: the default map of "
                              f"{model} covers budgets {sorted(d)}, not {miss}; set "
                              "scalefl.exits and scalefl.widths")
        return {b: next(v for k, v in d.items() if np.isclose(b, k)) for b in levels}
    for f in ("exits", "widths"):
        if len(o[f]) != len(levels):
            raise ConfigError(f"scalefl.{f}", tuple(o[f]),
                              f"{len(levels)} values, one per budget level {tuple(levels)}")
    m = MAX_EXITS[model]
    for h in o.exits:
        if not (isinstance(h, int) and 1 <= h <= m):
            raise ConfigError("scalefl.exits", tuple(o.exits), f"integers in 1..{m} for {model}")
    for w in o.widths:
        if not (0 < w <= 1):
            raise ConfigError("scalefl.widths", tuple(o.widths), "width factors in (0, 1]")
    return {b: (int(h), float(w)) for b, h, w in zip(levels, o.exits, o.widths)}


def validate_options(c, o) -> None:
    """ScaleFL's options ``o`` (``config.scalefl`` over :func:`default_options`)."""
    level_map(c.model, c.budget_levels, o)
    if not o.kd_gamma >= 0:
        raise ConfigError("scalefl.kd_gamma", o.kd_gamma, ">= 0 (0 disables self-distillation)")
    if not o.kd_T > 0:
        raise ConfigError("scalefl.kd_T", o.kd_T, "a temperature > 0")
    if not 0 <= o.kd_start <= 1:
        raise ConfigError("scalefl.kd_start", o.kd_start, "a fraction of the rounds in [0, 1]")
    ms = tuple(o.lr_milestones)
    if any(not isinstance(m, int) or m < 0 for m in ms) or list(ms) != sorted(ms):
        raise ConfigError("scalefl.lr_milestones", ms, "non-decreasing round indices >= 0")
    if not o.lr_decay > 0:
        raise ConfigError("scalefl.lr_decay", o.lr_decay, "a factor > 0")


def kd_term(student, teacher, T):
    """``nn.KLDivLoss()(log_softmax(student/T), softmax(teacher/T))``: mean over batch × classes
    of p·(log p − log q). The teacher is not detached (``models/model_utils.py``)."""
    logq = jax.nn.log_softmax(student / T)
    logp = jax.nn.log_softmax(teacher / T)
    return jnp.mean(jnp.exp(logp) * (logp - logq))


def exit_loss(outs, y, kd_on=True, gamma=0.0, T=3.0):
    """ScaleFL's local loss over a level's exits ``outs`` (shallowest first, h of them):
    Σ_j (j+1)·[CE(out_j) + (j < h-1)·kd_on·γ·T²·KL_j] / (h(h+1)/2) (``train.py``)."""
    h = len(outs)
    total = 0.0
    for j, o in enumerate(outs):
        lj = cross_entropy(o, y)
        if j < h - 1 and gamma != 0:
            lj = lj + jnp.where(kd_on, gamma * T * T * kd_term(o, outs[-1], T), 0.0)
        total = total + (j + 1) * lj
    return total / (h * (h + 1) / 2)


def kd_active(t, kd_start, rounds):
    """``train.py``: ``gamma_active = round > num_rounds * 0.25`` (round 0-based)."""
    return t > kd_start * rounds


def level_loss(m, kd_on, gamma, T):
    """``loss(params, x, y, rng)`` of a level's exit model for ``local_train``."""
    def loss(params, x, y, rng):
        return exit_loss(m.apply_exits(params, x, train=True, rng=rng), y, kd_on, gamma, T)
    return loss


def lr_at(t, base, milestones=(), decay=0.1):
    """``utils.adjust_learning_rate`` multistep: base · decay^(number of milestones ≤ t)."""
    return multistep_lr(t, base, milestones, decay, integer_power=True)


def aggregate(global_params, level_updates):
    """``fed.py`` ``average_weights``: per entry, the unweighted mean of the client copies that
    hold it; entries no (weighted) client holds keep their global value.

    ``level_updates``: ``[(stacked_level_params [cap, ...], weights [cap])]``; weights are 1 for
    a client that trained, 0 for a padding slot or a failed (non-finite) client."""
    num = jax.tree.map(jnp.zeros_like, global_params)
    den = jax.tree.map(jnp.zeros_like, global_params)
    for stacked, w in level_updates:
        w = jnp.asarray(w, jnp.float32)
        s = jax.tree.map(lambda a: jnp.tensordot(w, a, axes=1), keep_where(w > 0, stacked, 0.0))
        cnt = jax.tree.map(lambda a: jnp.full(a.shape, jnp.sum(w), a.dtype), s)
        num = jax.tree.map(jnp.add, num, E.embed_sum(global_params, s))
        den = jax.tree.map(jnp.add, den, E.embed_sum(global_params, cnt))
    return jax.tree.map(holders_mean, global_params, num, den)


def level_fractions(family, levels: dict) -> dict:
    """{budget: prunable-parameter fraction of the level's model relative to the global one}."""
    tot = E.num_params(family.make_exits(1.0, family.max_exits), prunable_only=True)
    return {b: E.num_params(family.make_exits(w, h), prunable_only=True) / tot
            for b, (h, w) in levels.items()}


class ScaleFLState(NamedTuple):
    params: Any               # the global model (all exits, full width)
    __getitem__ = state_item  # state["params"] reads the field (as the former dict state)


def scalefl(ctx: Context, o) -> Algorithm:
    cfg, family = ctx.local, ctx.family
    levels = level_map(family.name, ctx.budget_levels, o)
    gamma, T = float(o.kd_gamma), float(o.kd_T)
    milestones, decay = tuple(int(m) for m in o.lr_milestones), float(o.lr_decay)
    full = family.make_exits(1.0, family.max_exits)
    per = {b: family.make_exits(w, h) for b, (h, w) in levels.items()}
    shapes = {b: E.param_shapes(m) for b, m in per.items()}

    def level_of(s):
        return next(b for b in levels if np.isclose(b, s))

    def init(key, data):
        fr = level_fractions(family, levels)
        for b in sorted(levels):
            h, w = levels[b]
            print(f"scalefl level budget={b:g}: exits={h} width={w:g} params={E.num_params(per[b])} "
                  f"prunable fraction={fr[b]:.4f}")
        return ScaleFLState(full.init(model_init_key(ctx, key)))

    def round_fn(state, data, t):
        g = state.params
        lr = lr_at(t, cfg.lr, milestones, decay)
        kd_on = kd_active(t, o.kd_start, ctx.rounds)
        updates, losses_l, finite_l, valid_l = [], [], [], []
        model_bytes = None
        for s, co in draw_level_cohorts(ctx, data, t):
            b = level_of(s)
            p0 = E.extract(g, shapes[b])
            loss_fn = level_loss(per[b], kd_on, gamma, T)
            new, losses = train_cohort(
                ctx, lambda x, y, n, k, p0=p0, f=loss_fn: local_train(f, p0, None, x, y, n, k, cfg,
                                                                       lr=lr), co)
            finite = finite_clients(new, losses)
            updates.append((new, (co.valid & finite).astype(jnp.float32)))
            sent = 4.0 * per_client_size(new) * jnp.sum(co.valid.astype(jnp.float32))
            model_bytes = sent if model_bytes is None else model_bytes + sent
            losses_l.append(losses)
            finite_l.append(finite)
            valid_l.append(co.valid)
        # per-level lists: the loss sum is accumulated level by level, as before
        metrics = dict(round_metrics(losses_l, finite_l, valid_l), lr=lr,
                       **comm_metrics(model_bytes, model_bytes, 0.0))
        return ScaleFLState(aggregate(g, updates)), metrics

    def eval_groups(state, data):
        g = state.params
        return [EvalGroup(per[level_of(s)].apply, E.extract(g, shapes[level_of(s)]), ids,
                          per_client=False) for s, ids in budget_groups(ctx).items()]

    return Algorithm("scalefl", init, round_fn, eval_groups)


METHOD = Method("scalefl", scalefl, default_options, validate_options)
