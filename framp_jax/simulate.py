"""The federated simulation: data on the device, one jitted call per round, evaluation,
run-directory output and checkpoints. ``run(config, workdir)`` is what the CLI calls."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import config as C
from framp_jax.errors import CheckpointError, DivergenceError, WorkdirExistsError
from framp_jax.eval import budget_sweep, eval_metrics, make_evaluator, union_subset
from framp_jax.problem import build_algorithm, build_problem


class NonFiniteError(DivergenceError):
    """Training produced NaN/Inf (every client of a round failed, or the server state did), or
    its loss exploded past ``config.max_loss_ratio``."""


def hashed_config(c) -> dict:
    """The config fields a run's checkpoints are tied to (``c`` a ConfigDict or the dict of a
    config.json): all but those that may change between a run and its resumption."""
    d = json.loads(c.to_json_best_effort()) if hasattr(c, "to_json_best_effort") else dict(c)
    d.pop("_resolved", None)  # config.json's record of the data and the machine
    if str(d.get("dataset")) in C.GRAPH_DATASETS:
        d.pop("val_frac", None)  # graphs use their validation nodes: the field does nothing
    for k in ("rounds", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_last",
              "data_dir", "union_subset", "eval_model_chunk", "mesh_clients", "conv_impl",
              "max_loss_ratio"):
        d.pop(k, None)  # fields that may change between a run and its resumption
    for path, default in HASH_STABLE_DEFAULTS.items():  # fields added after runs were made:
        *parents, leaf = path.split(".")                  # at their default they are left out,
        node = d                                          # so earlier runs keep their hash
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and _same(node[leaf], default):
            node.pop(leaf)
    return d


# Config fields added after results and checkpoints existed, with the default that leaves a
# run's computation unchanged: hashed_config drops them at that value.
HASH_STABLE_DEFAULTS = {
    "compute_dtype": "float32",
    "val_frac": 0.0,
    "diagnostics": False,
    "record_mask_reuse": False,
    "framp.hn_steps": 1,
    "framp.base": "none",
    "framp.base_lr": 1.0,
    "framp.residual_scale": 0.1,
    "framp.residual_head": True,
    "framp.hist_smoothing": 0.0,
    "framp.descriptor_control": "none",
    "framp.gen_init": "he",
    "framp.head_in_topk": True,
}


def _with_stable_defaults(d: dict) -> dict:
    """``d`` (a :func:`hashed_config`) with the :data:`HASH_STABLE_DEFAULTS` it leaves out put
    back, so that a changed field reads ``float32 -> bfloat16``, not ``(unset) -> bfloat16``."""
    import copy
    d = copy.deepcopy(d)
    for path, default in HASH_STABLE_DEFAULTS.items():
        *parents, leaf = path.split(".")
        node = d
        for k in parents:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = default
    return d


def _same(value, default) -> bool:
    return type(value) is type(default) and value == default


def config_hash(c) -> str:
    return hashlib.sha256(json.dumps(hashed_config(c), sort_keys=True).encode()).hexdigest()[:16]


class TraceCounter:
    """Counts how often a function is traced (= compiled, for a jitted function)."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *a, **k):
        self.count += 1
        return self.fn(*a, **k)


def _kept_checkpoint(ckpt) -> str:
    """What a stopped run leaves to resume from: the newest checkpoint on disk, or none."""
    rounds = ckpt.all_rounds()
    if not rounds:
        return (f"no checkpoint was written before this round, so there is none to resume from "
                f"(checkpoints are saved every checkpoint_every rounds to {ckpt.directory})")
    return (f"the latest checkpoint, round {rounds[-1]} ({ckpt.step_dir(rounds[-1])}), is kept "
            "(resuming it needs the same config)")


def _is_finite_state(state):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state)
               if jnp.issubdtype(x.dtype, jnp.floating))


