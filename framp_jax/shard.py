"""Sweeps over many processes: ``framp-jax sweep --shard I/N`` and ``--jobs N`` on one GPU.

**Shards.** ``--shard I/N`` (0 <= I < N) trains the share of the sweep's units that
:func:`shard_units` gives shard I: the units (a run, or a batch of runs with ``--batch K``, which
stays whole) in the sweep's order, dealt round-robin: unit u goes to shard ``u % N``. The share
depends only on the sweep file and the ``--only`` / ``--batch`` options, never on the state of
the workdir, so N processes started with the same command line (on one machine or on N machines
sharing the workdir's file system) train disjoint shares that together cover the sweep; each
run's own workdir lock (:class:`~framp_jax.rundir.WorkdirLock`) keeps any two processes off one
run whatever their options. ``--shard auto`` reads the shard from the environment:
``FRAMP_SHARD_INDEX`` and ``FRAMP_SHARD_COUNT`` (framp_jax's own), else SLURM's job array
(``SLURM_ARRAY_TASK_ID``, ``SLURM_ARRAY_TASK_COUNT``; an array ``--array=a-b[:s]`` is numbered
from its first task ``SLURM_ARRAY_TASK_MIN`` in steps of ``SLURM_ARRAY_TASK_STEP``).

The processes of one sweep share its workdir: an unsharded sweep holds the workdir's lock
exclusively (one sweep per workdir, as before), a shard holds it shared (every shard of the
sweep may run at once, an unsharded sweep may not run beside them) and its own shard's lock
``<workdir>/.shards/<I>-of-<N>/`` exclusively (the same shard cannot run twice).
``framp-jax sweep --status`` shows the whole sweep from any shard; with ``--shard`` it adds one
line per shard (:func:`shard_summary`).

**Device memory.** ``--jobs N`` trains N runs at once, each its own process. On a GPU each JAX
process preallocates 75% of the device's memory by default, so a second one fails; the sweep
gives each child ``XLA_PYTHON_CLIENT_MEM_FRACTION`` = 0.9 / N (:func:`child_memory_env`) unless
the environment already sets ``XLA_PYTHON_CLIENT_MEM_FRACTION``,
``XLA_PYTHON_CLIENT_PREALLOCATE`` or ``XLA_PYTHON_CLIENT_ALLOCATOR``. It changes nothing on a
CPU.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence

from framp_jax.errors import FrampError, WorkdirError, WorkdirLockedError

__all__ = ["Shard", "ShardError", "parse_shard", "shard_units", "shard_of", "child_memory_env",
           "MEMORY_VARS", "SweepLock", "shard_summary", "other_host_owner"]

MEMORY_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
               "XLA_PYTHON_CLIENT_ALLOCATOR")
# of the device's memory, what --jobs N processes share (the rest: CUDA contexts, the driver)
MEMORY_SHARE = 0.9
SHARDS_DIR = ".shards"


class ShardError(FrampError, ValueError):
    """A --shard value (or the environment --shard auto reads) that is not usable."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""
    index: int
    count: int

    def __str__(self):
        return f"{self.index}/{self.count}"


_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def _int_env(env, name):
    v = env.get(name)
    if v is None or str(v).strip() == "":
        return None
    try:
        return int(str(v).strip())
    except ValueError:
        raise ShardError(f"--shard auto: ${name}={v!r} is not an integer") from None


