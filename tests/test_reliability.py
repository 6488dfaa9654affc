"""Fault injection: every bad input or broken run state gives one clear error (or warning) at the
right time, nothing is silently wrong and no run is lost.

Covers: resuming with fewer rounds than the checkpoints (refused, nothing deleted), the workdir
lock (a second run is refused naming the first; a killed run leaves no stuck lock), divergence
(excluded clients reported, loss-explosion stop, only existing checkpoints promised), budget
levels that would vanish, early one-line config/data checks, corrupt-checkpoint fallback, the
CLI's one-line errors and exit status 2 (``--debug`` for the traceback), file modes of the run
directory, and user images of any size for every vision model.
"""
from __future__ import annotations

import errno
import glob
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import config as C
from framp_jax import simulate
from framp_jax.checkpoint import CheckpointManager, CorruptCheckpointError
from framp_jax.errors import (CheckpointError, DataError, DivergenceError, FrampError,
                              WorkdirError, WorkdirLockedError)
from framp_jax.rundir import WorkdirLock, config_diff, read_metrics_csv, write_json_atomic

# orbax's pending tensorstore futures after a failed read (see test_checkpoint.py)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

ROUNDS, CKPT_EVERY = 4, 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quiet(*a, **k):
    pass


def run(c, workdir, **kw):
    kw.setdefault("warn", quiet)
    return simulate.run(c, str(workdir), progress=False, log=quiet, **kw)


def no_data_load(monkeypatch):
    """Makes any data load fail loudly: checks that must come before it can be asserted."""
    def boom(*a, **k):
        raise AssertionError("data were loaded")
    monkeypatch.setattr(simulate, "build_problem", boom)
    import framp_jax.data.vision as V
    monkeypatch.setattr(V, "load_vision_dataset", boom)


def snapshot(workdir):
    """Every file under workdir with its bytes, but the lock and the leftovers of a save cut
    short by a kill (orbax ``*.orbax-checkpoint-tmp*``: not a checkpoint, removed on open)."""
    out = {}
    for p in sorted(glob.glob(os.path.join(workdir, "**", "*"), recursive=True)):
        if (os.path.isfile(p) and not p.endswith(".framp-jax.lock")
                and "orbax-checkpoint-tmp" not in p):
            with open(p, "rb") as f:
                out[os.path.relpath(p, workdir)] = f.read()
    return out


def ckpt_rounds(workdir):
    with CheckpointManager(os.path.join(workdir, "checkpoints"), keep=None) as m:
        return m.all_rounds()


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
    """A finished FedAvg run: ROUNDS rounds, checkpoints at CKPT_EVERY and ROUNDS."""
    c = tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY)
    wd = tmp_path_factory.mktemp("reliability") / "reference"
    res = run(c, wd)
    return c, str(wd), res


def copy_of(reference, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(reference[1], dst)
    return str(dst)


# ---------------------------------------------------------------------------------------------
# 1. resume with fewer rounds than the latest checkpoint


def test_resume_with_fewer_rounds_than_checkpoint_is_refused(reference, tiny_config, tmp_path,
                                                             monkeypatch):
    wd = copy_of(reference, tmp_path)
    before = snapshot(wd)
    no_data_load(monkeypatch)  # refused from the checkpoint listing alone
    with pytest.raises(CheckpointError) as ei:
        run(tiny_config(rounds=3, checkpoint_every=CKPT_EVERY), wd, resume=True)
    msg = str(ei.value)
    assert "config.rounds=3" in msg and f"round {ROUNDS}" in msg
    assert f"--config.rounds={ROUNDS}" in msg and "nothing was changed" in msg
    assert "\n" not in msg
    assert snapshot(wd) == before  # no checkpoint deleted or rewritten, no result replaced
    assert ckpt_rounds(wd) == [CKPT_EVERY, ROUNDS]


def test_resume_of_a_finished_run_keeps_its_checkpoint(reference, tiny_config, tmp_path):
    """rounds == the final checkpoint: nothing to train; the final checkpoint is not re-saved
    (it used to be deleted and written again) and the results are the same."""
    c, _, res = reference
    wd = copy_of(reference, tmp_path)
    step = os.path.join(wd, "checkpoints", str(ROUNDS))
    mtime = os.stat(os.path.join(step, "extra")).st_mtime_ns
    res2 = run(tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY), wd, resume=True)
    assert res2["final"] == res["final"]
    assert os.stat(os.path.join(step, "extra")).st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------
