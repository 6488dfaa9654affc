"""framp-jax sweep --shard (framp_jax/shard.py): the shard from I/N or the environment (SLURM's
job array, FRAMP_SHARD_*), disjoint round-robin shares that cover the sweep, the workdir's
locks (shards beside each other, not beside an unsharded sweep, one process per shard), the
memory share of --jobs N, and two shard processes over one workdir training every run exactly
once, with --status showing the whole sweep from a shard."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from framp_jax import shard as SH
from framp_jax import sweep as S
from framp_jax.errors import FrampError, WorkdirLockedError

from conftest import TINY_FIELDS


def test_parse_shard_from_the_flag_and_the_environment():
    assert SH.parse_shard(None) is None and SH.parse_shard("") is None
    assert SH.parse_shard("1/4") == SH.Shard(1, 4) and str(SH.Shard(1, 4)) == "1/4"
    assert SH.parse_shard(" 0 / 1 ") == SH.Shard(0, 1)
    for bad in ("4/4", "-1/2", "1/0", "a/b", "2", "1/2/3"):
        with pytest.raises(SH.ShardError):
            SH.parse_shard(bad, {})
    assert issubclass(SH.ShardError, FrampError)  # the CLI reports it in one line
    # framp_jax's own variables first, then SLURM's array (numbered from its first task, by step)
    env = {"FRAMP_SHARD_INDEX": "2", "FRAMP_SHARD_COUNT": "3", "SLURM_ARRAY_TASK_ID": "0",
           "SLURM_ARRAY_TASK_COUNT": "5"}
    assert SH.parse_shard("auto", env) == SH.Shard(2, 3)
    assert SH.parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "5"}
                          ) == SH.Shard(3, 5)
    assert SH.parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4",
                                   "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2"}
                          ) == SH.Shard(3, 4)
    with pytest.raises(SH.ShardError, match="evenly spaced"):  # --array=1,4,9
        SH.parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3",
                                "SLURM_ARRAY_TASK_MIN": "1"})
    with pytest.raises(SH.ShardError, match="no shard in the environment"):
        SH.parse_shard("auto", {})
    with pytest.raises(SH.ShardError, match="both FRAMP_SHARD_INDEX and FRAMP_SHARD_COUNT"):
        SH.parse_shard("auto", {"FRAMP_SHARD_INDEX": "0"})
    with pytest.raises(SH.ShardError, match="not an integer"):
        SH.parse_shard("auto", {"FRAMP_SHARD_INDEX": "x", "FRAMP_SHARD_COUNT": "2"})


@pytest.mark.parametrize("n_units,count", [(1, 1), (7, 3), (3, 5), (12, 4)])
def test_shares_are_disjoint_cover_the_sweep_and_keep_units_whole(n_units, count):
    units = [[f"u{i}a", f"u{i}b"] for i in range(n_units)]  # e.g. batches of two runs
    shares = [SH.shard_units(units, SH.Shard(i, count)) for i in range(count)]
    flat = [u for s in shares for u in s]
    assert sorted(map(tuple, flat)) == sorted(map(tuple, units))  # each unit exactly once
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    assert all(u in units for u in flat)  # whole units
    assert SH.shard_units(units, None) == units


def test_jobs_share_the_device_memory():
    env, note = SH.child_memory_env({"PATH": "/bin"}, 1)
    assert env == {"PATH": "/bin"} and note is None
    env, note = SH.child_memory_env({"PATH": "/bin"}, 4)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225" and "0.225" in note
    env, note = SH.child_memory_env({"PATH": "/bin"}, 3)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.300"
    for var in SH.MEMORY_VARS:  # the user's own choice is kept
        env, note = SH.child_memory_env({var: "false"}, 4)
        assert env == {var: "false"} and var in note


def test_sweep_locks_shards_beside_each_other_not_beside_an_unsharded_sweep(tmp_path):
    wd = str(tmp_path / "wd")
    a = SH.SweepLock(wd, SH.Shard(0, 2)).acquire()
    b = SH.SweepLock(wd, SH.Shard(1, 2)).acquire()
    try:
        with pytest.raises(WorkdirLockedError, match="shard 0/2 .* already running"):
            SH.SweepLock(wd, SH.Shard(0, 2)).acquire()
        with pytest.raises(WorkdirLockedError):
            SH.SweepLock(wd, None).acquire()  # an unsharded sweep of the same workdir
    finally:
        a.release()
        b.release()
    whole = SH.SweepLock(wd, None).acquire()
    try:
        with pytest.raises(WorkdirLockedError, match="unsharded framp-jax sweep"):
            SH.SweepLock(wd, SH.Shard(1, 2)).acquire()
        assert not SH.SweepLock(wd, None)._locks
    finally:
        whole.release()
    SH.SweepLock(wd, SH.Shard(1, 2)).acquire().release()  # released: free again


def _write_preset(path: Path, npz: str, **fields):
    fields = {**TINY_FIELDS, "dataset": f"npz:{npz}", **fields}
    path.write_text("from framp_jax.config import base_config\n\n\ndef get_config():\n"
                    "    c = base_config()\n"
                    f"    for k, v in {fields!r}.items():\n        setattr(c, k, v)\n"
                    "    return c\n")


def _starts(rundir: Path) -> int:
    log = rundir / S.TRAIN_LOG
    return sum(ln.startswith("# ") for ln in log.read_text().splitlines()) if log.exists() else 0


# A stand-in for `framp-jax train` (the sweep's train_command replaced in the shard processes):
# it takes the run's workdir lock as a run does, appends the run's name to trained.txt, and
# writes the finished run's config.json and results.json; no JAX, so the test takes seconds.
_FAKE_TRAIN = r"""
import fcntl, json, os, sys, time
rundir, cfg, rounds, name, ledger = sys.argv[1:6]
os.makedirs(rundir, exist_ok=True)
fd = os.open(os.path.join(rundir, ".framp-jax.lock"), os.O_RDWR | os.O_CREAT, 0o666)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
with open(ledger, "a") as f:
    f.write(name + "\n")
