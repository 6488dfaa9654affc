"""Sweeps: many ``framp-jax train`` runs from one sweep file, resumable after any interruption.

``framp-jax sweep --sweep experiments/sweeps/NAME.py --workdir runs/NAME [--jobs N]``

A sweep file is a Python file with ``get_sweep()`` returning a list of :class:`Run` (a name, a
preset file and ``--config.KEY=VALUE`` overrides), usually built with :func:`grid` (every
variant x every seed) and :func:`ablations` (one change at a time from a base). Preset paths are
relative to the sweep file::

    from framp_jax.sweep import grid

    def get_sweep():
        return grid({"fedavg": "../configs/fedavg_cifar10_cpu.py",
                     "framp_width": ("../configs/framp_cifar10_cpu.py",
                                     {"framp.extraction": "width"})},
                    seeds=(0, 1, 2))

Every run's resolved config is validated before the first run starts (a bad entry stops the
sweep with one line naming the run and the field). Each run is its own run directory
``<workdir>/<name>``, trained by a ``python -m framp_jax.cli train`` subprocess (its output in
``<name>/train.log``). The state of the sweep is read from those directories each time, so
re-running the same command after an interruption (even ``kill -9``) continues where it stopped:

- finished (``results.json`` of the same config hash and rounds): skipped;
- checkpoints present: resumed (``--resume``);
- failed: ``<name>/error.txt`` holds the error, ``<workdir>/status.tsv`` a line, and the sweep
  goes on (the next invocation tries the run again).

``<workdir>/sweep.json`` records the sweep (runs, overrides, config hashes, commands).

``--only PATTERN[,PATTERN...]`` (shell-style globs on run names, e.g. ``--only 'fedavg_*,framp_seed0'``)
trains only the runs it matches, first, in the sweep's order; the others are left untouched for a
later invocation. A pattern that matches no run is an error that lists the sweep's run names.
``--status`` prints each run's state (finished / running / partial, with its latest checkpoint /
failed, with its last error / new / other) and changes nothing.

``--shard I/N`` (or ``auto``: SLURM's job array, or FRAMP_SHARD_INDEX / FRAMP_SHARD_COUNT)
trains a deterministic, disjoint share of the sweep's runs, so N processes (one per machine of
a job array, sharing the workdir's file system) share one sweep; ``--jobs N`` gives each
training process its share of an accelerator's memory. See :mod:`framp_jax.shard` and
docs/SCALE.md.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from framp_jax.errors import FrampError

__all__ = ["Run", "grid", "ablations", "before_validation", "BEFORE_VALIDATION", "sibling_module", "load_sweep", "resolve", "run_sweep", "SweepError",
           "select_runs", "sweep_status", "format_status",
           "run_state", "format_override"]

SWEEP_JSON = "sweep.json"
STATUS_TSV = "status.tsv"
ERROR_TXT = "error.txt"
TRAIN_LOG = "train.log"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


class SweepError(FrampError, ValueError):
    """A sweep file or one of its runs is not usable (named in the message)."""


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its directory name, preset file and config overrides."""
    name: str
    preset: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _variant(spec) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    preset, overrides = spec
    return preset, dict(overrides)


def grid(variants: Mapping[str, Any], seeds: Sequence[int] = (0, 1, 2),
         axes: Mapping[str, Sequence[Any]] | None = None, common: Mapping[str, Any] | None = None
         ) -> list[Run]:
    """Every variant x every seed (x every combination of ``axes``).

    ``variants`` maps a name to a preset path or to ``(preset path, {overrides})``; ``axes`` maps
    config keys to the values to try (cartesian product); ``common`` overrides apply to all.
    Run names: ``<variant>[_<key><value>...]_seed<s>`` (the key's last dotted part)."""
    axes = dict(axes or {})
    out = []
    for vname, spec in variants.items():
        preset, ov = _variant(spec)
        for combo in itertools.product(*axes.values()):
            extra = dict(zip(axes, combo))
            suffix = "".join(f"_{k.rsplit('.', 1)[-1]}{_name_value(v)}" for k, v in extra.items())
            for s in seeds:
                out.append(Run(f"{vname}{suffix}_seed{s}", preset,
                               {**(common or {}), **ov, **extra, "seed": s}))
    return out