# 2. workdir lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from framp_jax.rundir import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _start_lock_holder(workdir):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_workdir_lock_names_the_holder_and_dies_with_it(tiny_config, tmp_path):
    wd = tmp_path / "run"
    holder = _start_lock_holder(wd)
    try:
        with pytest.raises(WorkdirLockedError) as ei:
            run(tiny_config(rounds=1), wd)
        msg = str(ei.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and str(wd) in msg
        assert not (wd / "checkpoints").exists()  # refused before anything was written
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the OS drops the flock
        holder.wait()
    with WorkdirLock(wd) as lock:  # not stuck
        assert lock.held
        rec = json.loads(open(wd / ".framp-jax.lock").read())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
    assert not lock.held


def test_workdir_lock_in_one_process_and_unwritable_workdir(tmp_path):
    with WorkdirLock(tmp_path / "w"):
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            WorkdirLock(tmp_path / "w").acquire()
    WorkdirLock(tmp_path / "w").acquire().release()  # released on exit
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="cannot use workdir") as ei:
        WorkdirLock(tmp_path / "file" / "w").acquire()
    assert isinstance(ei.value, FrampError) and isinstance(ei.value, OSError)


# ---------------------------------------------------------------------------------------------
# 3. divergence


def _inject(monkeypatch, nan_at=None, loss_at=None):
    """The round reports ``nan_clients=1`` at round index ``nan_at`` and a train loss of 1e9 at
    ``loss_at`` (0-based), as a partly or fully diverging round would."""
    real = simulate.build_algorithm

    def patched(ctx, c):
        alg = real(ctx, c)

        def round_(state, data, t):
            state, m = alg.round(state, data, t)
            m = dict(m)
            if nan_at is not None:
                m["nan_clients"] = jnp.where(t == nan_at, 1, m["nan_clients"])
            if loss_at is not None:
                m["train_loss"] = jnp.where(t == loss_at, jnp.float32(1e9), m["train_loss"])
            return state, m
        return alg._replace(round=round_)
    monkeypatch.setattr(simulate, "build_algorithm", patched)


def test_excluded_clients_reported_and_loss_explosion_stops(tiny_config, tmp_path, monkeypatch):
    _inject(monkeypatch, nan_at=1, loss_at=2)
    wd = tmp_path / "run"
    c = tiny_config(rounds=4, checkpoint_every=1)
    warnings = []
    with pytest.raises(DivergenceError) as ei:
        run(c, wd, warn=warnings.append)
    msg = str(ei.value)
    # stopped at round 3 naming the threshold and the checkpoint that really exists
    assert msg.startswith("round 3: the mean training loss 1e+09 exceeds")
    assert "max_loss_ratio" in msg and "ln(4)" in msg
    assert f"round 2 ({wd / 'checkpoints' / '2'})" in msg and "\n" not in msg
    assert ckpt_rounds(wd) == [1, 2]
    # round 2's excluded client: one warning, and the metrics.csv column
    assert len(warnings) == 1 and warnings[0].startswith("round 2: 1 of 4 clients")
    rows = read_metrics_csv(wd / "metrics.csv")
    assert [r["excluded_clients"] for r in rows] == [0, 1]

    # resumed with the stop disabled (max_loss_ratio may change on resume): the count survives
    # the checkpoint and reaches results.json
    warnings.clear()
    res = run(tiny_config(rounds=4, checkpoint_every=1, max_loss_ratio=0.0), wd, resume=True,
              warn=warnings.append)
    assert res["excluded_clients"] == {"total": 1, "by_round": {"2": 1}}
    on_disk = json.loads((wd / "results.json").read_text())
    assert on_disk["excluded_clients"] == res["excluded_clients"]
    assert [r["excluded_clients"] for r in read_metrics_csv(wd / "metrics.csv")] == [0, 1, 0, 0]
    assert warnings == []


