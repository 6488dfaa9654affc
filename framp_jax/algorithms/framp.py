"""FRAMP (SPEC §1): hypernetwork-generated personalised submodels with prototype alignment.

One jitted round (SPEC §1.10): generate every participant's full model from its fixed
descriptor (vmapped HN) → extract its budget submodel (global top-k magnitude mask with a traced
budget, or narrower width pytrees) → vmapped local training with CE + lambda·alignment to the
global prototypes → the HN gradient as one VJP of the generator with the clients' deltas
(pFedHN sign: delta = theta_sent - theta_trained) → Adam step; prototypes are re-aggregated into
the bank. A client whose delta or prototypes hold NaN/Inf is left out of both and counted.

Local prototypes (``framp.proto_timing``): ``"post_eval"`` (SPEC §1.6) = one eval-mode,
un-augmented pass over the client's training data after local training; ``"last_epoch_train"``
= FedProto's code (``lib/update.py`` ``update_weights_het``): the class means of the features
each training step of the last local epoch computed in its forward pass (training mode,
augmented batches, the parameters before that step's update). A local epoch is
``ceil(n_i / batch_size)`` steps (a full-batch graph step is an epoch), so these are the last
``min(local_steps, ceil(n_i / batch_size))`` steps; a sample drawn twice counts twice, and the
uploaded class count is the number of features averaged (``proto_weighting="count"``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from framp_jax import masks as M
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup
from framp_jax.client import class_prototypes, is_finite_tree, local_train
from framp_jax.descriptors import compute_descriptors, with_budget
from framp_jax.hypernet import build_hypernet, hn_optimizer
from framp_jax.losses import ALIGN_FNS, cross_entropy


def _bcast(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def fiarse_grad_factor(params, prunable, tau):
    """SPEC §1.5 option: kept entries' gradient scaled by 1 + 2·tau·|w| / (|w| + tau)^2."""
    def f(p, g, pr):
        if not pr:
            return g
        a = jnp.abs(p)
        return g * (1.0 + 2.0 * tau * a / jnp.square(a + tau))
    return lambda p, g: jax.tree.map(f, p, g, prunable)


def aggregate_prototypes(protos, counts, ok, bank, bank_valid, weighting="count", keep=True,
                         dim_mask=None):
    """Count-weighted (or uniform over clients) mean of the uploaded class prototypes.

    protos [M, K, F], counts [M, K], ok [M] (clients to use); ``dim_mask`` [M, F] marks the
    feature channels each client holds (width extraction; default all), and each (class,
    channel) is averaged over the clients holding it. Classes seen this round replace the bank
    entry; unseen classes (channels) keep their previous value when ``keep`` (bank), else vanish.
    """
    w = counts if weighting == "count" else (counts > 0).astype(counts.dtype)
    w = w * ok[:, None]
    dm = jnp.ones((protos.shape[0], protos.shape[-1]), protos.dtype) if dim_mask is None else dim_mask
    wkf = w[:, :, None] * dm[:, None, :]
    den = wkf.sum(0)
    new = jnp.sum(wkf * jnp.where(ok[:, None, None], protos, 0.0), axis=0)
    new = new / jnp.maximum(den, 1e-12)
    seen_kf = den > 0
    seen = w.sum(0) > 0
    if keep:
        return jnp.where(seen_kf, new, bank), seen | bank_valid
    return jnp.where(seen_kf, new, 0.0), seen


def random_rotation(key, dim):
    q, r = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
    return q * jnp.sign(jnp.diag(r))[None, :]


