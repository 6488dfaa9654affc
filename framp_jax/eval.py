"""Evaluation (SPEC §2.6): Local(s) on each client's own test split and Union(s) on the union
of all clients' test data, per budget level, with fixed-size deterministic eval batches (20 by
default: with static BN the accuracy depends on the batch composition)."""
from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.client import normalize


def budget_label(b: float) -> str:
    f = Fraction(float(b)).limit_denominator(4096)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def batch_for_eval(x, y, count, batch: int):
    """Reshape one split into [nb, batch, ...] batches in index order. The tail is padded by
    wrapping around real samples (so BN batch statistics only see real images) and marked
    invalid."""
    nb = -(-x.shape[0] // batch)
    pos = jnp.arange(nb * batch)
    idx = pos % jnp.maximum(count, 1)
    valid = pos < count
    return (x[idx].reshape((nb, batch) + x.shape[1:]), y[idx].reshape(nb, batch),
            valid.reshape(nb, batch))


def correct_count(apply_fn, params, xb, yb, vb, mean, std, logits_fn=None):
    """Number of correct predictions over pre-batched data [nb, batch, ...]."""
    def body(acc, b):
        x, y, v = b
        logits, _ = apply_fn(params, normalize(x, mean, std), train=False)
        if logits_fn is not None:
            logits = logits_fn(logits)
        return acc + jnp.sum((jnp.argmax(logits, -1) == y) & v), None
    out, _ = jax.lax.scan(body, jnp.zeros((), jnp.int32), (xb, yb, vb))
    return out


def local_accuracy(apply_fn, params_stack, test_x, test_y, test_count, mean, std, batch=20,
                   logits_fn=None, label_counts=None, shared_params=False):
    """Accuracy of model i on client i's own test split; params_stack and test arrays share the
    leading client axis (``shared_params``: one model for every client). ``logits_fn(logits,
    label_counts_row)`` optionally transforms logits per client. Clients without test data get
    NaN."""
    lc = label_counts if label_counts is not None else jnp.zeros((test_x.shape[0], 1))

    def one(p, x, y, c, row):
        xb, yb, vb = batch_for_eval(x, y, c, batch)
        f = None if logits_fn is None else (lambda lg: logits_fn(lg, row))
        return correct_count(apply_fn, p, xb, yb, vb, mean, std, f)
    correct = jax.vmap(one, in_axes=(None if shared_params else 0, 0, 0, 0, 0))(
        params_stack, test_x, test_y, test_count, lc)
    return jnp.where(test_count > 0, correct / jnp.maximum(test_count, 1), jnp.nan)


def union_accuracy(apply_fn, params_stack, x, y, mean, std, batch=20, model_chunk=None):
    """Accuracy of each model of the stack on the same (union) test set."""
    xb, yb, vb = batch_for_eval(x, y, x.shape[0], batch)
    f = lambda p: correct_count(apply_fn, p, xb, yb, vb, mean, std)
    correct = jax.lax.map(f, params_stack, batch_size=model_chunk)
    return correct / x.shape[0]


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
