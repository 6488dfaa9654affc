"""Runs over several processes: the multi-process settings are checked before anything runs, and
two local CPU processes with 4 devices each (one ``clients`` mesh of 8 devices over both) train
the same run as one process with 8 devices, also across a ``--resume``."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from framp_jax import distributed as dist
from framp_jax.config import base_config

# -- settings ---------------------------------------------------------------------------------


def test_resolve_reads_flags_then_environment():
    assert dist.resolve(environ={}) is None
    assert dist.resolve(True, environ={}) == dist.Settings(None, None, None)
    s = dist.resolve(False, "10.0.0.1:1234", "4", "3", environ={})
    assert s == dist.Settings("10.0.0.1:1234", 4, 3)
    env = {dist.ENV_COORDINATOR: "host:99", dist.ENV_NUM_PROCESSES: "2",
           dist.ENV_PROCESS_ID: "1"}
    assert dist.resolve(environ=env) == dist.Settings("host:99", 2, 1)
    # a flag wins over its environment variable
    assert dist.resolve(False, None, None, "0", environ=env) == dist.Settings("host:99", 2, 0)
    # with --distributed, what is missing is left to JAX's cluster detection
    assert dist.resolve(True, None, None, "2", environ={}) == dist.Settings(None, None, 2)
    assert dist.resolve(False, "[::1]:80", 1, 0, environ={}).coordinator_address == "[::1]:80"


@pytest.mark.parametrize("kwargs, env, message", [
    (dict(coordinator_address="localhost", num_processes="2", process_id="0"), {},
     "--coordinator_address='localhost' is not allowed: HOST:PORT"),
    (dict(coordinator_address="h:70000", num_processes="2", process_id="0"), {},
     "--coordinator_address='h:70000' is not allowed: HOST:PORT with a port in 1..65535"),
    (dict(coordinator_address="h:1", num_processes="0", process_id="0"), {},
     "--num_processes='0' is not allowed: an integer >= 1"),
    (dict(coordinator_address="h:1", num_processes="two", process_id="0"), {},
     "--num_processes='two' is not allowed: an integer >= 1"),
    (dict(coordinator_address="h:1", num_processes="2", process_id="2"), {},
     "--process_id='2' is not allowed: an integer in 0..1 (num_processes=2)"),
    (dict(coordinator_address="h:1"), {dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "-1"},
     "FRAMP_PROCESS_ID='-1' is not allowed: an integer in 0..1 (num_processes=2)"),
    (dict(process_id="1"), {},
     "--process_id='1' needs --coordinator_address and --num_processes too"),
])
def test_resolve_names_flag_value_and_what_is_allowed(kwargs, env, message):
    with pytest.raises(dist.DistributedError) as e:
        dist.resolve(environ=env, **kwargs)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_single_process_helpers_change_nothing():
    x = jax.numpy.arange(3.0)
    assert dist.is_writer() and not dist.is_multi_process()
    assert dist.to_host((x, 1))[0] is x
    dist.check_config(base_config())  # no check in a single process
    dist.NULL_WRITER.append({"round": 1})  # the stand-in writer accepts any call


# -- launching ----------------------------------------------------------------------------------

CONFIG_FILE = """\
from framp_jax.config import base_config

FIELDS = {fields!r}


def get_config():
    c = base_config()
    for k, v in FIELDS.items():
        setattr(c, k, v)
    return c
