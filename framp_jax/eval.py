"""Evaluation summaries (SPEC §2.6): Local(s) on each client's own test split and Union(s) on
the union of all clients' test data, per budget level. The accuracies themselves are computed by
the data's modality (``local_accuracy``/``union_accuracy`` of :mod:`framp_jax.data.modality`)."""
from __future__ import annotations

from fractions import Fraction

import numpy as np


def budget_label(b: float) -> str:
    f = Fraction(float(b)).limit_denominator(4096)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def summarize(budgets, local_acc=None, union_acc=None, levels=None):
    """Per-budget means: ``local/<s>`` = mean over clients with budget s of their own-test
    accuracy, ``local/mean`` = mean over all clients; ``union/<s>`` likewise, ``union/mean`` =
    mean over the budget levels (SPEC §2.6)."""
    budgets = np.asarray(budgets, np.float64)
    levels = sorted(set(budgets.tolist())) if levels is None else levels
    out = {}
    for name, acc in (("local", local_acc), ("union", union_acc)):
        if acc is None:
            continue
        acc = np.asarray(acc, np.float64)
        per = []
        for s in levels:
            sel = np.isclose(budgets, s)
            if sel.any():
                out[f"{name}/{budget_label(s)}"] = float(np.nanmean(acc[sel]))
                per.append(out[f"{name}/{budget_label(s)}"])
        out[f"{name}/mean"] = float(np.nanmean(acc)) if name == "local" else float(np.mean(per))
    return out


# ---------------------------------------------------------------------------------------------
# The run's evaluator


def masked_local_logits(logits, label_counts_row):
    """HeteroFL's label-masked evaluation: logits of the classes absent from the client's
    training data set to 0 (the ``local_masked/`` column, the same for every method)."""
    from framp_jax.losses import label_masked_logits
    return label_masked_logits(logits, label_counts_row > 0)


def make_evaluator(alg, ctx, eval_batch: int, model_chunk: int = 0, at_budget: bool = False,
                   with_masked: bool = False):
    """A jitted ``evaluate(state, data, union_x, union_y) -> (local_acc[N], union_acc[N])`` over
    the algorithm's ``eval_groups`` with the context's modality (eval batches of ``eval_batch``;
    ``model_chunk`` > 0 evaluates that many models at a time on the union set). With
    ``at_budget`` it takes a traced ``budget`` too and evaluates every client's model at that
    budget (``alg.eval_groups_at_budget``), one compile for all budgets. With ``with_masked`` it
    returns ``(local, local_masked, union)``: ``local_masked`` is Local with the logits of the
    classes absent from each client's training data set to 0 (:func:`masked_local_logits`),
    computed alike for every method. Every method's Local is evaluated on the plain logits."""
    import jax
    import jax.numpy as jnp
    modality = ctx.modality
    chunk = model_chunk or None

    def evaluate(state, data, ux, uy, budget=None):
        local = jnp.zeros((ctx.num_clients,), jnp.float32)
        masked = jnp.zeros((ctx.num_clients,), jnp.float32)
        union = jnp.zeros((ctx.num_clients,), jnp.float32)
        groups = (alg.eval_groups_at_budget(state, data, budget) if at_budget
                  else alg.eval_groups(state, data))
        for g in groups:
            ids = np.asarray(g.client_ids)
            if len(ids) == 0:
                continue
            tx = jax.tree.map(lambda a: a[ids], data.test_x)
            ty, tc = data.test_y[ids], data.test_count[ids]
            la = modality.local_accuracy(g.apply, g.params, tx, ty, tc, eval_batch,
                                         None, None, not g.per_client)
            if with_masked:
                lm = modality.local_accuracy(g.apply, g.params, tx, ty, tc, eval_batch,
                                             masked_local_logits, data.label_counts[ids],
                                             not g.per_client)
                masked = masked.at[ids].set(lm)
            if g.per_client:
                ua = modality.union_accuracy(g.apply, g.params, ux, uy, eval_batch, chunk)
            else:
                single = jax.tree.map(lambda a: a[None], g.params)
                ua = jnp.broadcast_to(modality.union_accuracy(g.apply, single, ux, uy,
                                                              eval_batch)[0], (len(ids),))
            local = local.at[ids].set(la)
            union = union.at[ids].set(ua)
        return (local, masked, union) if with_masked else (local, union)

    return jax.jit(evaluate)


def union_subset(c, data):
    """The union test set of intermediate evaluations: ``config.union_subset`` samples (a
    seeded subset, whole eval batches), or all of it."""
    if not c.union_subset:
        return data.union_x, data.union_y
    n = data.union_x.shape[0]
    if c.union_subset >= n:
        return data.union_x, data.union_y
    k = (c.union_subset // c.eval_batch) * c.eval_batch or c.eval_batch
    idx = np.sort(np.random.default_rng(c.seed).permutation(n)[:k])
    return data.union_x[idx], data.union_y[idx]


def eval_metrics(c, ctx, local, union, local_masked=None):
    """Per-budget summaries of the trained clients, and ``unseen/...`` of the held-out ones;
    with ``local_masked`` also ``local_masked/...`` (and ``unseen/local_masked/...``)."""
    from framp_jax import config as C
    local, union = np.asarray(local), np.asarray(union)
    held = set(np.concatenate(C.heldout_ids(c)).tolist()) if c.heldout_frac > 0 else set()
    tr = np.array([i not in held for i in range(c.num_clients)])
    levels = [float(b) for b in c.budget_levels]
    out = summarize(ctx.budgets[tr], local[tr], union[tr], levels)
    if local_masked is not None:
        lm = np.asarray(local_masked)
        out.update({k.replace("local/", "local_masked/", 1): v for k, v in
                    summarize(ctx.budgets[tr], lm[tr], None, levels).items()})
    if held:
        un = summarize(ctx.budgets[~tr], local[~tr], union[~tr], levels)
        if local_masked is not None:
            un.update({k.replace("local/", "local_masked/", 1): v for k, v in
                       summarize(ctx.budgets[~tr], lm[~tr], None, levels).items()})
        out.update({f"unseen/{k}": v for k, v in un.items()})
    return out


def budget_sweep(c, alg, prob, state):
    """Every trained client's model at the algorithm's ``unseen_budgets`` (budgets never used in
    training, SPEC §1.10), zero-shot: mean Local and Union accuracy over the trained clients per
    budget."""
    budgets = tuple(alg.unseen_budgets)
    if alg.eval_groups_at_budget is None or not budgets:
        return {}
    import jax.numpy as jnp
    from framp_jax import config as C
    from framp_jax.distributed import to_host
    held = np.concatenate(C.heldout_ids(c)) if c.heldout_frac > 0 else np.zeros((0,), int)
    tr = np.setdiff1d(np.arange(c.num_clients), held)
    out = {}
    evaluate = make_evaluator(alg, prob.ctx, c.eval_batch, c.eval_model_chunk, at_budget=True)
    for b in budgets:
        la, ua = to_host(evaluate(state, prob.data, prob.data.union_x, prob.data.union_y,
                                  jnp.float32(b)))
        out[budget_label(b)] = {"local": float(np.nanmean(np.asarray(la)[tr])),
                                "union": float(np.mean(np.asarray(ua)[tr]))}
    return out
