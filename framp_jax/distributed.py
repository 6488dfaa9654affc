"""Runs over several processes (hosts): one ``clients`` mesh over every process's devices.

Each process runs the same program (multi-controller JAX). ``framp-jax train`` starts the JAX
distributed runtime before anything else touches JAX (:func:`initialize_from_flags`), from

- ``--coordinator_address HOST:PORT --num_processes N --process_id I`` (or the environment
  variables ``FRAMP_COORDINATOR``, ``FRAMP_NUM_PROCESSES``, ``FRAMP_PROCESS_ID``; flags win), or
- ``--distributed`` alone: JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU, ...).

After that ``jax.devices()`` lists every process's devices and ``config.mesh_clients`` (0 or the
global device count) puts the clients of a round on all of them. Every process loads the same
data and builds the same state from the seed; :func:`place_replicated` checks that (a checksum
per process) and puts it onto the global mesh without a transfer between processes. Results
needed on the host come back with :func:`to_host`. Only process 0 writes the run directory
(:func:`is_writer`); all processes take part in every checkpoint save and restore (orbax).

On CPU the cross-process collectives are gloo's (JAX's default); the devices per process come
from ``JAX_NUM_CPU_DEVICES``.
"""
from __future__ import annotations

import os
import re
import zlib
from typing import Any, NamedTuple

ENV_COORDINATOR = "FRAMP_COORDINATOR"
ENV_NUM_PROCESSES = "FRAMP_NUM_PROCESSES"
ENV_PROCESS_ID = "FRAMP_PROCESS_ID"
ENV_COORDINATOR_TIMEOUT = "FRAMP_COORDINATOR_TIMEOUT"
DEFAULT_COORDINATOR_TIMEOUT = 300  # seconds; JAX's own initialization timeout


class DistributedError(ValueError):
    """A multi-process setting (flag or environment variable) or state that is not allowed."""


class Settings(NamedTuple):
    """What ``jax.distributed.initialize`` gets; ``None`` fields are left to JAX's detection."""
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None


