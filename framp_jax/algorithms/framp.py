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

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from framp_jax import masks as M
from framp_jax.algorithms.base import Algorithm, Context, EvalGroup
from framp_jax.algorithms.registry import Method
from framp_jax.algorithms.rounds import (draw_cohort, fiarse_paper_factor, finite_clients,
                                         holders_mean, keep_where, model_init_key, put_clients,
                                         round_metrics, state_item, take_clients, train_cohort)
from framp_jax.config import check
from framp_jax.client import class_prototypes, local_train
from framp_jax.descriptors import (DESCRIPTOR_CONTROLS, compute_descriptors, control_descriptors,
                                   with_budget)
from framp_jax.hypernet import build_hypernet, hn_optimizer
from framp_jax.losses import ALIGN_FNS, cross_entropy


# ---------------------------------------------------------------------------------------------
# options

def framp_defaults() -> mlc.ConfigDict:
    """FRAMP's options (SPEC §1 and §5 defaults); every one is switchable from the config."""
    f = mlc.ConfigDict()
    f.descriptor = "label_hist+budget"  # | func_emb+budget | onehot_budget | budget_only
    f.func_emb_steps = 50               # local steps behind a func_emb descriptor
    f.hypernet = "chunked"              # key of framp_jax.hypernet.HYPERNETS
    f.hn_hidden = 128
    f.chunk_size = 16384                # 0 = one chunk of all P entries (FedSheafHN's single head)
    f.chunk_dim = 64
    f.gen_hidden = 256
    f.gen_init = "he"                   # generated kernels' initial scale: he (SPEC §1.4,
    #                                     sqrt(2/fan_in)) | model (the target network's own
    #                                     initial std per kernel; chunked HN only)
    f.generate = "all"                  # | backbone (per-client local classifier)
    f.head_in_topk = True               # False: the classifier is left out of the top-k and
    #                                     kept whole at every budget (ours, not SPEC)
    f.extraction = "topk"               # | width (narrower pytrees per budget level)
    f.width_rates = (1.0, 0.5, 0.25, 0.125)  # width per budget level (extraction="width")
    f.scope = "global"                  # | groupwise (one top-k threshold per stage)
    f.mask_grad = "masked"              # | fiarse_paper (threshold-aware gradient factor)
    f.lam = 1.0                         # weight of the prototype-alignment loss
    f.align = "fedproto"                # | batch_proto
    f.proto_weighting = "count"         # | uniform (FedProto's code)
    f.proto_samples = 0                 # local prototypes from the first N train samples (0 = all)
    f.proto_timing = "post_eval"        # | last_epoch_train (FedProto's code: train-mode features
    #                                     of the last local epoch's steps, before each update)
    f.proto_bank = True                 # keep classes unseen this round
    f.proto_noise_std = 0.0             # privacy: Gaussian noise on uploaded prototypes
    f.proto_rotation = "none"           # | shared (secret common rotation) | per_client
    f.hn_optimizer = "adam"             # | sgd | sgd_momentum (pFedHN's SGD + momentum + wd)
    f.hn_lr = 1e-3
    f.hn_clip = 50.0
    f.hn_momentum = 0.9                 # sgd_momentum only (pFedHN: 0.9)
    f.hn_weight_decay = 1e-3            # sgd_momentum only, on every HN parameter (pFedHN: 1e-3)
    f.embed_lr = 0.0                    # per-client embedding rows' lr (pfedhn); 0 = hn_lr
    f.embed_dim = -1                    # pfedhn embedding size; -1 = int(1 + num_clients / 4)
    f.hn_layers = 3                     # pfedhn trunk: hidden Linear(H, H) layers (n_hidden)
    f.reduction = "mean"                # | sum over clients of the HN VJP
    f.hn_steps = 1                      # HN optimizer steps per round (>1: steps on the
    #                                     clients' masked squared distance, see round_fn)
    f.hist_smoothing = 0.0              # label_hist descriptor: (n_ik + a) / (n_i + K a)
    f.descriptor_control = "none"       # controls (the descriptor's content taken out, its budget
    #                                     code kept): permute = each client gets another
    #                                     client's data part (a seeded cyclic derangement over
    #                                     all clients); random = a random code per client
    #                                     (label_hist: a uniform-Dirichlet histogram; func_emb: a
    #                                     random unit vector)
    # ours, not in SPEC: theta_i = base + residual_scale * (HN(desc_i) - HN offset), with a
    # server-held shared base moved by base_lr x the holders-mean of the clients' updates
    f.base = "none"                     # | fedavg
    f.base_lr = 1.0
    f.residual_scale = 0.1              # 0 with base="fedavg": the -HN control (SPEC §3.1): the
    #                                     shared base + top-k + alignment, no hypernetwork output
    f.residual_head = True              # False: the classifier is the shared base's (no residual)
    f.eval_mode = "generated"           # | finetuned
    f.finetune_steps = 20               # local steps before evaluation in finetuned mode
    f.unseen_budgets = ()               # budgets evaluated zero-shot at the end, e.g. (1/256, 1/2)
    return f