def test_exploding_loss_before_any_checkpoint_says_there_is_none(tiny_config, tmp_path):
    # ln(4) * 0.01 = 0.014: the first round's loss (~1.3) is over it
    wd = tmp_path / "run"
    with pytest.raises(DivergenceError) as ei:
        run(tiny_config(rounds=3, max_loss_ratio=0.01), wd)
    msg = str(ei.value)
    assert msg.startswith("round 1:") and "no checkpoint was written" in msg
    assert "is kept" not in msg and ckpt_rounds(wd) == []


def test_all_clients_nan_says_there_is_no_checkpoint(tiny_config, tmp_path):
    wd = tmp_path / "run"
    with pytest.raises(simulate.NonFiniteError) as ei:
        run(tiny_config(lr=1e10, rounds=2), wd)
    assert isinstance(ei.value, DivergenceError)
    msg = str(ei.value)
    assert "round 1" in msg and "NaN/Inf" in msg and "no checkpoint was written" in msg
    assert "last good checkpoint is kept" not in msg
    assert ckpt_rounds(wd) == []


def test_max_loss_ratio_is_validated_and_not_hashed(tiny_config):
    with pytest.raises(C.ConfigError, match=r"config\.max_loss_ratio=-1"):
        C.validate(tiny_config(max_loss_ratio=-1.0))
    assert simulate.config_hash(tiny_config(max_loss_ratio=0.0)) == \
        simulate.config_hash(tiny_config())


# ---------------------------------------------------------------------------------------------
# 4 + 5. config checks: one line naming field, value and what is allowed, before any data load


@pytest.mark.parametrize("overrides, field, allowed", [
    (dict(budget_dist=(1, 1, 1, 0)), "budget_dist", "level 0.015625 has share 0"),
    (dict(budget_dist=(0, 0, 0, 0)), "budget_dist", "all shares are zero"),
    (dict(budget_dist=(1, -1, 1, 1)), "budget_dist", "non-negative"),
    (dict(num_clients=3, clients_per_round=2), "budget_dist", "level 0.015625 gets none"),
    (dict(heldout_frac=0.5, num_clients=4, clients_per_round=1), "heldout_frac",
     "level 1.0 has 1 client(s) and ceil(0.5 x 1) = 1"),
    (dict(heldout_frac=0.6), "heldout_frac", "= 2 are held out"),
    (dict(budget_levels=(0.5,)), "budget_levels", "one budget per share of budget_dist"),
    (dict(budget_levels=0.5), "budget_levels", "a non-empty tuple of budgets in (0, 1]"),
    (dict(budget_levels=(1.0, 1.0, 0.5, 0.25)), "budget_levels", "distinct budgets"),
    (dict(eval_model_chunk=-1), "eval_model_chunk", "an integer >= 0"),
    (dict(seed=-1), "seed", "an integer in [0, 2**32)"),
    (dict(seed=2**32), "seed", "an integer in [0, 2**32)"),
    (dict(mesh_clients=jax.device_count() + 1), "mesh_clients", "available"),
])
def test_config_refused_before_data_load(tiny_config, tmp_path, monkeypatch, overrides, field,
                                         allowed):
    import ml_collections
    d = tiny_config().to_dict()
    d.update(overrides)  # built anew: a float where a tuple belongs is possible from Python
    c = ml_collections.ConfigDict(d)
    no_data_load(monkeypatch)
    with pytest.raises(C.ConfigError) as ei:
        run(c, tmp_path / "run")
    msg = str(ei.value)
    assert msg.startswith(f"config.{field}=") and allowed in msg and "\n" not in msg
    assert ei.value.field == field
    assert not (tmp_path / "run").exists()  # nothing created for a bad config


def test_heldout_frac_that_leaves_every_level_trained_is_fine(tiny_config):
    C.validate(tiny_config(heldout_frac=0.4, clients_per_round=4))


