"""The federated simulation: data on the device, one jitted call per round, evaluation,
run-directory output and checkpoints. ``run(config, workdir)`` is what the CLI calls."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import config as C
from framp_jax.algorithms.base import Context, FedData
from framp_jax.client import LocalConfig
from framp_jax.eval import local_accuracy, summarize, union_accuracy


class NonFiniteError(FloatingPointError):
    """Training produced NaN/Inf: every client of a round failed, or the server state did."""


class Problem(NamedTuple):
    """Everything built from a config before the first round."""
    config: Any
    data: FedData
    model: Any
    ctx: Context
    info: dict
    summary: str
    # optional (local_accuracy, union_accuracy) replacements with eval.py's signatures (graphs)
    eval_fns: Any = None


def _levels_ok(c):
    return [float(b) for b in c.budget_levels]


def config_hash(c) -> str:
    d = json.loads(c.to_json_best_effort())
    for k in ("rounds", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_last",
              "data_dir", "union_subset", "eval_model_chunk", "mesh_clients", "conv_impl"):
        d.pop(k, None)  # fields that may change between a run and its resumption
    if d.get("compute_dtype") == "float32":
        d.pop("compute_dtype")  # the default: runs from before the field keep their hash
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def build_model(c, num_classes, input_shape):
    from framp_jax.models.layers import with_compute_dtype
    dtype = c.get("compute_dtype", "float32")
    if c.model == "cnn":
        from framp_jax.models.cnn import make_cnn
        return with_compute_dtype(make_cnn(num_classes, input_shape, conv_impl=c.conv_impl), dtype)
    if c.model == "resnet18":
        from framp_jax.models.resnet import make_resnet18
        return with_compute_dtype(make_resnet18(num_classes, input_shape, conv_impl=c.conv_impl),
                                  dtype)
    raise C.ConfigError("model", c.model, "cnn or resnet18 for image data")


def make_mesh(c):
    n_dev = len(jax.devices())
    n = n_dev if c.mesh_clients == 0 else c.mesh_clients
    if n == 1:
        return None
    if n > n_dev:
        raise C.ConfigError("mesh_clients", c.mesh_clients, f"at most the {n_dev} available devices")
    if c.clients_per_round % n:
        raise C.ConfigError("clients_per_round", c.clients_per_round,
                            f"a multiple of the {n} devices on the 'clients' mesh axis")
    from jax.sharding import AxisType
    return jax.make_mesh((n,), ("clients",), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def build_problem(c, verbose=True) -> Problem:
    """Load data, partition, stack client arrays on the device and build the model/context."""
    C.validate(c)
    if str(c.dataset) in C.GRAPH_DATASETS:
        from framp_jax.graph_engine import build_graph_problem
        return build_graph_problem(c, verbose)
    from framp_jax.data.clients import label_counts, stack_clients, summary
    from framp_jax.data.partition import partition_vision
    from framp_jax.data.vision import get_normalization, load_vision_dataset

    ds = load_vision_dataset(c.dataset, c.data_dir or None)
    part = partition_vision(ds.y_train, ds.y_test, c.num_clients, c.partition, c.alpha, c.seed,
                            c.test_prior, c.classes_per_client, ds.num_classes)
    tr = stack_clients(ds.x_train, ds.y_train, part.train)
    te = stack_clients(ds.x_test, ds.y_test, part.test)
    lc_train = label_counts(ds.y_train, part.train, ds.num_classes)
    lc_test = label_counts(ds.y_test, part.test, ds.num_classes)
    budgets = C.assign_budgets(c)
    union_idx = np.sort(np.concatenate([np.asarray(i) for i in part.test]))
    mean, std = get_normalization(str(c.dataset), ds.x_train.shape[-1])
    data = FedData(
        train_x=jnp.asarray(tr.x), train_y=jnp.asarray(tr.y, jnp.int32),
        train_count=jnp.asarray(tr.count, jnp.int32),
        test_x=jnp.asarray(te.x), test_y=jnp.asarray(te.y, jnp.int32),
        test_count=jnp.asarray(te.count, jnp.int32),
        budgets=jnp.asarray(budgets, jnp.float32),
        label_counts=jnp.asarray(lc_train, jnp.float32),
        union_x=jnp.asarray(ds.x_test[union_idx]), union_y=jnp.asarray(ds.y_test[union_idx], jnp.int32))
    model = build_model(c, ds.num_classes, ds.x_train.shape[1:])
    held = np.concatenate(C.heldout_ids(c)) if c.heldout_frac > 0 else np.zeros((0,), int)
    train_ids = np.setdiff1d(np.arange(c.num_clients), held)
    local = LocalConfig(steps=c.local_steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, grad_clip=c.grad_clip, augment=c.augment,
                        mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    ctx = Context(c, model, c.num_clients, ds.num_classes, budgets, train_ids,
                  c.clients_per_round, local, make_mesh(c))
    info = dict(ds.info)
    info.update(num_classes=ds.num_classes, union_size=int(len(union_idx)),
                heldout_ids=held.tolist())
    text = summary(lc_train, lc_test, budgets)
    return Problem(c, data, model, ctx, info, text)


def build_algorithm(ctx: Context):
    m = ctx.config.method
    if m == "fedavg":
        from framp_jax.algorithms.fedavg import fedavg
        return fedavg(ctx)
    if m == "local":
        from framp_jax.algorithms.fedavg import local_only
        return local_only(ctx)
    import importlib
    mod = importlib.import_module(f"framp_jax.algorithms.{m}")
    return getattr(mod, m)(ctx)


class TraceCounter:
    """Counts how often a function is traced (= compiled, for a jitted function)."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *a, **k):
        self.count += 1
        return self.fn(*a, **k)


