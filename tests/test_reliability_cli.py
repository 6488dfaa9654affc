"""Issue 30, items 2, 4, 6 and 9: the command line's own failures are one line.

A typo in a flag or a config field (with ml_collections' did-you-mean), a missing or broken
``--config`` file, a sweep file with a syntax error or whose ``get_sweep()`` raises, and a wrong
usage each print one line ``framp-jax: ...`` and exit with status 2 (the traceback only under
``--debug``); Ctrl-C prints where the run stopped and how to continue, without a traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from framp_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORA = os.path.join(REPO, "experiments", "configs", "fedavg_cora.py")
FRAMP_CORA = os.path.join(REPO, "experiments", "configs", "framp_cora.py")


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "framp_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, **(env or {})))


def _one_line(r, expected):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == f"framp-jax: {expected}", r.stderr[-3000:]


@pytest.mark.parametrize("args, expected", [
    (["--config", CORA, "--config.roundz=3"],
     "--config.roundz=3: the config has no field 'roundz'; did you mean 'rounds'?"),
    (["--config", FRAMP_CORA, "--config.framp.lamm=1"],
     "--config.framp.lamm=1: config.framp has no field 'lamm'; did you mean 'lam'?"),
    (["--config", CORA, "--config.heterofl.no_such_option=1"],
     "--config.heterofl.no_such_option=1: the config has no field 'heterofl'"),
    (["--config", CORA, "--config.rounds=abc"],
     "flag --config.rounds=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config", CORA, "--no_such_flag"],
     "Unknown command line flag 'no_such_flag'; see framp-jax --helpshort"),
])
def test_flag_and_field_typos_are_one_line(tmp_path, args, expected):
    _one_line(_cli("train", "--workdir", str(tmp_path / "w"), *args), expected)
    assert not (tmp_path / "w").exists()


def test_usage_errors_exit_2_in_one_line(tmp_path):
    _one_line(_cli("bogus"), "usage: framp-jax {train,sweep,report,select} --config FILE "
                             "--workdir DIR [--config.KEY=VALUE ...] [--resume]; got ['bogus']")
    _one_line(_cli("train", "--config", CORA),
              "usage: framp-jax train --config FILE --workdir DIR [--config.KEY=VALUE ...] "
              "[--resume]: both --config and --workdir are needed")


def test_debug_shows_the_traceback_of_a_typo(tmp_path):
    r = _cli("train", "--workdir", str(tmp_path / "w"), "--config", CORA, "--config.roundz=3",
             "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert "did you mean 'rounds'?" in r.stderr


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_config_file_errors_are_one_line(tmp_path):
    """Checked in-process (:func:`cli._check_config_file`, what the flag parser calls first)."""
    cases = [
        (str(tmp_path / "nope.py"), f"--config {tmp_path / 'nope.py'}: no such file (give a "
                                     "get_config() file, e.g. "
                                     "experiments/configs/fedavg_cifar10_cpu.py)"),
        (_write(tmp_path / "syntax.py", "def get_config(:\n"),
         f"--config {tmp_path / 'syntax.py'} has a syntax error at line 1: invalid syntax"),
        (_write(tmp_path / "noget.py", "x = 1\n"),
         f"--config {tmp_path / 'noget.py'} defines no get_config() (a config file is a Python "
         "file whose get_config() returns an ml_collections.ConfigDict)"),
        (_write(tmp_path / "raises.py", "def get_config():\n    raise ValueError('boom')\n"),
         f"--config {tmp_path / 'raises.py'}: get_config() raised ValueError: boom"),
        (_write(tmp_path / "imports.py", "import no_such_module_x\n"),
         f"--config {tmp_path / 'imports.py'} cannot be loaded: ModuleNotFoundError: No module "
         "named 'no_such_module_x'"),
    ]
    for value, expected in cases:
        with pytest.raises(cli.CommandLineError) as ei:
            cli._check_config_file(value)
        assert str(ei.value) == expected
        assert cli.expected_failure_message(ei.value) == expected
    cli._check_config_file(CORA)  # a good one passes
    cli._check_config_file(_write(tmp_path / "arg.py", "def get_config(a):\n    return a\n")
                           + ":x")  # FILE:ARG, as ml_collections takes it


def test_missing_config_file_from_the_command_line(tmp_path):
    _one_line(_cli("train", "--config", str(tmp_path / "nope.py"), "--workdir",
                   str(tmp_path / "w")),
              f"--config {tmp_path / 'nope.py'}: no such file (give a get_config() file, e.g. "
              "experiments/configs/fedavg_cifar10_cpu.py)")


def test_sweep_file_errors_are_one_line(tmp_path):
    from framp_jax.sweep import SweepError, load_sweep
    syntax = _write(tmp_path / "syntax.py", "def get_sweep(:\n")
    raises = _write(tmp_path / "raises.py", "def get_sweep():\n    raise ValueError('no runs')\n")
    with pytest.raises(SweepError, match=r"^sweep file .*syntax\.py has a syntax error at line "
                                         r"1: invalid syntax$"):
        load_sweep(syntax)
    with pytest.raises(SweepError, match=r"^sweep file .*raises\.py: get_sweep\(\) raised "
                                         r"ValueError: no runs$"):
        load_sweep(raises)
    _one_line(_cli("sweep", "--sweep", syntax, "--workdir", str(tmp_path / "w")),
              f"sweep file {syntax} has a syntax error at line 1: invalid syntax")


# ---------------------------------------------------------------------------------------------
# 9. Ctrl-C, warnings; 8. TensorBoard after a resume; 6. a full disk


def test_ctrl_c_says_where_the_run_stopped(tmp_path, tiny_config):
    from framp_jax.simulate import _interrupted_message
    c = tiny_config(rounds=10, checkpoint_every=2)
    wd = tmp_path / "w"
    assert _interrupted_message(c, str(wd), None) == (
        "stopped before the first round (while loading the data or compiling), before the first "
        "checkpoint (one is saved every checkpoint_every=2 rounds): there is nothing to resume; "
        "start the run again without --resume")
    assert _interrupted_message(c, str(wd), 1).startswith("stopped at round 1 of 10, before the "
                                                          "first checkpoint")
    (wd / "checkpoints" / "2").mkdir(parents=True)
    (wd / "checkpoints" / "4").mkdir()
    ck = wd / "checkpoints" / "4"
    assert _interrupted_message(c, str(wd), 4) == (
        f"stopped at round 4 of 10; continue with --resume from the latest checkpoint, round 4 "
        f"({ck})")
    assert _interrupted_message(c, str(wd), 5).endswith(f"round 4 ({ck}) (round 5 is trained "
                                                        "again)")
    assert _interrupted_message(c, str(wd), 7).endswith("(rounds 5-7 are trained again)")


@pytest.mark.parametrize("argv, exc, expected", [
    (["framp-jax", "train"], "run", "stopped at round 3 of 4; continue with --resume from the "
                                    "latest checkpoint, round 2 (/w/checkpoints/2)"),
    (["framp-jax", "sweep"], "plain", "sweep stopped; run the same command again to continue "
                                      "(finished runs are kept, interrupted ones resume from "
                                      "their latest checkpoints)"),
])
def test_ctrl_c_is_one_line_exit_130(monkeypatch, capsys, argv, exc, expected):
    from framp_jax.simulate import RunInterrupted
    err = RunInterrupted(expected) if exc == "run" else KeyboardInterrupt()

    def interrupted(*a, **k):
        raise err
    monkeypatch.setattr(cli.app, "run", interrupted)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("FRAMP_DEBUG", raising=False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own
    with pytest.raises(SystemExit) as ei:
        cli.main()
    assert ei.value.code == 130
    assert capsys.readouterr().err == f"framp-jax: {expected}\n"
    monkeypatch.setenv("FRAMP_DEBUG", "1")  # the traceback under --debug
    with pytest.raises(KeyboardInterrupt):
        cli.main()


def test_framp_warnings_are_one_line(monkeypatch, capsys):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.delenv("FRAMP_DEBUG", raising=False)
    cli._framp_warning_lines()
    vision = os.path.join(REPO, "framp_jax", "data", "vision.py")
    warnings.showwarning(RuntimeWarning("decoded cache /c/x.npz is unreadable\n(BadZipFile); "
                                        "it is rebuilt"), RuntimeWarning, vision, 340)
    assert capsys.readouterr().err == ("framp-jax: warning: decoded cache /c/x.npz is unreadable "
                                       "(BadZipFile); it is rebuilt\n")
    warnings.showwarning(UserWarning("other"), UserWarning, "/elsewhere/lib.py", 3)
    assert "framp-jax" not in capsys.readouterr().err  # others' go to the usual display


def _read_events(path):
    """The ``Event`` records of one TensorBoard event file (TFRecord framing)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event
    out = []
    with open(path, "rb") as f:
        while True:
            head = f.read(12)
            if len(head) < 12:
                return out
            (n,) = struct.unpack("<Q", head[:8])
            data = f.read(n)
            f.read(4)
            ev = Event()
            ev.ParseFromString(data)
            out.append(ev)


