"""Budget masks: global (or groupwise) top-k magnitude masks with a traced budget.

``topk_mask(params, prunable, budget)`` keeps the ``k = floor(budget · P)`` largest-magnitude
entries among the prunable leaves (P entries in all) with one threshold
``tau = sort(|w|)[P - k]`` and ``mask = |w| >= tau`` (FIARSE semantics: ties may keep extra
entries). ``budget`` may be a traced scalar, so every budget level shares one compiled function.
Non-prunable leaves get an all-ones mask.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def validate_budget(budget) -> float:
    b = float(budget)
    if not (0.0 < b <= 1.0) or not np.isfinite(b):
        raise ValueError(f"budget={budget!r}: a budget is the kept fraction of prunable "
                         "parameters and must lie in (0, 1]")
    return b


def num_prunable(params, prunable) -> int:
    return int(sum(np.size(x) for x, p in zip(jax.tree.leaves(params), jax.tree.leaves(prunable)) if p))


def _threshold(abs_flat, budget):
    n = abs_flat.shape[0]
    k = jnp.clip(jnp.floor(budget * n).astype(jnp.int32), 1, n)
    return jnp.sort(abs_flat)[n - k]


def topk_mask(params, prunable, budget, groups=None):
    """{0,1} float mask pytree keeping the top ``floor(budget·P)`` prunable entries by |w|.

    ``groups``: optional pytree (params' structure) of ints naming each prunable leaf's group;
    with it, each group gets its own threshold (``scope="groupwise"``, FIARSE layerwise).
    """
    leaves, treedef = jax.tree.flatten(params)
    flags = jax.tree.leaves(prunable)
    gids = jax.tree.leaves(groups) if groups is not None else [0] * len(leaves)
    taus = {}
    for g in sorted({gid for gid, f in zip(gids, flags) if f}):
        flat = jnp.concatenate([jnp.abs(x).ravel() for x, f, gid in zip(leaves, flags, gids)
                                if f and gid == g])
        taus[g] = _threshold(flat, budget)
    out = [(jnp.abs(x) >= taus[gid]).astype(x.dtype) if f else jnp.ones_like(x)
           for x, f, gid in zip(leaves, flags, gids)]
    return jax.tree.unflatten(treedef, out)


def topk_threshold(params, prunable, budget):
    """The global threshold tau of ``topk_mask`` (used by FIARSE's threshold-aware forward)."""
    flat = jnp.concatenate([jnp.abs(x).ravel() for x, f in
                            zip(jax.tree.leaves(params), jax.tree.leaves(prunable)) if f])
    return _threshold(flat, budget)


def apply_mask(params, mask):
    return jax.tree.map(lambda p, m: p * m, params, mask)


def kept_fraction(mask, prunable):
    """Fraction of prunable entries a mask keeps (a traced scalar)."""
    kept = sum(jnp.sum(m) for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(prunable)) if f)
    total = sum(m.size for m, f in zip(jax.tree.leaves(mask), jax.tree.leaves(prunable)) if f)
    return kept / total


def stage_groups(params):
    """Group ids for ``scope="groupwise"``: one group per top-level entry prefix
    (ResNet: stem, layer1..4, classifier; CNN: each layer)."""
    names = sorted({k.split("_")[0] for k in params})
    ids = {n: i for i, n in enumerate(names)}
    return {k: jax.tree.map(lambda _: ids[k.split("_")[0]], v) for k, v in params.items()}
