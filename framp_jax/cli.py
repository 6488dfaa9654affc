"""Command line: ``framp-jax train --config experiments/configs/NAME.py --workdir DIR
[--config.KEY=VALUE ...] [--resume] [--debug]``.

An expected failure (a :class:`~framp_jax.errors.FrampError`: bad config, missing or corrupt
data, unusable checkpoint, diverging training, busy workdir; or a full disk / permission error
while writing) prints one line ``framp-jax: <message>`` on stderr and exits with status 2;
``--debug`` or ``FRAMP_DEBUG=1`` shows its traceback instead. Other exceptions are bugs and keep
their traceback."""
from __future__ import annotations

import errno
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from framp_jax import distributed as _distributed
from framp_jax.errors import EXIT_CODE, FrampError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A get_config() file, e.g. experiments/configs/framp_cifar10_cpu.py; override "
    "fields with --config.KEY=VALUE.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.csv, results.json, "
                    "checkpoints, TensorBoard events, plots).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its latest checkpoint.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("debug", False, "Show the traceback of expected failures (bad config, data, "
                  "checkpoint, divergence, workdir) instead of one line; also FRAMP_DEBUG=1.")
_distributed.define_flags()  # --distributed, --coordinator_address, --num_processes, --process_id
flags.DEFINE_string("sweep", None, "framp-jax sweep: a sweep file, e.g. experiments/sweeps/cora.py "
                    "(framp_jax.sweep); its runs go to --workdir/<run name>.")
flags.DEFINE_integer("jobs", 1, "framp-jax sweep: runs trained at the same time (processes).")
flags.DEFINE_string("only", None, "framp-jax sweep: train only the runs whose names match these "
                    "comma-separated shell patterns, e.g. 'fedavg_*,framp_seed0'; the others are "
                    "left for a later invocation.")
flags.DEFINE_bool("status", False, "framp-jax sweep: print each run's state (finished, partial "
                  "with its latest checkpoint, failed with its last error, new, other) and exit; "
                  "nothing runs or changes.")
flags.DEFINE_string("shard", None, "framp-jax sweep: train only shard I of N of the sweep's runs, "
                    "'I/N' (0 <= I < N) or 'auto' (FRAMP_SHARD_INDEX/FRAMP_SHARD_COUNT, else a "
                    "SLURM job array's SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT); with "
                    "--status: the whole sweep and a line per shard (framp_jax/shard.py).")
flags.DEFINE_integer("batch", 1, "framp-jax sweep: train up to this many runs that differ only in "
                     "seed, lr, framp.lam and framp.hn_lr together in one jitted program, each "
                     "writing its own run directory (framp_jax/batched.py); 1 = each run alone.")
flags.DEFINE_enum("batch_mode", "auto", ["auto", "vmap", "loop", "unroll", "map"],
                  "framp-jax sweep --batch: how a batch's runs share the program (auto: vmap on "
                  "an accelerator, loop on a CPU; see framp_jax/batched.py).")
flags.DEFINE_string("out", None, "framp-jax report: output directory (REPORT.md and plots).")
FLAGS = flags.FLAGS

COMMANDS = ("train", "sweep", "report", "select")


def _sweep_or_report(cmd):
    if cmd[0] == "select":
        if len(cmd) != 1 or FLAGS.sweep is None or FLAGS.workdir is None:
            raise app.UsageError("usage: framp-jax select --sweep TUNING_SWEEP_FILE --workdir DIR")
        from framp_jax.selection import markdown, write_selection
        print(markdown(write_selection(FLAGS.sweep, FLAGS.workdir)), end="")
        print(f"selection: {FLAGS.workdir}/selection.json")
        return
    if cmd[0] == "report":
        if len(cmd) < 2 or FLAGS.out is None:
            raise app.UsageError("usage: framp-jax report RUN_OR_SWEEP_DIR... [BENCH_SERVER.json] --out DIR")
        from framp_jax.report import write_report
        print(f"report: {write_report(cmd[1:], FLAGS.out)}")
        return
    if len(cmd) != 1 or FLAGS.sweep is None or FLAGS.workdir is None:
        raise app.UsageError("usage: framp-jax sweep --sweep FILE --workdir DIR [--jobs N] "
                             "[--only PATTERNS] [--shard I/N|auto] [--batch K] [--status]")
    if FLAGS.status:
        from framp_jax.sweep import format_status, sweep_status
        rows = sweep_status(FLAGS.sweep, FLAGS.workdir, only=FLAGS.only)
        print(format_status(rows))
        if FLAGS.shard:
            from framp_jax.shard import parse_shard, shard_summary
            from framp_jax.sweep import load_sweep, select_runs, sweep_units
            units = sweep_units(select_runs(load_sweep(FLAGS.sweep), FLAGS.only),
                                batch=FLAGS.batch)
            print(shard_summary(rows, [[r.name for r in u] for u in units],
                                parse_shard(FLAGS.shard).count))
        return
    from framp_jax.sweep import run_sweep
    out = run_sweep(FLAGS.sweep, FLAGS.workdir, jobs=FLAGS.jobs, only=FLAGS.only,
                    shard=FLAGS.shard, batch=FLAGS.batch, batch_mode=FLAGS.batch_mode)
    if out["failed"]:
        sys.exit(1)


