"""Checkpoints of a run's state: a thin wrapper around ``orbax.checkpoint.CheckpointManager``.

Each checkpoint is one orbax step directory ``<directory>/<round>/`` holding three items:

- ``state``: the pytree (jax/numpy arrays; PRNG keys stored as uint32 ``jax.random.key_data``;
  typed key arrays are converted on save and re-wrapped on restore when the target holds one);
- ``extra``: small JSON metadata (round, seed, config hash, metric history, ...);
- ``integrity``: per-leaf shape/dtype/CRC32 written by this module, checked on restore so that
  silently flipped bytes are reported instead of restored.

A state that is a NamedTuple (the typed server states of ``framp_jax.algorithms``) is stored as
the dict of its fields that are not None (:func:`_stored_form`), which is how the dict states of
earlier versions were stored: their checkpoints restore into the typed states, and a field that
is None (an option's field a run does not use) leaves nothing on disk.

Saves are atomic (orbax writes into a temporary directory and renames it when finalized) and, by
default, synchronous: when :meth:`CheckpointManager.save` returns the checkpoint is on disk, so a
process may exit right after it. With ``async_save=True`` the write continues in the background;
then call :meth:`CheckpointManager.wait` (or :meth:`~CheckpointManager.close`) before exiting.

Typical use::

    ckpt = CheckpointManager(workdir / "checkpoints", keep=3)
    if resume and (r := ckpt.latest_round()) is not None:
        state, extra = ckpt.restore(r, target=state, expected_config_hash=cfg_hash)
    ...
    ckpt.save(round, state, {"seed": seed, "config_hash": cfg_hash, "history": history})
    ckpt.close()
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from framp_jax.errors import CheckpointError
from framp_jax.rundir import to_jsonable

__all__ = ["CheckpointManager", "CheckpointError", "CorruptCheckpointError",
           "CheckpointMismatchError"]

log = logging.getLogger(__name__)

_INTEGRITY_VERSION = 1


class CorruptCheckpointError(CheckpointError, RuntimeError):
    """A checkpoint step exists but cannot be read back intact."""

    def __init__(self, directory: str, round: int, reason: str):
        self.directory = directory
        self.round = round
        self.reason = reason
        super().__init__(
            f"Checkpoint for round {round} at {directory} is corrupt or unreadable: {reason}; "
            f"delete that step (rm -r '{directory}') to resume from the previous checkpoint, "
            "or start the run without --resume in a new workdir."
        )


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint is intact but belongs to another config (hash, tree structure or shapes)."""


class _NoCheckpointError(CheckpointError, FileNotFoundError):
    """The requested checkpoint does not exist."""


# ---------------------------------------------------------------------------------------------
# Pytree helpers
# ---------------------------------------------------------------------------------------------


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path_str(path) -> str:
    """Container-agnostic path: NamedTuple fields, dict keys and list indices all become names,
    as in orbax's on-disk metadata tree."""
    return "/".join(_key_name(k) for k in path)


def _is_typed_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _stored_form(state: Any) -> Any:
    """The tree a state is stored as: a NamedTuple state becomes ``{field: value}`` over its
    fields that are not None (the former dict states' layout); anything else is unchanged."""
    if _is_namedtuple(state):
        return {k: v for k, v in zip(state._fields, state) if v is not None}
    return state


def _from_stored_form(stored: Any, like: Any) -> Any:
    """Inverse of :func:`_stored_form` for the target ``like``."""
    if _is_namedtuple(like):
        return type(like)(*(stored[k] if v is not None else None
                            for k, v in zip(like._fields, like)))
    return stored


def _to_saveable(x: Any, path) -> Any:
    if _is_typed_key(x):
        return jax.random.key_data(x)
    if isinstance(x, (jax.Array, np.ndarray)):
        return x
    if isinstance(x, (np.generic, bool, int, float)):
        return np.asarray(x)
    raise TypeError(
        f"checkpoint state leaf {_path_str(path) or '<root>'} has unsupported type "
        f"{type(x).__name__}; keep only arrays and numbers in the state and put other "
        "metadata in `extra`"
    )


def _to_restore_target(x: Any) -> Any:
    if _is_typed_key(x):
        return jax.random.key_data(x)
    if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
        return x
    if isinstance(x, (np.generic, bool, int, float)):
        return np.asarray(x)
    raise TypeError(f"unsupported restore target leaf type {type(x).__name__}")