def validate_options(c, f) -> None:
    """FRAMP's options ``f`` (``config.framp`` over :func:`framp_defaults`) against the run's
    config ``c``; raises ConfigError naming the field."""
    opts = {"descriptor": ("label_hist+budget", "func_emb+budget", "onehot_budget", "budget_only"),
            "generate": ("all", "backbone"), "extraction": ("topk", "width"),
            "scope": ("global", "groupwise"), "mask_grad": ("masked", "fiarse_paper"),
            "align": ("fedproto", "batch_proto"), "proto_weighting": ("count", "uniform"),
            "proto_rotation": ("none", "shared", "per_client"), "reduction": ("mean", "sum"),
            "eval_mode": ("generated", "finetuned"),
            "hn_optimizer": ("adam", "sgd", "sgd_momentum"), "base": ("none", "fedavg"),
            "proto_timing": ("post_eval", "last_epoch_train")}
    for k, allowed in opts.items():
        check(f[k] in allowed, f"framp.{k}", f[k], f"one of {allowed}")
    from framp_jax.hypernet import HYPERNETS, KERNEL_SCALES
    check(f.gen_init in KERNEL_SCALES, "framp.gen_init", f.gen_init, f"one of {KERNEL_SCALES}")
    check(f.gen_init == "he" or f.hypernet == "chunked", "framp.gen_init", f.gen_init,
          "'he' unless hypernet='chunked' (pfedhn starts with torch's default init)")
    check(f.hypernet in HYPERNETS, "framp.hypernet", f.hypernet, f"one of {tuple(HYPERNETS)}")
    check(isinstance(f.proto_samples, int) and f.proto_samples >= 0, "framp.proto_samples",
           f.proto_samples, "an integer >= 0 (0 = every training sample)")
    check(f.proto_timing == "post_eval" or f.proto_samples == 0, "framp.proto_samples",
           f.proto_samples, "0 with proto_timing='last_epoch_train' (the last epoch's batches)")
    check(0 <= f.hn_momentum < 1, "framp.hn_momentum", f.hn_momentum, "in [0, 1)")
    check(f.hn_weight_decay >= 0, "framp.hn_weight_decay", f.hn_weight_decay, ">= 0")
    check(f.embed_lr >= 0, "framp.embed_lr", f.embed_lr, ">= 0 (0 = hn_lr)")
    check(f.embed_lr == 0 or f.hypernet == "pfedhn", "framp.embed_lr", f.embed_lr,
           "0 unless hypernet='pfedhn' (the only HN with per-client embedding rows)")
    check(isinstance(f.embed_dim, int) and (f.embed_dim >= 1 or f.embed_dim == -1),
           "framp.embed_dim", f.embed_dim, "an integer >= 1, or -1 for int(1 + num_clients / 4)")
    check(isinstance(f.hn_layers, int) and f.hn_layers >= 0, "framp.hn_layers", f.hn_layers,
           "an integer >= 0")
    if f.hypernet == "pfedhn":
        from framp_jax.hypernet import check_pfedhn_size
        check_pfedhn_size(c)
    for k in ("hn_hidden", "chunk_dim", "gen_hidden", "func_emb_steps"):
        check(isinstance(f[k], int) and f[k] >= 1, f"framp.{k}", f[k], "an integer >= 1")
    check(isinstance(f.chunk_size, int) and f.chunk_size >= 0, "framp.chunk_size", f.chunk_size,
           "an integer >= 1, or 0 for a single chunk of every generated entry")
    check(f.lam >= 0, "framp.lam", f.lam, ">= 0")
    check(isinstance(f.hn_steps, int) and f.hn_steps >= 1, "framp.hn_steps", f.hn_steps,
          "an integer >= 1")
    check(f.hn_steps == 1 or f.extraction == "topk", "framp.hn_steps", f.hn_steps,
          "1 with extraction='width'")
    check(f.hist_smoothing >= 0, "framp.hist_smoothing", f.hist_smoothing, ">= 0")
    check(f.hist_smoothing == 0 or f.descriptor == "label_hist+budget", "framp.hist_smoothing",
          f.hist_smoothing, "0 unless descriptor='label_hist+budget'")
    check(f.base == "none" or (f.extraction == "topk" and f.generate == "all"), "framp.base",
          f.base, "'none' unless extraction='topk' and generate='all'")
    check(f.base_lr > 0, "framp.base_lr", f.base_lr, "> 0")
    check(f.residual_scale > 0 or (f.residual_scale == 0 and f.base != "none"),
          "framp.residual_scale", f.residual_scale,
          "> 0, or 0 with base='fedavg' (the -HN control: the base alone)")
    check(f.descriptor_control in DESCRIPTOR_CONTROLS, "framp.descriptor_control",
          f.descriptor_control, f"one of {DESCRIPTOR_CONTROLS}")
    check(f.descriptor_control == "none"
          or f.descriptor in ("label_hist+budget", "func_emb+budget"),
          "framp.descriptor_control", f.descriptor_control,
          "'none' unless descriptor is label_hist+budget or func_emb+budget (the others carry "
          "no client data to take out)")
    check(isinstance(f.residual_head, bool), "framp.residual_head", f.residual_head, "True or False")
    check(isinstance(f.head_in_topk, bool), "framp.head_in_topk", f.head_in_topk, "True or False")
    check(f.head_in_topk or f.extraction == "topk", "framp.head_in_topk", f.head_in_topk,
          "True with extraction='width' (width extraction has no top-k)")
    check(f.residual_head or f.base != "none", "framp.residual_head", f.residual_head,
          "True unless framp.base is set (it removes the residual from the base's classifier)")
    check(f.hn_lr > 0, "framp.hn_lr", f.hn_lr, "> 0")
    check(f.proto_noise_std >= 0, "framp.proto_noise_std", f.proto_noise_std, ">= 0")
    check(f.mask_grad == "masked" or f.scope == "global", "framp.mask_grad", f.mask_grad,
           "'masked' when framp.scope='groupwise' (the threshold-aware factor uses one tau)")
    check(f.eval_mode == "generated" or f.finetune_steps >= 1, "framp.finetune_steps",
           f.finetune_steps, ">= 1 with eval_mode='finetuned'")
    for b in tuple(f.unseen_budgets):
        check(0 < b <= 1, "framp.unseen_budgets", tuple(f.unseen_budgets), "budgets in (0, 1]")
    check(f.extraction == "topk" or f.proto_rotation == "none", "framp.proto_rotation",
           f.proto_rotation, "'none' with extraction='width' (clients hold different feature channels)")
    check(f.extraction == "topk" or f.generate == "all", "framp.generate", f.generate,
           "'all' with extraction='width'")
    from framp_jax.algorithms.framp_width import MODELS as WIDTH_MODELS
    check(f.extraction == "topk" or c.model in WIDTH_MODELS, "framp.extraction", f.extraction,
          f"'topk' for model={c.model!r} (extraction='width' supports {WIDTH_MODELS})")
    rates = tuple(f.width_rates)
    check(len(rates) == len(tuple(c.budget_levels)) and all(0 < r <= 1 for r in rates),
           "framp.width_rates", rates, f"{len(tuple(c.budget_levels))} rates in (0, 1], one per budget level")
    check(not (f.descriptor == "onehot_budget" and tuple(f.unseen_budgets)), "framp.descriptor",
           f.descriptor, "not onehot_budget when framp.unseen_budgets is set (it cannot encode them)")