def tensorboard_steps(tb_dir, tag="train_loss"):
    """The steps of ``tag`` as TensorBoard shows them: files in name (= start time) order, a
    ``SessionLog.START`` at step s drops the steps >= s seen so far (its purge)."""
    import glob

    from tensorboardX.proto.event_pb2 import SessionLog
    steps = []
    for f in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        for ev in _read_events(f):
            if ev.HasField("session_log") and ev.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < ev.step]
            elif ev.HasField("summary") and any(v.tag == tag for v in ev.summary.value):
                steps.append(ev.step)
    return steps


def test_event_writer_purge_step(tmp_path):
    from framp_jax.rundir import EventWriter
    with EventWriter(tmp_path) as w:
        for s in (1, 2, 3):
            w.scalars({"train_loss": 1.0}, s)
    __import__("time").sleep(1.1)  # event file names start with the second they were made
    with EventWriter(tmp_path, purge_step=3) as w:  # resumed from round 2: round 3 again
        w.scalars({"train_loss": 0.5}, 3)
    assert tensorboard_steps(tmp_path) == [1, 2, 3]


def test_checkpoint_error_reasons_are_short(tmp_path, monkeypatch):
    import errno

    from framp_jax.checkpoint import CheckpointManager, _one_line
    from framp_jax.errors import CheckpointError
    spec = ('NOT_FOUND: Error opening "zarr" driver: Metadata at "w/.zarray" does not exist '
            '[tensorstore_spec=\'{"context":{"cache_pool":{}}}\'] [source locations=\'x.cc:1\']')
    assert _one_line(ValueError(spec)) == ('ValueError: NOT_FOUND: Error opening "zarr" driver: '
                                           'Metadata at "w/.zarray" does not exist')
    assert _one_line(KeyError('Item "extra" was not found')) == \
        'KeyError: Item "extra" was not found'
    assert _one_line(ValueError(test_checkpoint_error_reasons_are_short)) == "ValueError"
    m = CheckpointManager(tmp_path / "ck", keep=None)

    def full(*a, **k):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:  # orbax wraps it in a long error of its own
            raise ValueError("x" * 500 + " /very/long/path/that/is/cut") from e
    monkeypatch.setattr(m._mngr, "save", full)
    with pytest.raises(CheckpointError) as ei:
        m.save(3, {"w": __import__("numpy").zeros(2, "float32")})
    assert str(ei.value) == (f"could not write the checkpoint for round 3 to {tmp_path / 'ck' / '3'}"
                             ": No space left on device (or disk quota exceeded); free space on "
                             "the disk (the checkpoints before it are kept)")
    m.close()


