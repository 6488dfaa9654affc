"""Run-directory writers: TensorBoard events, metrics.csv, results.json and plots.

Everything here is host-side and dependency-light: TensorBoard event files are written with
``tensorboardX`` (pure Python), so neither TensorFlow nor TensorBoard is required to *write* logs
that TensorBoard can read.

Contents of a workdir (see DESIGN.md, "Contracts: Run directory"):

- ``config.json``, ``results.json``      -> :func:`write_json_atomic`
- ``metrics.csv``                        -> :class:`MetricsCSV` (one row per evaluation)
- ``events.out.tfevents.*``              -> :class:`EventWriter`
- ``budget_accuracy.png``                -> :func:`plot_budget_accuracy`
"""

from __future__ import annotations

import csv
import errno
import glob
import io
import json
import math
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "EventWriter",
    "MetricsCSV",
    "read_metrics_csv",
    "write_json_atomic",
    "to_jsonable",
    "plot_budget_accuracy",
    "BUDGET_KEYS",
    "WorkdirLock",
    "config_diff",
]

# ---------------------------------------------------------------------------------------------
# TensorBoard events (tensorboardX)
# ---------------------------------------------------------------------------------------------


class EventWriter:
    """Writes scalar summaries to a TensorBoard event file, with ``tensorboardX`` (no TensorFlow).

    ``EventWriter(logdir)`` creates ``logdir/events.out.tfevents.<time>.<host>.<random hex>``
    (the random suffix keeps writers started on one directory in the same second apart) holding
    the ``brain.Event:2`` header record (then, with ``purge_step``, TensorBoard's
    ``SessionLog.START`` record at that step). Each :meth:`scalar`/:meth:`scalars` call appends one
    ``Event`` record, written at once (tensorboardX's synchronous ``EventsWriter``, not
    ``SummaryWriter``'s background queue), so :meth:`flush` (flush + fsync) makes everything
    written so far durable. Also usable as a context manager.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter

        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        suffix = "." + uuid.uuid4().hex[:12]
        self._writer = EventsWriter(os.path.join(self.logdir, "events"), suffix)
        (self.path,) = glob.glob(os.path.join(glob.escape(self.logdir),
                                              f"events.out.tfevents.*{suffix}"))
        if purge_step is not None:
            # as SummaryWriter(purge_step=...): TensorBoard drops the events of earlier files
            # at steps >= purge_step (a resumed run logs those rounds again)
            from tensorboardX.proto.event_pb2 import Event, SessionLog
            self._writer.write_event(Event(wall_time=time.time(), step=int(purge_step),
                                           session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def _write(self, step: int, items: list[tuple[str, float]]) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if self._writer is None:
            raise ValueError(f"EventWriter for {self.path} is closed")
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=v) for tag, v in items])
        with _naming_the_file(self.path):
            self._writer.write_event(Event(wall_time=time.time(), step=int(step),
                                           summary=summary))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Appends one scalar ``value`` under ``tag`` at ``step``."""
        self._write(step, [(str(tag), _to_float(value))])

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Appends all ``{tag: value}`` of ``values`` at ``step`` (one Event record).

        Values that are not numbers (strings, None) are skipped.
        """
        items = []
        for tag, value in values.items():
            try:
                items.append((str(tag), _to_float(value)))
            except (TypeError, ValueError):
                continue
        if items:
            self._write(step, items)

    def flush(self) -> None:
        if self._writer is not None:
            with _naming_the_file(self.path):
                self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()  # flushes first
            self._writer = None

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _to_float(value: Any) -> float:
    if isinstance(value, (str, bytes)) or value is None:
        raise TypeError(f"not a scalar number: {value!r}")
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"not a scalar: shape {arr.shape}")
    return float(arr.reshape(()))


# ---------------------------------------------------------------------------------------------
# metrics.csv
# ---------------------------------------------------------------------------------------------


def _parse_cell(s: str) -> Any:
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _format_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (np.generic, np.ndarray)) and np.ndim(v) == 0:
        v = np.asarray(v).item()
    if hasattr(v, "__array__") and not isinstance(v, (str, bytes)):
        arr = np.asarray(v)
        if arr.ndim == 0:
            v = arr.item()
    if isinstance(v, float):
        return repr(v)  # shortest exact round trip
    return str(v)


def read_metrics_csv(path: str | os.PathLike) -> list[dict]:
    """Reads ``metrics.csv`` into a list of dicts; numbers are parsed, empty cells are omitted."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return [{k: _parse_cell(v) for k, v in row.items() if k is not None and v not in ("", None)}
                for row in reader]


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic, but brief)
    os.umask(mask)
    return mask