# ---------------------------------------------------------------------------------------------

def _bcast(v, x):
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def fiarse_grad_factor(params, prunable, tau):
    """SPEC §1.5 option: kept entries' gradient scaled by 1 + 2·tau·|w| / (|w| + tau)^2
    (``rounds.fiarse_paper_factor``, guarded as FIARSE's: factor 1 where |w| = tau = 0, e.g. a
    zero bias of a budget-1 client whose tau is 0; before, that 0/0 was NaN and the client's
    update was dropped as non-finite)."""
    def f(p, g, pr):
        return g * fiarse_paper_factor(jnp.abs(p), tau) if pr else g
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
    # kept as it was rather than rounds.holders_mean: the same mean, but the round compiled
    # with that form moved the bank by an ulp (seen with uniform weighting, rotated prototypes)
    new = new / jnp.maximum(den, 1e-12)
    seen_kf = den > 0
    seen = w.sum(0) > 0
    if keep:
        return jnp.where(seen_kf, new, bank), seen | bank_valid
    return jnp.where(seen_kf, new, 0.0), seen


def random_rotation(key, dim):
    q, r = jnp.linalg.qr(jax.random.normal(key, (dim, dim)))
    return q * jnp.sign(jnp.diag(r))[None, :]


class FrampState(NamedTuple):
    """FRAMP's server state."""
    phi: Any                  # the hypernetwork's parameters
    opt: Any                  # its optimizer state
    desc: Any                 # float32 [N, D] every client's (fixed) descriptor
    protos: Any               # float32 [K, F] the global prototype bank
    proto_valid: Any          # bool [K] classes the bank holds
    heads: Any = None         # generate="backbone": every client's classifier, stacked [N, ...]
    base: Any = None          # framp.base="fedavg" (ours): the shared base model
    __getitem__ = state_item  # state["phi"] reads a field (as the former dict state)