def define_flags(flag_values=None) -> None:
    """The CLI flags ``--distributed``, ``--coordinator_address``, ``--num_processes``,
    ``--process_id`` (on absl's global flags unless ``flag_values`` is given)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_bool(
        "distributed", False, "Run as one of several processes; without the three flags below "
        "JAX detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU).", flag_values=fv)
    flags.DEFINE_string(
        "coordinator_address", None, f"HOST:PORT of process 0's coordinator, reachable from "
        f"every process (or ${ENV_COORDINATOR}).", flag_values=fv)
    flags.DEFINE_string(
        "num_processes", None, f"Number of processes of the run (or ${ENV_NUM_PROCESSES}).",
        flag_values=fv)
    flags.DEFINE_string(
        "process_id", None, f"This process's index, 0 .. num_processes-1; process 0 writes the "
        f"run directory (or ${ENV_PROCESS_ID}).", flag_values=fv)
    flags.DEFINE_string(
        "coordinator_timeout", None, f"Seconds to wait for the coordinator and the other "
        f"processes before giving up (or ${ENV_COORDINATOR_TIMEOUT}; default "
        f"{DEFAULT_COORDINATOR_TIMEOUT}).", flag_values=fv)


def _int(name: str, raw: str, allowed: str, lo: int, hi: int | None = None) -> int:
    try:
        v = int(str(raw).strip())
    except ValueError:
        v = None
    if v is None or v < lo or (hi is not None and v >= hi):
        raise DistributedError(f"{name}={raw!r} is not allowed: {allowed}")
    return v


def resolve(distributed: bool = False, coordinator_address: str | None = None,
            num_processes: str | int | None = None, process_id: str | int | None = None,
            environ=None) -> Settings | None:
    """Checks the multi-process settings (flags, then ``FRAMP_*`` environment variables).

    Returns ``None`` for a single-process run (nothing given), else the :class:`Settings` for
    ``jax.distributed.initialize``. Raises :class:`DistributedError` naming the flag or variable,
    its value and what is allowed.
    """
    env = os.environ if environ is None else environ
    given = {}  # field -> (name shown in errors, raw value)
    for field, flag, var in (("coordinator_address", coordinator_address, ENV_COORDINATOR),
                             ("num_processes", num_processes, ENV_NUM_PROCESSES),
                             ("process_id", process_id, ENV_PROCESS_ID)):
        if flag is not None:
            given[field] = (f"--{field}", flag)
        elif env.get(var, "") != "":
            given[field] = (var, env[var])
    if not given:
        return Settings(None, None, None) if distributed else None
    if not distributed and len(given) < 3:
        missing = [f"--{f}" for f in ("coordinator_address", "num_processes", "process_id")
                   if f not in given]
        name, raw = next(iter(given.values()))
        raise DistributedError(
            f"{name}={raw!r} needs {' and '.join(missing)} too (or --distributed to let JAX "
            "detect the cluster)")
    coord = n = pid = None
    if "coordinator_address" in given:
        name, raw = given["coordinator_address"]
        m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\s:\[\]]+):(\d+)", str(raw).strip())
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise DistributedError(f"{name}={raw!r} is not allowed: HOST:PORT with a port in "
                                   "1..65535, e.g. 10.0.0.1:12345")
        coord = str(raw).strip()
    if "num_processes" in given:
        name, raw = given["num_processes"]
        n = _int(name, raw, "an integer >= 1", 1)
    if "process_id" in given:
        name, raw = given["process_id"]
        if n is None:
            pid = _int(name, raw, "an integer >= 0", 0)
        else:
            pid = _int(name, raw, f"an integer in 0..{n - 1} (num_processes={n})", 0, n)
    return Settings(coord, n, pid)


def coordinator_timeout(raw: str | None = None, environ=None) -> float:
    """The wait for the coordinator (``--coordinator_timeout``, else
    ``$FRAMP_COORDINATOR_TIMEOUT``, else 300 s); :class:`DistributedError` when not > 0."""
    env = os.environ if environ is None else environ
    name, value = ("--coordinator_timeout", raw) if raw is not None else (
        ENV_COORDINATOR_TIMEOUT, env.get(ENV_COORDINATOR_TIMEOUT, ""))
    if value in (None, ""):
        return float(DEFAULT_COORDINATOR_TIMEOUT)
    try:
        t = float(str(value).strip())
    except ValueError:
        t = float("nan")
    if not t > 0 or t == float("inf"):
        raise DistributedError(f"{name}={value!r} is not allowed: a number of seconds > 0")
    return t


def wait_for_coordinator(address: str, timeout: float, log=None, interval: float = 10.0) -> None:
    """Waits until ``address`` (HOST:PORT) accepts a TCP connection, saying every ``interval``
    seconds how long it has waited; :class:`DistributedError` naming the address and the last
    reason after ``timeout`` seconds. (JAX's own wait ends in an abort of the process after 300
    s, with no word about the address.)"""
    import socket
    import sys
    import time
    if log is None:
        def log(msg):
            print(f"framp-jax: {msg}", file=sys.stderr, flush=True)
    host, port = address.rsplit(":", 1)
    host = host.strip("[]")
    t0 = time.monotonic()
    next_note = t0 + interval
    why = "no answer"
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(5.0, max(timeout, 0.1))):
                return
        except socket.gaierror as e:
            why = f"host name not resolved: {e.strerror or e}"
        except OSError as e:
            why = e.strerror or type(e).__name__
        now = time.monotonic()
        if now - t0 >= timeout:
            raise DistributedError(
                f"--coordinator_address={address!r}: no coordinator answered within "
                f"{timeout:g} s ({why}); start process 0 (the coordinator) first, check that "
                f"{address} is reachable from this host, or wait longer with "
                "--coordinator_timeout")
        if now >= next_note:
            log(f"waiting for the coordinator at {address} (process 0): {now - t0:.0f} s of "
                f"{timeout:g} s ({why})")
            next_note += interval
        time.sleep(min(1.0, max(0.0, t0 + timeout - now)))


def initialize(settings: Settings | None, timeout: float | None = None, log=None) -> None:
    """``jax.distributed.initialize`` with ``settings`` (nothing for ``None``). Must run before
    any other use of JAX in the process (no array created, no ``jax.devices()`` yet). A process
    other than 0 first waits at most ``timeout`` seconds (default 300) for the coordinator to
    answer (:func:`wait_for_coordinator`); JAX then gets the same bound."""
    if settings is None:
        return
    import jax
    if jax.distributed.is_initialized():
        return
    timeout = float(DEFAULT_COORDINATOR_TIMEOUT) if timeout is None else float(timeout)
    if settings.coordinator_address is not None and settings.process_id not in (None, 0):
        wait_for_coordinator(settings.coordinator_address, timeout, log)
    try:
        _initialize_bounded(settings, timeout, log)
    except DistributedError:
        raise
    except (ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if settings.coordinator_address is None:
            raise DistributedError(
                f"--distributed: JAX could not set up the processes ({first}); pass "
                "--coordinator_address, --num_processes and --process_id") from e
        raise DistributedError(
            f"--coordinator_address={settings.coordinator_address!r}: the processes could not "
            f"connect ({first})") from e


class _StuckInitialization(DistributedError):
    """JAX's initialization is still waiting in its thread: the process must end without the
    interpreter's shutdown (which would wait for it and print JAX's own abort log)."""
    hard_exit = True


def _initialize_bounded(settings: Settings, timeout: float, log=None,
                        interval: float = 10.0) -> None:
    """``jax.distributed.initialize`` in a thread, waited for at most ``timeout`` seconds with a
    line every ``interval`` seconds: JAX waits for every process to connect and then aborts the
    whole process (exit 134, a C++ stack dump); this ends it first, with one line naming the
    address (:class:`DistributedError`; the process must exit: JAX's thread goes on)."""
    import sys
    import threading
    import time

    import jax
    if log is None:
        def log(msg):
            print(f"framp-jax: {msg}", file=sys.stderr, flush=True)
    outcome = {}

    def target():
        try:
            jax.distributed.initialize(coordinator_address=settings.coordinator_address,
                                       num_processes=settings.num_processes,
                                       process_id=settings.process_id,
                                       initialization_timeout=int(timeout) + 60)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = e
    th = threading.Thread(target=target, name="jax-distributed-initialize", daemon=True)
    t0 = time.monotonic()
    th.start()
    while True:
        th.join(timeout=min(interval, max(0.0, t0 + timeout - time.monotonic())))
        if not th.is_alive():
            break
        waited = time.monotonic() - t0
        if waited >= timeout:
            who = (f"the other {settings.num_processes - 1} process(es)" if
                   settings.num_processes and settings.process_id == 0 else "every process")
            raise _StuckInitialization(
                f"--coordinator_address={settings.coordinator_address!r}: {who} did not connect "
                f"within {timeout:g} s (process {settings.process_id} of {settings.num_processes}); "
                "start every process with the same --coordinator_address and --num_processes, "
                "or wait longer with --coordinator_timeout")
        log(f"waiting for the processes to connect to {settings.coordinator_address} "
            f"(process {settings.process_id} of {settings.num_processes}): {waited:.0f} s of "
            f"{timeout:g} s")
    if "error" in outcome:
        raise outcome["error"]


def initialize_from_flags(flag_values) -> Settings | None:
    """:func:`resolve` the CLI's flags and :func:`initialize`; returns the settings used."""
    s = resolve(flag_values.distributed, flag_values.coordinator_address,
                flag_values.num_processes, flag_values.process_id)
    timeout = None
    if s is not None:
        timeout = coordinator_timeout(getattr(flag_values, "coordinator_timeout", None))
    initialize(s, timeout)
    return s


# -- during a run -------------------------------------------------------------------------------

def is_multi_process() -> bool:
    import jax
    return jax.distributed.is_initialized() and jax.process_count() > 1


def is_writer() -> bool:
    """Whether this process writes the run directory (process 0, or the only process)."""
    import jax
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def check_config(c) -> None:
    """In a multi-process run the ``clients`` mesh must span every process's devices."""
    if not is_multi_process():
        return
    import jax
    from framp_jax.config import ConfigError
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if c.mesh_clients not in (0, n_dev):
        raise ConfigError("mesh_clients", c.mesh_clients,
                          f"0 or {n_dev} (every device of the {n_proc} processes) in a run over "
                          "several processes")
    if c.clients_per_round % n_dev:
        raise ConfigError("clients_per_round", c.clients_per_round,
                          f"a multiple of the {n_dev} devices on the 'clients' mesh axis")


class _Null:
    """Stands in for a run-directory writer on the processes that do not write."""

    def __getattr__(self, name):
        return lambda *a, **k: None


NULL_WRITER = _Null()


def _fingerprint(leaves) -> int:
    import numpy as np
    crc = 0
    for a in leaves:
        a = np.ascontiguousarray(np.asarray(a))
        crc = zlib.crc32(f"{a.dtype}{a.shape}".encode(), crc)
        crc = zlib.crc32(a.reshape(-1).view(np.uint8), crc)
    return crc


def check_same_everywhere(value: int, what: str) -> None:
    """Raises :class:`DistributedError` unless every process passes the same ``value``."""
    import numpy as np
    from jax.experimental import multihost_utils
    got = np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int64))).reshape(-1)
    bad = [i for i, v in enumerate(got.tolist()) if v != got[0]]
    if bad:
        raise DistributedError(
            f"process {bad[0]} built other {what} than process 0 (checksum {int(got[bad[0]])} vs "
            f"{int(got[0])}): every process must read the same data files with the same config")


def place_replicated(tree: Any, mesh) -> Any:
    """``tree`` (the same host-built arrays on every process) as arrays replicated over ``mesh``,
    which may span several processes. Each process fills its own devices from its copy; a
    checksum first checks that the copies agree."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    sharding = NamedSharding(mesh, PartitionSpec())

    def is_key(x):
        return (getattr(x, "dtype", None) is not None
                and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))

    def host_leaf(x):
        if is_key(x):
            x = jax.random.key_data(x)
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None  # already on the global mesh
        return x

    leaves = [h for h in map(host_leaf, jax.tree.leaves(tree)) if h is not None]
    if jax.process_count() > 1:
        check_same_everywhere(_fingerprint(leaves), "data or initial state")

    def put(x):
        if is_key(x):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and (not x.is_fully_addressable or x.weak_type):
            # a reshard on the mesh; or a weakly typed scalar, which keeps its type this way
            return jax.device_put(x, sharding)
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Leaves that span other processes' devices as numpy arrays (a replicated array from this
    process's copy, a sharded one gathered from all processes); other leaves unchanged. Every
    process must call it with the same arrays."""
    import jax
    import numpy as np

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(get, tree)