def framp(ctx: Context) -> Algorithm:
    c, fc, model, cfg = ctx.config, ctx.config.framp, ctx.model, ctx.local
    K, F = ctx.num_classes, model.feature_dim
    template = model.init(ctx.init_key())
    prunable = model.prunable(template)
    backbone = fc.generate == "backbone"
    generated = {k: jax.tree.map(lambda _: not (backbone and k == "classifier"), v)
                 for k, v in template.items()}
    hn = build_hypernet(fc, template, generated, ctx.num_clients, ctx.train_ids)
    hn_opt = hn_optimizer(fc.hn_optimizer, fc.hn_lr, fc.hn_clip,
                          momentum=fc.get("hn_momentum", 0.9),
                          weight_decay=fc.get("hn_weight_decay", 1e-3),
                          embed_lr=fc.get("embed_lr", 0.0))
    last_epoch = fc.get("proto_timing", "post_eval") == "last_epoch_train"
    groups = M.stage_groups(template) if fc.scope == "groupwise" else None
    align_fn = ALIGN_FNS[fc.align]
    n_prunable = M.num_prunable(template, prunable)
    n_unmasked = sum(x.size for x, p in zip(jax.tree.leaves(template), jax.tree.leaves(prunable))
                     if not p)
    rot_shared = random_rotation(jax.random.fold_in(jax.random.key(c.seed), 5), F)
    width = fc.extraction == "width"
    if width:
        from framp_jax.algorithms.framp_width import WidthExtraction
        wx = WidthExtraction(ctx, template, prunable)
        print("framp width extraction: kept fraction of prunable parameters per budget "
              + ", ".join(f"{b:g}: {f:.4f}" for b, f in wx.fractions.items()))

    def generate(phi, desc, heads=None, ids=None):
        """Full models of the clients ``ids`` from their descriptors ``desc`` (the ids matter
        to HNs with per-client embeddings; None = none needed)."""
        if ids is None:
            theta = jax.vmap(hn.apply, in_axes=(None, 0))(phi, desc)
        else:
            theta = jax.vmap(hn.apply, in_axes=(None, 0, 0))(phi, desc, jnp.asarray(ids, jnp.int32))
        if backbone:
            theta = dict(theta, classifier=heads)
        return theta

    def init(key, data):
        desc = compute_descriptors(fc.descriptor, model, ctx, data, fc.func_emb_steps)
        phi = hn.init(jax.random.fold_in(ctx.init_key(), 1), desc[jnp.asarray(ctx.train_ids)])
        state = {"phi": phi, "opt": hn_opt.init(phi), "desc": desc,
                 "protos": jnp.zeros((K, F), jnp.float32),
                 "proto_valid": jnp.zeros((K,), bool)}
        if backbone:
            state["heads"] = jax.tree.map(lambda a: jnp.broadcast_to(a, (ctx.num_clients,) + a.shape),
                                          template["classifier"])
        return state

    def make_loss(protos, valid, with_features=False):
        def loss(p, x, y, rng):
            logits, f = model.apply(p, x, train=True, rng=rng)
            out = cross_entropy(logits, y)
            if fc.lam:
                out = out + fc.lam * align_fn(f, y, protos, valid)
            return (out, f) if with_features else out
        return loss

    def local_prototypes(theta, x, y, n):
        """Eval-mode class means of the features over the client's training data (or its first
        ``framp.proto_samples`` samples: the stacked indices are in dataset order, a random
        subset for shuffled datasets)."""
        if fc.proto_samples and not cfg.full_batch and fc.proto_samples < y.shape[0]:
            x, y, n = x[:fc.proto_samples], y[:fc.proto_samples], jnp.minimum(n, fc.proto_samples)
        return class_prototypes(model.apply, theta, x, y, n, K, cfg)

    def train_with_prototypes(protos, valid, p0, mask, x, y, n, key, gt=None):
        """Local training from ``p0``, then the client's prototypes at ``framp.proto_timing``:
        (params, mean loss, prototypes [K, F], counts [K])."""
        if last_epoch:
            p, loss, (sums, cnt) = local_train(make_loss(protos, valid, with_features=True), p0,
                                               mask, x, y, n, key, cfg, gt, proto_classes=K)
            return p, loss, sums / jnp.maximum(cnt, 1.0)[:, None], cnt
        p, loss = local_train(make_loss(protos, valid), p0, mask, x, y, n, key, cfg, gt)
        pro, cnt = local_prototypes(p, x, y, n)
        return p, loss, pro, cnt

    def client_topk(theta_gen, budget, x, y, n, key, protos, valid):
        """One client: mask its generated model at its budget, train, return delta and protos."""
        m = M.topk_mask(theta_gen, prunable, budget, groups)
        theta0 = M.apply_mask(theta_gen, m)
        gt = None
        if fc.mask_grad == "fiarse_paper":
            gt = fiarse_grad_factor(theta_gen, prunable, M.topk_threshold(theta_gen, prunable, budget))
        theta, loss, pro, cnt = train_with_prototypes(protos, valid, theta0, m, x, y, n, key, gt)
        kept = sum(jnp.sum(mm) for mm, f in zip(jax.tree.leaves(m), jax.tree.leaves(prunable)) if f)
        return jax.tree.map(jnp.subtract, theta0, theta), theta, pro, cnt, loss, kept

    def upload_protos(pro, keys):
        """Privacy knobs on uploaded prototypes (SPEC §1.7)."""
        if fc.proto_noise_std > 0:
            noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 7), (K, F)))(keys)
            pro = pro + fc.proto_noise_std * noise
        if fc.proto_rotation == "shared":
            pro = pro @ rot_shared
        elif fc.proto_rotation == "per_client":
            rots = jax.vmap(lambda k: random_rotation(jax.random.fold_in(k, 8), F))(keys)
            pro = jnp.einsum("mkf,mfg->mkg", pro, rots)
        return pro

    def align_targets(state):
        # with a shared secret rotation the server holds rotated prototypes; clients undo it
        bank = state["protos"] @ rot_shared.T if fc.proto_rotation == "shared" else state["protos"]
        return bank, state["proto_valid"]

    def heads_of(state, ids):
        """The local classifiers of clients ``ids`` (generate="backbone"), else None."""
        return jax.tree.map(lambda a: a[ids], state["heads"]) if backbone else None

    def round_fn(state, data, t):
        phi = state["phi"]
        protos, valid = align_targets(state)
        if width:
            ids, ok_slot, vjp_fn, delta, cls, pro, cnt, losses, kept, dmask = wx.round(
                state, data, t, phi, generate, lambda i: heads_of(state, i),
                train_with_prototypes, protos, valid)
        else:
            ids = ctx.sample_clients(t)
            ok_slot = jnp.ones(ids.shape, bool)
            x, y, n = ctx.gather(data, ids)
            keys = ctx.client_keys(t, ids)
            theta_gen, vjp_fn = jax.vjp(
                lambda ph: generate(ph, state["desc"][ids], heads_of(state, ids), ids), phi)
            theta_gen = ctx.shard_clients(theta_gen)
            run = ctx.vmap_clients(client_topk, in_axes=(0, 0, 0, 0, 0, 0, None, None))
            delta, theta, pro, cnt, losses, kept = run(theta_gen, data.budgets[ids], x, y, n, keys,
                                                       protos, valid)
            cls = theta["classifier"]
            dmask = None
        keys = ctx.client_keys(t, ids)
        pro = upload_protos(pro, keys)
        finite = (jax.vmap(is_finite_tree)(delta) & jnp.isfinite(losses)
                  & jnp.all(jnp.isfinite(pro), axis=(1, 2))) & ok_slot
        n_ok = jnp.sum(finite.astype(jnp.float32))
        w = finite.astype(jnp.float32) / (jnp.maximum(n_ok, 1.0) if fc.reduction == "mean" else 1.0)
        cot = jax.tree.map(lambda d: jnp.where(_bcast(finite, d), d, 0.0) * _bcast(w, d), delta)
        if backbone:
            cot = dict(cot, classifier=jax.tree.map(jnp.zeros_like, cot["classifier"]))
        (g,) = vjp_fn(cot)
        upd, opt = hn_opt.update(g, state["opt"], phi)
        new = dict(state, phi=optax.apply_updates(phi, upd), opt=opt)
        bank, bank_valid = aggregate_prototypes(pro, cnt, finite, state["protos"],
                                                state["proto_valid"], fc.proto_weighting,
                                                fc.proto_bank, dmask)
        new["protos"], new["proto_valid"] = bank, bank_valid
        if backbone:
            old = jax.tree.map(lambda a: a[ids], state["heads"])
            head = jax.tree.map(lambda a, o: jnp.where(_bcast(finite, a), a, o), cls, old)
            new["heads"] = jax.tree.map(lambda a, h: a.at[ids].set(h), state["heads"], head)
        okf = finite.astype(jnp.float32)
        loss = jnp.sum(jnp.where(finite, losses, 0.0)) / jnp.maximum(n_ok, 1.0)
        per_client_payload = kept + n_unmasked + K * F
        metrics = {
            "train_loss": jnp.where(n_ok > 0, loss, jnp.nan),
            "nan_clients": jnp.sum(ok_slot.astype(jnp.int32)) - jnp.sum(finite.astype(jnp.int32)),
            "hn_grad_norm": optax.tree.norm(g),
            "protos_known": jnp.sum(bank_valid.astype(jnp.int32)),
            # SPEC §1.9, float32 values; uplink adds class counts; mask bits if sent explicitly
            "comm/down_bytes": 4.0 * jnp.sum(per_client_payload * ok_slot),
            "comm/up_bytes": 4.0 * jnp.sum((per_client_payload + K) * ok_slot),
            "comm/mask_bytes": (0.0 if width else 1.0) * jnp.sum(ok_slot) * n_prunable / 8.0,
            "kept_fraction": jnp.sum(kept * okf) / jnp.maximum(n_ok, 1.0) / n_prunable,
        }
        return new, metrics

    def models_at(state, desc, budgets, ids):
        theta = generate(state["phi"], desc, heads_of(state, ids), ids)
        masks = jax.vmap(lambda th, b: M.topk_mask(th, prunable, b, groups))(theta, budgets)
        return M.apply_mask(theta, masks)

    def finetune(state, data, params, ids):
        protos, valid = align_targets(state)
        ft = cfg._replace(steps=fc.finetune_steps)
        root = jax.random.fold_in(jax.random.key(c.seed), 4)
        prun = jax.vmap(lambda th: jax.tree.map(lambda a, f: (a != 0).astype(a.dtype) if f
                                                else jnp.ones_like(a), th, prunable))
        masks = prun(params)

        def one(p, m, x, y, n, i):
            return local_train(make_loss(protos, valid), p, m, x, y, n,
                               jax.random.fold_in(root, i), ft)[0]
        x = jax.tree.map(lambda a: a[ids], data.train_x)
        return jax.vmap(one)(params, masks, x, data.train_y[ids], data.train_count[ids], ids)

    def groups_for(state, data, desc, budgets):
        ids = np.arange(ctx.num_clients)
        if width:
            return wx.eval_groups(state, generate, lambda i: heads_of(state, i))
        params = models_at(state, desc, budgets, jnp.asarray(ids))
        if fc.eval_mode == "finetuned":
            params = finetune(state, data, params, jnp.asarray(ids))
        return [EvalGroup(model.apply, params, ids, per_client=True)]

    def eval_groups(state, data):
        return groups_for(state, data, state["desc"], data.budgets)

    def eval_groups_at_budget(state, data, budget):
        desc = with_budget(state["desc"], fc.descriptor, budget, list(c.budget_levels))
        return groups_for(state, data, desc, jnp.full((ctx.num_clients,), budget, jnp.float32))

    # internals, for tests and research code that wants to reuse the pieces
    round_fn.parts = dict(hn=hn, generate=generate, client_topk=client_topk, make_loss=make_loss,
                          prunable=prunable, template=template, models_at=models_at,
                          train_with_prototypes=train_with_prototypes, hn_opt=hn_opt)
    return Algorithm("framp", init, round_fn, eval_groups,
                     None if width else eval_groups_at_budget)