def test_writes_that_fail_without_a_file_name_name_the_file(tmp_path, monkeypatch):
    import errno

    from framp_jax.rundir import MetricsCSV, write_json_atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")  # as write()/fsync() raise it
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as ei:
        write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert ei.value.filename == str(tmp_path / "results.json")
    assert cli.expected_failure_message(ei.value) == (
        f"cannot write ({tmp_path / 'results.json'}): No space left on device; free space on the "
        "disk or choose another --workdir")
    assert not list(tmp_path.glob(".results.json*"))  # no temporary file left behind
    monkeypatch.undo()
    m = MetricsCSV(tmp_path / "metrics.csv")
    m.append({"round": 1, "a": 0.5})
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as ei:
        m.append({"round": 2, "a": 0.5})
    assert ei.value.filename == str(tmp_path / "metrics.csv")


def test_library_logs_are_quiet_without_debug():
    import logging as pylogging

    from absl import logging
    before = (logging.get_verbosity(), pylogging.getLogger("asyncio").level)
    try:
        cli._quiet_library_logs()
        assert logging.get_verbosity() == logging.FATAL
        assert pylogging.getLogger("asyncio").level == pylogging.CRITICAL
    finally:
        logging.set_verbosity(before[0])
        pylogging.getLogger("asyncio").setLevel(before[1])


# ---------------------------------------------------------------------------------------------
# 7. lines that misled


