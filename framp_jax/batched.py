"""Batched runs: several runs of one sweep trained together in one jitted program.

Runs that differ only in their seed and in the declared batchable hyperparameters
(:data:`BATCHABLE`: the client learning rate ``lr``, FRAMP's alignment weight ``framp.lam`` and
its hypernetwork learning rate ``framp.hn_lr``), and in fields the program does not read
(:data:`HOST_FIELDS`: evaluation, checkpoint and stopping settings), share one program: every
round is one call over all of them (the *members* of the batch). Each member keeps its own
everything else:

- its own data: per-seed partitions differ, so each member builds its own problem
  (:func:`framp_jax.problem.build_problem`); for the vmapped program the members' client arrays
  are padded to one static shape (images: more sample slots; graphs: more node, edge and feature
  entries, all padding) and stacked on a leading runs axis;
- its own run directory, written as :func:`framp_jax.simulate.run` writes it (config.json with
  its own seed and config hash, metrics.csv, TensorBoard events, checkpoints, results.json,
  accuracy.png), so ``framp-jax report``, ``sweep --status`` and the skipping of finished runs
  treat it as any other run; results.json adds ``"batch"`` (the members, the mode);
- its own evaluation: each member's model is evaluated by its own algorithm and evaluator on its
  own (unpadded) data, exactly as a run alone evaluates it;
- its own checkpoints, in its own directory: a batch resumes from its members' checkpoints (all
  at one round), and a member's checkpoint resumes alone too;
- its own failure: a member whose training diverges (the checks of :func:`simulate.run`) stops
  alone, recorded as failed (``error.txt``), while the others go on.

How the members share the program (``mode``):

- ``"vmap"``: one vmapped program over the runs axis (``jax.vmap``), sharded over a ``runs``
  device mesh when several devices are at hand (:func:`runs_mesh`). The accelerators' mode: the
  members' small matmuls and convolutions become batched ones. The algorithm is built inside
  the program with the values that differ traced (:func:`member_factory`: the seed as the
  context's seed, ``lr`` in the local recipe, FRAMP's options through :class:`OptionsView`), so
  every key a run alone folds from its seed is the member's own; the numbers equal a run
  alone's up to floating-point reassociation of the batched kernels (measured in
  tests/test_batched.py and docs/SCALE.md);
- ``"loop"``: that same per-member program (values traced), compiled once and called once per
  member each round: the numbers equal a run alone's bit for bit, each round costs what K
  separate runs' rounds cost, the compile is paid once instead of K times;
- ``"unroll"``: each member's own round (its own algorithm, its values as constants) traced
  side by side in one jitted call: bit for bit; the compile grows with K;
- ``"map"``: the per-member program over the members one after another inside one program
  (``lax.map``): one compile, small numeric differences as vmap's;
- ``"auto"``: ``vmap`` on an accelerator, ``loop`` on a CPU (where batched kernels do not beat
  the cores one run already keeps busy: benchmarks/bench_batched.py).

Entry points: :func:`train_batch` (library), ``python -m framp_jax.batched --sweep FILE
--workdir DIR --runs a,b,c`` (what ``framp-jax sweep --batch K`` starts), :func:`group_runs`
(how a sweep's runs are grouped), :func:`batch_key`.

Not batched (each such run trains alone, as a batch of one): ``diagnostics``,
``record_mask_reuse``, runs over several processes. Runs with a ``clients`` mesh
(``mesh_clients`` > 1) batch in the vmap mode on a ``("runs", "clients")`` mesh (each member's
clients split as its run alone splits them, members over the rows); in the other modes such a
batch is refused and ``python -m framp_jax.batched`` trains its runs one by one.
HeteroFL and FedRolex with ``sbn_clients > 0`` choose their sBN clients from the seed in Python,
so their seeds do not batch (their learning rates do).
"""
from __future__ import annotations

import json
import operator
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import config as C
from framp_jax.errors import FrampError

__all__ = ["BATCHABLE", "MODES", "BatchError", "batch_key", "group_runs", "train_batch",
           "resolve_mode", "runs_mesh", "pad_members", "Hyper", "OptionsView"]

# config keys whose values may differ between the members of one batch
BATCHABLE = ("seed", "lr", "framp.lam", "framp.hn_lr")
# fields the batched program does not read (each member's evaluation, checkpoints and stopping
# rule follow its own values), so members may differ in them too
HOST_FIELDS = ("eval_every", "eval_last", "eval_batch", "union_subset", "eval_model_chunk",
               "checkpoint_every", "keep_checkpoints", "max_loss_ratio")
MODES = ("auto", "vmap", "loop", "unroll", "map")
CPU_MODE = "loop"  # what "auto" means on a CPU (benchmarks/bench_batched.py)


class BatchError(FrampError, ValueError):
    """Runs that cannot train together (named in the message)."""