class _naming_the_file:
    """Gives an OSError raised without a file name (a write or fsync that fails with ENOSPC)
    the name of the file being written, so that its one-line message says where."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        return self

    def __exit__(self, typ, e, tb):
        if isinstance(e, OSError) and not e.filename and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), self.path) from e
        return False


def _atomic_write_text(path: str, text: str) -> None:
    with _naming_the_file(path):
        _atomic_write_text_(path, text)


def _atomic_write_text_(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        # mkstemp creates 0600; give the file the mode open() would (0666 less the umask)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class MetricsCSV:
    """``metrics.csv``: one row per evaluation; the header is the union of all keys seen.

    ``MetricsCSV(path)`` starts a fresh file (an existing one is replaced on the first write);
    ``MetricsCSV(path, resume=True)`` keeps the rows already there. After resuming from a
    checkpoint at round ``r`` call :meth:`truncate_after(r) <truncate_after>` so rows logged after
    that checkpoint are not duplicated. :meth:`append` adds a row with append+flush+fsync, or
    rewrites the whole file atomically (temp file + ``os.replace``) when the row brings new keys.
    Columns keep first-seen order, with ``round_key`` first.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, round_key: str = "round"):
        self.path = os.fspath(path)
        self.round_key = round_key
        self._rows: list[dict] = []
        self._fields: list[str] = []
        self._synced = False  # whether the file on disk holds exactly self._rows
        if resume and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self._fields = list(reader.fieldnames or [])
            self._rows = read_metrics_csv(self.path)
            self._synced = True

    @property
    def rows(self) -> list[dict]:
        return [dict(r) for r in self._rows]

    @property
    def fieldnames(self) -> list[str]:
        return list(self._fields)

    def _merge_fields(self, row: Mapping) -> bool:
        new = [k for k in row if k not in self._fields]
        if not new:
            return False
        fields = self._fields + new
        if self.round_key in fields:
            fields = [self.round_key] + [k for k in fields if k != self.round_key]
        self._fields = fields
        return True

    def _render(self, rows: list[dict], header: bool) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._fields, lineterminator="\n")
        if header:
            w.writeheader()
        for r in rows:
            w.writerow({k: _format_cell(r.get(k)) for k in self._fields})
        return buf.getvalue()

    def _rewrite(self) -> None:
        _atomic_write_text(self.path, self._render(self._rows, header=True))
        self._synced = True

    def append(self, row: Mapping[str, Any]) -> None:
        """Adds one evaluation row (``{"round": r, "local/1/4": acc, ...}``)."""
        row = {str(k): v for k, v in row.items()}
        widened = self._merge_fields(row)
        self._rows.append(row)
        if widened or not self._synced or not os.path.exists(self.path):
            self._rewrite()
            return
        with _naming_the_file(self.path), open(self.path, "a", newline="") as f:
            f.write(self._render([row], header=False))
            f.flush()
            os.fsync(f.fileno())

    def truncate_after(self, round: int) -> int:
        """Drops rows whose ``round_key`` is greater than ``round``; returns how many were dropped."""
        keep = [r for r in self._rows if not _round_after(r.get(self.round_key), round)]
        dropped = len(self._rows) - len(keep)
        self._rows = keep
        if dropped or not self._synced or not os.path.exists(self.path):
            self._rewrite()
        return dropped


