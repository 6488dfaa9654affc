"""HeteroFL (Diao et al., ICLR 2021): static nested width submodels (SPEC §4.1, §4.7).

Each round the sampled clients are grouped by budget level (``ctx.sample_clients_by_level``);
level ``l`` trains the global model's first ``ceil(r_l · C)`` channels of every unit (a genuinely
narrower pytree, ``framp_jax.width.gather``), vmapped over its clients at that static shape.
The server then ``combine``s: every entry becomes the unweighted mean of the *parameters* of the
clients that hold it, the output layer's rows only from clients that have that label, and
entries nobody holds keep their value (HeteroFL ``src/fed.py`` ``Federation.combine``).

* Budgets ↔ width rates: ``c.heterofl.rates`` aligned with ``c.budget_levels`` (default
  1, 1/2, 1/4, 1/8 for budgets 1, 1/4, 1/16, 1/64: parameters scale with rate²).
* Masked CE (``mask=1``): logits of classes absent from the client's train labels are set to 0,
  in training and in the Local evaluation (``src/models/resnet.py``); the Union evaluation uses
  plain logits (``train_classifier_fed.py`` ``test``).
* Model: ``models/preact.py`` (pre-act ResNet-18, or its small-CNN analogue on ``model="cnn"``)
  with Scaler and static BN; ``c.heterofl.backbone="same"`` trains the engine's own ``c.model``
  (post-act ResNet-18 with batch-stat BN / plain CNN) instead.
* sBN: before each evaluation the server runs every level's submodel in train-mode BN over the
  clients' training data and evaluates with the cumulative average of the batch statistics
  (``train_classifier_fed.py`` ``stats()``). ``sbn_clients`` / ``sbn_max_per_client`` restrict
  the pass to a subset (a labelled deviation for CPU presets; 0 = all, as the official code).
  ``sbn_augment`` applies the training augmentation in that pass, as the official pass iterates
  ``dataset['train']`` with its train transform (``src/data.py`` ``fetch_dataset``).
* LR: ``lr(t) = c.lr · gamma^{#{m ∈ milestones : m ≤ t}}`` (``MultiStepLR`` stepped after every
  round, ``train_classifier_fed.py``), passed traced to ``local_train``.

Bytes communicated per round (metrics ``comm/down_bytes``, ``comm/up_bytes``,
``comm/mask_bytes``; float32 = 4 bytes per value, valid participants only, as FRAMP's): every
participant receives its level's narrow submodel and sends its trained narrow submodel back,
4 · (the narrow pytree's entries) bytes each way. ``comm/mask_bytes`` is 0 when the index sets
follow from what the client knows (HeteroFL's prefix, FedRolex's rolling window of the round);
with per-client index sets drawn by the server (FedRolex ``algo="random"``) they are sent as
int32 indices, 4 · Σ_units k bytes per client.

``fedrolex.py`` reuses :func:`width_method` with other index sets.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from framp_jax import width as W
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup
from framp_jax.algorithms.registry import Method
from framp_jax.algorithms.rounds import (budget_groups, comm_metrics, draw_level_cohorts,
                                         finite_clients, holders_mean, keep_where, model_init_key,
                                         multistep_lr, per_client_size, round_metrics, state_item,
                                         train_cohort)
from framp_jax.client import local_train
from framp_jax.config import ConfigError
from framp_jax.losses import cross_entropy, label_masked_logits

# output layer: leaf path -> its class axis (rows aggregated label-wise)
CLASS_AXES = {("classifier", "kernel"): 1, ("classifier", "bias"): 0}


def heterofl_defaults() -> mlc.ConfigDict:
    h = mlc.ConfigDict()
    h.backbone = "preact"          # preact (HeteroFL's model) | same (the engine's c.model)
    h.rates = (1.0, 0.5, 0.25, 0.125)  # width rate per budget level (aligned with budget_levels)
    h.label_mask = True            # masked CE in training (evaluation is the same for every
    #                                method: Local on plain logits, local_masked/ beside it)
    h.labelwise_output = True      # output rows aggregated only from clients with that label
    h.lr_milestones = ()           # MultiStepLR milestones in rounds (paper: 300, 500)
    h.lr_gamma = 0.1
    h.sbn = True                   # server BN-statistics pass before evaluation (preact only)
    h.sbn_clients = 0              # 0 = every client's training data; k = a seeded subset of k
    h.sbn_max_per_client = 0       # 0 = all of each client's samples; k = its first k
    h.sbn_batch = 100              # batch of the statistics pass
    h.sbn_augment = True           # train-time crop/flip in the pass (the official train loader)
    return h


# ---------------------------------------------------------------------------------------------
# aggregation

class Part(NamedTuple):
    """One level's contribution: stacked narrow client params [M, ...], the index sets
    ({unit: [k]} shared by the level, or {unit: [M, k]} per client), weights [M] (0 = padding
    slot or failed client) and label masks [M, K]."""
    params: Any
    idx: dict
    weight: Any
    label_mask: Any = None


def _key(path):
    return tuple(getattr(p, "key", p) for p in path)


WEIGHTINGS = ("avg", "width")


def _weight_tree(stacked, weight, label_mask, labelwise: bool, weighting: str = "avg"):
    """Per-entry weights with the stacked params' shapes: w_i, times the label mask along the
    class axis of output-layer leaves; with ``weighting="width"`` (FedRolex ``--weighting
    width``) every hidden kernel (ndim >= 2, not the output layer) is also weighted by the
    client's output width of that kernel, its last axis = ``ceil(rate · O)``."""
    def leaf(path, a):
        w = weight.astype(jnp.float32).reshape((-1,) + (1,) * (a.ndim - 1))
        ax = CLASS_AXES.get(_key(path))
        if weighting == "width" and a.ndim >= 3 and ax is None:  # [clients, ..., in, out]
            w = w * float(a.shape[-1])
        if labelwise and label_mask is not None and ax is not None:
            shape = [a.shape[0]] + [1] * (a.ndim - 1)
            shape[ax + 1] = a.shape[ax + 1]
            w = w * label_mask.astype(jnp.float32).reshape(shape)
        return jnp.broadcast_to(w, a.shape)
    return jax.tree_util.tree_map_with_path(leaf, stacked)