def run(c, workdir: str, resume: bool = False, progress: bool = True, log=print,
        warn=None) -> dict:
    """Train ``c`` writing the DESIGN run directory into ``workdir``; returns results.json.

    The config is validated first, then ``workdir`` is locked for the whole run
    (:class:`~framp_jax.rundir.WorkdirLock`: a second run on it is refused, naming this one's
    pid and host), then its checkpoints are checked against ``resume`` and the config, all
    before any data loads. ``log`` gets progress lines, ``warn`` (default: stderr) one line per
    warning (clients left out of a round for NaN/Inf, a corrupt checkpoint skipped). Expected
    failures raise :class:`~framp_jax.errors.FrampError` subclasses with one-line messages.
    """
    from framp_jax import distributed as dist
    from framp_jax.rundir import WorkdirLock

    from framp_jax.data.locate import check_data_env
    C.validate(c)
    check_data_env()  # an explicitly set $FRAMP_DATA_DIR that does not exist
    if resume and not _has_checkpoint_dirs(workdir):  # before the lock creates the workdir
        from framp_jax.rundir import LOCK_NAME
        if dist.is_writer() and os.path.exists(os.path.join(workdir, LOCK_NAME)):
            WorkdirLock(workdir).acquire().release()  # a run still starting there is named
        raise CheckpointError(_nothing_to_resume(c, workdir))
    lock = WorkdirLock(workdir).acquire() if dist.is_writer() else None
    closers = []  # what _run opened (progress bar, checkpoint manager), closed on any exit
    where = {}  # the last round trained, for the message of an interrupted run
    try:
        return _run(c, workdir, resume, progress, log, warn, closers, where)
    except KeyboardInterrupt as e:  # Ctrl-C: where it stopped and how to go on, in one line
        if isinstance(e, RunInterrupted):
            raise
        raise RunInterrupted(_interrupted_message(c, workdir, where.get("round"))) from e
    finally:
        close_all(closers)
        if lock is not None:
            lock.release()


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped a run; the message says at which round and how to go on."""


def _interrupted_message(c, workdir, done) -> str:
    from framp_jax.checkpoint import saved_rounds
    ckdir = os.path.join(workdir, "checkpoints")
    rounds = saved_rounds(ckdir)
    if done is None:
        head = "stopped before the first round (while loading the data or compiling)"
    else:
        head = f"stopped at round {done} of {c.rounds}"
    if rounds:
        again = ""
        if done is not None and done > rounds[-1]:
            again = (f" (round {done} is trained again)" if done == rounds[-1] + 1 else
                     f" (rounds {rounds[-1] + 1}-{done} are trained again)")
        return (f"{head}; continue with --resume from the latest checkpoint, round {rounds[-1]} "
                f"({os.path.join(ckdir, str(rounds[-1]))}){again}")
    return (f"{head}, before the first checkpoint (one is saved every checkpoint_every="
            f"{c.checkpoint_every} rounds): there is nothing to resume; start the run again "
            "without --resume")


def close_all(closers) -> None:
    """Call ``closers`` in reverse order; an error on the way out must not mask the first."""
    for close in reversed(closers):
        try:
            close()
        except Exception:  # noqa: BLE001
            pass


def _has_checkpoint_dirs(workdir) -> bool:
    from framp_jax.checkpoint import saved_rounds
    return bool(saved_rounds(os.path.join(workdir, "checkpoints")))


def _nothing_to_resume(c, workdir) -> str:
    return (f"nothing to resume in {workdir}: it holds no checkpoint (a run saves one every "
            f"checkpoint_every={c.checkpoint_every} rounds and at its end); start without "
            "--resume")


def data_identity(info) -> dict | None:
    """The data a run trains on, as checkpoints and config.json record it: ``{"file",
    "sha256"}`` of the loaded data's info (``sha256`` a ``{file: digest}`` dict for a raw
    directory such as ogbn_arxiv's, None for tfds); None when the info names no file."""
    if not isinstance(info, dict) or not info.get("file"):
        return None
    return {"file": str(info["file"]), "sha256": info.get("sha256")}


def expected_data_identity(c) -> dict | None:
    """:func:`data_identity` of the file the config ``c`` would load now (its data_dir,
    ``$FRAMP_DATA_DIR``, the files present), found and hashed without loading it; None where
    that cannot be told before loading (tfds, no file found: loading reports it)."""
    from framp_jax.data.locate import sha256_file
    ds, data_dir = str(c.dataset), (c.data_dir or None)
    try:
        if ds in C.GRAPH_DATASETS:
            from framp_jax.data.graphs import OGB_RAW_FILES, find_graph_file
            path = find_graph_file(ds, data_dir)
            if path is None:
                return None
            sha = ({f: sha256_file(path / f) for f in OGB_RAW_FILES} if path.is_dir()
                   else sha256_file(path))
        else:
            from framp_jax.data.vision import find_vision_file
            path = find_vision_file(ds, data_dir)
            if path is None:
                return None
            sha = sha256_file(path)
    except (OSError, ValueError):  # unreadable: loading says what is wrong with it
        return None
    return {"file": str(path), "sha256": sha}


