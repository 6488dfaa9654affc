"""The expected failures of a framp_jax run, as one small exception hierarchy.

Every error a user can cause or fix (a bad config value, missing or corrupt data, a damaged
checkpoint, a diverging run, a busy or unwritable workdir) is a :class:`FrampError`. The CLI
prints such an error as one line, ``framp-jax: <message>``, and exits with status 2
(``--debug`` or ``FRAMP_DEBUG=1`` shows the traceback); anything else is a bug and keeps its
traceback. Each subclass also derives from the built-in exception that code written before this
hierarchy caught (``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError`` around
``validate`` or ``except FileExistsError`` around ``run`` keep working.
"""
from __future__ import annotations

__all__ = [
    "FrampError",
    "DataError",
    "CheckpointError",
    "DivergenceError",
    "WorkdirError",
    "WorkdirLockedError",
    "WorkdirExistsError",
    "InputShapeError",
]

EXIT_CODE = 2  # the CLI's exit status for every FrampError

SWEEP_RUN_ENV = "FRAMP_SWEEP_RUN"  # set by framp-jax sweep for the training runs it starts


def fresh_start_advice() -> str:
    """How to start a run over: in a new workdir, or (a run a sweep started: the sweep
    chooses its directories) by moving its directory away so the sweep starts it again."""
    import os
    if os.environ.get(SWEEP_RUN_ENV):
        return ("move this run directory away (the next framp-jax sweep invocation starts the "
                "run again)")
    return "start without --resume in a new workdir"


class FrampError(Exception):
    """An expected failure with a message meant for the user (one line)."""


class DataError(FrampError):
    """A dataset is missing, unreadable, corrupt or inconsistent."""


class CheckpointError(FrampError):
    """A run's checkpoints cannot be used (corrupt, from another config, past the run's end)."""


class DivergenceError(FrampError, FloatingPointError):
    """Training produced NaN/Inf or an exploding loss."""


class WorkdirError(FrampError, OSError):
    """The workdir cannot be used: busy, not writable, full, or holding another run."""


class WorkdirLockedError(WorkdirError):
    """Another framp-jax process is running in the same workdir."""


class WorkdirExistsError(WorkdirError, FileExistsError):
    """The workdir already holds another run's checkpoints (and --resume was not given)."""


class InputShapeError(DataError, ValueError):
    """The data's shape does not fit the chosen model (e.g. images too small to pool)."""