# The run fields of every sweep made before the fair-comparison protocol (results/sweeps/FAIR.md):
# no validation split, one graph split for every seed. Sweep files of those studies apply it
# (:func:`before_validation`) so that their finished runs keep their config hash.
BEFORE_VALIDATION = {"val_frac": 0.0, "graph_split_seed": 123}


def before_validation(runs: Sequence[Run]) -> list[Run]:
    """``runs`` with :data:`BEFORE_VALIDATION` under their own overrides."""
    return [dataclasses.replace(r, overrides={**BEFORE_VALIDATION, **r.overrides}) for r in runs]


def ablations(name: str, preset: str, changes: Mapping[str, Mapping[str, Any]],
              seeds: Sequence[int] = (0, 1, 2), base: Mapping[str, Any] | None = None
              ) -> list[Run]:
    """One-at-a-time ablations: the base (``preset`` + ``base`` overrides) and, for each
    ``label -> {overrides}`` of ``changes``, the base with only that change; every one per seed.
    Run names: ``<name>_seed<s>`` and ``<name>_<label>_seed<s>``."""
    variants = {name: (preset, dict(base or {}))}
    for label, ov in changes.items():
        variants[f"{name}_{label}"] = (preset, {**(base or {}), **ov})
    return grid(variants, seeds)


