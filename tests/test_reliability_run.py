"""Issue 30, items 8 and 9 end to end (real tiny runs, ~40 s each on 2 busy cores: slow).

- Ctrl-C during a run: one line saying at which round it stopped and from which checkpoint
  ``--resume`` continues (the CLI: exit status 130, no traceback).
- TensorBoard after that resume shows every round once (the resumed writer's purge step drops
  the rounds logged after the checkpoint), and a fresh run does not keep the event files of an
  earlier run that failed before its first checkpoint.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from framp_jax import simulate
from framp_jax.rundir import EventWriter, read_metrics_csv

from test_reliability_cli import REPO, tensorboard_steps

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def quiet(*a, **k):
    pass


def run(c, workdir, **kw):
    return simulate.run(c, str(workdir), progress=False, log=quiet, warn=quiet, **kw)


def test_interrupt_then_resume_shows_each_round_once_in_tensorboard(tiny_config, tmp_path,
                                                                    monkeypatch):
    wd = tmp_path / "run"
    with EventWriter(wd / "tb") as w:  # an earlier run that failed before its first checkpoint
        for s in range(1, 7):
            w.scalars({"train_loss": 9.0}, s)
    c = tiny_config(rounds=4, checkpoint_every=2, eval_every=1)

    real = EventWriter.scalars
    fired = []

    def ctrl_c_after_round_3(self, values, step):
        real(self, values, step)
        if step == 3 and not fired:  # after round 3 is logged; its checkpoint is round 2's
            fired.append(step)
            raise KeyboardInterrupt
    monkeypatch.setattr(EventWriter, "scalars", ctrl_c_after_round_3)
    with pytest.raises(simulate.RunInterrupted) as ei:
        run(c, wd)
    assert str(ei.value) == (f"stopped at round 3 of 4; continue with --resume from the latest "
                             f"checkpoint, round 2 ({wd / 'checkpoints' / '2'}) (round 3 is "
                             "trained again)")
    assert tensorboard_steps(wd / "tb") == [1, 2, 3]  # the stale file is gone
    res = run(c, wd, resume=True)
    assert res["rounds"] == 4
    assert tensorboard_steps(wd / "tb") == [1, 2, 3, 4]  # round 3 once, the resumed one
    assert [r["round"] for r in read_metrics_csv(wd / "metrics.csv")] == [1, 2, 3, 4]


def test_cli_ctrl_c_is_one_line_and_resumable(tiny_npz, tmp_path):
    from test_reliability import _config_file
    wd = tmp_path / "w"
    args = ["train", "--config", _config_file(tmp_path, tiny_npz), "--workdir", str(wd),
            "--noprogress", "--config.rounds=100000", "--config.checkpoint_every=2",
            "--config.eval_every=1000"]
    p = subprocess.Popen([sys.executable, "-m", "framp_jax.cli", *args], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (wd / "checkpoints" / "2").is_dir():
            assert p.poll() is None, p.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("framp-jax: stopped at round ") and " of 100000; continue with " \
        "--resume from the latest checkpoint, round " in last, last


def test_cli_resume_past_a_corrupt_checkpoint_prints_one_warning(tiny_config, tiny_npz, tmp_path):
    """The newest checkpoint's arrays are gone: one warning line, no traceback (tensorstore's
    'Event loop is closed' callbacks are left out), and the run finishes."""
    import glob

    from test_reliability import _config_file
    wd = tmp_path / "w"
    run(tiny_config(rounds=4, checkpoint_every=2), wd)
    for f in glob.glob(str(wd / "checkpoints" / "4" / "state" / "**" / "d" / "*"), recursive=True):
        os.remove(f)
    r = subprocess.run([sys.executable, "-m", "framp_jax.cli", "train", "--config",
                        _config_file(tmp_path, tiny_npz), "--workdir", str(wd), "--noprogress",
                        "--config.rounds=4", "--config.checkpoint_every=2", "--resume"],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("framp-jax: warning: checkpoint(s) of round 4 (ValueError: ")
    assert "tensorstore_spec" not in lines[0] and "resuming from round 2" in lines[0]