def parse_shard(spec: str | None, env: Mapping[str, str] | None = None) -> Shard | None:
    """The shard of ``--shard SPEC``: ``None`` / ``""`` = no sharding, ``"I/N"``, or ``"auto"``
    (FRAMP_SHARD_INDEX / FRAMP_SHARD_COUNT, else SLURM's array task id and count; see the
    module docstring). Raises :class:`ShardError` with what to fix."""
    if spec is None or str(spec).strip() == "":
        return None
    env = os.environ if env is None else env
    spec = str(spec).strip()
    if spec == "auto":
        idx, cnt = _int_env(env, "FRAMP_SHARD_INDEX"), _int_env(env, "FRAMP_SHARD_COUNT")
        if idx is not None or cnt is not None:
            if idx is None or cnt is None:
                raise ShardError("--shard auto: set both FRAMP_SHARD_INDEX and FRAMP_SHARD_COUNT "
                                 f"(got index {idx}, count {cnt})")
            return _checked(idx, cnt, "FRAMP_SHARD_INDEX/FRAMP_SHARD_COUNT")
        tid, tcount = _int_env(env, "SLURM_ARRAY_TASK_ID"), _int_env(env, "SLURM_ARRAY_TASK_COUNT")
        if tid is None or tcount is None:
            raise ShardError("--shard auto: no shard in the environment: set FRAMP_SHARD_INDEX "
                             "and FRAMP_SHARD_COUNT, or run as a SLURM job array (sbatch "
                             "--array=0-(N-1), which sets SLURM_ARRAY_TASK_ID and "
                             "SLURM_ARRAY_TASK_COUNT), or pass --shard I/N")
        tmin = _int_env(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int_env(env, "SLURM_ARRAY_TASK_STEP") or 1
        idx, rem = divmod(tid - tmin, step)
        if rem or not 0 <= idx < tcount:
            raise ShardError(
                f"--shard auto: SLURM array task {tid} (first {tmin}, step {step}, {tcount} "
                "tasks) is not one of an evenly spaced range; submit the array as "
                "--array=0-(N-1) (a '%' limit is fine), or set FRAMP_SHARD_INDEX and "
                "FRAMP_SHARD_COUNT")
        return _checked(idx, tcount, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    m = _SPEC.match(spec)
    if not m:
        raise ShardError(f"--shard={spec!r} is not allowed: I/N with 0 <= I < N (e.g. 0/4), "
                         "or auto")
    return _checked(int(m.group(1)), int(m.group(2)), "--shard")


def _checked(idx, cnt, where) -> Shard:
    if cnt < 1 or not 0 <= idx < cnt:
        raise ShardError(f"{where}: shard {idx} of {cnt} is not allowed: the count must be >= 1 "
                         "and the index in 0 .. count-1")
    return Shard(idx, cnt)


def shard_of(unit_index: int, count: int) -> int:
    """The shard that trains unit ``unit_index`` of the sweep (round-robin)."""
    return unit_index % count


def shard_units(units: Sequence, shard: Shard | None) -> list:
    """The units (runs, or batches of runs) of ``shard``, in order; all of them for None."""
    if shard is None:
        return list(units)
    return [u for i, u in enumerate(units) if shard_of(i, shard.count) == shard.index]


# ---------------------------------------------------------------------------------------------
# device memory of --jobs N


def child_memory_env(env: Mapping[str, str], jobs: int) -> tuple[dict, str | None]:
    """``(env for the training processes, a note for the log or None)``: with ``jobs > 1``
    each process gets ``XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / jobs`` (3 decimals, rounded
    down) unless ``env`` already sets one of :data:`MEMORY_VARS` (that choice is kept)."""
    out = dict(env)
    if jobs <= 1:
        return out, None
    given = [k for k in MEMORY_VARS if out.get(k, "") != ""]
    if given:
        return out, (f"--jobs {jobs}: the environment's {', '.join(f'{k}={out[k]}' for k in given)} "
                     "applies to every training process")
    frac = int(MEMORY_SHARE / jobs * 1000) / 1000
    out["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{frac:.3f}"
    return out, (f"--jobs {jobs}: each training process may use {frac:.3f} of an accelerator's "
                 "memory (XLA_PYTHON_CLIENT_MEM_FRACTION; set it, XLA_PYTHON_CLIENT_PREALLOCATE "
                 "or XLA_PYTHON_CLIENT_ALLOCATOR to choose otherwise)")


# ---------------------------------------------------------------------------------------------
# the sweep workdir's locks


class SweepLock:
    """The locks of one sweep process on its workdir: exclusive for an unsharded sweep
    (:class:`~framp_jax.rundir.WorkdirLock`, as before), shared plus the shard's own exclusive
    lock for a shard (see the module docstring). ``acquire()`` raises
    :class:`~framp_jax.errors.WorkdirLockedError` naming the holder."""

    def __init__(self, workdir: str, shard: Shard | None):
        self.workdir, self.shard = os.path.abspath(workdir), shard
        self._locks = []
        self._fd = None

    def acquire(self) -> "SweepLock":
        from framp_jax.rundir import WorkdirLock
        if self.shard is None:
            self._locks.append(WorkdirLock(self.workdir).acquire())
            return self
        own = os.path.join(self.workdir, SHARDS_DIR, f"{self.shard.index}-of-{self.shard.count}")
        try:
            self._locks.append(WorkdirLock(own).acquire())
        except WorkdirLockedError as e:
            raise WorkdirLockedError(f"shard {self.shard} of the sweep in {self.workdir} is "
                                     f"already running: {e}") from None
        try:
            self._shared()
        except BaseException:
            self.release()
            raise
        return self

    def _shared(self):
        import fcntl
        from framp_jax.rundir import LOCK_NAME, _read_lock_owner
        path = os.path.join(self.workdir, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WorkdirError(f"cannot use workdir {self.workdir}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_lock_owner(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by an unsharded framp-jax sweep "
                    f"({holder}); shards run beside each other, not beside an unsharded sweep "
                    "of the same workdir") from None
            raise WorkdirError(f"cannot lock workdir {self.workdir}: {e.strerror or e}") from e
        try:  # a shard names itself for an unsharded sweep refused meanwhile
            owner = {"pid": os.getpid(), "host": socket.gethostname() or "localhost",
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shard": str(self.shard)}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        except OSError:
            pass
        self._fd = fd

    def release(self):
        if self._fd is not None:
            import fcntl
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
        while self._locks:
            self._locks.pop().release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------
# --status


def other_host_owner(rundir: str) -> str | None:
    """The process of another host recorded in ``rundir``'s lock file (``"pid N on host H,
    started T"``), else None. It cannot be checked from here: it may be running, or dead."""
    from framp_jax.rundir import LOCK_NAME
    try:
        with open(os.path.join(rundir, LOCK_NAME)) as f:
            rec = json.loads(f.read() or "{}")
        pid, host = int(rec["pid"]), str(rec["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == (socket.gethostname() or "localhost"):
        return None
    return f"pid {pid} on host {host}, started {rec.get('started', '?')}"


def shard_summary(rows: Sequence[Mapping[str, str]], units: Sequence[Sequence[str]],
                  count: int) -> str:
    """One line per shard of ``count``: its runs' states (``rows`` of ``sweep_status``, the
    units as lists of run names in the sweep's order)."""
    state = {r["name"]: r["state"] for r in rows}
    order = ("finished", "running", "partial", "failed", "new", "other")
    lines = []
    for s in range(count):
        names = [n for i, u in enumerate(units) if shard_of(i, count) == s for n in u]
        counts = {}
        for n in names:
            counts[state.get(n, "?")] = counts.get(state.get(n, "?"), 0) + 1
        parts = [f"{counts[k]} {k}" for k in order if k in counts]
        lines.append(f"shard {s}/{count}: {len(names)} runs" + (f": {', '.join(parts)}" if parts else ""))
    return "\n".join(lines)