def sibling_module(anchor_file: str, filename: str):
    """The module of the file ``filename`` in the directory of ``anchor_file`` (sweep files
    share variant lists this way; they are loaded by path, not imported)."""
    path = os.path.join(os.path.dirname(os.path.abspath(anchor_file)), filename)
    spec = importlib.util.spec_from_file_location(
        "framp_sweep_" + re.sub(r"\W", "_", os.path.splitext(filename)[0]), path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _name_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "-".join(_name_value(x) for x in v)
    return str(v)


# ---------------------------------------------------------------------------------------------
# Loading and resolving
# ---------------------------------------------------------------------------------------------


def load_sweep(path: str) -> list[Run]:
    """The runs of a sweep file, preset paths made absolute (relative to the sweep file)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise SweepError(f"sweep file {path} does not exist")
    spec = importlib.util.spec_from_file_location(
        "framp_sweep_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0]), path)
    mod = importlib.util.module_from_spec(spec)
    _exec_file(spec, mod, f"sweep file {path}")
    if not hasattr(mod, "get_sweep"):
        raise SweepError(f"sweep file {path} defines no get_sweep() (it must return a list of "
                         "framp_jax.sweep.Run)")
    try:
        runs = list(mod.get_sweep())
    except FrampError:  # the sweep file's own one-line refusal (e.g. a missing selection)
        raise
    except Exception as e:  # noqa: BLE001 - whatever the sweep file's code raises
        raise SweepError(f"sweep file {path}: get_sweep() raised {_one_line(e)}") from e
    if not runs:
        raise SweepError(f"sweep file {path}: get_sweep() returned no runs")
    here = os.path.dirname(path)
    out, seen = [], set()
    for r in runs:
        if not isinstance(r, Run):
            raise SweepError(f"sweep file {path}: get_sweep() returned {r!r}; each entry must be "
                             "a framp_jax.sweep.Run")
        if not _NAME_OK.match(r.name):
            raise SweepError(f"sweep run {r.name!r}: a run name must be a plain directory name "
                             "(letters, digits and . _ + = -)")
        if r.name in seen:
            raise SweepError(f"sweep run {r.name!r}: the name is used twice in {path}")
        seen.add(r.name)
        out.append(Run(r.name, os.path.normpath(os.path.join(here, r.preset)), dict(r.overrides)))
    return out


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _exec_file(spec, mod, what: str) -> None:
    """Runs a sweep or preset file; a syntax error or an exception of its code is one
    :class:`SweepError` line naming ``what``."""
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise SweepError(f"{what} has a syntax error at line {e.lineno}: {e.msg}") from e
    except FrampError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"{what} cannot be loaded: {_one_line(e)}") from e


def _load_preset(path: str):
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(path))[0], path)
    mod = importlib.util.module_from_spec(spec)
    _exec_file(spec, mod, f"preset {path}")
    if not callable(getattr(mod, "get_config", None)):
        raise SweepError(f"preset {path} defines no get_config()")
    try:
        return mod.get_config()
    except FrampError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SweepError(f"preset {path}: get_config() raised {_one_line(e)}") from e


def resolve(run: Run):
    """The run's config: its preset with its overrides applied, validated. Raises
    :class:`SweepError` naming the run (and the field, for an invalid value)."""
    from framp_jax import config as C
    if not os.path.isfile(run.preset):
        raise SweepError(f"sweep run {run.name!r}: preset {run.preset} does not exist")
    c = _load_preset(run.preset)
    for key, value in run.overrides.items():
        node, parts = c, key.split(".")
        for p in parts[:-1]:
            if p not in node or not hasattr(node[p], "keys"):
                raise SweepError(f"sweep run {run.name!r}: config has no field {key!r}")
            node = node[p]
        if parts[-1] not in node:
            raise SweepError(f"sweep run {run.name!r}: config has no field {key!r}")
        if isinstance(value, list):
            value = tuple(value)
        try:
            setattr(node, parts[-1], value)
        except (TypeError, ValueError) as e:
            raise SweepError(f"sweep run {run.name!r}: config.{key}={value!r}: {e}") from None
    try:
        C.validate(c)
    except C.ConfigError as e:
        raise SweepError(f"sweep run {run.name!r}: {e}") from None
    return c


def format_override(key: str, value) -> str:
    """``--config.KEY=VALUE`` as ml_collections' config flags parse it back to ``value``."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (tuple, list)):
        text = repr(tuple(value))
    elif isinstance(value, float):
        text = repr(value)
    else:
        text = str(value)
    return f"--config.{key}={text}"


def train_command(run: Run, workdir: str, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "framp_jax.cli", "train", "--config", run.preset,
           "--workdir", workdir, "--noprogress"]
    cmd += [format_override(k, v) for k, v in run.overrides.items()]
    return cmd + (["--resume"] if resume else [])


# ---------------------------------------------------------------------------------------------
# State of a run, read from its directory
# ---------------------------------------------------------------------------------------------


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_state(rundir: str, c) -> tuple[str, str]:
    """``(state, detail)`` of a run directory for the config ``c``: ``finished`` (results.json of
    this config hash and rounds), ``other`` (a finished run of another config), ``partial``
    (checkpoints to resume), or ``new``."""
    from framp_jax.simulate import _has_checkpoint_dirs, config_hash, hashed_config
    res = _read_json(os.path.join(rundir, "results.json"))
    if res is not None:
        cfg = _read_json(os.path.join(rundir, "config.json"))
        if cfg is None:
            return "other", "it holds results.json without a readable config.json"
        same = config_hash(cfg) == config_hash(c)
        rounds = int(res.get("rounds", -1))
        if same and rounds == int(c.rounds):
            return "finished", ""
        if not (same and rounds < int(c.rounds) and _has_checkpoint_dirs(rundir)):
            from framp_jax.rundir import config_diff
            changed = config_diff(hashed_config(cfg), hashed_config(c))
            if rounds != int(c.rounds):
                changed.append(f"rounds: {rounds} -> {c.rounds}")
            return "other", ("it holds a finished run of a different config (changed: "
                             f"{'; '.join(changed)}); move it away or rename the sweep run")
    if _has_checkpoint_dirs(rundir):
        return "partial", ""
    return "new", ""


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _die_with_parent():
    """In the child: get SIGKILL when the sweep process dies (Linux), so a killed sweep leaves
    no orphan training behind."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _hms(s: float) -> str:
    s = int(round(max(s, 0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _error_from_log(log_path: str, rc: int) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f.readlines()[-200:] if ln.strip()]
    except OSError:
        lines = []
    for ln in reversed(lines):
        if ln.startswith("framp-jax: "):
            return ln[len("framp-jax: "):]
    tail = [ln for ln in lines if not ln.startswith(" ")][-1:] or [""]
    return f"exit status {rc}: {tail[0]}".strip()


def _summary(name: str, res: dict) -> str:
    f = res.get("final", {})
    parts = []
    for split in ("local", "union"):
        if isinstance(f.get(split, {}).get("mean"), (int, float)):  # null: nothing evaluated
            parts.append(f"{split} mean {100 * f[split]['mean']:.2f}")
    return (f"{name}: {res.get('method')} on {res.get('dataset')} seed {res.get('seed')}, "
            f"{res.get('rounds')} rounds, {', '.join(parts)}, {res.get('wall_s', 0):.0f} s")


class _Status:
    def __init__(self, workdir):
        self.path = os.path.join(workdir, STATUS_TSV)

    def write(self, run: str, event: str, detail: str = ""):
        line = "\t".join([time.strftime("%Y-%m-%dT%H:%M:%S"), run, event,
                          " ".join(detail.split())])
        with open(self.path, "a") as f:
            f.write(line + "\n")


def select_runs(runs: Sequence[Run], only: str | Sequence[str] | None) -> list[Run]:
    """The runs whose name matches one of ``only``'s shell-style patterns (a comma-separated string
    or a sequence), in the sweep's order; all of them when ``only`` is None or empty."""
    if only is None:
        return list(runs)
    pats = [p.strip() for p in (only.split(",") if isinstance(only, str) else only)]
    pats = [p for p in pats if p]
    if not pats:
        return list(runs)
    names = [r.name for r in runs]
    for p in pats:
        if not fnmatch.filter(names, p):
            shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
            raise SweepError(f"--only pattern {p!r} matches no run of this sweep; its runs: {shown}")
    return [r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in pats)]