def _round_after(value: Any, round: int) -> bool:
    try:
        return float(value) > round
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Converts numpy/jax scalars and arrays, tuples, sets and paths into plain JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=repr)]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "__array__"):  # jax.Array and friends
        return np.asarray(obj).tolist()
    if hasattr(obj, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(obj.to_dict())
    return str(obj)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as JSON (indent 2) via a temp file and ``os.replace``: never half-written.
    NaN and infinities (e.g. the accuracy of a budget level no client evaluates) are written as
    ``null``: ``NaN`` is not JSON, and strict readers refuse the whole file for it."""
    text = json.dumps(_finite_or_null(to_jsonable(obj)), indent=2, sort_keys=False,
                      allow_nan=False) + "\n"
    _atomic_write_text(os.fspath(path), text)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_or_null(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------

BUDGET_KEYS = ("1", "1/4", "1/16", "1/64", "mean")


def _series(rows: list[Mapping], key: str, round_key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        try:
            y = float(v)
        except (TypeError, ValueError):
            continue
        if not math.isfinite(y):
            continue
        try:
            x = float(r.get(round_key, i))
        except (TypeError, ValueError):
            x = float(i)
        xs.append(x)
        ys.append(y)
    return xs, ys


def plot_budget_accuracy(
    metrics_rows: Iterable[Mapping[str, Any]],
    out_png: str | os.PathLike,
    *,
    round_key: str = "round",
    title: str | None = None,
) -> str:
    """Plots accuracy vs round, one line per budget, in two panels (Local, Union).

    Uses the keys ``local/1``, ``local/1/4``, ``local/1/16``, ``local/1/64``, ``local/mean`` and the
    same under ``union/`` when present; missing keys, missing values and NaNs are skipped, and an
    empty input still yields a (labelled, empty) figure. Returns the path written.
    """
    # Figure + the Agg canvas directly: no pyplot, so no global backend switch and no GUI.
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [dict(r) for r in metrics_rows]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    styles = {"1": "-", "1/4": "-", "1/16": "-", "1/64": "-", "mean": "--"}
    for ax, (prefix, name) in zip(axes, (("local", "Local"), ("union", "Union"))):
        drawn = 0
        for b in BUDGET_KEYS:
            xs, ys = _series(rows, f"{prefix}/{b}", round_key)
            if not xs:
                continue
            label = "mean" if b == "mean" else f"budget {b}"
            ax.plot(xs, ys, styles[b], marker="o" if len(xs) < 30 else None, markersize=3,
                    label=label, color="black" if b == "mean" else None)
            drawn += 1
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = os.fspath(out_png)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


# ---------------------------------------------------------------------------------------------
# Workdir lock
# ---------------------------------------------------------------------------------------------

LOCK_NAME = ".framp-jax.lock"


class WorkdirLock:
    """An exclusive lock on a workdir for the lifetime of one run.

    ``fcntl.flock`` on ``<workdir>/.framp-jax.lock``, held through an open file descriptor: the
    OS releases it when the process ends in any way (``kill -9`` included), so a dead run never
    leaves the workdir locked. The file holds the owner's pid, host and start time (JSON) so a
    refused run can name it. The file itself is left in place (removing it would let two
    processes lock two different files of the same name).

    ``WorkdirLock(workdir).acquire()`` creates the workdir if needed and raises
    :class:`~framp_jax.errors.WorkdirLockedError` when another process holds the lock, or
    :class:`~framp_jax.errors.WorkdirError` when the workdir cannot be created or written.
    Usable as a context manager.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "WorkdirLock":
        import fcntl

        from framp_jax.errors import WorkdirError, WorkdirLockedError

        try:
            os.makedirs(self.workdir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise WorkdirError(f"cannot use workdir {self.workdir}: {e.strerror or e} "
                               f"({getattr(e, 'filename', None) or self.workdir}); choose "
                               "another --workdir or fix its permissions") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_lock_owner(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by another framp-jax run ({holder}); "
                    "wait for it to finish, or use another --workdir") from None
            raise WorkdirError(f"cannot lock workdir {self.workdir} ({self.path}): "
                               f"{e.strerror or e}") from e
        try:
            owner = {"pid": os.getpid(), "host": socket.gethostname() or "localhost",
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise WorkdirError(f"cannot write to workdir {self.workdir}: {e.strerror or e}; "
                               "choose another --workdir, or free space on its disk") from e
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlocks (idempotent). The lock file stays, with its last owner's record."""
        if self._fd is not None:
            import fcntl

            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_lock_owner(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"pid {rec['pid']} on host {rec['host']}, started {rec.get('started', '?')}")
    except (OSError, ValueError, KeyError, TypeError):
        return "pid and host not yet recorded"


def running_owner(workdir: str | os.PathLike) -> str | None:
    """The live framp-jax process on this host recorded in ``workdir``'s lock file (``"pid N,
    started T"``), else None. Reads the record only: it never takes the lock, so it cannot make a
    starting run fail. A record of another host is not checked (None)."""
    path = os.path.join(os.fspath(workdir), LOCK_NAME)
    try:
        with open(path) as f:
            rec = json.loads(f.read() or "{}")
        pid, host = int(rec["pid"]), str(rec["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != (socket.gethostname() or "localhost"):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"framp" not in f.read():
                return None  # the pid was reused by an unrelated process
    except OSError:
        pass  # no /proc: trust the live pid
    return f"pid {pid}, started {rec.get('started', '?')}"


# ---------------------------------------------------------------------------------------------
# Config comparison (resume)
# ---------------------------------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, Mapping):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_diff(old: Mapping, new: Mapping) -> list[str]:
    """``["lr: 0.3 -> 0.2", "framp.lam: 1.0 -> 0", ...]`` for every (nested) field whose value
    differs between two JSON config dicts; a field only in one side shows ``(unset)``. Lists and
    tuples compare equal when their items do."""
    a, b = _flatten(to_jsonable(old)), _flatten(to_jsonable(new))
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "(unset)"), b.get(k, "(unset)")
        if va != vb:
            fmt = lambda v: v if v == "(unset)" else json.dumps(v)
            out.append(f"{k}: {fmt(va)} -> {fmt(vb)}")
    return out