def _per_client(idx):
    return any(jnp.ndim(v) == 2 for v in idx.values())


def _scatter_sum(zeros, narrow_stacked, spec, idx):
    """Σ_i scatter(0, narrow_i) over the stacked clients."""
    if _per_client(idx):
        one = lambda n, ix: W.scatter(zeros, n, spec, ix)
        return jax.tree.map(lambda a: jnp.sum(a, 0), jax.vmap(one)(narrow_stacked, idx))
    return W.scatter(zeros, jax.tree.map(lambda a: jnp.sum(a, 0), narrow_stacked), spec, idx)


def combine(global_params, spec: W.WidthSpec, parts, labelwise: bool = True,
            weighting: str = "avg"):
    """HeteroFL ``combine``: each entry = Σ w·θ / Σ w over the clients holding it (w = the
    client's weight, times its label mask for output rows, times its kernel width with
    ``weighting="width"``); entries with Σ w = 0 keep the global value."""
    zeros = jax.tree.map(jnp.zeros_like, global_params)
    num, den = zeros, zeros
    for part in parts:
        wt = _weight_tree(part.params, part.weight, part.label_mask, labelwise, weighting)
        wp = jax.tree.map(lambda w, p: w * p, wt, part.params)
        num = jax.tree.map(jnp.add, num, _scatter_sum(zeros, wp, spec, part.idx))
        den = jax.tree.map(jnp.add, den, _scatter_sum(zeros, wt, spec, part.idx))
    return jax.tree.map(holders_mean, global_params, num, den)