def run_sweep(sweep_file: str, workdir: str, jobs: int = 1, log=print,
              env: Mapping[str, str] | None = None,
              only: str | Sequence[str] | None = None, shard=None, batch: int = 1,
              batch_mode: str = "auto") -> dict:
    """Runs (or continues) the sweep; returns ``{"done", "failed", "skipped", "runs"}`` counts and
    the failed runs' errors. ``only``: train just the runs matching these name patterns
    (``--only``; the others count as ``"unselected"``). ``shard``: ``"I/N"``, ``"auto"`` or a
    :class:`framp_jax.shard.Shard`: train only that shard's share (``--shard``; the runs of the
    other shards count as ``"other_shards"``). ``batch`` > 1: runs that differ only in seed and
    batchable hyperparameters train together, up to ``batch`` at a time, in one program
    (``--batch``, :mod:`framp_jax.batched`; ``batch_mode`` its mode). See the module docstring."""
    from framp_jax import shard as SH
    from framp_jax.rundir import write_json_atomic
    from framp_jax.simulate import config_hash
    if jobs < 1:
        raise SweepError(f"--jobs={jobs} is not allowed: 1 or more processes")
    if not isinstance(shard, SH.Shard):
        shard = SH.parse_shard(shard, env)
    if batch < 1:
        raise SweepError(f"--batch={batch} is not allowed: 1 or more runs per batch")
    runs = load_sweep(sweep_file)
    configs = {r.name: resolve(r) for r in runs}  # every run validated before the first starts
    selected = select_runs(runs, only)
    units = sweep_units(selected, configs, batch)
    my_units = SH.shard_units(units, shard)
    mine = [r for u in my_units for r in u]
    workdir = os.path.abspath(workdir)
    lock = SH.SweepLock(workdir, shard).acquire()  # one sweep (or one sweep's shards) per workdir
    try:
        record = {"sweep_file": os.path.abspath(sweep_file), "runs": [
            {"name": r.name, "preset": r.preset, "overrides": dict(r.overrides),
             "config_hash": config_hash(configs[r.name]), "rounds": configs[r.name].rounds,
             "command": train_command(r, os.path.join(workdir, r.name), False)[1:]}
            for r in runs]}
        write_json_atomic(os.path.join(workdir, SWEEP_JSON), record)
        status = _Status(workdir)
        unselected = len(runs) - len(selected)
        if unselected:
            log(f"sweep: --only selects {len(selected)} of {len(runs)} runs; "
                f"the other {unselected} are left as they are")
        if shard is not None:
            log(f"sweep: shard {shard} trains {len(mine)} of the {len(selected)} runs")
        batch_cmd = None
        if batch > 1:
            def batch_cmd(names, resume):
                return ([sys.executable, "-m", "framp_jax.batched", "--sweep",
                         os.path.abspath(sweep_file), "--workdir", workdir, "--runs",
                         ",".join(names), "--mode", batch_mode, "--noprogress"]
                        + (["--resume"] if resume else []))
            n_batches = sum(len(u) > 1 for u in my_units)
            log(f"sweep: --batch {batch}: {len(mine)} runs in {len(my_units)} units, "
                f"{n_batches} of them batches")
        out = _schedule(mine, configs, workdir, jobs, log, status, env,
                        my_units if batch > 1 else None, batch_cmd)
        out["unselected"] = unselected
        out["other_shards"] = len(selected) - len(mine)
        return out
    finally:
        lock.release()