class FrampInternals(NamedTuple):
    """The pieces of a FRAMP run (:func:`build`), for tests and research code that reuse them.

    ``generate(phi, desc, heads=None, ids=None)``: the full models of clients ``ids`` from their
    descriptors; ``client_topk(theta_gen, budget, x, y, n, key, protos, valid) -> (delta,
    theta, prototypes, counts, loss, kept)``: one client of the top-k extraction (kept: its
    kept prunable entries and, of them, those in a local classifier);
    ``make_loss(protos, valid)``: the local loss (CE + lambda·alignment);
    ``train_with_prototypes(protos, valid, p0, mask, x, y, n, key)``: local training and the
    client's prototypes; ``models_at(state, desc, budgets, ids)``: generated, budget-masked
    models; ``algorithm``: the :class:`Algorithm` the factory returns."""
    hn: Any
    hn_opt: Any
    template: Any
    prunable: Any
    generate: Callable
    make_loss: Callable
    train_with_prototypes: Callable
    client_topk: Callable
    models_at: Callable
    algorithm: Algorithm


def framp(ctx: Context, fc) -> Algorithm:
    """FRAMP on ``ctx`` with its options ``fc`` (:func:`framp_defaults` merged with
    ``config.framp``)."""
    return build(ctx, fc).algorithm