def make_evaluator(alg, ctx: Context, eval_fns=None, at_budget=False):
    """A jitted ``evaluate(state, data, union_x, union_y) -> (local_acc[N], union_acc[N])``;
    with ``at_budget`` it takes a traced ``budget`` too and evaluates every client's model at that
    budget (``alg.eval_groups_at_budget``), one compile for all budgets."""
    c = ctx.config
    local_accuracy_, union_accuracy_ = eval_fns or (local_accuracy, union_accuracy)
    mean, std = ctx.local.mean, ctx.local.std
    chunk = c.eval_model_chunk or None

    def evaluate(state, data, ux, uy, budget=None):
        local = jnp.zeros((ctx.num_clients,), jnp.float32)
        union = jnp.zeros((ctx.num_clients,), jnp.float32)
        groups = (alg.eval_groups_at_budget(state, data, budget) if at_budget
                  else alg.eval_groups(state, data))
        for g in groups:
            ids = np.asarray(g.client_ids)
            if len(ids) == 0:
                continue
            tx = jax.tree.map(lambda a: a[ids], data.test_x)
            ty, tc = data.test_y[ids], data.test_count[ids]
            la = local_accuracy_(g.apply, g.params, tx, ty, tc, mean, std, c.eval_batch,
                                g.local_logits_fn, data.label_counts[ids], not g.per_client)
            if g.per_client:
                ua = union_accuracy_(g.apply, g.params, ux, uy, mean, std, c.eval_batch, chunk)
            else:
                single = jax.tree.map(lambda a: a[None], g.params)
                ua = jnp.broadcast_to(union_accuracy_(g.apply, single, ux, uy, mean, std,
                                                     c.eval_batch)[0], (len(ids),))
            local = local.at[ids].set(la)
            union = union.at[ids].set(ua)
        return local, union

    return jax.jit(evaluate)


def union_subset(c, data: FedData):
    if not c.union_subset:
        return data.union_x, data.union_y
    n = data.union_x.shape[0]
    if c.union_subset >= n:
        return data.union_x, data.union_y
    k = (c.union_subset // c.eval_batch) * c.eval_batch or c.eval_batch
    idx = np.sort(np.random.default_rng(c.seed).permutation(n)[:k])
    return data.union_x[idx], data.union_y[idx]


def eval_metrics(c, ctx, local, union):
    local, union = np.asarray(local), np.asarray(union)
    held = set(np.concatenate(C.heldout_ids(c)).tolist()) if c.heldout_frac > 0 else set()
    tr = np.array([i not in held for i in range(c.num_clients)])
    levels = _levels_ok(c)
    out = summarize(ctx.budgets[tr], local[tr], union[tr], levels)
    if held:
        un = summarize(ctx.budgets[~tr], local[~tr], union[~tr], levels)
        out.update({f"unseen/{k}": v for k, v in un.items()})
    return out


def _is_finite_state(state):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.floating))


