"""Run-directory writers: TensorBoard events, metrics.csv, results.json and plots.

Everything here is host-side and dependency-light: the TensorBoard event writer is pure Python
(TFRecord framing, CRC32C and the few protobuf fields an ``Event`` with scalar summaries needs), so
neither TensorFlow nor TensorBoard is required to *write* logs that TensorBoard can read.

Contents of a workdir (see DESIGN.md, "Contracts: Run directory"):

- ``config.json``, ``results.json``      -> :func:`write_json_atomic`
- ``metrics.csv``                        -> :class:`MetricsCSV` (one row per evaluation)
- ``events.out.tfevents.*``              -> :class:`EventWriter`, read back by :func:`read_events`
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
import struct
import tempfile
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "EventWriter",
    "read_events",
    "crc32c",
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
# CRC32C (Castagnoli), table driven, pure Python.
# ---------------------------------------------------------------------------------------------


def _make_crc32c_table() -> tuple[int, ...]:
    poly = 0x82F63B78  # reversed Castagnoli polynomial
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C of ``data`` (continuing from ``crc``); ``crc32c(b"123456789") == 0xE3069283``."""
    table = _CRC32C_TABLE
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# Minimal protobuf encoding / decoding for tensorflow.Event with scalar summaries.
#   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
#   Summary { repeated Value value = 1; }
#   Value   { string tag = 1; float simple_value = 2; }
# ---------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 two's complement for negative values
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _len_delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _encode_event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    scalars: Iterable[tuple[str, float]] = (),
) -> bytes:
    msg = _key(1, 1) + struct.pack("<d", float(wall_time))
    msg += _key(2, 0) + _varint(int(step))
    if file_version is not None:
        msg += _len_delimited(3, file_version.encode("utf-8"))
    values = b""
    for tag, value in scalars:
        v = _len_delimited(1, str(tag).encode("utf-8")) + _key(2, 5) + struct.pack("<f", float(value))
        values += _len_delimited(1, v)
    if values:
        msg += _len_delimited(5, values)
    return msg


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint in protobuf message")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("varint too long in protobuf message")


def _iter_fields(buf: bytes):
    """Yields (field_number, wire_type, value) for one protobuf message."""
    pos = 0
    n = len(buf)
    while pos < n:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value = buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            ln, pos = _read_varint(buf, pos)
            value = buf[pos : pos + ln]
            pos += ln
        elif wire == 5:
            value = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > n:
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def _decode_event(buf: bytes) -> dict:
    event: dict[str, Any] = {"wall_time": 0.0, "step": 0, "file_version": None, "scalars": []}
    for field, wire, value in _iter_fields(buf):
        if field == 1 and wire == 1:
            event["wall_time"] = struct.unpack("<d", value)[0]
        elif field == 2 and wire == 0:
            event["step"] = value - (1 << 64) if value >= (1 << 63) else value
        elif field == 3 and wire == 2:
            event["file_version"] = bytes(value).decode("utf-8")
        elif field == 5 and wire == 2:
            for sfield, swire, sval in _iter_fields(value):
                if sfield != 1 or swire != 2:
                    continue
                tag, simple = None, None
                for vfield, vwire, vval in _iter_fields(sval):
                    if vfield == 1 and vwire == 2:
                        tag = bytes(vval).decode("utf-8")
                    elif vfield == 2 and vwire == 5:
                        simple = struct.unpack("<f", vval)[0]
                if tag is not None and simple is not None:
                    event["scalars"].append((tag, simple))
    return event


# ---------------------------------------------------------------------------------------------
# TFRecord framing.
# ---------------------------------------------------------------------------------------------


def _frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", _masked_crc(header))
        + data
        + struct.pack("<I", _masked_crc(data))
    )


def _read_records(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        buf = f.read()
    records = []
    pos = 0
    while pos < len(buf):
        if pos + 12 > len(buf):
            raise ValueError(f"{path}: truncated record header at byte {pos}")
        header = buf[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (len_crc,) = struct.unpack("<I", buf[pos + 8 : pos + 12])
        if len_crc != _masked_crc(header):
            raise ValueError(f"{path}: corrupt record (length crc mismatch) at byte {pos}")
        start = pos + 12
        end = start + length
        if end + 4 > len(buf):
            raise ValueError(f"{path}: truncated record at byte {pos}")
        data = buf[start:end]
        (data_crc,) = struct.unpack("<I", buf[end : end + 4])
        if data_crc != _masked_crc(data):
            raise ValueError(f"{path}: corrupt record (data crc mismatch) at byte {pos}")
        records.append(data)
        pos = end + 4
    return records


class EventWriter:
    """Writes scalar summaries to a TensorBoard event file, without TensorFlow.

    ``EventWriter(logdir)`` creates ``logdir/events.out.tfevents.<time>.<host>`` (with a numeric
    suffix if that name is taken) and writes the ``brain.Event:2`` header record. Each
    :meth:`scalar`/:meth:`scalars` call appends one ``Event`` record; :meth:`flush` makes it
    durable. Also usable as a context manager.
    """

    FILE_VERSION = "brain.Event:2"

    def __init__(self, logdir: str | os.PathLike):
        self.logdir = os.fspath(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        host = socket.gethostname() or "localhost"
        base = os.path.join(self.logdir, f"events.out.tfevents.{int(time.time()):010d}.{host}")
        path, n = base, 0
        while os.path.exists(path):
            n += 1
            path = f"{base}.{n}"
        self.path = path
        self._file = open(self.path, "xb")
        self._write(_encode_event(time.time(), 0, file_version=self.FILE_VERSION))
        self.flush()

    def _write(self, event_bytes: bytes) -> None:
        if self._file is None:
            raise ValueError(f"EventWriter for {self.path} is closed")
        self._file.write(_frame(event_bytes))

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Appends one scalar ``value`` under ``tag`` at ``step``."""
        self._write(_encode_event(time.time(), int(step), scalars=[(tag, _to_float(value))]))

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
            self._write(_encode_event(time.time(), int(step), scalars=items))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.flush()
            self._file.close()
            self._file = None

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


def read_events(path: str | os.PathLike) -> list[tuple[int, str, float]]:
    """Reads scalar summaries back as ``[(step, tag, value), ...]`` in file order.

    ``path`` is an event file or a directory (all ``*tfevents*`` files in it, by name). Values are
    the stored float32 as Python floats. Raises ``ValueError`` on a corrupt or truncated record.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*tfevents*")))
    else:
        files = [path]
    out = []
    for fname in files:
        for rec in _read_records(fname):
            ev = _decode_event(rec)
            for tag, value in ev["scalars"]:
                out.append((ev["step"], tag, value))
    return out


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


def _atomic_write_text(path: str, text: str) -> None:
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
        with open(self.path, "a", newline="") as f:
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
    """Writes ``obj`` as JSON (indent 2) via a temp file and ``os.replace``: never half-written."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n"
    _atomic_write_text(os.fspath(path), text)


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