def _main(argv):
    cmd = argv[1:]
    if cmd[:1] in (["sweep"], ["report"], ["select"]):
        return _sweep_or_report(cmd)
    if len(cmd) != 1 or cmd[0] not in COMMANDS:
        raise app.UsageError(f"usage: framp-jax {{{','.join(COMMANDS)}}} --config FILE --workdir DIR "
                             f"[--config.KEY=VALUE ...] [--resume]; got {cmd}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("usage: framp-jax train --config FILE --workdir DIR [--config.KEY=VALUE "
                             "...] [--resume]: both --config and --workdir are needed")
    # before any other use of JAX: afterwards jax.devices() lists every process's devices
    _distributed.initialize_from_flags(FLAGS)
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if not _debug():  # orbax's own error log (a failed save, a corrupt checkpoint): the one
        _quiet_library_logs()  # line framp-jax prints says it; --debug shows it all
    from framp_jax.simulate import run
    res = run(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume, progress=FLAGS.progress)
    if not _distributed.is_writer():
        return
    final = res["final"]
    print(f"{res['method']} on {res['dataset']} seed {res['seed']}: {res['rounds']} rounds in "
          f"{res['wall_s']:.1f} s, round function compiled {res['compiles']}x")
    for split, d in final.items():
        print(f"  {split:13s} " + "  ".join(f"{k}={v:.4f}" for k, v in d.items()))
    print(f"results: {FLAGS.workdir}/results.json")


# OSError numbers that mean "the disk or the permissions", not a bug
_IO_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def expected_failure_message(e: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for anything else (a bug)."""
    from framp_jax.config import ConfigError
    from framp_jax.errors import FrampError
    if isinstance(e, ConfigError):
        msg = f"bad config: {e}"
    elif isinstance(e, (FrampError, _distributed.DistributedError)):
        msg = str(e)
    elif isinstance(e, OSError) and e.errno in _IO_ERRNOS:
        where = f" ({e.filename})" if e.filename else ""
        msg = (f"cannot write{where}: {e.strerror or e}; free space on the disk or choose "
               "another --workdir")
    else:
        return None
    return " ".join(line.strip() for line in msg.strip().splitlines() if line.strip())


def _debug() -> bool:
    if os.environ.get("FRAMP_DEBUG", "") not in ("", "0"):
        return True
    try:
        return bool(FLAGS.debug)
    except flags.UnparsedFlagAccessError:  # the flags did not parse: asked on the command line
        return any(a in ("--debug", "--debug=true", "--debug=True") for a in sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# The command line itself: usage, flags, the --config file (one line each, exit status 2)


class CommandLineError(FrampError):
    """A bad command line: wrong usage, an unknown flag or config field, a bad flag value, a
    --config file that is missing or cannot be loaded."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _config_arg(argv) -> str | None:
    """The value of ``--config`` in ``argv`` (``--config=X`` or ``--config X``), if any."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a[len("--config="):]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _check_config_file(value: str) -> None:
    """Loads the ``--config`` file as ml_collections does (``FILE`` or ``FILE:ARG``, then
    ``get_config(ARG)``), so that a missing file, a syntax error, a file without get_config()
    or a get_config() that raises is one line naming the file."""
    import importlib.util
    path, args = value, []
    if not os.path.isfile(path) and ":" in value:
        path, arg = value.split(":", 1)
        args = [arg]
    if not os.path.isfile(path):
        raise CommandLineError(f"--config {value}: no such file (give a get_config() file, e.g. "
                               "experiments/configs/fedavg_cifar10_cpu.py)")
    spec = importlib.util.spec_from_file_location("framp_jax_cli_config_check", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except SyntaxError as e:
        raise CommandLineError(f"--config {path} has a syntax error at line {e.lineno}: "
                               f"{e.msg}") from e
    except Exception as e:  # noqa: BLE001 - whatever the file's own code raises
        raise CommandLineError(f"--config {path} cannot be loaded: {_one_line(e)}") from e
    if not callable(getattr(mod, "get_config", None)):
        raise CommandLineError(f"--config {path} defines no get_config() (a config file is a "
                               "Python file whose get_config() returns an "
                               "ml_collections.ConfigDict)")
    try:
        mod.get_config(*args)
    except Exception as e:  # noqa: BLE001
        raise CommandLineError(f"--config {path}: get_config() raised {_one_line(e)}") from e


def _override_error(e: BaseException, argv) -> str | None:
    """One line for a ``--config.KEY=VALUE`` naming a field the config does not have, with
    ml_collections' did-you-mean; None when ``e`` is not that."""
    import re
    key, suggestion, x = None, None, e
    while x is not None:  # the innermost KeyError names the missing key
        if isinstance(x, KeyError) and x.args:
            text = str(x.args[0])
            m = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
            if m:
                suggestion, key = m.group(1), m.group(2)
            elif key is None:
                key = text.strip("'\"")
        x = x.__cause__ or x.__context__
    if key is None:
        return None
    for a in argv:
        if a.startswith("--config.") and key in a[len("--config."):].split("=", 1)[0].split("."):
            path = a[len("--config."):].split("=", 1)[0]
            parent = path[:path.index(key)].rstrip(".")
            where = f"config.{parent}" if parent else "the config"
            return (f"{a}: {where} has no field {key!r}"
                    + (f"; did you mean {suggestion!r}?" if suggestion else ""))
    return None


def _parse_flags(argv):
    """absl's flag parsing, every failure one :class:`CommandLineError` line."""
    value = _config_arg(argv[1:])
    if value is not None:
        _check_config_file(value)
    try:
        return FLAGS(argv)
    except flags.UnrecognizedFlagError as e:
        raise CommandLineError(f"{' '.join(str(e).split())}; see framp-jax --helpshort") from e
    except flags.Error as e:
        raise CommandLineError(" ".join(str(e).split())) from e
    except (KeyError, AttributeError) as e:
        line = _override_error(e, argv[1:])
        if line is None:
            raise
        raise CommandLineError(line) from e


def _main_usage(argv):
    try:
        return _main(argv)
    except app.UsageError as e:  # absl would print its whole help and exit 1
        raise CommandLineError(" ".join(str(e).split())) from e


def _quiet_library_logs() -> None:
    """Only fatal messages from absl logging (orbax's) and asyncio (tensorstore's abandoned
    futures after a failed read)."""
    import logging as pylogging

    from absl import logging
    logging.set_verbosity(logging.FATAL)
    pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
    # after a failed checkpoint read, tensorstore completes the futures of orbax's closed event
    # loop: each prints a 'RuntimeError: Event loop is closed' traceback (harmless)
    for hook in ("excepthook", "unraisablehook"):
        setattr(sys, hook, _without_closed_loop_noise(getattr(sys, hook)))


def _is_closed_loop_noise(exc) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _without_closed_loop_noise(hook):
    def quiet(*args):
        exc = args[1] if len(args) == 3 else getattr(args[0], "exc_value", None)
        if not _is_closed_loop_noise(exc):
            hook(*args)
    return quiet


INTERRUPTED_EXIT_CODE = 130  # the shell's status for a process stopped by Ctrl-C (SIGINT)


def interrupted_message(e: KeyboardInterrupt, argv) -> str:
    """The line for Ctrl-C: a run says where it stopped and how to continue."""
    if str(e):
        return " ".join(str(e).split())
    if "sweep" in argv[1:2]:
        return ("sweep stopped; run the same command again to continue (finished runs are "
                "kept, interrupted ones resume from their latest checkpoints)")
    return "stopped"


def _framp_warning_lines() -> None:
    """framp_jax's own warnings (e.g. an unreadable decoded-data cache) as one line each,
    ``framp-jax: warning: ...``, instead of Python's two-line ``file:line: Category: ...``."""
    import warnings
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        here = os.path.dirname(os.path.abspath(__file__))
        if os.path.abspath(str(filename)).startswith(here + os.sep) and not _debug():
            print(f"framp-jax: warning: {' '.join(str(message).split())}",
                  file=file or sys.stderr, flush=True)
        else:
            shown(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def main():
    _framp_warning_lines()
    try:
        app.run(_main_usage, flags_parser=_parse_flags)
    except KeyboardInterrupt as e:
        if _debug():
            raise
        print(f"framp-jax: {interrupted_message(e, sys.argv)}", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except Exception as e:  # noqa: BLE001 - expected failures become one line
        line = expected_failure_message(e)
        if line is None or _debug():
            raise
        print(f"framp-jax: {line}", file=sys.stderr, flush=True)
        if getattr(e, "hard_exit", False):  # JAX's initialization still waits in a thread
            sys.stdout.flush()
            os._exit(EXIT_CODE)
        sys.exit(EXIT_CODE)


if __name__ == "__main__":
    main()
