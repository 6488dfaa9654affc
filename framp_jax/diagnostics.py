"""Evaluation diagnostics (``config.diagnostics``): metrics recorded beside Local/Union at every
evaluation, on the same union set.

- ``diag/union_present/<s>``, ``diag/union_absent/<s>``: client i's model on the union samples
  whose class is present in client i's training data (``label_counts[i, k] > 0``) and on those
  whose class is absent; mean over the trained clients of budget s (clients without such
  samples left out), and ``.../mean`` = the mean over budget levels (levels without a value
  left out).
- ``diag/cos_same_budget``, ``diag/cos_cross_budget``, ``diag/cos_within/<s>``: cosine
  similarity of the trained clients' evaluated models (every leaf of a model's params
  flattened and concatenated), mean over the unordered client pairs with the same budget, with
  different budgets, and with budget s. Clients of a shared group (``per_client=False``) have
  the same model (cosine 1); pairs whose models differ in structure or shapes (HeteroFL's
  narrower models) are left out. With ``alg.diagnostic_params`` the same three from those
  params as ``diag/gen_cos_...`` (FRAMP: the generated models before the budget mask).

Every value is NaN where it has nothing to average. Trained clients = ``ctx.train_ids``.
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.eval import budget_label


def _signature(stack):
    """A stacked model's tree structure and per-model leaf shapes."""
    leaves, tree = jax.tree.flatten(stack)
    return tree, tuple(tuple(x.shape[1:]) for x in leaves)


def gram(a, b):
    """``[na, nb]`` inner products of the models of two stacks of the same structure: per-leaf
    ``x.reshape(n, -1) @ y.reshape(n, -1).T`` summed (float32, full precision)."""
    out = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32)
        y = y.reshape(y.shape[0], -1).astype(jnp.float32)
        out = out + jnp.dot(x, y.T, precision=jax.lax.Precision.HIGHEST)
    return out


def client_gram(stacks, client_models, num_clients: int):
    """The clients' Gram matrix ``[N, N]`` and a static ``[N, N]`` bool of the pairs whose
    models are comparable. ``stacks``: model stacks ``[n_g, ...]``; ``client_models``: per stack
    the model index of each of its clients (``(ids, models)``)."""
    sizes = [jax.tree.leaves(s)[0].shape[0] for s in stacks]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    sigs = [_signature(s) for s in stacks]
    m = int(offsets[-1])
    g = jnp.zeros((m, m), jnp.float32)
    comp = np.zeros((m, m), bool)
    for a in range(len(stacks)):
        for b in range(a, len(stacks)):
            if sigs[a] != sigs[b]:
                continue
            blk = gram(stacks[a], stacks[b])
            ra, rb = slice(offsets[a], offsets[a + 1]), slice(offsets[b], offsets[b + 1])
            g = g.at[ra, rb].set(blk)
            g = g.at[rb, ra].set(blk.T)
            comp[ra, rb] = comp[rb, ra] = True
    index = np.zeros((num_clients,), int)
    covered = np.zeros((num_clients,), bool)
    for k, (ids, models) in enumerate(client_models):
        index[ids] = offsets[k] + models
        covered[ids] = True
    cg = g[index][:, index]
    cc = comp[index][:, index] & covered[:, None] & covered[None, :]
    return cg, cc


def make_diagnostics(alg, ctx, eval_batch: int, model_chunk: int = 0):
    """``diagnose(state, data, ux, uy) -> {name: float}`` (see the module docstring); the
    device part is one jitted call over the algorithm's ``eval_groups`` (eval batches of
    ``eval_batch``, ``model_chunk`` > 0 models at a time on the union set)."""
    from framp_jax.distributed import to_host
    modality, n, k = ctx.modality, ctx.num_clients, ctx.num_classes
    chunk = model_chunk or None
    gen = getattr(alg, "diagnostic_params", None)

    def compute(state, data, ux, uy):
        correct = jnp.zeros((n, k), jnp.int32)
        covered = np.zeros((n,), bool)
        stacks, client_models = [], []
        for g in alg.eval_groups(state, data):
            ids = np.asarray(g.client_ids)
            if len(ids) == 0:
                continue
            stack = g.params if g.per_client else jax.tree.map(lambda a: a[None], g.params)
            cc = modality.union_class_correct(g.apply, stack, ux, uy, eval_batch, k,
                                              chunk if g.per_client else None)
            models = np.arange(len(ids)) if g.per_client else np.zeros((len(ids),), int)
            correct = correct.at[ids].set(cc[models])
            covered[ids] = True
            stacks.append(stack)
            client_models.append((ids, models))
        class_total = union_class_totals(uy, k)
        cg, comp = client_gram(stacks, client_models, n)
        out = {"correct": correct, "covered": jnp.asarray(covered), "class_total": class_total,
               "label_counts": data.label_counts, "gram": cg, "comparable": jnp.asarray(comp)}
        if gen is not None:
            p = gen(state, data)
            out["gen_gram"] = gram(p, p)
        return out

    compute = jax.jit(compute)

    def diagnose(state, data, ux, uy):
        r = jax.tree.map(np.asarray, to_host(compute(state, data, ux, uy)))
        return diagnostic_metrics(ctx, r["correct"], r["class_total"], r["label_counts"],
                                  r["gram"], r["comparable"], r.get("gen_gram"), r["covered"])

    return diagnose