def run(c, workdir: str, resume: bool = False, progress: bool = True, log=print) -> dict:
    """Train ``c`` writing the DESIGN run directory into ``workdir``; returns results.json."""
    from framp_jax.checkpoint import CheckpointManager
    from framp_jax import distributed as dist
    from framp_jax.rundir import EventWriter, MetricsCSV, plot_budget_accuracy, write_json_atomic

    C.validate(c)
    dist.check_config(c)
    writer = dist.is_writer()  # several processes: only process 0 writes the run directory
    if not writer:
        log, progress = (lambda *a, **k: None), False
    os.makedirs(workdir, exist_ok=True)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints)
    if not resume and ckpt.latest_round() is not None:
        raise FileExistsError(
            f"{workdir} already holds checkpoints (latest round {ckpt.latest_round()}); pass "
            "--resume to continue that run or choose a new --workdir")
    t_setup = time.time()
    prob = build_problem(c)
    log(prob.summary)
    alg = build_algorithm(prob.ctx)
    resolved = json.loads(c.to_json_best_effort())
    resolved["_resolved"] = {"data": prob.info, "jax": jax.__version__, "backend": jax.default_backend(),
                             "devices": len(jax.devices()), "python": platform.python_version(),
                             "config_hash": config_hash(c)}

    round_counter = TraceCounter(alg.round)
    mesh = prob.ctx.mesh
    # On a mesh the round returns its state replicated over the devices; pinning that placement
    # (here and for the first round's input below) keeps one trace/compile for every round.
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    round_fn = jax.jit(round_counter, donate_argnums=(0,),
                       **({} if replicated is None else {"out_shardings": replicated}))
    evaluate = make_evaluator(alg, prob.ctx, prob.eval_fns)
    data = prob.data

    state = alg.init(jax.random.key(c.seed), data)
    multi = dist.is_multi_process()
    if multi:  # onto the mesh over all processes first; a checkpoint restores straight onto it
        state, data = dist.place_replicated((state, data), mesh)
    start, wall_before, history = 0, 0.0, []
    metrics_csv = (MetricsCSV(os.path.join(workdir, "metrics.csv"), resume=resume) if writer
                   else dist.NULL_WRITER)
    if resume and ckpt.latest_round() is not None:
        state, extra = ckpt.restore(target=state, expected_config_hash=config_hash(c))
        start = int(extra["round"])
        wall_before = float(extra.get("wall_s", 0.0))
        history = list(extra.get("history", []))
        metrics_csv.truncate_after(start)
        log(f"resumed from round {start}")
    if replicated is not None and not multi:  # placed once, not transferred every round
        state, data = jax.device_put((state, data), replicated)
    ux_sub, uy_sub = union_subset(c, data)
    # written once a resume has passed the checkpoint's config check, so a refused --resume
    # leaves the workdir's config.json describing the run its checkpoints belong to
    if writer:
        write_json_atomic(os.path.join(workdir, "config.json"), resolved)
    tb = EventWriter(os.path.join(workdir, "tb")) if writer else dist.NULL_WRITER

    def do_eval(t, full):
        ux, uy = (data.union_x, data.union_y) if full else (ux_sub, uy_sub)
        la, ua = dist.to_host(evaluate(state, data, ux, uy))
        m = eval_metrics(c, prob.ctx, la, ua)
        m["union_samples"] = int(jnp.sum(uy >= 0))
        return m

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=c.rounds, initial=start, desc=c.method, file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
    t0 = time.time()
    last = {}
    for t in range(start, c.rounds):
        state, m = round_fn(state, data, jnp.int32(t))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not np.isfinite(m["train_loss"]):
            raise NonFiniteError(
                f"round {t + 1}: every participating client returned a NaN/Inf loss or update "
                f"({int(m['nan_clients'])} clients); lower config.lr (now {c.lr}) or set "
                "config.grad_clip. The last good checkpoint is kept in the workdir.")
        rnd = t + 1
        is_last = rnd == c.rounds
        if rnd % c.eval_every == 0 or is_last:
            if not _is_finite_state(state):
                raise NonFiniteError(f"round {rnd}: the server state holds NaN/Inf values")
            ev = do_eval(t, full=is_last)
            row = {"round": rnd, **m, **ev, "wall_s": wall_before + time.time() - t0}
            metrics_csv.append(row)
            tb.scalars({k: v for k, v in row.items() if k != "round"}, rnd)
            tb.flush()
            history.append({"round": rnd, **ev})
            last = ev
        if bar is not None:
            bar.set_postfix(loss=f"{m['train_loss']:.3f}",
                            local=f"{last.get('local/mean', float('nan')):.3f}",
                            union=f"{last.get('union/mean', float('nan')):.3f}", refresh=False)
            bar.update(1)
        if rnd % c.checkpoint_every == 0 and not is_last:
            ckpt.save(rnd, state, {"round": rnd, "wall_s": wall_before + time.time() - t0,
                                   "history": history, "config_hash": config_hash(c)})
    if bar is not None:
        bar.close()
    wall = wall_before + time.time() - t0
    ckpt.save(c.rounds, state, {"round": c.rounds, "wall_s": wall, "history": history,
                                "config_hash": config_hash(c)})
    ckpt.wait()
    tb.close()
    results = make_results(c, history, wall, round_counter.count, prob, time.time() - t_setup - wall + wall_before)
    sweep = budget_sweep(c, alg, prob._replace(data=data) if multi else prob, state)
    if sweep:
        results["unseen_budgets"] = sweep
    if writer:
        write_json_atomic(os.path.join(workdir, "results.json"), results)
        plot_budget_accuracy(history, os.path.join(workdir, "accuracy.png"),
                             title=f"{c.method} on {c.dataset} (seed {c.seed})")
    return results