def _schedule(runs, configs, workdir, jobs, log, status, env, units=None, batch_cmd=None) -> dict:
    t0 = time.time()
    todo, skipped, failed, done, errors = [], 0, 0, 0, {}
    states = {r.name: run_state(os.path.join(workdir, r.name), configs[r.name]) for r in runs}
    for r in runs:
        if states[r.name][0] == "finished":
            skipped += 1
        elif states[r.name][0] == "other":
            failed += 1
        else:
            todo.append((r, states[r.name][0] == "partial"))
    total = len(runs)
    log(f"sweep: {total} runs, {skipped} already finished, {len(todo)} to run"
        + (f", {failed} not runnable" if failed else "") + f", {jobs} at a time")
    for r in runs:
        if states[r.name][0] == "other":
            errors[r.name] = states[r.name][1]
            _record_failure(os.path.join(workdir, r.name), r.name, errors[r.name], status, log,
                            configs[r.name])
    durations: list[float] = []
    running: dict = {}  # name -> (Popen, run, start, log file); a batch under its first run
    queue = list(todo) if units is None else _batch_jobs(units, todo, workdir)

    def progress():
        left = len(queue) + len(running)
        eta = ""
        if durations and left:
            eta = f", about {_hms(sum(durations) / len(durations) * left / min(jobs, left))} left"
        log(f"sweep: {done} done, {failed} failed, {skipped} skipped, {left} left; "
            f"elapsed {_hms(time.time() - t0)}{eta}")

    from framp_jax.shard import child_memory_env
    child_env, note = child_memory_env(os.environ if env is None else env, jobs)
    from framp_jax.errors import SWEEP_RUN_ENV
    child_env = {**child_env, SWEEP_RUN_ENV: "1"}  # its errors' advice fits the sweep's runs
    if note:
        log(f"sweep: {note}")
    while queue or running:
        while queue and len(running) < jobs:
            r, resume = queue.pop(0)
            if isinstance(r, list):  # a batch of runs (framp_jax.batched), one process
                running[r[0].name] = _start_batch(r, resume, workdir, batch_cmd, child_env,
                                                  status, log)
                continue
            rd = os.path.join(workdir, r.name)
            _fresh_rundir(rd)
            logf = open(os.path.join(rd, TRAIN_LOG), "a")
            cmd = train_command(r, rd, resume)
            logf.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n")
            logf.flush()
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env,
                                 preexec_fn=_die_with_parent, cwd=os.getcwd())
            status.write(r.name, "resume" if resume else "start", f"pid {p.pid}")
            log(f"sweep: {'resuming' if resume else 'starting'} {r.name}")
            running[r.name] = (p, r, time.time(), logf)
        time.sleep(0.2)
        for name in list(running):
            p, r, start, logf = running[name]
            rc = p.poll()
            if rc is None:
                continue
            logf.close()
            del running[name]
            if isinstance(r, list):
                d, f = _finish_batch(r, rc, start, workdir, configs, status, log, errors)
                done, failed = done + d, failed + f
                if d:  # the ETA counts jobs: a batch is one
                    durations.append(time.time() - start)
                progress()
                continue
            rd = os.path.join(workdir, name)
            res = _read_json(os.path.join(rd, "results.json"))
            if rc == 0 and res is not None:
                done += 1
                durations.append(time.time() - start)
                status.write(name, "done", f"{time.time() - start:.1f} s")
                log("sweep: " + _summary(name, res))
            else:
                failed += 1
                errors[name] = _error_from_log(os.path.join(rd, TRAIN_LOG), rc)
                _record_failure(rd, name, errors[name], status, log, configs[name])
            progress()
    if not todo:
        progress()
    return {"runs": total, "done": done, "failed": failed, "skipped": skipped, "errors": errors}


