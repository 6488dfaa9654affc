"""The algorithm contract (optax/fedjax style): a factory returns pure functions.

``init(key, data) -> state``: ``key`` is the run's root key, ``jax.random.key(seed)`` (a method
derives its model's key from it, ``rounds.model_init_key``); the state is a typed NamedTuple.
``round(state, data, t) -> (state, metrics)`` is one jitted call per round (``t`` is traced, so
N rounds compile once), composed of the building blocks of ``rounds.py``;
``eval_groups(state, data)`` lists the models to evaluate, each for a static set of clients.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class FedData(NamedTuple):
    """Device-resident federated data; every array has a leading client axis except union_*."""
    train_x: Any      # uint8 [N, n_max, ...]
    train_y: Any      # int32 [N, n_max]
    train_count: Any  # int32 [N]
    test_x: Any
    test_y: Any
    test_count: Any
    budgets: Any      # float32 [N]
    label_counts: Any  # float32 [N, K] train label histogram
    union_x: Any      # the union of the clients' test data (full test set for vision)
    union_y: Any
    # validation (model selection only; no training step reads it): each client's own
    # validation data (vision: a stratified share ``config.val_frac`` of its training data;
    # graphs: its validation nodes) and their union; None when the run has none
    val_x: Any = None
    val_y: Any = None
    val_count: Any = None
    union_val_x: Any = None
    union_val_y: Any = None

    def validation(self):
        """This data with the validation split in the test fields (the evaluator reads those),
        or None when there is no validation data."""
        if self.val_y is None:
            return None
        return self._replace(test_x=self.val_x, test_y=self.val_y, test_count=self.val_count,
                             union_x=self.union_val_x, union_y=self.union_val_y)


class EvalGroup(NamedTuple):
    apply: Callable
    params: Any               # stacked [len(client_ids), ...] if per_client else one model
    client_ids: np.ndarray    # static ids of the clients this group serves
    per_client: bool = True


class Algorithm(NamedTuple):
    name: str
    init: Callable
    round: Callable
    eval_groups: Callable
    # optional eval_groups_at_budget(state, data, budget): every client's model at another budget
    # (unseen-budget sweeps, SPEC §1.10)
    eval_groups_at_budget: Callable | None = None
    # budgets never used in training at which every trained client's model is evaluated
    # zero-shot at the end of a run (needs eval_groups_at_budget)
    unseen_budgets: tuple = ()
    # optional diagnostic_params(state, data) -> every client's raw model stacked [N, ...]
    # (FRAMP: the generated models before the budget mask), compared across clients by
    # config.diagnostics (framp_jax/diagnostics.py)
    diagnostic_params: Callable | None = None
    # optional round_masks(state, data, t) -> (masks, budgets, valid): the {0,1} float masks over
    # the full-size params pytree (stacked [M, ...]) that round t's participants train under,
    # given the server state before the round, their budgets [M] and a valid [M] bool (False: a
    # padding slot). Only the prunable leaves are read (config.record_mask_reuse,
    # framp_jax/mask_reuse.py); methods whose clients train narrower pytrees leave it None.
    round_masks: Callable | None = None


class Context(NamedTuple):
    """What a method factory gets besides its own options: the model family and the run's
    network, the data's modality, static facts of the federation, the local training recipe,
    and a ``vmap_clients`` that maps over clients (sharded over the ``clients`` mesh axis if
    any). Nothing here needs the run's config."""
    model: Any                   # the run's network at full width (= family.make(1.0))
    family: Any                  # framp_jax.models.family.ModelFamily: the network at other widths/exits
    modality: Any                # framp_jax.data.modality.Modality (also local.modality)
    num_clients: int
    num_classes: int
    budgets: np.ndarray          # static per-client budgets
    budget_levels: tuple         # the configured budget levels, in config order
    train_ids: np.ndarray        # clients that may be sampled (held-out ones excluded)
    clients_per_round: int
    local: Any                   # client.LocalConfig
    seed: int = 0
    rounds: int = 1
    client_map: str = "auto"     # auto | vmap | map
    mesh: Any = None

    def client_map_mode(self) -> str:
        """``vmap`` or ``map`` (``lax.map``, clients one after another inside the jitted round).
        ``config.client_map="auto"`` picks ``map`` on CPU without a mesh, where a vmapped matmul
        over per-client weights is slower than sequential clients
        (``benchmarks/bench_round.py``: jax_map vs jax), and ``vmap`` elsewhere."""
        mode = self.client_map
        if self.mesh is not None:
            return "vmap"
        if mode == "auto":
            return "map" if jax.default_backend() == "cpu" else "vmap"
        return mode

    def vmap_clients(self, fn, in_axes=0, out_axes=0):
        """Map ``fn`` over the leading client axis of the arguments whose ``in_axes`` is 0
        (``None``: shared by every client); outputs are stacked on axis 0."""
        if self.mesh is not None:
            return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes, spmd_axis_name="clients")
        if self.client_map_mode() == "vmap" or out_axes != 0:
            return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes)

        def mapped(*args):
            axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
            if any(ax not in (0, None) for ax in axes):
                raise ValueError(f"vmap_clients: in_axes {in_axes} must be 0 or None per argument")
            xs = tuple(a for a, ax in zip(args, axes) if ax == 0)

            def body(sliced):
                it = iter(sliced)
                return fn(*(next(it) if ax == 0 else a for a, ax in zip(args, axes)))
            return jax.lax.map(body, xs)
        return mapped

    def shard_clients(self, tree):
        """Constrain stacked per-client arrays to be split over the ``clients`` mesh axis."""
        if self.mesh is None:
            return tree
        sh = NamedSharding(self.mesh, P("clients"))
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sh), tree)

    def client_keys(self, t, ids):
        """fold_in(fold_in(root_clients, round), client_id) for each sampled client."""
        root = jax.random.fold_in(jax.random.key(self.seed), 0)
        rk = jax.random.fold_in(root, t)
        return jax.vmap(lambda i: jax.random.fold_in(rk, i))(ids)

    def sample_clients(self, t):
        """The round's participants, drawn without replacement from the trainable clients."""
        k = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), 1), t)
        ids = jnp.asarray(self.train_ids, jnp.int32)
        return jax.random.choice(k, ids, (self.clients_per_round,), replace=False)

    def levels(self):
        """The budget levels present among the trainable clients, in config order."""
        tb = self.budgets[self.train_ids]
        return [float(b) for b in self.budget_levels if np.isclose(tb, b).any()]

    def sample_clients_by_level(self, t):
        """Stratified participants for methods that train each budget level at its own static
        shape: level l gets ``M // L`` clients plus one of the ``M % L`` extra slots, which rotate
        with the round, so over L rounds every level gets exactly its share and each client's
        participation rate matches uniform sampling when levels are equally populated.
        Returns ``[(budget, ids[cap_l], valid[cap_l])]``: each level is padded to a static
        ``cap_l = min(ceil(M / L), n_l)`` slots; ``valid`` marks real participants (padding slots
        hold a real client whose update gets weight 0)."""
        levels = self.levels()
        L, M = len(levels), self.clients_per_round
        base, rem = divmod(M, L)
        k = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), 1), t)
        out = []
        for l, s in enumerate(levels):
            pool = self.train_ids[np.isclose(self.budgets[self.train_ids], s)]
            cap = min(base + (rem > 0), len(pool))
            n_l = jnp.minimum(base + ((l - t) % L < rem).astype(jnp.int32), cap)
            ids = jax.random.choice(jax.random.fold_in(k, l), jnp.asarray(pool, jnp.int32), (cap,),
                                    replace=False)
            out.append((s, ids, jnp.arange(cap) < n_l))
        return out

    def gather(self, data: FedData, ids):
        take = lambda tree: jax.tree.map(lambda a: a[ids], tree)  # x may be a graph pytree
        return self.shard_clients((take(data.train_x), data.train_y[ids], data.train_count[ids]))

    def init_key(self):
        """The model key of the run's root key ``key(seed)`` (``rounds.model_init_key``)."""
        return jax.random.fold_in(jax.random.key(self.seed), 2)