# ---------------------------------------------------------------------------------------------
# grouping


def _cfg_get(c, key):
    node = c
    for part in key.split("."):
        node = node[part]
    return node


def _seed_static(c) -> bool:
    """Methods whose factory uses the seed in Python (not only as a JAX key): their seeds
    cannot be traced, so runs of different seeds do not batch."""
    m = str(c.method)
    return m in ("heterofl", "fedrolex") and bool(c.get(m, {}).get("sbn_clients", 0))


def batch_key(c) -> str | None:
    """Runs with the same key train together; None = this run trains alone. The key is the
    run's whole config less :data:`BATCHABLE`, plus what of those fixes the program's shape
    (whether FRAMP's alignment term is on; the seed where it cannot be traced)."""
    if c.get("diagnostics", False) or c.get("record_mask_reuse", False):
        return None
    d = json.loads(c.to_json_best_effort())
    d.pop("_resolved", None)
    for key in BATCHABLE + HOST_FIELDS:
        *parents, leaf = key.split(".")
        node = d
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    d["__lam_on"] = bool(c.framp.lam) if str(c.method) == "framp" else None
    d["__seed"] = int(c.seed) if _seed_static(c) else None
    return json.dumps(d, sort_keys=True)


def group_runs(runs: Sequence, configs: dict, k: int) -> list[list]:
    """The sweep's runs in batches of up to ``k`` runs of one :func:`batch_key`, in the sweep's
    order (a batch is listed where its first run is; a run that cannot batch is alone).
    ``configs`` maps run names to resolved configs. ``k = 1``: every run alone."""
    if k < 1:
        raise BatchError(f"--batch={k} is not allowed: 1 or more runs per batch")
    groups, open_ = [], {}
    for r in runs:
        key = batch_key(configs[r.name]) if k > 1 else None
        if key is None:
            groups.append([r])
            continue
        g = open_.get(key)
        if g is None or len(g) >= k:
            g = []
            open_[key] = g
            groups.append(g)
        g.append(r)
    return groups


def check_batchable(configs: Sequence) -> None:
    """Raises :class:`BatchError` unless the configs can be one batch."""
    keys = [batch_key(c) for c in configs]
    if any(k is None for k in keys):
        i = keys.index(None)
        raise BatchError(f"run {i} (seed {configs[i].seed}) cannot be batched: diagnostics and "
                         "record_mask_reuse train alone")
    if len(set(keys)) > 1:
        from framp_jax.rundir import config_diff
        a, b = json.loads(keys[0]), json.loads(keys[keys.index(next(k for k in keys if k != keys[0]))])
        raise BatchError("runs of one batch may differ only in " + ", ".join(BATCHABLE)
                         + "; these differ in: " + "; ".join(config_diff(a, b)))


# ---------------------------------------------------------------------------------------------
# traced hyperparameters


class Hyper:
    """A traced hyperparameter standing where a method reads a Python number: arithmetic gives
    the traced value, ``bool()`` the truth every member shares (``if fc.lam:`` keeps its
    meaning: members with ``lam == 0`` batch apart, :func:`batch_key`)."""

    def __init__(self, value, truth: bool):
        self.value, self.truth = value, bool(truth)

    def __bool__(self):
        return self.truth

    def __jax_array__(self):
        return self.value

    def __neg__(self):
        return -self.value

    def __repr__(self):
        return f"Hyper({self.value!r})"


for _name in ("mul", "add", "sub", "truediv", "pow"):
    _op = getattr(operator, _name)
    setattr(Hyper, f"__{_name}__", (lambda op: lambda s, o: op(s.value, o))(_op))
    setattr(Hyper, f"__r{_name}__", (lambda op: lambda s, o: op(o, s.value))(_op))


class OptionsView:
    """A method's resolved options with some fields replaced (traced values): reads as the
    ConfigDict does (attributes, ``[key]``, ``get``)."""

    def __init__(self, base, overrides: dict):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_over", dict(overrides))

    def __getattr__(self, k):
        over = object.__getattribute__(self, "_over")
        if k in over:
            return over[k]
        return getattr(object.__getattribute__(self, "_base"), k)

    def __getitem__(self, k):
        return self.__getattr__(k)

    def __contains__(self, k):
        return k in object.__getattribute__(self, "_over") or k in object.__getattribute__(self, "_base")

    def get(self, k, default=None):
        try:
            return self.__getattr__(k)
        except (AttributeError, KeyError):
            return default


def _member_values(configs) -> tuple[dict, dict]:
    """``(traced, static)``: the batchable keys whose values differ between the members
    (``{key: float32/uint32 [K]}``) and those all members share (``{key: value}``)."""
    traced, static = {}, {}
    for key in BATCHABLE:
        vals = [_cfg_get(c, key) for c in configs]
        if all(v == vals[0] for v in vals):
            static[key] = vals[0]
        else:
            traced[key] = np.asarray(vals, np.uint32 if key == "seed" else np.float32)
    return traced, static