def _batch_jobs(units, todo, workdir) -> list:
    """The queue of a batched sweep: each unit's runs still to train, split by the round they
    start from (a batch starts its members at one round); a group of one is an ordinary run."""
    from framp_jax.checkpoint import saved_rounds
    pending = {r.name: resume for r, resume in todo}
    jobs = []
    for u in units:
        by_start: dict = {}
        for r in u:
            if r.name in pending:
                rounds = saved_rounds(os.path.join(workdir, r.name, "checkpoints"))
                start = rounds[-1] if pending[r.name] and rounds else 0
                by_start.setdefault(start, []).append(r)
        for start, rs in by_start.items():
            jobs.append((rs[0], pending[rs[0].name]) if len(rs) == 1 else (rs, start > 0))
    return jobs


def _fresh_rundir(rd: str) -> None:
    """A run directory about to be trained: created, its last recorded error removed."""
    os.makedirs(rd, exist_ok=True)
    for stale in (ERROR_TXT, ERROR_CONFIG):
        try:
            os.remove(os.path.join(rd, stale))
        except FileNotFoundError:
            pass


def _start_batch(runs, resume, workdir, batch_cmd, env, status, log):
    """Starts ``python -m framp_jax.batched`` for ``runs``; its output goes to the first run's
    train.log, and every run's train.log gets the start line."""
    first = os.path.join(workdir, runs[0].name)
    cmd = batch_cmd([r.name for r in runs], resume)
    for r in runs:
        rd = os.path.join(workdir, r.name)
        _fresh_rundir(rd)
        if r is not runs[0]:
            with open(os.path.join(rd, TRAIN_LOG), "a") as f:
                f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} batch of {len(runs)} (output "
                        f"in {os.path.join(first, TRAIN_LOG)}): {' '.join(cmd)}\n")
    logf = open(os.path.join(first, TRAIN_LOG), "a")
    logf.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(cmd)}\n")
    logf.flush()
    p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                         preexec_fn=_die_with_parent, cwd=os.getcwd())
    for r in runs:
        status.write(r.name, "resume" if resume else "start", f"pid {p.pid} (batch of {len(runs)})")
    log(f"sweep: {'resuming' if resume else 'starting'} a batch of {len(runs)}: "
        + ", ".join(r.name for r in runs))
    return p, runs, time.time(), logf


def _finish_batch(runs, rc, start, workdir, configs, status, log, errors) -> tuple[int, int]:
    """Each member of a finished batch process: done (results.json of its config) or failed
    (the error the batch wrote to its error.txt, else the end of the batch's log)."""
    done = failed = 0
    log_path = os.path.join(workdir, runs[0].name, TRAIN_LOG)
    for r in runs:
        rd = os.path.join(workdir, r.name)
        if run_state(rd, configs[r.name])[0] == "finished":
            done += 1
            status.write(r.name, "done", f"{time.time() - start:.1f} s (batch of {len(runs)})")
            log("sweep: " + _summary(r.name, _read_json(os.path.join(rd, "results.json"))))
            continue
        failed += 1
        try:
            with open(os.path.join(rd, ERROR_TXT), errors="replace") as f:
                msg = " ".join(f.read().split())
        except OSError:
            msg = ""
        errors[r.name] = msg or _error_from_log(log_path, rc)
        _record_failure(rd, r.name, errors[r.name], status, log, configs[r.name])
    return done, failed


ERROR_CONFIG = ".error_config_hash"  # the config hash error.txt was recorded for


def _record_failure(rundir, name, msg, status, log, c=None):
    os.makedirs(rundir, exist_ok=True)
    with open(os.path.join(rundir, ERROR_TXT), "w") as f:
        f.write(msg + "\n")
    if c is not None:  # so that --status can tell an error of an earlier config
        from framp_jax.simulate import config_hash
        with open(os.path.join(rundir, ERROR_CONFIG), "w") as f:
            f.write(f"{config_hash(c)} {int(c.rounds)}\n")
    status.write(name, "failed", msg)
    log_file = os.path.join(rundir, TRAIN_LOG)
    log(f"sweep: {name} FAILED: {msg}" + (f" (log: {log_file})" if os.path.exists(log_file) else ""))


