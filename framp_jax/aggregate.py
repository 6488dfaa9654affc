"""Server-side aggregation of stacked client pytrees (leading axis = clients)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from framp_jax.algorithms.rounds import holders_mean


def _bcast(w, x):
    return w.reshape(w.shape + (1,) * (x.ndim - 1))


def masked_mean(global_params, client_params, masks=None, weights=None):
    """Count-averaged aggregation: each entry becomes the (weighted) mean over the clients whose
    mask covers it; entries no client covers keep their global value.

    ``client_params`` and ``masks`` are stacked [M, ...] pytrees (``masks`` None = full cover);
    ``weights`` [M] (None = 1 each; 0 drops a client, e.g. one with a NaN update).
    """
    m = jax.tree.leaves(client_params)[0].shape[0]
    w = jnp.ones((m,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)

    def leaf(g, p, mk):
        cover = _bcast(w, p) if mk is None else mk * _bcast(w, p)
        num = jnp.sum(jnp.where(cover > 0, p, 0.0) * cover, axis=0)
        den = jnp.sum(cover, axis=0)
        return holders_mean(g, num, den)

    if masks is None:
        return jax.tree.map(lambda g, p: leaf(g, p, None), global_params, client_params)
    return jax.tree.map(leaf, global_params, client_params, masks)


masked_mean_jit = jax.jit(masked_mean)