def member_factory(c0, ctx0, traced_keys: Sequence[str]) -> Callable:
    """``build(h) -> Algorithm``: the run's algorithm with the traced values ``h`` ({key:
    scalar}) in place of the config's (seed: the context's seed; lr: the local recipe's;
    framp.lam / framp.hn_lr: FRAMP's options)."""
    from framp_jax.algorithms.registry import resolve
    method, opts0 = resolve(c0)
    is_framp = str(c0.method) == "framp"

    def build(h):
        ctx = ctx0
        if "seed" in traced_keys:
            ctx = ctx._replace(seed=h["seed"])
        if "lr" in traced_keys:
            ctx = ctx._replace(local=ctx.local._replace(lr=h["lr"]))
        over = {}
        if is_framp and "framp.lam" in traced_keys:
            over["lam"] = Hyper(h["framp.lam"], bool(c0.framp.lam))
        if is_framp and "framp.hn_lr" in traced_keys:
            over["hn_lr"] = h["framp.hn_lr"]
        return method.factory(ctx, OptionsView(opts0, over) if over else opts0)
    return build


# ---------------------------------------------------------------------------------------------
# data: one static shape for every member


_EVAL_FIELDS = ("test_x", "test_y", "test_count", "union_x", "union_y", "val_x", "val_y",
                "val_count", "union_val_x", "union_val_y")


def training_data(data):
    """The fields a round reads (training data, budgets, label counts); the evaluation fields
    are None (each member is evaluated on its own data), so a round that read them would fail
    at trace time instead of reading another member's."""
    return data._replace(**{f: None for f in _EVAL_FIELDS})


def _pad_axis(a, axis, n, value=0):
    a = np.asarray(a)
    if a.shape[axis] == n:
        return a
    width = [(0, 0)] * a.ndim
    width[axis] = (0, n - a.shape[axis])
    return np.pad(a, width, constant_values=value)


def _repad_graph(x, n_new, e_new, nnz_new):
    """A stacked :class:`GraphClients` with ``n_new`` node slots, ``e_new`` edge slots (and
    ``nnz_new`` feature entries for sparse features), as
    :func:`framp_jax.data.graph_partition.pad_clients` would pad it: the last node is the
    padding node every padding edge (and sparse padding entry) points to."""
    from framp_jax.models.gcn import SparseFeatures
    g, mask = x.graphs, np.asarray(x.node_mask)
    n_old = mask.shape[1]
    last = n_new - 1
    ne = np.asarray(g.n_edge)[:, 0]
    nn = np.asarray(g.n_node)[:, 0]

    def edges(a):
        a = np.asarray(a).copy()
        pad = np.arange(a.shape[1])[None, :] >= ne[:, None]
        a[pad] = last
        return _pad_axis(a, 1, e_new, last).astype(np.int32)

    if isinstance(g.nodes, SparseFeatures):
        sf = g.nodes
        rows = np.asarray(sf.rows).copy()
        rows[rows == n_old - 1] = last
        nodes = SparseFeatures(_pad_axis(rows, 1, nnz_new, last).astype(np.int32),
                               _pad_axis(sf.cols, 1, nnz_new, 0).astype(np.int32),
                               _pad_axis(sf.vals, 1, nnz_new, 0.0).astype(np.float32),
                               n_new, sf.num_features)
    else:
        nodes = _pad_axis(g.nodes, 1, n_new, 0.0)
    graphs = g._replace(
        nodes=nodes, senders=edges(g.senders), receivers=edges(g.receivers),
        n_node=np.stack([nn, n_new - nn], 1).astype(np.int32),
        n_edge=np.stack([ne, e_new - ne], 1).astype(np.int32))
    return type(x)(graphs, _pad_axis(mask, 1, n_new, False))


def pad_members(datas: Sequence) -> list:
    """The members' :func:`training_data` padded to one static shape (numpy leaves): image
    clients get more (zero) sample slots, graph clients more padding nodes, edges and feature
    entries. A client's padding is never drawn or counted (batches come from its first
    ``train_count`` samples; graph labels of padding nodes are -1), so each member trains as it
    does alone."""
    from framp_jax.data.graph_modality import GraphClients
    datas = [jax.device_get(training_data(d)) for d in datas]
    x0 = datas[0].train_x
    if isinstance(x0, GraphClients):
        from framp_jax.models.gcn import SparseFeatures
        n_new = max(d.train_x.node_mask.shape[1] for d in datas)
        e_new = max(d.train_x.graphs.senders.shape[1] for d in datas)
        sparse = isinstance(x0.graphs.nodes, SparseFeatures)
        nnz = max(d.train_x.graphs.nodes.rows.shape[1] for d in datas) if sparse else 0
        out = []
        for d in datas:
            x = _repad_graph(d.train_x, n_new, e_new, nnz)
            out.append(d._replace(train_x=x, train_y=_pad_axis(d.train_y, 1, n_new, -1)))
        return out
    n_max = max(d.train_x.shape[1] for d in datas)
    return [d._replace(train_x=_pad_axis(d.train_x, 1, n_max, 0),
                       train_y=_pad_axis(d.train_y, 1, n_max, 0)) for d in datas]