def _error_of_another_config(rundir, c) -> bool:
    """Whether error.txt was recorded for another config (hash or rounds) than ``c``; False
    when that is not recorded."""
    from framp_jax.simulate import config_hash
    try:
        with open(os.path.join(rundir, ERROR_CONFIG)) as f:
            recorded = f.read().split()
    except OSError:
        return False
    return recorded != [config_hash(c), str(int(c.rounds))]


def sweep_units(runs: Sequence[Run], configs: Mapping | None = None,
                batch: int = 1) -> list[list[Run]]:
    """The units a sweep trains and ``--shard`` deals out: one per run, or with ``batch`` > 1
    the batches of :func:`framp_jax.batched.group_runs` (``configs``: run name -> resolved
    config; resolved here when None)."""
    if batch <= 1:
        return [[r] for r in runs]
    from framp_jax.batched import group_runs
    configs = {r.name: resolve(r) for r in runs} if configs is None else configs
    return group_runs(runs, configs, batch)


def sweep_status(sweep_file: str, workdir: str, only: str | Sequence[str] | None = None
                 ) -> list[dict]:
    """What each (selected) run of the sweep would do now, read from ``workdir`` without changing
    anything (``framp-jax sweep --status``): ``{"name", "state", "detail"}`` with ``state`` one
    of ``finished``, ``partial`` (detail: its latest checkpoint round of the run's rounds),
    ``new``, ``other`` (a finished run of another config: detail says what changed),
    ``running`` (a live process on this host holds its workdir: detail names it) and ``failed``
    (its error.txt from the last attempt; it is retried)."""
    from framp_jax.checkpoint import saved_rounds
    from framp_jax.rundir import running_owner
    from framp_jax.shard import other_host_owner
    runs = select_runs(load_sweep(sweep_file), only)
    out = []
    for r in runs:
        c = resolve(r)
        rd = os.path.join(os.path.abspath(workdir), r.name)
        state, detail = run_state(rd, c)
        if state == "partial":
            done = saved_rounds(os.path.join(rd, "checkpoints"))[-1]
            detail = f"checkpoint at round {done} of {int(c.rounds)}"
        owner = running_owner(rd) if state in ("partial", "new") else None
        elsewhere = other_host_owner(rd) if state in ("partial", "new") else None
        if owner is not None:
            state, detail = "running", f"{owner}" + (f"; {detail}" if detail else "")
        elif state in ("partial", "new") and os.path.exists(os.path.join(rd, ERROR_TXT)):
            with open(os.path.join(rd, ERROR_TXT), errors="replace") as f:
                err = " ".join(f.read().split())
            if _error_of_another_config(rd, c):  # the sweep file changed the run since
                detail = ((f"{detail}; " if detail else "") + "its last error was for an "
                          "earlier config of the run")
            else:
                state, detail = "failed", (f"{detail}; " if detail else "") + f"last error: {err}"
        if owner is None and elsewhere is not None:  # not checkable from here: said, state kept
            detail = (f"{detail}; " if detail else "") + f"last started by {elsewhere}"
        out.append({"name": r.name, "state": state, "detail": detail})
    return out


def format_status(rows: Sequence[Mapping[str, str]]) -> str:
    """``sweep_status`` as text: one line per run, then the counts per state."""
    width = max((len(r["name"]) for r in rows), default=4)
    lines = [f"{r['name']:<{width}}  {r['state']:<8}  {r['detail']}".rstrip() for r in rows]
    counts = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    order = ("finished", "running", "partial", "failed", "new", "other")
    lines.append(f"{len(rows)} runs: " + ", ".join(f"{counts[k]} {k}" for k in order if k in counts))
    return "\n".join(lines)


def validate_sweep(sweep_file: str) -> list[tuple[Run, Any]]:
    """``[(run, resolved config)]`` of a sweep file, every config validated; nothing runs."""
    return [(r, resolve(r)) for r in load_sweep(sweep_file)]