def budget_sweep(c, alg, prob, state):
    """Every trained client's model at budgets never used in training (SPEC §1.10), zero-shot:
    mean Local and Union accuracy over the trained clients per budget."""
    budgets = tuple(c.framp.unseen_budgets) if c.method == "framp" else ()
    if alg.eval_groups_at_budget is None or not budgets:
        return {}
    from framp_jax.distributed import to_host
    from framp_jax.eval import budget_label
    held = np.concatenate(C.heldout_ids(c)) if c.heldout_frac > 0 else np.zeros((0,), int)
    tr = np.setdiff1d(np.arange(c.num_clients), held)
    out = {}
    evaluate = make_evaluator(alg, prob.ctx, prob.eval_fns, at_budget=True)
    for b in budgets:
        la, ua = to_host(evaluate(state, prob.data, prob.data.union_x, prob.data.union_y,
                                  jnp.float32(b)))
        out[budget_label(b)] = {"local": float(np.nanmean(np.asarray(la)[tr])),
                                "union": float(np.mean(np.asarray(ua)[tr]))}
    return out


def make_results(c, history, wall, compiles, prob, setup_s=0.0):
    lastk = history[-c.eval_last:] if history else []
    keys = sorted({k for h in lastk for k in h if k != "round"})
    mean_last = {k: float(np.mean([h[k] for h in lastk if k in h])) for k in keys}
    final = {}
    for split in ("local", "union", "unseen/local", "unseen/union"):
        d = {k[len(split) + 1:]: v for k, v in mean_last.items() if k.startswith(split + "/")}
        if d:
            final[split] = d
    return {"method": c.method, "dataset": str(c.dataset), "dataset_info": prob.info,
            "seed": c.seed, "rounds": c.rounds, "final": final,
            "final_statistic": f"mean of the last {len(lastk)} evaluation(s), rounds "
                               f"{[h['round'] for h in lastk]}; the last one on the full union set",
            "wall_s": wall, "setup_s": setup_s, "compiles": compiles,
            "backend": jax.default_backend()}