def test_resume_while_a_run_starts_in_the_workdir_names_it(tiny_config, tmp_path):
    """No checkpoint yet, but another run holds the workdir: named, not 'nothing to resume'."""
    import json
    import signal
    import socket

    from test_reliability import _start_lock_holder

    from framp_jax import simulate
    from framp_jax.errors import WorkdirLockedError
    wd = tmp_path / "w"
    holder = _start_lock_holder(wd)
    try:
        with pytest.raises(WorkdirLockedError) as ei:
            simulate.run(tiny_config(), str(wd), resume=True, progress=False)
        started = json.loads((wd / ".framp-jax.lock").read_text())["started"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert str(ei.value) == (f"workdir {wd} is in use by another framp-jax run (pid {holder.pid} "
                             f"on host {socket.gethostname()}, started {started}); wait for it "
                             "to finish, or use another --workdir")
    from framp_jax.errors import CheckpointError
    with pytest.raises(CheckpointError, match="nothing to resume"):  # once it is gone
        simulate.run(tiny_config(), str(wd), resume=True, progress=False)


def test_changed_field_at_its_old_default_is_not_unset(tiny_config, tmp_path, monkeypatch):
    import numpy as np

    from framp_jax import simulate
    from framp_jax.checkpoint import CheckpointManager
    from framp_jax.errors import CheckpointError
    old = tiny_config()  # compute_dtype float32: left out of the hashed config
    wd = tmp_path / "run"
    with CheckpointManager(wd / "checkpoints", keep=None) as m:
        m.save(2, {"w": np.zeros(2, np.float32)}, {"config_hash": simulate.config_hash(old),
                                                    "config": simulate.hashed_config(old)})
    new = tiny_config(compute_dtype="bfloat16")
    monkeypatch.delenv("FRAMP_SWEEP_RUN", raising=False)
    with CheckpointManager(wd / "checkpoints", keep=None) as m:
        with pytest.raises(CheckpointError) as ei:
            simulate.check_checkpoints(new, str(wd), m, resume=True)
        assert 'changed: compute_dtype: "float32" -> "bfloat16"; resume with the original ' \
               "values, or start without --resume in a new workdir" in str(ei.value)
        monkeypatch.setenv("FRAMP_SWEEP_RUN", "1")  # a run a sweep started: its advice
        with pytest.raises(CheckpointError) as ei:
            simulate.check_checkpoints(new, str(wd), m, resume=True)
        assert str(ei.value).endswith("resume with the original values, or move this run "
                                      "directory away (the next framp-jax sweep invocation "
                                      "starts the run again)")


@pytest.mark.parametrize("make, expected", [
    (lambda np: np.full((4, 8, 8, 3), 200, np.int64),
     r"x_train has dtype int64; expected uint8 pixels in \[0, 255\] \(its values are in "
     r"\[200, 200\]: x\.astype\(np\.uint8\)\)"),
    (lambda np: np.full((4, 8, 8, 3), 0.5, np.float32),
     r"\(its values are in \[0\.5, 0\.5\]: \(x \* 255\)\.round\(\)\.astype\(np\.uint8\)\)"),
    (lambda np: np.full((4, 8, 8, 3), 300, np.int32),
     r"\(its values span \[300, 300\]: rescale them to \[0, 255\] first\)"),
    (lambda np: np.zeros((4, 3, 32, 32), np.uint8),
     r"x_train has shape \(4, 3, 32, 32\), channels first \(NCHW, 3 channels of 32x32\); store "
     r"images channels last \(NHWC\): np\.transpose\(x_train, \(0, 2, 3, 1\)\)"),
])
def test_user_npz_pixel_hints(tmp_path, make, expected):
    import numpy as np

    from framp_jax.data.vision import load_vision_dataset
    from framp_jax.errors import DataError
    x = make(np)
    p = tmp_path / "mine.npz"
    np.savez(p, x_train=x, y_train=np.arange(4) % 2, x_test=x, y_test=np.arange(4) % 2)
    with pytest.raises(DataError, match=expected) as ei:
        load_vision_dataset(f"npz:{p}")
    assert str(ei.value).startswith(f"{p}: ")


def test_sweep_status_leaves_out_the_error_of_an_earlier_config(tiny_config, tmp_path):
    from framp_jax import sweep as S
    rd = tmp_path / "run_seed0"
    old = tiny_config(lr=0.5)
    S._record_failure(str(rd), "run_seed0", "round 3: diverged", S._Status(str(tmp_path)),
                      lambda *a: None, old)
    assert (rd / S.ERROR_TXT).read_text() == "round 3: diverged\n"
    assert not S._error_of_another_config(str(rd), old)
    assert S._error_of_another_config(str(rd), tiny_config(lr=0.1))  # the sweep file changed it
    assert S._error_of_another_config(str(rd), tiny_config(lr=0.5, rounds=9))


# ---------------------------------------------------------------------------------------------
# 4. an unreachable coordinator


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wait_for_coordinator_is_bounded_and_says_so():
    import socket

    from framp_jax import distributed as dist
    port = _free_port()
    lines = []
    with pytest.raises(dist.DistributedError) as ei:
        dist.wait_for_coordinator(f"127.0.0.1:{port}", 1.6, lines.append, interval=0.5)
    assert str(ei.value) == (
        f"--coordinator_address='127.0.0.1:{port}': no coordinator answered within 1.6 s "
        f"(Connection refused); start process 0 (the coordinator) first, check that "
        f"127.0.0.1:{port} is reachable from this host, or wait longer with "
        "--coordinator_timeout")
    assert lines and all(ln.startswith(f"waiting for the coordinator at 127.0.0.1:{port} "
                                       "(process 0): ") and ln.endswith("of 1.6 s (Connection "
                                                                        "refused)")
                         for ln in lines)
    with socket.socket() as srv:  # a coordinator that answers: no wait
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        dist.wait_for_coordinator(f"127.0.0.1:{srv.getsockname()[1]}", 5, lines.append)
    assert dist.coordinator_timeout(None, {}) == 300.0
    assert dist.coordinator_timeout("2.5", {}) == 2.5
    assert dist.coordinator_timeout(None, {dist.ENV_COORDINATOR_TIMEOUT: "7"}) == 7.0
    with pytest.raises(dist.DistributedError, match=r"--coordinator_timeout='0' is not allowed: "
                                                    r"a number of seconds > 0"):
        dist.coordinator_timeout("0", {})


@pytest.mark.parametrize("process_id, expected", [
    (1, "no coordinator answered within 2 s (Connection refused); start process 0 (the "
        "coordinator) first"),
    (0, "the other 1 process(es) did not connect within 4 s (process 0 of 2); start every "
        "process with the same --coordinator_address and --num_processes, or wait longer with "
        "--coordinator_timeout"),
])
def test_cli_unreachable_coordinator_is_one_line(tmp_path, process_id, expected):
    port = _free_port()
    r = _cli("train", "--config", CORA, "--workdir", str(tmp_path / "w"),
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
             f"--process_id={process_id}", f"--coordinator_timeout={2 if process_id else 4}",
             env={"JAX_PLATFORMS": "cpu"}, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Fatal Python error" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"framp-jax: --coordinator_address='127.0.0.1:{port}': {expected}"), r.stderr[-3000:]
    assert not (tmp_path / "w").exists()


def test_union_set_smaller_than_the_test_set_is_noted(tiny_config, tmp_path):
    import numpy as np

    from conftest import make_tiny_images
    from framp_jax.problem import build_problem
    from framp_jax.simulate import union_note
    rng = np.random.default_rng(0)
    xtr, ytr = make_tiny_images(400, rng)
    xte, yte = make_tiny_images(100, rng)  # 100 test images do not divide among 8 clients
    np.savez(tmp_path / "t.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    c = tiny_config()
    c.dataset = f"npz:{tmp_path / 't.npz'}"
    info = build_problem(c, verbose=False).info
    assert (info["union_size"], info["test_size"]) == (96, 100)
    assert union_note(c, info) == ("note: Union is measured on the 96 of 100 test samples that "
                                   "the 8 clients' test splits hold (partition="
                                   "balanced_dirichlet leaves 4 out)")
    assert union_note(c, {**info, "union_size": 100}) is None


def test_closed_event_loop_noise_is_left_out():
    """tensorstore's callbacks into orbax's closed event loop after a failed read print one
    'Event loop is closed' traceback each; the CLI leaves them out without --debug."""
    seen = []
    hook = cli._without_closed_loop_noise(lambda *a: seen.append(a))
    noise = RuntimeError("Event loop is closed")
    hook(RuntimeError, noise, None)
    hook(type("U", (), {"exc_value": noise})())  # as sys.unraisablehook gets it
    assert seen == []
    bug = RuntimeError("a real bug")
    hook(RuntimeError, bug, None)
    assert seen == [(RuntimeError, bug, None)]