def stack(trees):
    return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *trees)


def member(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


# ---------------------------------------------------------------------------------------------
# the batched round


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise BatchError(f"batch mode {mode!r} is not allowed: one of {MODES}")
    if mode == "auto":
        return CPU_MODE if jax.default_backend() == "cpu" else "vmap"
    return mode


def runs_mesh(k: int, devices: int | None = None, clients: int = 1):
    """The device mesh of a vmapped batch of ``k`` members: ``("runs",)`` over the most devices
    (at most ``devices``, default all) that divide ``k``, None for one; with ``clients`` > 1 (the
    members' ``mesh_clients``) ``("runs", "clients")``, ``clients`` devices per member row and
    as many rows as divide ``k`` and fit."""
    n_dev = len(jax.devices()) if devices is None else min(int(devices), len(jax.devices()))
    rows = max(n_dev // max(clients, 1), 1)
    n = max(d for d in range(1, rows + 1) if k % d == 0)
    from jax.sharding import AxisType
    if clients > 1:
        if clients > n_dev:
            raise BatchError(f"mesh_clients={clients} needs {clients} devices; {n_dev} at hand")
        return jax.make_mesh((n, clients), ("runs", "clients"), axis_types=(AxisType.Auto,) * 2,
                             devices=jax.devices()[:n * clients])
    if n <= 1:
        return None
    return jax.make_mesh((n,), ("runs",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


def make_batched_round(mode, configs, probs, algs, min_count, mesh=None):
    """``(round_fn(S, D, H, t) -> (S, M), D, H, trace_counter)``: S and M stacked on a leading
    runs axis (unroll: lists). D / H: the members' training data and traced values as the mode
    takes them."""
    from framp_jax.simulate import TraceCounter
    k = len(configs)
    if mode == "unroll":
        def unrolled(states, datas, hs, t):
            outs = [a.round(s, d, t) for a, s, d in zip(algs, states, datas)]
            return [o[0] for o in outs], [o[1] for o in outs]
        counter = TraceCounter(unrolled)
        return (jax.jit(counter, donate_argnums=(0,)),
                [training_data(p.data) for p in probs], [None] * k, counter)
    traced, _ = _member_values(configs)
    ctx0 = probs[0].ctx
    if ctx0.mesh is not None:  # the members' clients mesh: a column of the runs x clients mesh
        if mode != "vmap" or mesh is None or "clients" not in mesh.axis_names:
            raise BatchError(f"runs with mesh_clients={configs[0].mesh_clients} batch in the "
                             "vmap mode only (a runs x clients mesh)")
        ctx0 = ctx0._replace(mesh=mesh)
    ctx0 = ctx0._replace(local=ctx0.local._replace(min_count=int(min_count)))
    build = member_factory(configs[0], ctx0, tuple(traced))

    def one(state, data, h, t):
        return build(h).round(state, data, t)

    if mode == "loop":
        counter = TraceCounter(one)
        D = [jax.device_put(d) for d in pad_members([p.data for p in probs])]
        H = [{key: jnp.asarray(v[i]) for key, v in traced.items()} for i in range(k)]
        return _LoopRound(jax.jit(counter, donate_argnums=(0,))), D, H, counter
    if mode == "vmap":
        body = jax.vmap(one, in_axes=(0, 0, 0, None),
                        **({} if mesh is None else {"spmd_axis_name": "runs"}))
    else:
        def body(S, D, H, t):
            return jax.lax.map(lambda a: one(*a, t), (S, D, H))
    counter = TraceCounter(body)
    D = stack(pad_members([p.data for p in probs]))
    H = {key: jnp.asarray(v) for key, v in traced.items()}
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec as P
        sh = NamedSharding(mesh, P("runs"))
        D, H = jax.device_put((D, H), sh)
        fn = jax.jit(counter, donate_argnums=(0,), out_shardings=(sh, sh))
    else:
        D, H = jax.device_put((D, H))
        fn = jax.jit(counter, donate_argnums=(0,))
    return fn, D, H, counter


class _LoopRound:
    """The loop mode's round: one program (the members' differing values traced), called once
    per member: ``(states, datas, hs, t) -> (states, metrics)`` over lists. ``lower(...)
    .compile()`` compiles it once (ahead of time) for every member, as the other modes'."""

    def __init__(self, jitted):
        self.fn = jitted

    @staticmethod
    def _over(fn, S, D, H, t):
        outs = [fn(s, d, h, t) for s, d, h in zip(S, D, H)]
        return [o[0] for o in outs], [o[1] for o in outs]

    def __call__(self, S, D, H, t):
        return self._over(self.fn, S, D, H, t)

    def lower(self, S, D, H, t):
        lowered = self.fn.lower(S[0], D[0], H[0], t)
        over = self._over

        class _Lowered:
            def compile(self):
                compiled = lowered.compile()
                return lambda S, D, H, t: over(compiled, S, D, H, t)
        return _Lowered()


# ---------------------------------------------------------------------------------------------
# training


class _Member:
    """One member's run: its config, workdir, problem, algorithm, writers and history."""

    def __init__(self, c, workdir):
        self.c, self.workdir = c, os.path.abspath(workdir)
        self.name = os.path.basename(self.workdir)
        self.error: BaseException | None = None
        self.history, self.excluded, self.final_clients, self.last = [], {}, {}, {}
        self.wall_before, self.start = 0.0, 0
        self.trained_on = None

    @property
    def alive(self):
        return self.error is None


def _write_error(workdir, msg):
    try:
        with open(os.path.join(workdir, "error.txt"), "w") as f:
            f.write(" ".join(str(msg).split()) + "\n")
    except OSError:
        pass


def train_batch(configs: Sequence, workdirs: Sequence[str], resume: bool = False,
                mode: str = "auto", log=print, warn=None, devices: int | None = None,
                progress: bool = False) -> list:
    """Train the runs ``configs`` (one batch, :func:`check_batchable`) together, each writing
    its run directory ``workdirs[i]`` as :func:`framp_jax.simulate.run` does. Returns one entry
    per member: its results dict, or the exception that stopped it (a diverged member; its
    error is also written to ``<workdir>/error.txt``). Errors before training (a config, a
    checkpoint, data, members' checkpoints at different rounds) raise, nothing trained.
    ``resume``: every member continues from its latest checkpoint (all at one round).
    ``devices``: at most this many devices on the ``runs`` mesh (vmap mode; default all)."""
    from framp_jax.rundir import WorkdirLock
    from framp_jax import distributed as dist
    configs = list(configs)
    if len(configs) != len(workdirs) or not configs:
        raise BatchError("train_batch needs one workdir per config, and at least one config")
    for c in configs:
        C.validate(c)
    check_batchable(configs)
    if dist.is_multi_process():
        raise BatchError("batched runs train in one process (no --distributed)")
    mode = resolve_mode(mode)
    members = [_Member(c, w) for c, w in zip(configs, workdirs)]
    if len({m.workdir for m in members}) != len(members):
        raise BatchError("two members of the batch share a workdir")
    from framp_jax.data.locate import check_data_env
    check_data_env()
    from framp_jax.simulate import (CheckpointError, _has_checkpoint_dirs, _nothing_to_resume,
                                    close_all)
    for m in members:
        if resume and not _has_checkpoint_dirs(m.workdir):
            raise CheckpointError(_nothing_to_resume(m.c, m.workdir))
    locks, closers = [], []
    try:
        for m in members:
            locks.append(WorkdirLock(m.workdir).acquire())
        return _train(members, resume, mode, log, warn, devices, progress, closers)
    finally:
        close_all(closers)
        for lk in locks:
            lk.release()


def _train(members, resume, mode, log, warn, devices, progress, closers):
    from framp_jax.checkpoint import CheckpointManager
    from framp_jax.eval import budget_sweep, eval_metrics, make_evaluator, union_subset
    from framp_jax.problem import build_algorithm, build_problem
    from framp_jax.report import source_commit
    from framp_jax.rundir import EventWriter, MetricsCSV, plot_budget_accuracy, write_json_atomic
    from framp_jax.simulate import (NonFiniteError, _data_changed, _is_finite_state,
                                    _kept_checkpoint, check_checkpoints, config_hash, data_identity,
                                    hashed_config, make_results, same_data)
    import platform

    def warn_(msg):
        if warn is not None:
            return warn(msg)
        print(f"framp-jax: warning: {msg}", file=sys.stderr, flush=True)

    k = len(members)
    names = [m.name for m in members]
    for m in members:
        os.makedirs(m.workdir, exist_ok=True)
        m.ckpt = CheckpointManager(os.path.join(m.workdir, "checkpoints"), keep=m.c.keep_checkpoints)
        closers.append(m.ckpt.close)
        m.trained_on = check_checkpoints(m.c, m.workdir, m.ckpt, resume)
    t_setup = time.time()
    for m in members:
        m.prob = build_problem(m.c)
        m.data_id = data_identity(m.prob.info)
        if (m.trained_on is not None and m.data_id is not None
                and not same_data(m.trained_on[1], m.data_id)):
            raise _data_changed(m.workdir, m.trained_on[0], m.trained_on[1], m.data_id, "loaded")
        m.alg = build_algorithm(m.prob.ctx, m.c)
    _check_same_statics(members)
    log(f"batch of {k} ({mode}): " + ", ".join(names))
    log(members[0].prob.summary)
    commit = source_commit()
    for m in members:
        c = m.c
        resolved = json.loads(c.to_json_best_effort())
        resolved["_resolved"] = {"data": m.prob.info, "jax": jax.__version__,
                                 "backend": jax.default_backend(), "devices": len(jax.devices()),
                                 "python": platform.python_version(),
                                 "config_hash": config_hash(c), "framp_jax_commit": commit,
                                 "batch": {"members": names, "mode": mode}}
        m.resolved = resolved
        m.evaluate = make_evaluator(m.alg, m.prob.ctx, c.eval_batch, c.eval_model_chunk,
                                    with_masked=True)
        m.max_loss = c.max_loss_ratio * float(np.log(max(int(m.prob.ctx.num_classes), 2)))
        m.hash, m.hashed = config_hash(c), hashed_config(c)

    # initial states, each exactly as a run alone makes it; or the members' checkpoints
    states = []
    for m in members:
        state = m.alg.init(jax.random.key(m.c.seed), m.prob.data)
        m.csv = MetricsCSV(os.path.join(m.workdir, "metrics.csv"), resume=resume)
        if resume and m.ckpt.latest_round() is not None:
            state, extra = m.ckpt.restore_latest_intact(target=state,
                                                        expected_config_hash=m.hash, warn=warn_)
            m.start = int(extra["round"])
            m.wall_before = float(extra.get("wall_s", 0.0))
            m.history = list(extra.get("history", []))
            m.excluded = {int(r): int(n) for r, n in extra.get("excluded_clients", {}).items()}
        states.append(state)
    starts = sorted({m.start for m in members})
    if len(starts) > 1:
        raise BatchError("the members' checkpoints are at different rounds ("
                         + ", ".join(f"{m.name}: {m.start}" for m in members)
                         + "); resume them one by one (or in batches of one round)")
    start = starts[0]

    min_count = min(int(m.prob.ctx.local.min_count) for m in members)
    clients = members[0].prob.ctx.mesh
    clients = 1 if clients is None else int(clients.shape["clients"])
    mesh = runs_mesh(k, devices, clients) if mode == "vmap" else None
    if clients > 1:  # each member's own evaluation, as simulate.run places it
        from jax.sharding import NamedSharding, PartitionSpec as P
        for m in members:
            m.placed = NamedSharding(m.prob.ctx.mesh, P())
            m.prob = m.prob._replace(data=jax.device_put(m.prob.data, m.placed))
    round_fn, D, H, counter = make_batched_round(mode, [m.c for m in members],
                                                 [m.prob for m in members],
                                                 [m.alg for m in members], min_count, mesh)
    if mode in ("unroll", "loop"):
        S = states
    else:
        S = stack(states)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec as P
            S = jax.device_put(S, NamedSharding(mesh, P("runs")))
        else:
            S = jax.device_put(S)
    del states
    t_compile = time.time()
    try:  # ahead of time: a program the members cannot share fails here, before any write
        round_fn = round_fn.lower(S, D, H, jnp.int32(start)).compile()
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError,
            jax.errors.TracerBoolConversionError, jax.errors.TracerArrayConversionError) as e:
        raise BatchError(f"these runs cannot share one {mode} program: their method reads a "
                         f"batched value in Python ({type(e).__name__})") from e
    log(f"batch of {k}: round compiled in {time.time() - t_compile:.1f} s")
    for m in members:
        m.csv.truncate_after(start)
        if start:
            log(f"{m.name}: resumed from round {start}")
        # written once a resume has passed the checkpoints' checks (as simulate.run does)
        write_json_atomic(os.path.join(m.workdir, "config.json"), m.resolved)
        m.tb = EventWriter(os.path.join(m.workdir, "tb"))
        closers.append(m.tb.close)
        m.ux_sub, m.uy_sub = union_subset(m.c, m.prob.data)

    def state_of(i):
        st = S[i] if mode in ("unroll", "loop") else member(S, i)
        placed = getattr(members[i], "placed", None)
        return st if placed is None else jax.device_put(st, placed)

    def fail(m, err):
        m.error = err
        _write_error(m.workdir, f"{type(err).__name__}: {err}" if not isinstance(err, FrampError)
                     else str(err))
        warn_(f"{m.name} stopped: {err}")

    def do_eval(m, i, state, full):
        data = m.prob.data
        ux, uy = (data.union_x, data.union_y) if full else (m.ux_sub, m.uy_sub)
        la, lm, ua = m.evaluate(state, data, ux, uy)
        if full:
            m.final_clients.update({key: [None if not np.isfinite(x) else float(x) for x in
                                          np.asarray(v)] for key, v in (("local", la), ("union", ua))})
        ev = eval_metrics(m.c, m.prob.ctx, la, ua, lm)
        ev["union_samples"] = int(jnp.sum(uy >= 0))
        val = data.validation()
        if val is not None:
            vl, vm, vu = m.evaluate(state, val, val.union_x, val.union_y)
            ev.update({f"val/{key}": v for key, v in eval_metrics(m.c, m.prob.ctx, vl, vu, vm).items()})
            ev["val/union_samples"] = int(jnp.sum(val.union_y >= 0))
        return ev

    c0 = members[0].c
    rounds = int(c0.rounds)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=rounds, initial=start, desc=f"batch of {k}", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        closers.append(bar.close)
    t0 = time.time()
    for t in range(start, rounds):
        S, M = round_fn(S, D, H, jnp.int32(t))
        M = jax.device_get(M)
        rnd = t + 1
        is_last = rnd == rounds
        for i, m in enumerate(members):
            if not m.alive:
                continue
            mm = M[i] if mode in ("unroll", "loop") else member(M, i)
            mm = {key: float(v) for key, v in mm.items()}
            c = m.c
            if not np.isfinite(mm["train_loss"]):
                fail(m, NonFiniteError(
                    f"round {rnd}: every participating client returned a NaN/Inf loss or update "
                    f"({int(mm.get('nan_clients', 0))} clients); lower config.lr (now {c.lr}) or "
                    f"set config.grad_clip; {_kept_checkpoint(m.ckpt)}"))
                continue
            if mm.get("nan_clients", 0) > 0:
                m.excluded[rnd] = int(mm["nan_clients"])
                warn_(f"{m.name}: round {rnd}: {m.excluded[rnd]} of {c.clients_per_round} clients "
                      "returned a NaN/Inf loss or update and were left out of the aggregate "
                      "(metrics.csv column excluded_clients); lower config.lr or set "
                      "config.grad_clip if this recurs")
            if m.max_loss > 0 and mm["train_loss"] > m.max_loss:
                fail(m, NonFiniteError(
                    f"round {rnd}: the mean training loss {mm['train_loss']:.4g} exceeds "
                    f"config.max_loss_ratio x ln(num_classes) = {c.max_loss_ratio:g} x "
                    f"ln({m.prob.ctx.num_classes}) = {m.max_loss:.4g}: training diverges; lower "
                    f"config.lr (now {c.lr}) or set config.grad_clip (0 = off), or set "
                    f"config.max_loss_ratio=0 to go on regardless; {_kept_checkpoint(m.ckpt)}"))
                continue
            if rnd % c.eval_every == 0 or is_last:
                state = state_of(i)
                if not _is_finite_state(state):
                    fail(m, NonFiniteError(
                        f"round {rnd}: the server state holds NaN/Inf values; lower config.lr "
                        f"(now {c.lr}) or set config.grad_clip; {_kept_checkpoint(m.ckpt)}"))
                    continue
                ev = do_eval(m, i, state, full=is_last)
                since = m.history[-1]["round"] if m.history else 0
                mm["excluded_clients"] = sum(n for r, n in m.excluded.items() if since < r <= rnd)
                row = {"round": rnd, **mm, **ev, "wall_s": m.wall_before + time.time() - t0}
                m.csv.append(row)
                m.tb.scalars({key: v for key, v in row.items() if key != "round"}, rnd)
                m.tb.flush()
                m.history.append({"round": rnd, **ev})
                m.last = ev
            if rnd % c.checkpoint_every == 0 and not is_last:
                m.ckpt.save(rnd, state_of(i), _extra(m, rnd, t0))
        if bar is not None:
            alive = [m for m in members if m.alive]
            bar.set_postfix(alive=f"{len(alive)}/{k}", refresh=False)
            bar.update(1)
        if not any(m.alive for m in members):
            break
    if bar is not None:
        bar.close()
    out = []
    for i, m in enumerate(members):
        if not m.alive:
            out.append(m.error)
            continue
        c = m.c
        state = state_of(i)
        wall = m.wall_before + time.time() - t0
        if start < rounds:
            m.ckpt.save(rounds, state, _extra(m, rounds, t0))
        m.ckpt.wait()
        m.tb.close()
        res = make_results(c, m.history, wall, counter.count, m.prob, t0 - t_setup)
        res["excluded_clients"] = {"total": int(sum(m.excluded.values())),
                                   "by_round": {str(r): n for r, n in sorted(m.excluded.items())}}
        if m.final_clients:
            res["per_client"] = {"round": rounds, "budget": np.asarray(m.prob.ctx.budgets).tolist(),
                                 "heldout": [int(j) for ids in C.heldout_ids(c) for j in ids],
                                 **m.final_clients}
        sweep = budget_sweep(c, m.alg, m.prob, state)
        if sweep:
            res["unseen_budgets"] = sweep
        res["batch"] = {"members": names, "index": i, "mode": mode,
                        "note": "wall_s is the batch's: its members trained together"}
        write_json_atomic(os.path.join(m.workdir, "results.json"), res)
        plot_budget_accuracy(m.history, os.path.join(m.workdir, "accuracy.png"),
                             title=f"{c.method} on {c.dataset} (seed {c.seed})")
        try:
            os.remove(os.path.join(m.workdir, "error.txt"))
        except FileNotFoundError:
            pass
        out.append(res)
    return out


def _extra(m, rnd, t0):
    from framp_jax.simulate import config_hash, hashed_config
    return {"round": rnd, "wall_s": m.wall_before + time.time() - t0, "history": m.history,
            "config_hash": config_hash(m.c), "config": hashed_config(m.c),
            "excluded_clients": m.excluded, "data": m.data_id}


def _check_same_statics(members):
    """What the batched program takes from the first member must be every member's: the
    federation, the budgets, the network's input and the local recipe but its lr and
    min_count."""
    a = members[0].prob.ctx
    for m in members[1:]:
        b = m.prob.ctx
        diffs = [f for f in ("num_clients", "num_classes", "clients_per_round", "budget_levels",
                             "client_map", "rounds") if getattr(a, f) != getattr(b, f)]
        diffs += [f for f in ("budgets", "train_ids")
                  if not np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))]
        la, lb = a.local._replace(lr=0.0, min_count=0), b.local._replace(lr=0.0, min_count=0)
        if la != lb:
            diffs.append("local recipe")
        if a.modality != b.modality:
            diffs.append("data modality")
        if diffs:
            raise BatchError(f"{m.name} cannot train in a batch with {members[0].name}: they "
                             f"differ in {', '.join(diffs)}")


# ---------------------------------------------------------------------------------------------
# command line: what `framp-jax sweep --batch K` starts


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m framp_jax.batched",
                                description="Train runs of a sweep file as one batch.")
    p.add_argument("--sweep", required=True)
    p.add_argument("--workdir", required=True, help="the sweep's workdir (runs in <workdir>/<name>)")
    p.add_argument("--runs", required=True, help="comma-separated run names of the sweep")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--mode", default="auto", choices=MODES)
    p.add_argument("--noprogress", action="store_true")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    from absl import logging
    logging.set_verbosity(logging.WARNING)
    try:
        from framp_jax.sweep import load_sweep, resolve
        runs = {r.name: r for r in load_sweep(a.sweep)}
        names = [n for n in a.runs.split(",") if n]
        missing = [n for n in names if n not in runs]
        if missing:
            raise BatchError(f"no run {missing[0]!r} in {a.sweep}")
        configs = [resolve(runs[n]) for n in names]
        workdirs = [os.path.join(a.workdir, n) for n in names]
        t0 = time.time()
        try:
            results = train_batch(configs, workdirs, resume=a.resume, mode=a.mode,
                                  progress=not a.noprogress)
        except BatchError as e:  # not one batch after all: the runs one by one
            print(f"framp-jax: warning: {e}; training the {len(names)} runs one by one",
                  file=sys.stderr, flush=True)
            results = _one_by_one(configs, workdirs, a.resume)
        failed = 0
        for n, r in zip(names, results):
            if isinstance(r, BaseException):
                failed += 1
                print(f"{n}: FAILED: {r}", flush=True)
            else:
                f = r["final"]
                print(f"{n}: {r['method']} seed {r['seed']}, {r['rounds']} rounds: "
                      + ", ".join(f"{s} mean {f[s]['mean']:.4f}" for s in ("local", "union")
                                  if "mean" in f.get(s, {})), flush=True)
        print(f"batch: {len(names) - failed} of {len(names)} runs finished in "
              f"{time.time() - t0:.1f} s", flush=True)
        return 1 if failed else 0
    except Exception as e:  # noqa: BLE001 - expected failures become one line
        from framp_jax.cli import expected_failure_message
        line = expected_failure_message(e)
        if line is None or a.debug or os.environ.get("FRAMP_DEBUG", "") not in ("", "0"):
            raise
        print(f"framp-jax: {line}", file=sys.stderr, flush=True)
        for w in locals().get("workdirs", []):
            if not os.path.exists(os.path.join(w, "results.json")):
                _write_error(w, line)
        return 2


def _one_by_one(configs, workdirs, resume):
    from framp_jax.simulate import run
    out = []
    for c, w in zip(configs, workdirs):
        try:
            out.append(run(c, w, resume=resume and os.path.isdir(os.path.join(w, "checkpoints")),
                           progress=False))
        except FrampError as e:
            _write_error(w, str(e))
            out.append(e)
    return out


if __name__ == "__main__":
    sys.exit(main())