def same_data(a: dict, b: dict) -> bool:
    """Whether two :func:`data_identity` records are the same data: the same sha256 where both
    have one (a copy of the file elsewhere is the same data), else the same file."""
    if a.get("sha256") is not None and b.get("sha256") is not None:
        return a["sha256"] == b["sha256"]
    return str(a.get("file")) == str(b.get("file"))


def _recorded_data(workdir, extra) -> dict | None:
    """The data a checkpoint was trained on: its own record (``extra["data"]``), else (older
    checkpoints) the workdir's config.json, which records the data of the run's last start."""
    rec = data_identity(extra.get("data"))
    if rec is not None:
        return rec
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            resolved = json.load(f).get("_resolved") or {}
        return data_identity(resolved.get("data"))
    except (OSError, ValueError, AttributeError):
        return None


def _digest_text(d: dict) -> str:
    sha = d.get("sha256")
    if isinstance(sha, str):
        return f"sha256 {sha[:16]}"
    if isinstance(sha, dict):
        return "sha256 " + ", ".join(f"{k} {str(v)[:16]}" for k, v in sorted(sha.items()))
    return "no sha256 recorded"


def _data_changed(workdir, r, old: dict, new: dict, verb: str) -> Exception:
    from framp_jax.checkpoint import CheckpointMismatchError
    return CheckpointMismatchError(
        f"cannot resume {workdir}: its checkpoint of round {r} was trained on {old['file']} "
        f"({_digest_text(old)}) but this run {verb} {new['file']} ({_digest_text(new)}); a run "
        f"goes on with the data it started with: make {old['file']} the file found again "
        "(--config.data_dir, FRAMP_DATA_DIR), or " + _fresh_start_advice() + " (nothing was "
        "changed)")


def _fresh_start_advice() -> str:
    from framp_jax.errors import fresh_start_advice
    return fresh_start_advice()


def check_checkpoints(c, workdir, ckpt, resume: bool):
    """What the workdir's checkpoints allow, decided from the config alone (no data loaded):
    a fresh run needs a workdir without checkpoints; ``resume`` needs a checkpoint, none past
    ``c.rounds`` (resuming a shorter run would relabel a later state and delete its
    checkpoint), and the config the checkpoints were written with (the fields that changed are
    listed), and the data they were trained on (the file this config would load now, hashed
    but not loaded, must have the sha256 they record). Nothing is modified. Returns ``(round,
    data record)`` of the checkpoint checked when it records its data (for the check after
    loading, :func:`_run`), else None."""
    from framp_jax.checkpoint import CheckpointMismatchError, CorruptCheckpointError
    from framp_jax.rundir import config_diff
    rounds = ckpt.all_rounds()
    if not resume:
        if rounds:
            raise WorkdirExistsError(
                f"{workdir} already holds checkpoints (latest round {rounds[-1]}); pass "
                "--resume to continue that run or choose a new --workdir")
        return
    if not rounds:
        raise CheckpointError(_nothing_to_resume(c, workdir))
    if rounds[-1] > c.rounds:
        raise CheckpointError(
            f"cannot resume {workdir} with config.rounds={c.rounds}: it holds a checkpoint of "
            f"round {rounds[-1]} (checkpoints {rounds}), past the end of this run; resume with "
            f"--config.rounds={rounds[-1]} or more, or use a new --workdir (nothing was changed)")
    for r in reversed(rounds):  # the newest checkpoint whose metadata reads back
        try:
            extra = ckpt.restore_extra(r)
        except CorruptCheckpointError:
            continue
        stored, now = extra.get("config_hash"), config_hash(c)
        if stored is None or str(stored) == now:
            recorded = _recorded_data(workdir, extra)
            if recorded is None:
                return None
            found = expected_data_identity(c)
            if found is not None and not same_data(recorded, found):
                raise _data_changed(workdir, r, recorded, found, "would load")
            return r, recorded
        old = extra.get("config")
        if old is None:  # checkpoints without their config: the workdir's config.json
            try:
                with open(os.path.join(workdir, "config.json")) as f:
                    old = hashed_config(json.load(f))
            except (OSError, ValueError):
                old = None
        changed = (config_diff(_with_stable_defaults(old), _with_stable_defaults(hashed_config(c)))
                   if old is not None else [])
        raise CheckpointMismatchError(
            f"cannot resume {workdir}: its checkpoint of round {r} was written with a different "
            f"config; changed: {'; '.join(changed) or f'config hash {stored} -> {now}'}; resume "
            "with the original values, or " + _fresh_start_advice())


