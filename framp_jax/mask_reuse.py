"""Mask reuse (SPEC §2.6, FIARSE's Fig. 1): for each prunable parameter, how often it is in the
masks that the participants of a budget level train under, over all (client, round) pairs.

Opt-in with ``config.record_mask_reuse=True`` for a method whose :class:`Algorithm` has a
``round_masks(state, data, t) -> (masks, budgets, valid)`` hook (FIARSE; FRAMP with
``framp.extraction="topk"``). Before each round the run calls the jitted :meth:`MaskReuse.add`
with the server state before that round; it adds, for every budget level ``l``,

    counts[l] += Σ_{valid participants i at level l} flat(masks_i)    (float32 [L, P])
    n[l]      += #{valid participants at level l}

where ``flat`` concatenates the prunable leaves (``model.prunable``) of the params pytree, each
raveled, in ``jax.tree.leaves`` order, and ``L`` = ``config.budget_levels`` (config order). The
kept fraction of parameter ``p`` at level ``l`` is ``counts[l, p] / n[l]``.

``<workdir>/mask_reuse.npz`` (``counts``, ``n``, ``budget_levels``, ``round`` = the rounds
counted) is written atomically at every checkpoint and at the end of the run; ``--resume`` loads
it when its ``round`` equals the restored checkpoint's round and refuses otherwise (counts are
never restarted silently).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.errors import CheckpointError

FILENAME = "mask_reuse.npz"


def prunable_flags(ctx) -> list:
    """``[bool]`` per leaf of the run's full-size params (``jax.tree.leaves`` order)."""
    shapes = jax.eval_shape(ctx.model.init, ctx.init_key())
    return [bool(f) for f in jax.tree.leaves(ctx.model.prunable(shapes))], shapes


def flat_prunable(tree, flags, stacked: bool = True):
    """The prunable leaves of ``tree`` raveled and concatenated: [M, P] (``stacked``) or [P]."""
    leaves = jax.tree.leaves(tree)
    if len(leaves) != len(flags):
        raise ValueError(f"mask pytree has {len(leaves)} leaves, the params {len(flags)}")
    if stacked:
        return jnp.concatenate([x.reshape(x.shape[0], -1) for x, f in zip(leaves, flags) if f], 1)
    return jnp.concatenate([jnp.ravel(x) for x, f in zip(leaves, flags) if f])