time.sleep(0.3)
with open(os.path.join(rundir, "config.json"), "w") as f:
    f.write(cfg)
with open(os.path.join(rundir, "results.json"), "w") as f:
    json.dump({"rounds": int(rounds), "final": {}}, f)
"""

_SHARD_PROCESS = r"""
import json, sys
import framp_jax.sweep as S
sw, wd, shard, fake, ledger = sys.argv[1:6]

def train_command(run, workdir, resume):
    c = S.resolve(run)
    return [sys.executable, "-c", fake, workdir, c.to_json_best_effort(), str(c.rounds),
            run.name, ledger]

S.train_command = train_command
out = S.run_sweep(sw, wd, jobs=2, shard=shard)
print("RESULT", json.dumps({k: out[k] for k in ("done", "failed", "skipped", "other_shards")}))
"""


def test_two_shard_processes_share_one_workdir_without_training_a_run_twice(tiny_npz, tmp_path):
    """Two sweep processes, ``--shard 0/2`` and ``1/2``, started together on one workdir of 7
    runs (their training replaced by a stand-in that records each run it trains): every run
    finished, trained exactly once, by its round-robin shard; a second pass trains nothing."""
    _write_preset(tmp_path / "tiny.py", tiny_npz)
    (tmp_path / "sw.py").write_text(
        "from framp_jax.sweep import grid\n\n\ndef get_sweep():\n"
        "    return grid({'a': 'tiny.py', 'b': ('tiny.py', {'lr': 0.2})}, seeds=(0, 1, 2))"
        " + grid({'c': 'tiny.py'}, seeds=(5,))\n")
    sw, wd, ledger = str(tmp_path / "sw.py"), tmp_path / "runs", tmp_path / "trained.txt"
    names = [r.name for r in S.load_sweep(sw)]
    assert len(names) == 7
    procs = [subprocess.Popen([sys.executable, "-c", _SHARD_PROCESS, sw, str(wd), f"{i}/2",
                               _FAKE_TRAIN, str(ledger)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    trained = ledger.read_text().split()
    assert sorted(trained) == sorted(names)  # every run, each exactly once
    for i, out in enumerate(outs):
        mine = names[i::2]
        assert f"shard {i}/2 trains {len(mine)} of the 7 runs" in out, out
        assert all(f"starting {n}" in out for n in mine), out
        assert not any(f"starting {n}" in out for n in names if n not in mine), out
        res = json.loads(out.split("RESULT ")[-1])
        assert res == {"done": len(mine), "failed": 0, "skipped": 0, "other_shards": 7 - len(mine)}
    status = (wd / S.STATUS_TSV).read_text().splitlines()
    for n in names:
        assert S.run_state(str(wd / n), S.resolve(next(r for r in S.load_sweep(sw)
                                                        if r.name == n)))[0] == "finished"
        assert sum(f"\t{n}\tstart\t" in ln for ln in status) == 1, status
    rows = S.sweep_status(sw, str(wd))  # the whole sweep, from any shard
    units = [[r.name for r in u] for u in S.sweep_units(S.load_sweep(sw))]
    assert SH.shard_summary(rows, units, 2).splitlines() == [
        "shard 0/2: 4 runs: 4 finished", "shard 1/2: 3 runs: 3 finished"]
    out = S.run_sweep(sw, str(wd), shard="0/2", log=lambda *a: None)  # nothing left to train
    assert (out["done"], out["skipped"], out["other_shards"]) == (0, 4, 3)
    assert sorted(ledger.read_text().split()) == sorted(names)


@pytest.mark.slow  # 4 real runs: 3 min on 2 busy cores
def test_two_shard_processes_train_every_run_exactly_once(tiny_npz, tmp_path):
    """Two ``--shard auto`` processes (FRAMP_SHARD_INDEX 0 and 1 of 2) started together on one
    workdir: every run finished, each trained once (one start in its train.log and in
    status.tsv), by the shard round-robin gives it; the status from a shard is the whole sweep."""
    _write_preset(tmp_path / "tiny.py", tiny_npz, rounds=1, val_frac=0.0)
    (tmp_path / "sw.py").write_text(
        "from framp_jax.sweep import grid\n\n\ndef get_sweep():\n"
        "    return grid({'a': 'tiny.py', 'b': ('tiny.py', {'lr': 0.2})}, seeds=(0, 1))\n")
    sw, wd = str(tmp_path / "sw.py"), tmp_path / "runs"
    names = [r.name for r in S.load_sweep(sw)]
    assert names == ["a_seed0", "a_seed1", "b_seed0", "b_seed1"]
    cmd = [sys.executable, "-m", "framp_jax.cli", "sweep", "--sweep", sw, "--workdir", str(wd),
           "--shard", "auto", "--noprogress"]
    import os
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "FRAMP_SHARD_INDEX": str(i),
                                   "FRAMP_SHARD_COUNT": "2"}) for i in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    for i, out in enumerate(outs):
        assert f"shard {i}/2 trains 2 of the 4 runs" in out, out
        mine = names[i::2]
        assert all(f"starting {n}" in out for n in mine), out
        assert not any(f"starting {n}" in out for n in names if n not in mine), out
    status = (wd / S.STATUS_TSV).read_text().splitlines()
    for n in names:
        res = json.loads((wd / n / "results.json").read_text())
        assert res["rounds"] == 1
        assert _starts(wd / n) == 1, n
        assert sum(f"\t{n}\tstart\t" in ln for ln in status) == 1, status
        assert sum(f"\t{n}\tdone\t" in ln for ln in status) == 1, status
    # any shard shows the whole sweep, and what each shard holds
    r = subprocess.run([sys.executable, "-m", "framp_jax.cli", "sweep", "--sweep", sw,
                        "--workdir", str(wd), "--status", "--shard", "1/2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[-3:] == ["4 runs: 4 finished", "shard 0/2: 2 runs: 2 finished",
                          "shard 1/2: 2 runs: 2 finished"], r.stdout
    # a second pass of a shard trains nothing
    out = S.run_sweep(sw, str(wd), shard="1/2", log=lambda *a: None)
    assert (out["done"], out["skipped"], out["other_shards"]) == (0, 2, 2)


def test_status_names_a_run_started_on_another_host(tiny_npz, tmp_path):
    """A run directory whose lock records a process of another host (a shard elsewhere): its
    state is kept (it cannot be checked from here) and the detail names that process."""
    from framp_jax.rundir import LOCK_NAME
    _write_preset(tmp_path / "tiny.py", tiny_npz)
    (tmp_path / "sw.py").write_text("from framp_jax.sweep import grid\n\n\ndef get_sweep():\n"
                                    "    return grid({'a': 'tiny.py'}, seeds=(0, 1))\n")
    sw, wd = str(tmp_path / "sw.py"), tmp_path / "runs"
    (wd / "a_seed0" / "checkpoints" / "3").mkdir(parents=True)
    (wd / "a_seed0" / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "node-elsewhere-7",
                                                        "started": "T1"}))
    rows = {r["name"]: r for r in S.sweep_status(sw, str(wd))}
    assert rows["a_seed0"]["state"] == "partial"
    assert rows["a_seed0"]["detail"].endswith(
        "; last started by pid 4242 on host node-elsewhere-7, started T1")
    assert rows["a_seed1"] == {"name": "a_seed1", "state": "new", "detail": ""}