def _run(c, workdir: str, resume: bool, progress: bool, log, warn, closers, where=None) -> dict:
    from framp_jax.checkpoint import CheckpointManager
    from framp_jax import distributed as dist
    from framp_jax.rundir import EventWriter, MetricsCSV, plot_budget_accuracy, write_json_atomic

    C.validate(c)
    dist.check_config(c)
    writer = dist.is_writer()  # several processes: only process 0 writes the run directory
    if not writer:
        log, progress, warn = (lambda *a, **k: None), False, (lambda *a, **k: None)
    bar = None

    def warn_(msg):
        if warn is not None:
            return warn(msg)
        line = f"framp-jax: warning: {msg}"
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    os.makedirs(workdir, exist_ok=True)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints)
    closers.append(ckpt.close)
    trained_on = check_checkpoints(c, workdir, ckpt, resume)  # before any data loads
    t_setup = time.time()
    prob = build_problem(c)
    data_id = data_identity(prob.info)  # recorded in every checkpoint
    if trained_on is not None and data_id is not None and not same_data(trained_on[1], data_id):
        # what was loaded (e.g. tfds, or a file changed since the check): before anything is
        # written or compiled
        raise _data_changed(workdir, trained_on[0], trained_on[1], data_id, "loaded")
    log(prob.summary)
    note = union_note(c, prob.info)
    if note:
        log(note)
    alg = build_algorithm(prob.ctx, c)
    resolved = json.loads(c.to_json_best_effort())
    resolved["_resolved"] = {"data": prob.info, "jax": jax.__version__, "backend": jax.default_backend(),
                             "devices": len(jax.devices()), "python": platform.python_version(),
                             "config_hash": config_hash(c)}
    from framp_jax.report import source_commit
    resolved["_resolved"]["framp_jax_commit"] = source_commit()  # git HEAD (+dirty) or unknown

    round_counter = TraceCounter(alg.round)
    mesh = prob.ctx.mesh
    # On a mesh the round returns its state replicated over the devices; pinning that placement
    # (here and for the first round's input below) keeps one trace/compile for every round.
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    round_fn = jax.jit(round_counter, donate_argnums=(0,),
                       **({} if replicated is None else {"out_shardings": replicated}))
    evaluate = make_evaluator(alg, prob.ctx, c.eval_batch, c.eval_model_chunk, with_masked=True)
    diagnose = None
    if c.get("diagnostics", False):  # diag/ metrics at every evaluation (framp_jax/diagnostics.py)
        from framp_jax.diagnostics import make_diagnostics
        diagnose = make_diagnostics(alg, prob.ctx, c.eval_batch, c.eval_model_chunk)
    data = prob.data
    reuse = None
    if c.get("record_mask_reuse", False):  # before anything compiles (mask_reuse.py)
        if alg.round_masks is None:
            raise C.ConfigError(
                "record_mask_reuse", True,
                f"False for method={c.method!r} with these options: its algorithm has no "
                "round_masks hook (FIARSE and FRAMP with framp.extraction='topk' have one)")
        from framp_jax.mask_reuse import MaskReuse
        reuse = MaskReuse(alg, prob.ctx)

    state = alg.init(jax.random.key(c.seed), data)
    multi = dist.is_multi_process()
    if multi:  # onto the mesh over all processes first; a checkpoint restores straight onto it
        state, data = dist.place_replicated((state, data), mesh)
    start, wall_before, history = 0, 0.0, []
    metrics_csv = (MetricsCSV(os.path.join(workdir, "metrics.csv"), resume=resume) if writer
                   else dist.NULL_WRITER)
    excluded = {}  # round -> clients left out of the aggregate for a NaN/Inf loss or update
    if resume and ckpt.latest_round() is not None:
        state, extra = ckpt.restore_latest_intact(target=state, expected_config_hash=config_hash(c),
                                                  warn=warn_)
        start = int(extra["round"])
        wall_before = float(extra.get("wall_s", 0.0))
        history = list(extra.get("history", []))
        excluded = {int(r): int(n) for r, n in extra.get("excluded_clients", {}).items()}
        metrics_csv.truncate_after(start)
        if reuse is not None:  # the counts of exactly the restored rounds, or a refusal
            reuse.restore(workdir, start)
        log(f"resumed from round {start}")
    if replicated is not None and not multi:  # placed once, not transferred every round
        state, data = jax.device_put((state, data), replicated)
    ux_sub, uy_sub = union_subset(c, data)
    # written once a resume has passed the checkpoint's config check, so a refused --resume
    # leaves the workdir's config.json describing the run its checkpoints belong to
    if writer:
        write_json_atomic(os.path.join(workdir, "config.json"), resolved)
    # TensorBoard: a resumed run's events replace those logged after its checkpoint (the purge
    # step), and a fresh run does not show the event files of a run that failed before its
    # first checkpoint (check_checkpoints refused a fresh run over any checkpoint)
    if writer and not resume:
        _remove_event_files(os.path.join(workdir, "tb"))
    tb = (EventWriter(os.path.join(workdir, "tb"), purge_step=start + 1 if start else None)
          if writer else dist.NULL_WRITER)
    closers.append(tb.close)  # what was logged is on disk after an error or Ctrl-C too

    final_clients = {}  # the last (full) evaluation's per-client accuracies, for results.json

    def do_eval(t, full):
        ux, uy = (data.union_x, data.union_y) if full else (ux_sub, uy_sub)
        la, lm, ua = dist.to_host(evaluate(state, data, ux, uy))
        if full:
            final_clients.update({k: [None if not np.isfinite(x) else float(x) for x in
                                      np.asarray(v)] for k, v in (("local", la), ("union", ua))})
        m = eval_metrics(c, prob.ctx, la, ua, lm)
        m["union_samples"] = int(jnp.sum(uy >= 0))
        val = data.validation()  # model selection reads these (val/ metrics), on every eval
        if val is not None:
            vl, vm, vu = dist.to_host(evaluate(state, val, val.union_x, val.union_y))
            m.update({f"val/{k}": v for k, v in eval_metrics(c, prob.ctx, vl, vu, vm).items()})
            m["val/union_samples"] = int(jnp.sum(val.union_y >= 0))
        if diagnose is not None:
            m.update(diagnose(state, data, ux, uy))  # host values (dist.to_host inside)
        return m

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=c.rounds, initial=start, desc=c.method, file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        closers.append(bar.close)  # on an error too, so the error starts on its own line
    t0 = time.time()
    where = {} if where is None else where
    where["round"] = start
    last = {}
    max_loss = c.max_loss_ratio * float(np.log(max(int(prob.ctx.num_classes), 2)))
    for t in range(start, c.rounds):
        if reuse is not None:  # the masks of round t, from the state before it
            reuse.add(state, data, jnp.int32(t))
        state, m = round_fn(state, data, jnp.int32(t))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        rnd = t + 1
        where["round"] = rnd
        if not np.isfinite(m["train_loss"]):
            raise NonFiniteError(
                f"round {rnd}: every participating client returned a NaN/Inf loss or update "
                f"({int(m.get('nan_clients', 0))} clients); lower config.lr (now {c.lr}) or set "
                f"config.grad_clip; {_kept_checkpoint(ckpt)}")
        if m.get("nan_clients", 0) > 0:
            excluded[rnd] = int(m["nan_clients"])
            warn_(f"round {rnd}: {excluded[rnd]} of {c.clients_per_round} clients returned a "
                  "NaN/Inf loss or update and were left out of the aggregate (metrics.csv column "
                  "excluded_clients); lower config.lr or set config.grad_clip if this recurs")
        if max_loss > 0 and m["train_loss"] > max_loss:
            raise NonFiniteError(
                f"round {rnd}: the mean training loss {m['train_loss']:.4g} exceeds "
                f"config.max_loss_ratio x ln(num_classes) = {c.max_loss_ratio:g} x "
                f"ln({prob.ctx.num_classes}) = {max_loss:.4g}: training diverges; lower "
                f"config.lr (now {c.lr}) or set config.grad_clip (0 = off), or set "
                f"config.max_loss_ratio=0 to go on regardless; {_kept_checkpoint(ckpt)}")
        is_last = rnd == c.rounds
        if rnd % c.eval_every == 0 or is_last:
            if not _is_finite_state(state):
                raise NonFiniteError(f"round {rnd}: the server state holds NaN/Inf values; lower "
                                     f"config.lr (now {c.lr}) or set config.grad_clip; "
                                     f"{_kept_checkpoint(ckpt)}")
            ev = do_eval(t, full=is_last)
            since = history[-1]["round"] if history else 0
            m["excluded_clients"] = sum(n for r, n in excluded.items() if since < r <= rnd)
            row = {"round": rnd, **m, **ev, "wall_s": wall_before + time.time() - t0}
            metrics_csv.append(row)
            tb.scalars({k: v for k, v in row.items() if k != "round"}, rnd)
            tb.flush()
            history.append({"round": rnd, **ev})
            last = ev
        if bar is not None:
            bar.set_postfix(loss=f"{m['train_loss']:.3f}",
                            local=f"{last.get('local/mean', float('nan')):.3f}",
                            union=f"{last.get('union/mean', float('nan')):.3f}",
                            excluded=sum(excluded.values()), refresh=False)
            bar.update(1)
        if rnd % c.checkpoint_every == 0 and not is_last:
            ckpt.save(rnd, state, {"round": rnd, "wall_s": wall_before + time.time() - t0,
                                   "history": history, "config_hash": config_hash(c),
                                   "config": hashed_config(c), "excluded_clients": excluded,
                                   "data": data_id})
            if reuse is not None:
                reuse.save(workdir, rnd, write=writer)
    if bar is not None:
        bar.close()
    wall = wall_before + time.time() - t0
    if start < c.rounds:  # resumed from the final checkpoint: it is already on disk
        ckpt.save(c.rounds, state, {"round": c.rounds, "wall_s": wall, "history": history,
                                    "config_hash": config_hash(c), "config": hashed_config(c),
                                    "excluded_clients": excluded, "data": data_id})
    if reuse is not None:
        reuse.save(workdir, c.rounds, write=writer)
    ckpt.wait()
    tb.close()
    results = make_results(c, history, wall, round_counter.count, prob, time.time() - t_setup - wall + wall_before)
    results["excluded_clients"] = {"total": int(sum(excluded.values())),
                                   "by_round": {str(r): n for r, n in sorted(excluded.items())}}
    if reuse is not None:  # the accumulator's traces (one per compilation, like "compiles")
        results["mask_reuse"] = {"file": "mask_reuse.npz", "compiles": reuse.compiles}
    if final_clients:  # client i's budget and accuracies at the last evaluation (round c.rounds)
        results["per_client"] = {"round": c.rounds, "budget": np.asarray(prob.ctx.budgets).tolist(),
                                 "heldout": [int(i) for ids in C.heldout_ids(c) for i in ids],
                                 **final_clients}
    sweep = budget_sweep(c, alg, prob._replace(data=data) if multi else prob, state)
    if sweep:
        results["unseen_budgets"] = sweep
    if writer:
        write_json_atomic(os.path.join(workdir, "results.json"), results)
        plot_budget_accuracy(history, os.path.join(workdir, "accuracy.png"),
                             title=f"{c.method} on {c.dataset} (seed {c.seed})")
    return results