"""


def _write_config(tmp_path, c) -> str:
    base = base_config().to_dict()
    fields = {k: v for k, v in c.to_dict().items() if base.get(k) != v and k != "framp"}
    path = tmp_path / "config.py"
    path.write_text(CONFIG_FILE.format(fields=fields))
    return str(path)


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES,
                        dist.ENV_PROCESS_ID)}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    return env


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "framp_jax.cli", "train", "--noprogress", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, tag, args, processes=2, devices=4, timeout=900):
    """Starts ``processes`` CLI processes of one run (``devices`` CPU devices each) and waits for
    all; returns their (returncode, stdout, stderr)."""
    port = _free_port()
    procs, files = [], []
    for i in range(processes):
        out = open(tmp_path / f"{tag}.{i}.out", "w+")
        err = open(tmp_path / f"{tag}.{i}.err", "w+")
        files.append((out, err))
        procs.append(subprocess.Popen(
            _cli(*args, f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={processes}", f"--process_id={i}"),
            stdout=out, stderr=err, env=_env(devices)))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    res = []
    for p, (out, err) in zip(procs, files):
        out.seek(0), err.seek(0)
        res.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return res


def _ok(results):
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"process {i} exited with {rc}:\n{out[-2000:]}\n{err[-4000:]}"


def _rows(workdir):
    from framp_jax.rundir import read_metrics_csv
    return read_metrics_csv(os.path.join(workdir, "metrics.csv"))


def _final_params(c, workdir, round):
    """The checkpointed state of ``round`` (restored onto this process's one device)."""
    from framp_jax.checkpoint import CheckpointManager
    from framp_jax.problem import build_algorithm, build_problem
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    target = alg.init(jax.random.key(c.seed), prob.data)
    with CheckpointManager(os.path.join(workdir, "checkpoints"), keep=None) as m:
        state, extra = m.restore(round, target=target)
    return [np.asarray(a) for a in jax.tree.leaves(state)], extra


def test_cli_rejects_bad_process_flags_before_loading_data(tmp_path):
    cfg = _write_config(tmp_path, base_config())  # cifar10: never loaded, the flags fail first
    r = subprocess.run(_cli("--config", cfg, "--workdir", str(tmp_path / "wd"),
                            "--coordinator_address=127.0.0.1:1", "--num_processes=2",
                            "--process_id=5"),
                       capture_output=True, text=True, timeout=300, env=_env(1))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "framp-jax: --process_id='5' is not allowed: an integer in 0..1 (num_processes=2)")
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_two_processes_match_one_process_with_eight_devices(tiny_config, tmp_path):
    c = tiny_config(rounds=3, clients_per_round=8, checkpoint_every=100)
    cfg = _write_config(tmp_path, c)

    # the reference: one process, 8 devices, clients split 8 ways
    ref = str(tmp_path / "one")
    r = subprocess.run(_cli("--config", cfg, "--workdir", ref, "--config.mesh_clients=8"),
                       capture_output=True, text=True, timeout=900, env=_env(8))
    assert r.returncode == 0, r.stderr[-4000:]

    # the same run over 2 processes x 4 devices (mesh_clients=0: all 8), stopped after round 2
    # and resumed to round 3 (config.rounds may change on --resume)
    mp = str(tmp_path / "two")
    bad = _launch(tmp_path, "mesh1", ["--config", cfg, "--workdir", mp])  # mesh_clients=1
    for rc, _, err in bad:
        assert rc != 0 and err.strip().splitlines()[-1] == (
            "framp-jax: bad config: config.mesh_clients=1 is not allowed: 0 or 8 (every device "
            "of the 2 processes) in a run over several processes"), err[-2000:]
    first = _launch(tmp_path, "first", ["--config", cfg, "--workdir", mp,
                                        "--config.mesh_clients=0", "--config.rounds=2"])
    _ok(first)
    # only process 0 writes the run directory and prints
    assert sorted(os.listdir(mp)) == sorted(os.listdir(ref))
    assert {"config.json", "metrics.csv", "results.json", "tb", "checkpoints"} <= set(os.listdir(mp))
    assert len(os.listdir(os.path.join(mp, "tb"))) == 1
    assert "results:" in first[0][1] and "results:" not in first[1][1]
    assert json.load(open(os.path.join(mp, "config.json")))["_resolved"]["devices"] == 8
    second = _launch(tmp_path, "resume", ["--config", cfg, "--workdir", mp,
                                          "--config.mesh_clients=0", "--resume"])
    _ok(second)
    assert "resumed from round 2" in second[0][1]

    ref_rows, mp_rows = _rows(ref), _rows(mp)
    assert [x["round"] for x in mp_rows] == [1, 2, 3] == [x["round"] for x in ref_rows]
    keys = [k for k in ref_rows[0] if k not in ("round", "wall_s")]
    assert keys == [k for k in mp_rows[0] if k not in ("round", "wall_s")]
    for x, y in zip(ref_rows, mp_rows):
        for k in keys:
            if k == "train_loss":
                # a cross-process (gloo) sum adds the 8 devices' partial sums in another order
                # than the in-process one: equal to float rounding
                assert abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(x[k])), (x["round"], k, x[k], y[k])
            else:
                assert x[k] == y[k], (x["round"], k, x[k], y[k])
    res_ref = json.load(open(os.path.join(ref, "results.json")))
    res_mp = json.load(open(os.path.join(mp, "results.json")))
    assert res_mp["final"] == res_ref["final"]
    assert res_mp["compiles"] == res_ref["compiles"] == 1

    p_ref, e_ref = _final_params(c, ref, 3)
    p_mp, e_mp = _final_params(c, mp, 3)
    assert e_mp["history"] == e_ref["history"]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(p_ref, p_mp))
    assert diff < 1e-6, diff