def test_resume_after_config_change_lists_the_changes_before_loading(reference, tiny_config,
                                                                      tmp_path, monkeypatch):
    wd = copy_of(reference, tmp_path)
    before = snapshot(wd)
    no_data_load(monkeypatch)
    c = tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY, lr=0.2, alpha=0.7)
    with pytest.raises(ValueError) as ei:  # a CheckpointError that stays a ValueError
        run(c, wd, resume=True)
    assert isinstance(ei.value, CheckpointError)
    msg = str(ei.value)
    assert "different config" in msg and "lr: 0.3 -> 0.2" in msg and "alpha: 0.5 -> 0.7" in msg
    assert "hash" not in msg and "\n" not in msg
    assert snapshot(wd) == before


def test_resume_check_reads_config_json_for_checkpoints_without_their_config(tiny_config,
                                                                             tmp_path):
    """Checkpoints written before they carried their config: the workdir's config.json says
    what changed."""
    old = tiny_config()
    wd = tmp_path / "run"
    with CheckpointManager(wd / "checkpoints", keep=None) as m:
        m.save(2, {"w": np.zeros(2, np.float32)}, {"config_hash": simulate.config_hash(old)})
    write_json_atomic(wd / "config.json", {**old.to_dict(), "_resolved": {"seed": 0}})
    new = tiny_config(momentum=0.5)
    with CheckpointManager(wd / "checkpoints", keep=None) as m:
        simulate.check_checkpoints(old, str(wd), m, resume=True)  # same config: fine
        with pytest.raises(CheckpointError, match=r"changed: momentum: 0\.0 -> 0\.5; resume"):
            simulate.check_checkpoints(new, str(wd), m, resume=True)


def test_checkpoint_write_failure_is_one_line(tmp_path, monkeypatch):
    m = CheckpointManager(tmp_path / "ck", keep=None)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(m._mngr, "save", full)
    with pytest.raises(CheckpointError) as ei:
        m.save(3, {"w": np.zeros(2, np.float32)})
    msg = str(ei.value)
    assert msg.startswith(f"could not write the checkpoint for round 3 to {tmp_path / 'ck' / '3'}")
    assert "No space left on device" in msg and "\n" not in msg
    m.close()


def test_config_diff_nested_and_unset():
    old = {"lr": 0.3, "framp": {"lam": 1.0, "scope": "global"}, "budget_levels": [1.0, 0.25]}
    new = {"lr": 0.3, "framp": {"lam": 0.0, "scope": "global"}, "budget_levels": (1.0, 0.25),
           "new_field": 3}
    assert config_diff(old, new) == ["framp.lam: 1.0 -> 0.0", "new_field: (unset) -> 3"]


def test_resume_into_empty_workdir_is_refused(tiny_config, tmp_path, monkeypatch):
    no_data_load(monkeypatch)
    with pytest.raises(CheckpointError, match=r"nothing to resume in .*start without --resume"):
        run(tiny_config(), tmp_path / "fresh", resume=True)
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "started" / "checkpoints").mkdir(parents=True)  # a run that died before round 1
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run(tiny_config(), tmp_path / "started", resume=True)


def test_framp_data_dir_that_does_not_exist_is_an_error(tiny_config, tmp_path, monkeypatch):
    from framp_jax.data.vision import load_vision_dataset
    missing = tmp_path / "no" / "such" / "dir"
    monkeypatch.setenv("FRAMP_DATA_DIR", str(missing))
    with pytest.raises(DataError, match=f"FRAMP_DATA_DIR={missing} names {missing}, which is "
                                        "not an existing directory"):
        load_vision_dataset("cifar10")
    with pytest.raises(DataError, match="FRAMP_DATA_DIR"):
        run(tiny_config(), tmp_path / "run")  # even though the npz path needs no search
    assert not (tmp_path / "run").exists()  # checked before the workdir is touched
    monkeypatch.setenv("FRAMP_DATA_DIR", str(tmp_path))  # an existing one is fine
    from framp_jax.data.locate import check_data_env
    check_data_env()