def union_class_totals(uy, num_classes: int):
    """Union samples per true class, int32 ``[num_classes]``: over every label of ``uy`` (images:
    ``[n]``; graphs: ``[clients, padded nodes]``), labels < 0 (not test nodes, padding) left out."""
    return jnp.sum(jax.nn.one_hot(jnp.reshape(uy, (-1,)), num_classes, dtype=jnp.int32), 0)


def _nanmean(x):
    x = np.asarray(x, np.float64)
    if x.size == 0 or np.isnan(x).all():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(x))


def present_absent(correct, class_total, label_counts):
    """Per client, the accuracy on the union samples of the classes present in its training
    data and on those of the absent classes (NaN without such samples): two ``[N]`` arrays."""
    correct = np.asarray(correct, np.float64)
    total = np.asarray(class_total, np.float64)
    present = np.asarray(label_counts) > 0
    out = []
    for sel in (present, ~present):
        num = (correct * sel).sum(1)
        den = (total[None, :] * sel).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out.append(np.where(den > 0, num / np.maximum(den, 1), np.nan))
    return out[0], out[1]


def cosine(g):
    """Cosine similarities from a Gram matrix (NaN where a model has norm 0)."""
    g = np.asarray(g, np.float64)
    d = np.clip(np.diag(g), 0, None)
    nn = d[:, None] * d[None, :]  # one square root: identical models give exactly 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(nn > 0, g / np.sqrt(nn), np.nan)


def cosine_metrics(prefix, g, comparable, budgets, trained, levels):
    """``{prefix}_same_budget``, ``{prefix}_cross_budget`` and ``{prefix}_within/<s>``: mean
    cosine over the unordered pairs i < j of trained clients (comparable ones only)."""
    cos = cosine(g)
    n = len(budgets)
    iu, ju = np.triu_indices(n, 1)
    ok = np.asarray(comparable, bool)[iu, ju] & trained[iu] & trained[ju]
    same = np.isclose(budgets[iu], budgets[ju])
    vals = cos[iu, ju]
    out = {f"{prefix}_same_budget": _nanmean(vals[ok & same]),
           f"{prefix}_cross_budget": _nanmean(vals[ok & ~same])}
    for s in levels:
        sel = ok & same & np.isclose(budgets[iu], s)
        out[f"{prefix}_within/{budget_label(s)}"] = _nanmean(vals[sel])
    return out


def diagnostic_metrics(ctx, correct, class_total, label_counts, gram_matrix, comparable,
                       gen_gram=None, covered=None):
    """The ``diag/`` metrics from the host arrays of one evaluation (see the module docstring):
    ``correct [N, K]`` per-class correct union predictions of client i's model, ``class_total
    [K]`` union samples per class, ``label_counts [N, K]``, the clients' Gram matrix ``[N, N]``
    with its ``comparable`` pairs, ``gen_gram`` that of ``alg.diagnostic_params``, ``covered
    [N]`` the clients with an evaluated model (default all)."""
    n = ctx.num_clients
    budgets = np.asarray(ctx.budgets, np.float64)
    trained = np.zeros((n,), bool)
    trained[np.asarray(ctx.train_ids, int)] = True
    evaluated = trained & (True if covered is None else np.asarray(covered, bool))
    levels = ctx.levels()
    pres, absn = present_absent(correct, class_total, label_counts)
    out = {}
    for name, acc in (("union_present", pres), ("union_absent", absn)):
        per = []
        for s in levels:
            sel = evaluated & np.isclose(budgets, s)
            if sel.any():
                out[f"diag/{name}/{budget_label(s)}"] = _nanmean(acc[sel])
                per.append(out[f"diag/{name}/{budget_label(s)}"])
        out[f"diag/{name}/mean"] = _nanmean(per)
    out.update(cosine_metrics("diag/cos", gram_matrix, comparable, budgets, evaluated, levels))
    if gen_gram is not None:
        out.update(cosine_metrics("diag/gen_cos", gen_gram, np.ones((n, n), bool), budgets,
                                  trained, levels))
    return out