def counted_leaves(params):
    """FedRolex ``resnet_server.py`` ``combine``: the entries weighted by ``tmp_counts`` (every
    1-D leaf and the output layer's kernel); conv/hidden kernels use K = 1 (``weighting=avg``)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, a: a.ndim <= 1 or _key(path) in CLASS_AXES, params)


def combine_official_counts(global_params, spec, parts, tmp_counts, labelwise: bool = True,
                            weighting: str = "avg"):
    """FedRolex's official ``combine`` with its count aliasing (``official_count_bug=True``).

    In ``ResnetServerRoll.combine`` the line ``self.tmp_counts = tmp_counts_cpy`` sits inside the
    key loop, so from the second key on the weights read and the counts incremented are the same
    tensor: for the counted entries (:func:`counted_leaves`) the j-th client (in processing
    order) that holds an entry gets weight ``T + j``, where ``T`` is the entry's running number
    of past updates (initialised to 1, never reset), and ``T`` grows by the number of holders.
    Clients are processed level by level in slot order (the official order is its random user
    order). Other entries (hidden kernels) are count-averaged, or width-weighted with
    ``weighting="width"``. Returns (params, tmp_counts)."""
    plain = combine(global_params, spec, parts, labelwise, weighting)
    counted = counted_leaves(global_params)
    zeros = jax.tree.map(jnp.zeros_like, global_params)
    covs, vals = [], []
    for part in parts:
        wt = _weight_tree(part.params, (part.weight > 0).astype(jnp.float32), part.label_mask,
                          labelwise)
        if _per_client(part.idx):
            sc = jax.vmap(lambda n, ix: W.scatter(zeros, n, spec, ix))
            covs.append(sc(wt, part.idx))
            vals.append(sc(part.params, part.idx))
        else:
            sc = jax.vmap(lambda n: W.scatter(zeros, n, spec, part.idx))
            covs.append(sc(wt))
            vals.append(sc(part.params))
    cat = lambda trees: jax.tree.map(lambda *a: jnp.concatenate(a, 0), *trees)
    cov, val = cat(covs), cat(vals)

    def leaf(is_counted, g, p, c, v, t):
        if not is_counted:
            return p, t
        prior = jnp.cumsum(c, axis=0) - c
        w = c * (t[None] + prior)
        num, den = jnp.sum(w * v, 0), jnp.sum(w, 0)
        return holders_mean(g, num, den), t + jnp.sum(c, 0)

    out = jax.tree.map(leaf, counted, global_params, plain, cov, val, tmp_counts)
    is_pair = lambda x: isinstance(x, tuple)
    return (jax.tree.map(lambda o: o[0], out, is_leaf=is_pair),
            jax.tree.map(lambda o: o[1], out, is_leaf=is_pair))


# ---------------------------------------------------------------------------------------------
# models, rates, schedule

class Family(NamedTuple):
    """The width-level models of one backbone: ``model(rate)`` (cached), the width spec and
    whether the models carry sBN statistics."""
    model: Callable
    spec: W.WidthSpec
    sbn: bool


def backbone_family(family, backbone: str) -> Family:
    """HeteroFL's models at every width: "preact" = the family's pre-activation sBN variant
    (``models/preact.py``: the pre-act ResNet-18, or its small-CNN analogue); "same" = the run's
    own network (CNN, post-act ResNet-18 or GCN) at that width."""
    if backbone == "preact":
        return Family(family.make_preact, family.preact_spec, True)
    return Family(family.make, family.width_spec, False)


def level_rates(budget_levels, opts) -> dict:
    """{budget: width rate}, from ``opts.rates`` aligned with the budget levels."""
    levels, rates = tuple(float(b) for b in budget_levels), tuple(float(r) for r in opts.rates)
    return dict(zip(levels, rates))


def rate_of(rates: dict, budget: float) -> float:
    for b, r in rates.items():
        if np.isclose(b, budget):
            return r
    raise KeyError(f"budget {budget} has no width rate in {rates}")


# MultiStepLR: ``base_lr · gamma^{#{m ≤ t + offset}}`` (``t`` traced)
lr_at = multistep_lr


def validate_width_opts(c, name: str, opts, allowed_backbones=("preact", "same")):
    def check(cond, field, value, allowed):
        if not cond:
            raise ConfigError(f"{name}.{field}", value, allowed)
    check(opts.backbone in allowed_backbones, "backbone", opts.backbone,
          f"one of {allowed_backbones}")
    check(c.model in ("cnn", "resnet18") or opts.backbone == "same", "backbone", opts.backbone,
          "'same' for config.model='gcn' (there is no pre-activation GCN)")
    rates, levels = tuple(opts.rates), tuple(c.budget_levels)
    check(len(rates) == len(levels) and all(0 < r <= 1 for r in rates), "rates", rates,
          f"{len(levels)} width rates in (0, 1], one per budget level {levels}")
    ms = tuple(opts.lr_milestones)
    check(all(isinstance(m, int) and m >= 0 for m in ms) and list(ms) == sorted(ms),
          "lr_milestones", ms, "ascending round numbers >= 0")
    check(opts.lr_gamma > 0, "lr_gamma", opts.lr_gamma, "> 0")
    for f in ("sbn_clients", "sbn_max_per_client"):
        check(isinstance(opts[f], int) and opts[f] >= 0, f, opts[f], "an integer >= 0 (0 = all)")
    check(isinstance(opts.sbn_batch, int) and opts.sbn_batch >= 2, "sbn_batch", opts.sbn_batch,
          "an integer >= 2")
    check(opts.sbn_clients <= c.num_clients, "sbn_clients", opts.sbn_clients,
          f"at most num_clients={c.num_clients}")


# ---------------------------------------------------------------------------------------------
# sBN statistics pass

def sbn_statistics(model, params, data, client_ids, max_per_client: int, batch: int,
                   modality, aug: bool, key):
    """Cumulative average of the per-batch BN statistics of ``model`` over the training data of
    ``client_ids`` (static), in consecutive batches of ``batch`` valid samples (the last one
    wraps around). PyTorch's train-mode BN with ``momentum=None`` keeps exactly this average."""
    n_max = data.train_x.shape[1]
    cap = n_max if max_per_client == 0 else min(n_max, max_per_client)
    ids = jnp.asarray(np.asarray(client_ids), jnp.int32)
    counts = jnp.minimum(data.train_count[ids], cap)
    valid = (jnp.arange(cap)[None, :] < counts[:, None]).reshape(-1)
    flat = (ids[:, None] * n_max + jnp.arange(cap)[None, :]).reshape(-1)
    src = flat[jnp.argsort(~valid, stable=True)]
    n_valid = jnp.maximum(jnp.sum(valid), 1)
    xs = data.train_x.reshape((-1,) + data.train_x.shape[2:])
    nb = -(-int(flat.shape[0]) // batch)

    def body(carry, b):
        acc, cnt = carry
        sel = src[(b * batch + jnp.arange(batch)) % n_valid]
        xb = modality.prepare(xs[sel], jax.random.fold_in(key, b) if aug else None)
        st = model.batch_stats(params, xb)
        w = (b * batch < n_valid).astype(jnp.float32)
        return (jax.tree.map(lambda a, s: a + w * s, acc, st), cnt + w), None

    shapes = jax.eval_shape(model.batch_stats, params, xs[:batch].astype(jnp.float32))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (acc, cnt), _ = jax.lax.scan(body, (zero, jnp.zeros((), jnp.float32)), jnp.arange(nb))
    return jax.tree.map(lambda a: a / jnp.maximum(cnt, 1.0), acc)


def _eval_apply(model, ps, x, *, train=False, rng=None):
    del train, rng
    if ps.get("bn_stats") is None:
        return model.apply(ps["params"], x, train=False)
    return model.apply(ps["params"], x, train=False, bn_stats=ps["bn_stats"])


# ---------------------------------------------------------------------------------------------
# the algorithm

class WidthState(NamedTuple):
    """The server state of HeteroFL and FedRolex."""
    params: Any               # the global (full-width) model
    tmp_counts: Any = None    # FedRolex official_count_bug: running update counts, like params
    t: Any = None             # int32 completed rounds (FedRolex eval_window="last")
    __getitem__ = state_item  # state["params"] reads a field (as the former dict state)


def width_method(ctx: Context, name: str, opts, index_fn: Callable, per_client_index: bool = False,
                 lr_offset: int = 0, eval_bn: str = "sbn", count_bug: bool = False,
                 eval_index_fn: Callable | None = None, weighting: str = "avg") -> Algorithm:
    """The HeteroFL round/eval skeleton shared by HeteroFL and FedRolex.

    ``index_fn(sizes, rate, t, client_id)`` gives the round's index sets ({unit: [k]});
    with ``per_client_index`` it is vmapped over the level's clients. Evaluation uses the prefix
    (HeteroFL's submodel; FedRolex's window at roll 0) unless ``eval_index_fn(sizes, rate,
    t_done)`` is given, ``t_done`` being the number of completed rounds (kept in the state as
    ``t``). ``eval_bn``: "sbn" (server statistics pass) or "batch" (batch statistics of each
    eval batch). ``weighting``: "avg" or "width" (:func:`combine`)."""
    cfg = ctx.local
    rates = level_rates(ctx.budget_levels, opts)
    for b in budget_groups(ctx):
        rate_of(rates, b)
    fam = backbone_family(ctx.family, opts.backbone)

    use_sbn = eval_bn == "sbn" and opts.backbone == "preact" and opts.sbn
    if opts.sbn_clients:
        sbn_ids = np.sort(np.random.default_rng(ctx.seed).choice(ctx.num_clients,
                                                                 opts.sbn_clients, replace=False))
    else:
        sbn_ids = np.arange(ctx.num_clients)

    def make_loss(model):
        def loss(p, x, y, rng, lmask):
            logits, _ = model.apply(p, x, train=True, rng=rng)
            if opts.label_mask:
                logits = label_masked_logits(logits, lmask)
            return cross_entropy(logits, y)
        return loss

    def init(key, data):
        params = fam.model(1.0).init(model_init_key(ctx, key))
        return WidthState(params,
                          jax.tree.map(jnp.ones_like, params) if count_bug else None,
                          jnp.zeros((), jnp.int32) if eval_index_fn is not None else None)

    def round_fn(state, data, t):
        params = state.params
        sizes = W.unit_sizes(params, fam.spec)
        lr = lr_at(t, cfg.lr, tuple(opts.lr_milestones), opts.lr_gamma, lr_offset)
        parts, losses_all, valid_all, finite_all = [], [], [], []
        model_bytes, index_bytes = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
        for budget, co in draw_level_cohorts(ctx, data, t):
            r = rate_of(rates, budget)
            level_loss = make_loss(fam.model(r))
            lmask = (data.label_counts[co.ids] > 0).astype(jnp.float32)
            if per_client_index:
                idx = jax.vmap(lambda i: index_fn(sizes, r, t, i))(co.ids)
            else:
                idx = index_fn(sizes, r, t, None)

            def train_one(x, y, n, k, ix, lm):
                sub = W.gather(params, fam.spec, ix)
                return local_train(lambda p, xb, yb, rng: level_loss(p, xb, yb, rng, lm), sub, None,
                                   x, y, n, k, cfg, lr=lr)

            new, losses = train_cohort(ctx, train_one, co, idx, lmask,
                                       extra_axes=(0 if per_client_index else None, 0))
            finite = finite_clients(new, losses)
            ok = co.valid & finite
            # a failed client's params may hold NaN; zero them so 0-weight products stay finite
            parts.append(Part(keep_where(ok, new, 0.0), idx, ok.astype(jnp.float32), lmask))
            losses_all.append(losses)
            valid_all.append(co.valid)
            finite_all.append(finite)
            n_valid = jnp.sum(co.valid.astype(jnp.float32))
            model_bytes = model_bytes + 4.0 * per_client_size(new) * n_valid
            if per_client_index:  # indices the server drew for each client: sent as int32
                index_bytes = index_bytes + 4.0 * per_client_size(idx) * n_valid
        tmp_counts = None
        if count_bug:
            new_params, tmp_counts = combine_official_counts(
                params, fam.spec, parts, state.tmp_counts, opts.labelwise_output, weighting)
        else:
            new_params = combine(params, fam.spec, parts, opts.labelwise_output, weighting)
        new_state = WidthState(new_params, tmp_counts,
                               state.t + 1 if eval_index_fn is not None else None)
        cat = jnp.concatenate
        metrics = round_metrics(cat(losses_all), cat(finite_all), cat(valid_all))
        return new_state, dict(metrics, lr=lr, **comm_metrics(model_bytes, model_bytes,
                                                              index_bytes))

    def eval_groups(state, data):
        params = state.params
        sizes = W.unit_sizes(params, fam.spec)
        groups = []
        for b, ids in budget_groups(ctx).items():
            r = rate_of(rates, b)
            model = fam.model(r)
            idx = (W.prefix_indices(sizes, r) if eval_index_fn is None
                   else eval_index_fn(sizes, r, state.t))
            sub = W.gather(params, fam.spec, idx)
            stats = None
            if use_sbn:
                stats = sbn_statistics(model, sub, data, sbn_ids, opts.sbn_max_per_client,
                                       opts.sbn_batch, ctx.modality, opts.sbn_augment,
                                       jax.random.fold_in(ctx.init_key(), 7))
            groups.append(EvalGroup(functools.partial(_eval_apply, model),
                                    {"params": sub, "bn_stats": stats}, ids, per_client=False))
        return groups

    return Algorithm(name, init, round_fn, eval_groups)


def heterofl(ctx: Context, opts) -> Algorithm:
    return width_method(ctx, "heterofl", opts,
                        lambda sizes, r, t, cid: W.prefix_indices(sizes, r))


METHOD = Method("heterofl", heterofl, heterofl_defaults,
                lambda c, opts: validate_width_opts(c, "heterofl", opts))