def _npz(path, **kw):
    rng = np.random.default_rng(0)
    base = dict(x_train=rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8),
                y_train=np.arange(12) % 3,
                x_test=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
                y_test=np.arange(6) % 3)
    base.update(kw)
    np.savez(path, **base)
    return str(path)


@pytest.mark.parametrize("kw, pattern", [
    (dict(x_test=np.zeros((0, 8, 8, 3), np.uint8), y_test=np.zeros((0,), np.int64)),
     r"the test set is empty \(x_test and y_test have 0 samples\)"),
    (dict(x_train=np.zeros((0, 8, 8, 3), np.uint8), y_train=np.zeros((0,), np.int64)),
     r"the train set is empty"),
    (dict(y_train=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 255, 0])),
     r"y_train labels must be 0\.\.K-1 with every class present \(K = 1 \+ the largest label = "
     r"256\), but 245 of them never occur \(10-254\)"),
    (dict(y_test=np.array([0, 1, 2, 3, 0, 1])),
     r"y_test has labels that y_train never uses \(3\); labels must be in \[0, 3\)"),
])
def test_user_npz_content_errors_name_file_and_key(tmp_path, kw, pattern):
    from framp_jax.data.vision import load_vision_dataset
    path = _npz(tmp_path / "mine.npz", **kw)
    with pytest.raises(DataError, match=pattern) as ei:
        load_vision_dataset(f"npz:{path}")
    assert str(ei.value).startswith(path) and isinstance(ei.value, ValueError)


def test_text_file_as_npz_is_not_called_pickled(tmp_path):
    from framp_jax.data.vision import load_vision_dataset
    p = tmp_path / "notes.npz"
    p.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError) as ei:
        load_vision_dataset(f"npz:{p}")
    msg = str(ei.value)
    assert f"{p} is not an npz archive" in msg and "np.savez" in msg and "pickle" not in msg
    np.save(tmp_path / "one.npy", np.zeros(3))
    os.replace(tmp_path / "one.npy", tmp_path / "one.npz")
    with pytest.raises(DataError, match="this file is a single .npy array"):
        load_vision_dataset(f"npz:{tmp_path / 'one.npz'}")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_member"])
def test_corrupt_cifar10_webp_names_the_file(tmp_path, monkeypatch, damage):
    from framp_jax.data.vision import load_vision_dataset
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FRAMP_DATA_DIR", raising=False)
    d = tmp_path / "data" / "cifar10"
    d.mkdir(parents=True)
    p = d / "cifar10_webp.npz"
    np.savez(p, webp_train=np.arange(4000, dtype=np.uint8), offsets_train=np.array([0, 4000]),
             y_train=np.zeros(1, np.int64))
    raw = p.read_bytes()
    if damage == "garbage":
        p.write_bytes(b"\x00" * 1000)
    elif damage == "truncated":
        p.write_bytes(raw[: len(raw) // 2])
    else:  # the zip directory is fine, an array's bytes are not (CRC mismatch)
        buf = bytearray(raw)
        buf[raw.index(b"webp_train") + 400] ^= 0xFF
        p.write_bytes(bytes(buf))
    with pytest.raises(DataError) as ei:
        load_vision_dataset("cifar10", data_dir=tmp_path / "data")
    msg = str(ei.value)
    assert msg.startswith(f"{p} is corrupt") and "re-copy the file" in msg
    assert "shared/data/cifar10/README.md" in msg and "\n" not in msg


def test_partition_that_cannot_work_is_a_data_error(tiny_config, tmp_path):
    # 250 clients but 200 test images: only known once the data are loaded
    c = tiny_config(num_clients=250, clients_per_round=4)
    with pytest.raises(DataError) as ei:
        run(c, tmp_path / "run")
    msg = str(ei.value)
    assert "num_clients=250" in msg and "test samples (200)" in msg and "\n" not in msg


def test_missing_dataset_message_is_one_line(tmp_path, monkeypatch):
    from framp_jax.data import locate
    from framp_jax.data.vision import load_vision_dataset
    monkeypatch.setattr(locate, "_shared_dirs", lambda: [])
    monkeypatch.delenv("FRAMP_DATA_DIR", raising=False)
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DataError) as ei:
        load_vision_dataset("cifar100", data_dir=tmp_path / "mine")
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path / "mine" / "cifar100" / "cifar100_webp.npz") in msg
    assert isinstance(ei.value, FileNotFoundError)