def union_note(c, info) -> str | None:
    """A line when the union set (the clients' test splits together) is not the whole test
    set, as when the test samples do not divide among the clients."""
    union, total = info.get("union_size", 0), info.get("test_size", 0)
    if not 0 < union < total:
        return None
    return (f"note: Union is measured on the {union} of {total} test samples that the "
            f"{c.num_clients} clients' test splits hold (partition={c.partition} leaves "
            f"{total - union} out)")


def _remove_event_files(tb_dir: str) -> None:
    import glob
    for f in glob.glob(os.path.join(glob.escape(tb_dir), "events.out.tfevents.*")):
        try:
            os.remove(f)
        except FileNotFoundError:
            pass


def make_results(c, history, wall, compiles, prob, setup_s=0.0):
    lastk = history[-c.eval_last:] if history else []
    keys = sorted({k for h in lastk for k in h if k != "round"})
    mean_last = {k: float(np.mean([h[k] for h in lastk if k in h])) for k in keys}
    final = {}
    for split in ("local", "union", "local_masked", "unseen/local", "unseen/union",
                  "unseen/local_masked", "val/local", "val/union", "val/local_masked",
                  "val/unseen/local", "val/unseen/union", "val/unseen/local_masked"):
        d = {k[len(split) + 1:]: v for k, v in mean_last.items() if k.startswith(split + "/")}
        if d:
            final[split] = d
    return {"method": c.method, "dataset": str(c.dataset), "dataset_info": prob.info,
            "seed": c.seed, "rounds": c.rounds, "final": final,
            "final_statistic": f"mean of the last {len(lastk)} evaluation(s), rounds "
                               f"{[h['round'] for h in lastk]}; the last one on the full union set",
            "wall_s": wall, "setup_s": setup_s, "compiles": compiles,
            "backend": jax.default_backend()}