class MaskReuse:
    """The run's mask-reuse counts on the device and their file."""

    def __init__(self, alg, ctx):
        if alg.round_masks is None:
            raise ValueError(f"{alg.name} has no round_masks hook")
        self.flags, shapes = prunable_flags(ctx)
        self.levels = np.asarray([float(b) for b in ctx.budget_levels], np.float32)
        self.num_prunable = int(sum(np.prod(x.shape, dtype=np.int64)
                                    for x, f in zip(jax.tree.leaves(shapes), self.flags) if f))
        L, P = len(self.levels), self.num_prunable
        self.mesh = ctx.mesh
        self.counts, self.n = self._place((np.zeros((L, P), np.float32), np.zeros((L,), np.float32)))
        self.compiles = 0
        levels = jnp.asarray(self.levels)
        flags = self.flags

        def step(counts, n, state, data, t):
            self.compiles += 1  # traced once per compilation
            masks, budgets, valid = alg.round_masks(state, data, t)
            level = jnp.argmin(jnp.abs(jnp.asarray(budgets, jnp.float32)[:, None]
                                       - levels[None, :]), axis=1)
            w = jax.nn.one_hot(level, L, dtype=jnp.float32) * jnp.asarray(valid, jnp.float32)[:, None]
            leaves = jax.tree.leaves(masks)
            if len(leaves) != len(flags):
                raise ValueError(f"{alg.name}.round_masks returned {len(leaves)} leaves; the "
                                 f"params have {len(flags)}")
            # per leaf, Σ_i w[i, l]·mask_i (0/1 values: exact in float32 below 2**24)
            add = jnp.concatenate(
                [jnp.einsum("ml,mp->lp", w, m.reshape(m.shape[0], -1).astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
                 for m, f in zip(leaves, flags) if f], axis=1)
            return counts + add, n + jnp.sum(w, 0)

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def add(self, state, data, t) -> None:
        """Counts round ``t``'s masks (call with the state *before* the round)."""
        self.counts, self.n = self._step(self.counts, self.n, state, data, t)

    def arrays(self, round: int) -> dict:
        from framp_jax.distributed import to_host
        counts, n = to_host((self.counts, self.n))
        return {"counts": np.asarray(counts, np.float32), "n": np.asarray(n, np.float32),
                "budget_levels": self.levels, "round": np.int64(round)}

    def save(self, workdir: str, round: int, write: bool = True) -> str:
        """``workdir/mask_reuse.npz`` of the first ``round`` rounds; every process calls it (the
        counts are read back on each), only the writer (``write``) writes."""
        arrays = self.arrays(round)
        path = os.path.join(workdir, FILENAME)
        return save(path, **arrays) if write else path

    def restore(self, workdir: str, round: int) -> None:
        """Continue the counts of ``workdir``'s file, which must hold exactly ``round`` rounds
        (the restored checkpoint's); anything else is a :class:`CheckpointError`."""
        path = os.path.join(workdir, FILENAME)
        restart = ("; the counts cannot be continued: start the run again in a new workdir "
                   "(mask reuse is counted from round 0)")
        if not os.path.exists(path):
            raise CheckpointError(f"cannot resume with record_mask_reuse=True: {path} is "
                                  f"missing (the checkpoint restored is round {round}){restart}")
        try:
            d = load(path)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot resume with record_mask_reuse=True: {path} does not "
                                  f"read back ({type(e).__name__}: {e}){restart}") from None
        if int(d["round"]) != round:
            raise CheckpointError(
                f"cannot resume with record_mask_reuse=True: {path} counts {int(d['round'])} "
                f"rounds but the checkpoint restored is round {round}{restart}")
        want = (len(self.levels), self.num_prunable)
        if d["counts"].shape != want or not np.allclose(d["budget_levels"], self.levels):
            raise CheckpointError(
                f"cannot resume with record_mask_reuse=True: {path} holds counts of shape "
                f"{d['counts'].shape} for budget levels {d['budget_levels'].tolist()}, this run "
                f"needs {want} for {self.levels.tolist()}{restart}")
        self.counts, self.n = self._place((np.asarray(d["counts"], np.float32),
                                           np.asarray(d["n"], np.float32)))

    def _place(self, arrays):
        """Host arrays onto the device(s): replicated over the run's mesh if it has one (as the
        state), else the default device."""
        if self.mesh is None:
            return jax.device_put(arrays)
        from framp_jax import distributed as dist
        if dist.is_multi_process():
            return dist.place_replicated(arrays, self.mesh)
        sh = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(arrays, sh)


def save(path: str, counts, n, budget_levels, round) -> str:
    """Writes the npz atomically (a temporary file in the same directory, then ``os.replace``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, counts=np.asarray(counts, np.float32), n=np.asarray(n, np.float32),
                     budget_levels=np.asarray(budget_levels, np.float32),
                     round=np.int64(round))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load(path: str) -> dict:
    """``{counts [L, P], n [L], budget_levels [L], round}`` of a mask_reuse.npz."""
    with np.load(path) as z:
        return {k: np.asarray(z[k]) for k in ("counts", "n", "budget_levels", "round")}


def kept_fractions(d: dict) -> dict:
    """``{budget level: counts[l] / n[l]}`` for the levels with ``n[l] > 0``."""
    return {float(b): d["counts"][l] / d["n"][l] for l, b in enumerate(d["budget_levels"])
            if d["n"][l] > 0}