# ---------------------------------------------------------------------------------------------
# 6. corrupt latest checkpoint: fall back to the previous intact one


def _flip_byte(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    f = max(files, key=os.path.getsize)
    buf = bytearray(open(f, "rb").read())
    buf[int(len(buf) * 0.7)] ^= 0x10
    open(f, "wb").write(bytes(buf))


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tiny_config, tmp_path):
    c, ref_wd, res = reference
    wd = copy_of(reference, tmp_path)
    _flip_byte(os.path.join(wd, "checkpoints", str(ROUNDS)))
    warnings = []
    res2 = run(tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY), wd, resume=True,
               warn=warnings.append)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"round {ROUNDS} (" in warnings[0] and "checksum mismatch" in warnings[0]
    assert f"resuming from round {CKPT_EVERY}" in warnings[0]
    assert res2["final"] == res["final"]  # retrained to the same numbers
    with CheckpointManager(os.path.join(wd, "checkpoints"), keep=None) as m:
        state, _ = m.restore(ROUNDS)  # replaced by an intact one
    with CheckpointManager(os.path.join(ref_wd, "checkpoints"), keep=None) as m:
        ref_state, _ = m.restore(ROUNDS)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_no_intact_checkpoint_is_one_line(reference, tiny_config, tmp_path):
    wd = copy_of(reference, tmp_path)
    for r in (CKPT_EVERY, ROUNDS):
        _flip_byte(os.path.join(wd, "checkpoints", str(r)))
    with pytest.raises(CorruptCheckpointError) as ei:
        run(tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY), wd, resume=True)
    msg = str(ei.value)
    assert msg.startswith(f"no checkpoint in {os.path.join(wd, 'checkpoints')} reads back intact")
    assert f"[{CKPT_EVERY}, {ROUNDS}]" in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# 7. the CLI: one line and exit status 2 for expected failures, --debug for the traceback


def test_expected_failure_message():
    from framp_jax.cli import expected_failure_message
    assert expected_failure_message(C.ConfigError("lr", -1, "> 0")) == \
        "bad config: config.lr=-1 is not allowed: > 0"
    assert expected_failure_message(DataError("a\n  b\n")) == "a b"
    full = OSError(errno.ENOSPC, "No space left on device", "/w/results.json")
    assert expected_failure_message(full) == ("cannot write (/w/results.json): No space left on "
                                              "device; free space on the disk or choose another "
                                              "--workdir")
    assert expected_failure_message(RuntimeError("a bug")) is None
    assert expected_failure_message(FileNotFoundError(errno.ENOENT, "x")) is None


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "framp_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **(env or {})), cwd=REPO)