def _from_restored(restored: Any, like: Any) -> Any:
    """Gives a restored leaf the kind of the target leaf (typed key, numpy scalar, Python number)."""
    if _is_typed_key(like):
        return jax.random.wrap_key_data(restored, impl=jax.random.key_impl(like))
    if isinstance(like, np.generic):
        return like.dtype.type(np.asarray(restored).astype(like.dtype))
    if isinstance(like, (bool, int, float)):
        return type(like)(np.asarray(restored).item())
    return restored


def _no_space(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a full disk or quota."""
    import errno
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
                s in str(err) for s in ("No space left on device", "Disk quota exceeded")):
            return True
        err = err.__cause__ or err.__context__
    return False


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message`` without tensorstore's spec dump (at most 300
    characters); a full disk says so first."""
    if _no_space(err):
        return "No space left on device (or disk quota exceeded)"
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    msg = str(text).strip()
    if msg.startswith("<bound method") or msg.startswith("<function"):
        msg = ""  # an exception carrying a callable, not a message
    msg = msg.splitlines()[0] if msg else ""
    for cut in (" [tensorstore_spec", " [source locations"):
        msg = msg.split(cut)[0]
    if len(msg) > 300:
        msg = msg[:300] + "..."
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def _leaf_crc(x: Any) -> dict | None:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            return None  # multi-host sharded: not checked
        x = x.addressable_data(0)  # replicated over several processes: this process's copy
    a = np.asarray(x)
    flat = np.ascontiguousarray(a).reshape(-1)  # (ascontiguousarray makes 0-d arrays 1-d)
    return {
        "shape": list(a.shape),
        "dtype": str(a.dtype),
        "crc32": zlib.crc32(flat.view(np.uint8)),
    }


# ---------------------------------------------------------------------------------------------
# Manager
# ---------------------------------------------------------------------------------------------


def saved_rounds(directory) -> list[int]:
    """Rounds of the checkpoint directories under ``directory`` (ascending), read from their
    names alone, without opening orbax: an unfinalized save is a temporary directory whose name
    is not a round, so it is not listed. [] when ``directory`` does not exist."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


class CheckpointManager:
    """Keeps the last ``keep`` checkpoints of a run under ``directory`` (one per saved round)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int | None = 3,
        *,
        async_save: bool = False,
        verify: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep = keep
        self.async_save = async_save
        self.verify = verify
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of a save interrupted by a crash
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        # orbax removes those leftovers in a background thread; a process that exits right
        # after (e.g. a refused --resume) would kill it mid-way and print a thread error
        wait_cleanup = getattr(self._mngr, "_maybe_await_cleanup_tmp_directory", None)
        if wait_cleanup is not None:
            wait_cleanup()

    # -- queries ----------------------------------------------------------------------------

    def all_rounds(self) -> list[int]:
        """Rounds with a finalized checkpoint, ascending."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_round(self) -> int | None:
        """The newest finalized checkpoint's round, or None if there is none."""
        steps = self.all_rounds()
        return steps[-1] if steps else None

    def step_dir(self, round: int) -> str:
        return os.path.join(self.directory, str(int(round)))

    # -- save -------------------------------------------------------------------------------

    def save(self, round: int, state_pytree: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Saves ``state_pytree`` and the JSON-able ``extra`` as the checkpoint of ``round``.

        Synchronous unless ``async_save=True`` (then call :meth:`wait` before relying on it).
        ``extra["round"]`` defaults to ``round``. Checkpoints of rounds >= ``round`` already on
        disk (left by a run that went further before it was resumed from an earlier round) are
        deleted first: they belong to a history this run has replaced.
        """
        round = int(round)
        self._mngr.wait_until_finished()
        stale = [s for s in self.all_rounds() if s >= round]
        for s in stale:
            log.warning("deleting stale checkpoint for round %d in %s", s, self.directory)
            self._mngr.delete(s)

        state = jax.tree_util.tree_map_with_path(lambda p, x: _to_saveable(x, p),
                                                 _stored_form(state_pytree))
        meta = dict(to_jsonable(dict(extra or {})))
        meta.setdefault("round", round)
        json.dumps(meta)  # fail here, not inside orbax, if something is not JSON-able
        items = {
            "state": ocp.args.StandardSave(state),
            "extra": ocp.args.JsonSave(meta),
        }
        if self.verify:
            leaves = {
                _path_str(p): _leaf_crc(x)
                for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
            }
            items["integrity"] = ocp.args.JsonSave(
                {"version": _INTEGRITY_VERSION, "leaves": leaves}
            )
        try:
            saved = self._mngr.save(round, args=ocp.args.Composite(**items), force=True)
            if not self.async_save:
                self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - disk full, permissions, I/O errors inside orbax
            raise CheckpointError(
                f"could not write the checkpoint for round {round} to {self.step_dir(round)}: "
                f"{_one_line(e)}"
                + ("; free space on the disk (the checkpoints before it are kept)"
                   if _no_space(e) else " (is the disk full or the workdir not writable?)")
            ) from e
        if not saved:  # pragma: no cover - orbax policy refused; should not happen with force
            raise RuntimeError(f"orbax did not save the checkpoint for round {round}")

    def wait(self) -> None:
        """Blocks until any in-flight (async) save is finalized on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax resources."""
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore ----------------------------------------------------------------------------

    def _resolve_round(self, round: int | None) -> int:
        self._mngr.wait_until_finished()
        self._mngr.reload()
        rounds = self.all_rounds()
        if round is None:
            if not rounds:
                raise _NoCheckpointError(f"no checkpoint found in {self.directory}")
            return rounds[-1]
        round = int(round)
        if round not in rounds:
            raise _NoCheckpointError(
                f"no checkpoint for round {round} in {self.directory} (available: {rounds})"
            )
        return round

    def _corrupt(self, round: int, err: BaseException | str) -> CorruptCheckpointError:
        if isinstance(err, BaseException):
            err = _one_line(err)
        return CorruptCheckpointError(self.step_dir(round), round, err)

    def restore_latest_intact(
        self,
        target: Any = None,
        *,
        expected_config_hash: str | None = None,
        warn=None,
    ) -> tuple[Any, dict]:
        """:meth:`restore` of the newest checkpoint that reads back intact.

        A corrupt newest checkpoint (:class:`CorruptCheckpointError`) is skipped for the one
        before it, and so on; ``warn`` (a ``str -> None`` callable, default ``log.warning``)
        gets one line naming the skipped rounds and the round used. The skipped steps stay on
        disk until the resumed run saves a round at or before them (:meth:`save` then replaces
        them). Raises :class:`CorruptCheckpointError` when no checkpoint is intact, naming them
        all, and ``FileNotFoundError`` (a :class:`CheckpointError`) when there is none. Config
        and structure mismatches are not skipped: they raise at once.
        """
        self._mngr.wait_until_finished()
        self._mngr.reload()
        rounds = self.all_rounds()
        if not rounds:
            raise _NoCheckpointError(f"no checkpoint found in {self.directory}")
        bad: list[CorruptCheckpointError] = []
        for r in reversed(rounds):
            try:
                state, extra = self.restore(r, target, expected_config_hash=expected_config_hash)
            except CorruptCheckpointError as e:
                bad.append(e)
                continue
            if bad:
                (warn or log.warning)(
                    "checkpoint(s) of round "
                    + ", ".join(f"{e.round} ({e.reason})" for e in bad)
                    + f" in {self.directory} are corrupt; resuming from round {r}, the newest "
                    "intact checkpoint (the damaged ones are replaced as the run goes on)")
            return state, extra
        err = CorruptCheckpointError(bad[0].directory, bad[0].round, bad[0].reason)
        from framp_jax.errors import fresh_start_advice
        err.args = (f"no checkpoint in {self.directory} reads back intact (rounds {rounds}; "
                    f"round {bad[0].round}: {bad[0].reason}); {fresh_start_advice()}",)
        raise err

    def restore_extra(self, round: int | None = None) -> dict:
        """Only the JSON metadata of a checkpoint (cheap: no arrays are read)."""
        round = self._resolve_round(round)
        return self._restore_json(round, "extra")

    def _restore_json(self, round: int, item: str) -> Any:
        try:
            out = self._mngr.restore(round, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
            value = out[item]
        except Exception as e:  # noqa: BLE001 - anything orbax raises here means unreadable
            raise self._corrupt(round, e) from e
        if item == "extra" and not isinstance(value, dict):
            raise self._corrupt(round, f"'{item}' is not a JSON object")
        return value

    def restore(
        self,
        round: int | None = None,
        target: Any = None,
        *,
        expected_config_hash: str | None = None,
    ) -> tuple[Any, dict]:
        """Restores ``(state, extra)`` of ``round`` (default: the latest).

        With ``target`` (a pytree like the saved state, e.g. a freshly initialised state, or one of
        ``jax.ShapeDtypeStruct``) the state comes back with its structure, dtypes, container types
        and, for jax arrays, shardings. Without it, as saved (jax arrays on the default device).

        Raises:
          FileNotFoundError: no checkpoint (for that round).
          CheckpointMismatchError (a ValueError): ``extra["config_hash"]`` differs from
            ``expected_config_hash`` (the workdir belongs to a different config), or ``target``
            does not match the saved tree.
          CorruptCheckpointError: the step directory is damaged (missing/truncated files, bad
            checksums).
        """
        round = self._resolve_round(round)
        extra = self._restore_json(round, "extra")

        stored_hash = extra.get("config_hash")
        if expected_config_hash is not None and stored_hash is not None:
            if str(stored_hash) != str(expected_config_hash):
                raise CheckpointMismatchError(
                    f"The checkpoint for round {round} in {self.directory} was written with config "
                    f"hash {stored_hash}, but the current config hashes to {expected_config_hash}: "
                    "the workdir belongs to a different config. Use another --workdir, or restore "
                    "the original config, or start without --resume."
                )

        integrity = None
        if self.verify and os.path.isdir(os.path.join(self.step_dir(round), "integrity")):
            integrity = self._restore_json(round, "integrity")
            if not isinstance(integrity, dict) or "leaves" not in integrity:
                raise self._corrupt(round, "integrity record is malformed")

        restore_target = None
        if target is not None:
            restore_target = jax.tree.map(_to_restore_target, _stored_form(target))
            self._check_matches_target(round, restore_target, integrity)

        try:
            out = self._mngr.restore(
                round,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(restore_target)),
            )
            state = out["state"]
        except Exception as e:  # noqa: BLE001 - tensorstore/orbax read errors
            raise self._corrupt(round, e) from e

        if integrity is not None:
            self._verify(round, state, integrity["leaves"])
        if target is not None:
            like = _stored_form(target)
            state = _from_stored_form(jax.tree.map(_from_restored, state, like), target)
        return state, extra

    def _check_matches_target(self, round: int, target: Any, integrity: dict | None) -> None:
        """ValueError when ``target`` has other leaves or shapes than the checkpoint."""
        saved: dict[str, tuple[int, ...]] = {}
        if integrity is not None:
            for path, rec in integrity["leaves"].items():
                saved[path] = tuple(rec["shape"]) if rec else None
        else:
            try:
                md = self._mngr.item_metadata(round)["state"]
                tree = md.tree if hasattr(md, "tree") else md
                for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    shape = getattr(leaf, "shape", None)
                    saved[_path_str(p)] = tuple(shape) if shape is not None else None
            except Exception as e:  # noqa: BLE001
                raise self._corrupt(round, e) from e
        wanted = {
            _path_str(p): tuple(x.shape if hasattr(x, "shape") else np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(target)[0]
        }
        missing = sorted(set(wanted) - set(saved))
        unexpected = sorted(set(saved) - set(wanted))
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"The checkpoint for round {round} in {self.directory} does not match the state "
                f"structure of this run (target leaves not in checkpoint: {missing[:5]}; "
                f"checkpoint leaves not in target: {unexpected[:5]}). The workdir probably belongs "
                "to a different config or code version; use another --workdir or start without "
                "--resume."
            )
        bad = [
            f"{p}: checkpoint {saved[p]} vs target {wanted[p]}"
            for p in sorted(wanted)
            if saved[p] is not None and saved[p] != wanted[p]
        ]
        if bad:
            raise CheckpointMismatchError(
                f"The checkpoint for round {round} in {self.directory} has other array shapes "
                f"than this run's state ({'; '.join(bad[:5])}). The workdir probably belongs to a "
                "different config; use another --workdir or start without --resume."
            )

    def _verify(self, round: int, state: Any, leaves: dict) -> None:
        for p, x in jax.tree_util.tree_flatten_with_path(state)[0]:
            rec = leaves.get(_path_str(p))
            if not rec:
                continue
            got = _leaf_crc(x)
            if got is None or got["dtype"] != rec["dtype"] or got["shape"] != rec["shape"]:
                continue  # restored into another dtype/shape on purpose: nothing to compare
            if got["crc32"] != rec["crc32"]:
                raise self._corrupt(
                    round, f"checksum mismatch in array '{_path_str(p)}' (data damaged on disk)"
                )
