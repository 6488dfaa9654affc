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
    """``sort(abs_flat)[n - k]``, the k-th largest entry, ``k = clip(floor(budget·n), 1, n)``,
    found without sorting: for non-negative floats (and NaN, which sorts last) the order of the
    values is the order of their bit patterns as int32, so the largest pattern ``t`` with
    ``count(bits >= t) >= k`` is built bit by bit (31 counting passes); it is exactly the sorted
    entry (ties included), at a fraction of a sort's cost on 10^7 entries (CPU: 0.6 s instead of
    5.4 s for ResNet-18's 11.2 M). One exception without effect: where the device treats
    subnormals as 0.0 (XLA's CPU sort does), a threshold among zeros and subnormals may be
    another member of that tie, equal to it in every device comparison, so the mask is the same."""
    if jnp.ndim(budget) > 0:  # one threshold per budget
        return jax.vmap(lambda b: _threshold(abs_flat, b))(jnp.ravel(budget)).reshape(jnp.shape(budget))
    n = abs_flat.shape[0]
    k = jnp.clip(jnp.floor(budget * n).astype(jnp.int32), 1, n)
    bits = jax.lax.bitcast_convert_type(abs_flat.astype(jnp.float32), jnp.int32)

    def set_bit(i, t):
        cand = t | jnp.left_shift(jnp.int32(1), 30 - i)
        return jnp.where(jnp.sum((bits >= cand).astype(jnp.int32)) >= k, cand, t)
    t = jax.lax.fori_loop(0, 31, set_bit, jnp.zeros(jnp.shape(k), jnp.int32))
    return jax.lax.bitcast_convert_type(t, jnp.float32)


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


def num_kept(mask, prunable):
    """The number of entries a mask keeps over its prunable leaves (a traced float32 scalar)."""
    return sum((jnp.sum(m, dtype=jnp.float32) for m, f in
                zip(jax.tree.leaves(mask), jax.tree.leaves(prunable)) if f), jnp.float32(0))


def kept_fraction(mask, prunable):
    """Fraction of prunable entries a mask keeps (a traced scalar)."""
    return num_kept(mask, prunable) / num_prunable(mask, prunable)


def stage_groups(params):
    """Group ids for ``scope="groupwise"``: one group per top-level entry prefix
    (ResNet: stem, layer1..4, classifier; CNN: each layer)."""
    names = sorted({k.split("_")[0] for k in params})
    ids = {n: i for i, n in enumerate(names)}
    return {k: jax.tree.map(lambda _: ids[k.split("_")[0]], v) for k, v in params.items()}