def _config_file(tmp_path, npz):
    p = tmp_path / "cfg.py"
    p.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from conftest import build_tiny_config

        def get_config():
            return build_tiny_config({npz!r})
    """))
    return str(p)


def test_cli_expected_failures_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    cfg = _config_file(tmp_path, str(bad))
    r = _cli("train", "--config", cfg, "--workdir", str(tmp_path / "w"), "--noprogress")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"framp-jax: {bad} is not an npz archive")
    assert "Traceback" not in r.stderr
    r = _cli("train", "--config", cfg, "--workdir", str(tmp_path / "w"), "--noprogress",
             "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "InvalidDatasetError" in r.stderr
    r = _cli("train", "--config", cfg, "--workdir", str(tmp_path / "w"), "--noprogress",
             "--config.seed=-1", env={"FRAMP_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "config.seed=-1" in r.stderr


def test_cli_refuses_a_locked_workdir(tiny_npz, tmp_path):
    wd = tmp_path / "w"
    holder = _start_lock_holder(wd)
    try:
        r = _cli("train", "--config", _config_file(tmp_path, tiny_npz), "--workdir", str(wd),
                 "--noprogress")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"framp-jax: workdir {wd} is in use by another framp-jax run (pid {holder.pid} on host "
        f"{socket.gethostname()}, started {json.loads((wd / '.framp-jax.lock').read_text())['started']}"
        "); wait for it to finish, or use another --workdir")


@pytest.mark.slow
def test_cli_kill_9_then_lock_free_and_shorter_resume_refused(tiny_npz, tmp_path):
    """A real run killed with SIGKILL after checkpoints/4: a second run is refused while it
    lives; afterwards the lock is free, ``--resume --config.rounds=3`` is refused with nothing
    deleted, and ``--resume`` with enough rounds finishes."""
    wd = tmp_path / "w"
    cfg = _config_file(tmp_path, tiny_npz)
    args = ["train", "--config", cfg, "--workdir", str(wd), "--noprogress",
            "--config.rounds=100000", "--config.checkpoint_every=2", "--config.eval_every=1000",
            "--config.keep_checkpoints=100"]
    p = subprocess.Popen([sys.executable, "-m", "framp_jax.cli", *args], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (wd / "checkpoints" / "4").is_dir():
            assert p.poll() is None, p.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        r = _cli(*args)
        assert r.returncode == 2 and f"pid {p.pid} on host" in r.stderr
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    rounds = ckpt_rounds(wd)
    assert rounds[-1] >= 4
    before = snapshot(wd)
    r = _cli(*args[:-4], "--resume", "--config.rounds=3", "--config.checkpoint_every=2")
    assert r.returncode == 2
    assert f"holds a checkpoint of round {rounds[-1]}" in r.stderr.strip().splitlines()[-1]
    assert snapshot(wd) == before
    r = _cli(*args[:-4], "--resume", f"--config.rounds={rounds[-1] + 1}",
             "--config.checkpoint_every=2", "--config.eval_every=1000")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["rounds"] == rounds[-1] + 1


# ---------------------------------------------------------------------------------------------
# 8. file modes


def test_run_files_follow_the_umask(reference, tmp_path):
    _, wd, _ = reference
    for name in ("results.json", "metrics.csv", "config.json", "accuracy.png"):
        mode = stat.S_IMODE(os.stat(os.path.join(wd, name)).st_mode)
        assert mode == 0o666 & ~_umask(), (name, oct(mode))
    old = os.umask(0o027)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o640
        os.umask(0o022)
        write_json_atomic(tmp_path / "a.json", {"x": 2})  # replaced: the new file's mode
        assert stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode) == 0o644
    finally:
        os.umask(old)


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


# ---------------------------------------------------------------------------------------------
# 9. user images of any size and channel count


def test_max_pool2_floors_like_pytorch():
    from framp_jax.models.layers import max_pool2
    x = np.arange(2 * 5 * 7 * 3, dtype=np.float32).reshape(2, 5, 7, 3)
    np.random.default_rng(0).shuffle(x.reshape(-1))
    got = np.asarray(max_pool2(jnp.asarray(x)))
    want = x[:, :4, :6].reshape(2, 2, 2, 3, 2, 3).max(axis=(2, 4))  # MaxPool2d(2): floor
    assert got.shape == (2, 2, 3, 3) and np.array_equal(got, want)
    even = np.asarray(max_pool2(jnp.asarray(x[:, :4, :6])))
    assert np.array_equal(even, want)


SHAPES = [(28, 28, 1), (32, 32, 3), (15, 17, 2)]


def _vision_models(shape):
    from framp_jax.models.cnn import make_cnn
    from framp_jax.models.exits import make_cnn_exits, make_resnet18_exits
    from framp_jax.models.preact import make_preact_cnn, make_preact_resnet18
    from framp_jax.models.resnet import make_resnet18
    for w in (1.0, 0.25):
        yield f"cnn(w={w})", make_cnn(5, shape, width=w)
        yield f"preact_cnn(w={w})", make_preact_cnn(5, shape, width=w)
        for h in (1, 2, 3):
            yield f"cnn_exits(w={w},h={h})", make_cnn_exits(5, shape, width=w, exits=h)
    # the ResNets' spatial sizes do not depend on the width: narrow ones trace faster
    yield "resnet18(w=0.125)", make_resnet18(5, shape, width=0.125)
    yield "preact_resnet18(w=0.125)", make_preact_resnet18(5, shape, width=0.125)
    for h in (1, 4):
        yield f"resnet18_exits(h={h})", make_resnet18_exits(5, shape, width=0.125, exits=h)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_vision_model_takes_any_image_size(shape):
    x = jnp.asarray(np.random.default_rng(0).random((2,) + shape), jnp.float32)
    for name, m in _vision_models(shape):  # shapes only: traced, not compiled or run
        params = jax.eval_shape(m.init, jax.random.key(0))
        logits, feats = jax.eval_shape(lambda p, x: m.apply(p, x), params, x)
        assert logits.shape == (2, 5) and feats.shape == (2, m.feature_dim), name
        if hasattr(m, "apply_exits"):
            outs = jax.eval_shape(lambda p, x: m.apply_exits(p, x), params, x)
            assert len(outs) == m.num_exits and all(o.shape == (2, 5) for o in outs), name
    # one real forward pass of the small CNN: finite logits
    from framp_jax.models.cnn import make_cnn, pooled_size
    m = make_cnn(5, shape, width=0.25)
    params = m.init(jax.random.key(0))
    logits, _ = m.apply(params, x)
    assert np.all(np.isfinite(np.asarray(logits)))
    fh, fw = pooled_size(shape)
    assert params["dense"]["kernel"].shape == (fh * fw * 16, 32)


def test_cnn_flatten_size_matches_pytorch_floor():
    from framp_jax.models.cnn import pooled_size
    assert pooled_size((32, 32, 3)) == (4, 4)
    assert pooled_size((28, 28, 1)) == (3, 3)  # 28 -> 14 -> 7 -> 3
    assert pooled_size((15, 17, 2)) == (1, 2)  # 15 -> 7 -> 3 -> 1, 17 -> 8 -> 4 -> 2
    with pytest.raises(ValueError, match=r"needs H and W >= 8"):
        pooled_size((7, 32, 3))


def test_images_too_small_for_the_cnn_are_one_line(tiny_config, tmp_path):
    path = _image_npz(tmp_path / "small.npz", (6, 6, 3))
    c = tiny_config()
    c.dataset = f"npz:{path}"
    with pytest.raises(DataError) as ei:
        run(c, tmp_path / "run")
    msg = str(ei.value)
    assert msg.startswith("image_shape=(6, 6, 3)") and "needs H and W >= 8" in msg
    assert "resnet18" in msg and "\n" not in msg


def _image_npz(path, shape, n_train=120, n_test=60, k=3):
    rng = np.random.default_rng(0)
    def make(n):
        y = np.arange(n) % k
        x = rng.integers(0, 64, (n,) + shape)
        for c in range(k):
            x[y == c] += 60 * c  # brightness tells the class
        x = x.astype(np.uint8)
        return (x[..., 0] if shape[-1] == 1 else x), y
    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return str(path)


@pytest.mark.parametrize("shape, method", [
    ((28, 28, 1), "fedavg"), ((15, 17, 2), "fedavg"),
    pytest.param((15, 17, 2), "heterofl", marks=pytest.mark.slow),  # preact CNN, 4 widths
], ids=["28x28x1-cnn", "15x17x2-cnn", "15x17x2-heterofl"])
def test_run_end_to_end_on_user_images(tiny_config, tmp_path, shape, method):
    """MNIST-like grey 28x28 NHW images and an odd 15x17x2 size train end to end."""
    path = _image_npz(tmp_path / "imgs.npz", shape)
    c = tiny_config(rounds=2, method=method, local_steps=2, augment=False)
    c.dataset = f"npz:{path}"
    res = run(c, tmp_path / "run")
    assert res["rounds"] == 2 and res["excluded_clients"]["total"] == 0
    assert res["dataset_info"]["num_classes"] == 3
    for split in ("local", "union"):
        assert all(0.0 <= v <= 1.0 for v in res["final"][split].values())
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["_resolved"]["data"]["file"] == path