def build(ctx: Context, fc) -> FrampInternals:
    """FRAMP on ``ctx`` with its options ``fc``: the algorithm and its pieces."""
    model, cfg = ctx.model, ctx.local
    K, F = ctx.num_classes, model.feature_dim
    template = model.init(ctx.init_key())  # shapes for the HN and the extraction
    prunable = model.prunable(template)
    if not fc.head_in_topk:  # the classifier stays whole, outside the budget's top-k
        prunable = dict(prunable, classifier=jax.tree.map(lambda _: False, prunable["classifier"]))
    backbone = fc.generate == "backbone"
    generated = {k: jax.tree.map(lambda _: not (backbone and k == "classifier"), v)
                 for k, v in template.items()}
    hn = build_hypernet(fc, template, generated, ctx.num_clients, ctx.train_ids)
    hn_opt = hn_optimizer(fc.hn_optimizer, fc.hn_lr, fc.hn_clip,
                          momentum=fc.hn_momentum,
                          weight_decay=fc.hn_weight_decay,
                          embed_lr=fc.embed_lr)
    last_epoch = fc.proto_timing == "last_epoch_train"
    groups = M.stage_groups(template) if fc.scope == "groupwise" else None
    align_fn = ALIGN_FNS[fc.align]
    n_prunable = M.num_prunable(template, prunable)
    # entries sent whole (not in the top-k); a local classifier (generate="backbone") is never sent
    n_unmasked = sum(x.size for x, p, g in zip(jax.tree.leaves(template), jax.tree.leaves(prunable),
                                               jax.tree.leaves(generated)) if g and not p)
    rot_shared = random_rotation(jax.random.fold_in(jax.random.key(ctx.seed), 5), F)
    width = fc.extraction == "width"
    if width:
        from framp_jax.algorithms.framp_width import WidthExtraction
        wx = WidthExtraction(ctx, fc.width_rates, template, prunable)
        print("framp width extraction: kept fraction of prunable parameters per budget "
              + ", ".join(f"{b:g}: {f:.4f}" for b, f in wx.fractions.items()))

    with_base = fc.base != "none"
    # the HN's output at u = 0 (hypernet.entry_scales: 1 for norm scales, else 0)
    hn_offset = jax.tree_util.tree_map_with_path(
        lambda path, a: 1.0 if getattr(path[-1], "key", None) == "scale" else 0.0, template)
    # the residual's weight per leaf: residual_scale, or 0 on the classifier (residual_head=False)
    res_w = {k: jax.tree.map(lambda _: 0.0 if (k == "classifier" and not fc.residual_head)
                             else fc.residual_scale, v) for k, v in template.items()}

    def generate(phi, desc, heads=None, ids=None, base=None):
        """Full models of the clients ``ids`` from their descriptors ``desc`` (the ids matter
        to HNs with per-client embeddings; None = none needed). With ``framp.base`` (ours) the
        HN output is a residual around the shared ``base``: base + residual_scale * (HN - offset)."""
        if ids is None:
            theta = jax.vmap(hn.apply, in_axes=(None, 0))(phi, desc)
        else:
            theta = jax.vmap(hn.apply, in_axes=(None, 0, 0))(phi, desc, jnp.asarray(ids, jnp.int32))
        if base is not None:
            theta = jax.tree.map(lambda th, b, a, s: b + s * (th - a), theta, base, hn_offset,
                                 res_w)
        if backbone:
            theta = dict(theta, classifier=heads)
        return theta

    def init(key, data):
        desc = compute_descriptors(fc.descriptor, model, ctx, data, fc.func_emb_steps,
                                   hist_smoothing=fc.hist_smoothing)
        mkey = model_init_key(ctx, key)
        if fc.descriptor_control != "none":
            desc = control_descriptors(desc, fc.descriptor, fc.descriptor_control,
                                       jax.random.fold_in(mkey, 2))
        phi = hn.init(jax.random.fold_in(mkey, 1), desc[jnp.asarray(ctx.train_ids)])
        heads = None
        if backbone:
            head0 = model.init(mkey)["classifier"]
            heads = jax.tree.map(lambda a: jnp.broadcast_to(a, (ctx.num_clients,) + a.shape), head0)
        base = model.init(mkey) if with_base else None
        return FrampState(phi, hn_opt.init(phi), desc, jnp.zeros((K, F), jnp.float32),
                          jnp.zeros((K,), bool), heads, base)

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
        x, y, n = ctx.modality.head(x, y, n, fc.proto_samples)
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
        kept = M.num_kept(m, prunable)
        # (kept prunable entries, of them in the local classifier, which is not sent)
        kept = jnp.stack([kept, M.num_kept(m["classifier"], prunable["classifier"])
                          if backbone else jnp.zeros_like(kept)])
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
        bank = state.protos @ rot_shared.T if fc.proto_rotation == "shared" else state.protos
        return bank, state.proto_valid

    def heads_of(state, ids):
        """The local classifiers of clients ``ids`` (generate="backbone"), else None."""
        return take_clients(state.heads, ids) if backbone else None

    def train_topk(state, data, t, phi, protos, valid):
        """The top-k extraction's clients: all generated at once (one VJP), masked at their
        budgets and trained. Returns (cohort, vjp_fn, delta, classifiers, prototypes, counts,
        losses, kept entries [M, 2] (prunable; of them in the local classifier), None)."""
        co = draw_cohort(ctx, data, t)
        gen = lambda ph: generate(ph, state.desc[co.ids], heads_of(state, co.ids), co.ids,
                                  state.base)
        theta_gen, vjp_fn = jax.vjp(gen, phi)
        theta_gen = ctx.shard_clients(theta_gen)
        run = lambda x, y, n, k, th, b, pr, va: client_topk(th, b, x, y, n, k, pr, va)
        delta, theta, pro, cnt, losses, kept = train_cohort(
            ctx, run, co, theta_gen, data.budgets[co.ids], protos, valid,
            extra_axes=(0, 0, None, None))
        return (co, vjp_fn, delta, theta["classifier"], pro, cnt, losses, kept, None,
                (gen, theta_gen))

    def cohort_masks(theta_gen, budgets):
        return jax.vmap(lambda th, b: M.topk_mask(th, prunable, b, groups))(theta_gen, budgets)

    def hn_multistep(phi, opt, gen, theta_gen, masks, delta, w):
        """``framp.hn_steps`` optimizer steps on L(phi') = sum_i w_i/2 ||m_i * (gen_i(phi') -
        theta_i)||^2, theta_i the client's trained model (= m_i * theta_gen_i - delta_i): its
        gradient at phi is the one-step VJP sum_i w_i J_i^T delta_i, and further steps move the
        generated kept entries on towards the trained values."""
        def loss(ph):
            r = jax.tree.map(lambda a, a0, m, d: m * (a - a0) + d, gen(ph), theta_gen, masks, delta)
            return 0.5 * sum(jnp.sum(w * jnp.sum(jnp.square(x).reshape(x.shape[0], -1), -1))
                             for x in jax.tree.leaves(r))

        def step(carry, _):
            ph, op = carry
            g = jax.grad(loss)(ph)
            upd, op = hn_opt.update(g, op, ph)
            return (optax.apply_updates(ph, upd), op), optax.tree.norm(g)
        (phi, opt), norms = jax.lax.scan(step, (phi, opt), None, length=fc.hn_steps)
        return phi, opt, norms[0]

    def round_fn(state, data, t):
        phi = state.phi
        protos, valid = align_targets(state)
        if width:
            co, vjp_fn, delta, cls, pro, cnt, losses, kept, dmask, sent = wx.round(
                state, data, t, phi, generate, lambda i: heads_of(state, i),
                train_with_prototypes, protos, valid)
        else:
            co, vjp_fn, delta, cls, pro, cnt, losses, kept, dmask, (gen, theta_gen) = train_topk(
                state, data, t, phi, protos, valid)
        pro = upload_protos(pro, co.keys)
        usable = finite_clients((delta, pro), losses)
        finite = usable & co.valid
        n_ok = jnp.sum(finite.astype(jnp.float32))
        w = finite.astype(jnp.float32) / (jnp.maximum(n_ok, 1.0) if fc.reduction == "mean" else 1.0)
        delta_ok = keep_where(finite, delta, 0.0)
        cot = jax.tree.map(lambda d: d * _bcast(w, d), delta_ok)
        if backbone:
            cot = dict(cot, classifier=jax.tree.map(jnp.zeros_like, cot["classifier"]))
        masks = None
        if fc.hn_steps > 1 or with_base:
            masks = cohort_masks(theta_gen, data.budgets[co.ids])
        if fc.hn_steps > 1:
            if backbone:  # the local classifiers are not generated
                masks = dict(masks, classifier=jax.tree.map(jnp.zeros_like, masks["classifier"]))
                delta_ok = dict(delta_ok, classifier=jax.tree.map(jnp.zeros_like,
                                                                  delta_ok["classifier"]))
            new_phi, opt, g_norm = hn_multistep(phi, state.opt, gen, theta_gen, masks, delta_ok, w)
        else:
            (g,) = vjp_fn(cot)
            upd, opt = hn_opt.update(g, state.opt, phi)
            new_phi, g_norm = optax.apply_updates(phi, upd), optax.tree.norm(g)
        base = state.base
        if with_base:  # ours: the holders-mean of the clients' updates (-delta) moves the base
            hold = jax.tree.map(lambda m: m * _bcast(finite.astype(m.dtype), m), masks)
            num = jax.tree.map(lambda d, h: jnp.sum(d * h, 0), delta_ok, hold)
            den = jax.tree.map(lambda h: jnp.sum(h, 0), hold)
            step = jax.tree.map(lambda n, d: holders_mean(0.0, n, d), num, den)
            base = jax.tree.map(lambda b, s: b - fc.base_lr * s, base, step)
        bank, bank_valid = aggregate_prototypes(pro, cnt, finite, state.protos, state.proto_valid,
                                                fc.proto_weighting, fc.proto_bank, dmask)
        heads = state.heads
        if backbone:
            heads = put_clients(heads, co.ids, keep_where(finite, cls, heads_of(state, co.ids)))
        new = FrampState(new_phi, opt, state.desc, bank, bank_valid, heads, base)
        okf = finite.astype(jnp.float32)
        if width:  # the narrow pytree whole, prototypes on the feature channels held
            per_client_payload = sent
        else:  # kept generated entries, the unmasked ones whole; a local classifier stays put
            kept, kept_head = kept[:, 0], kept[:, 1]
            per_client_payload = kept - kept_head + n_unmasked + K * F
        metrics = {
            **round_metrics(losses, usable, co.valid),
            "hn_grad_norm": g_norm,
            "protos_known": jnp.sum(bank_valid.astype(jnp.int32)),
            # SPEC §1.9, float32 values; uplink adds class counts; mask bits if sent explicitly
            "comm/down_bytes": 4.0 * jnp.sum(per_client_payload * co.valid),
            "comm/up_bytes": 4.0 * jnp.sum((per_client_payload + K) * co.valid),
            "comm/mask_bytes": (0.0 if width else 1.0) * jnp.sum(co.valid) * n_prunable / 8.0,
            "kept_fraction": jnp.sum(kept * okf) / jnp.maximum(n_ok, 1.0) / n_prunable,
        }
        return new, metrics

    def models_at(state, desc, budgets, ids):
        theta = generate(state.phi, desc, heads_of(state, ids), ids, state.base)
        masks = jax.vmap(lambda th, b: M.topk_mask(th, prunable, b, groups))(theta, budgets)
        return M.apply_mask(theta, masks)

    def finetune(state, data, params, ids):
        protos, valid = align_targets(state)
        ft = cfg._replace(steps=fc.finetune_steps)
        root = jax.random.fold_in(jax.random.key(ctx.seed), 4)
        prun = jax.vmap(lambda th: jax.tree.map(lambda a, f: (a != 0).astype(a.dtype) if f
                                                else jnp.ones_like(a), th, prunable))
        masks = prun(params)

        def one(p, m, x, y, n, i):
            return local_train(make_loss(protos, valid), p, m, x, y, n,
                               jax.random.fold_in(root, i), ft)[0]
        x = take_clients(data.train_x, ids)
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
        return groups_for(state, data, state.desc, data.budgets)

    def eval_groups_at_budget(state, data, budget):
        desc = with_budget(state.desc, fc.descriptor, budget, list(ctx.budget_levels))
        return groups_for(state, data, desc, jnp.full((ctx.num_clients,), budget, jnp.float32))

    def diagnostic_params(state, data):
        """Every client's generated model before the budget mask (config.diagnostics)."""
        ids = jnp.arange(ctx.num_clients)
        return generate(state.phi, state.desc, heads_of(state, ids), ids, state.base)

    def round_masks(state, data, t):
        """Round ``t``'s top-k masks (``Algorithm.round_masks``, config.record_mask_reuse):
        each participant's generated model masked at its budget, as ``train_topk`` builds them."""
        co = draw_cohort(ctx, data, t)
        theta_gen = generate(state.phi, state.desc[co.ids], heads_of(state, co.ids), co.ids,
                             state.base)
        budgets = data.budgets[co.ids]
        return cohort_masks(theta_gen, budgets), budgets, co.valid

    alg = Algorithm("framp", init, round_fn, eval_groups,
                    None if width else eval_groups_at_budget,
                    unseen_budgets=tuple(float(b) for b in fc.unseen_budgets),
                    diagnostic_params=diagnostic_params,
                    round_masks=None if width else round_masks)
    return FrampInternals(hn, hn_opt, template, prunable, generate, make_loss,
                          train_with_prototypes, client_topk, models_at, alg)


METHOD = Method("framp", framp, framp_defaults, validate_options)
