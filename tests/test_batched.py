"""Batched runs (framp_jax/batched.py, framp-jax sweep --batch K): which runs batch together,
the padding of the members' data to one shape, and members that equal the same runs trained
alone: bit for bit in the unroll and loop modes (unroll also after a resume from the members'
checkpoints), within a stated tolerance in the vmap and map modes, on one device, a ``runs``
mesh and a ``runs`` x ``clients`` mesh; a diverging member stops alone; sweep --batch.
Every test that trains is marked slow (minutes on 2 busy cores): run them with -m slow.

Tolerance (vmap / map, where XLA reassociates the batched kernels): every metrics.csv value of a
member within 2e-4 of its run alone after 2-3 rounds on the tiny data. Measured: FedAvg map 0,
vmap ~3e-8 in the parameters; FRAMP (seed, lr, framp.lam, framp.hn_lr all differing) vmap
1.2e-5, map 4.8e-7; Cora (padded partitions) map 0; runs x clients mesh 1.2e-7."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import batched as B
from framp_jax import sweep as S
from framp_jax.rundir import read_metrics_csv
from framp_jax.simulate import run as train_alone

from conftest import TINY_FIELDS

QUIET = dict(log=lambda *a, **k: None)
VMAP_TOL = 2e-4


# ---------------------------------------------------------------------------------------------
# grouping


def test_batch_key_groups_seeds_and_batchable_values_only(tiny_config):
    base = tiny_config(method="framp")
    key = B.batch_key(base)
    same = [tiny_config(method="framp", seed=3, lr=0.1, eval_every=2, checkpoint_every=7,
                        max_loss_ratio=0.0)]
    c = tiny_config(method="framp")
    c.framp.lam, c.framp.hn_lr = 0.5, 3e-3
    same.append(c)
    assert all(B.batch_key(x) == key for x in same)
    c = tiny_config(method="framp")
    c.framp.lam = 0.0  # the alignment term leaves the program: another batch
    other = [tiny_config(method="framp", local_steps=4), tiny_config(method="fedavg"),
             tiny_config(method="framp", rounds=4), c]
    assert all(B.batch_key(x) not in (None, key) for x in other)
    assert B.batch_key(tiny_config(diagnostics=True)) is None
    assert B.batch_key(tiny_config(record_mask_reuse=True, method="fiarse")) is None
    # HeteroFL's sBN clients are drawn from the seed in Python: its seeds do not batch
    import ml_collections as mlc
    h0, h1 = tiny_config(method="heterofl", seed=0), tiny_config(method="heterofl", seed=1)
    assert B.batch_key(h0) == B.batch_key(h1)
    sbn = lambda **kw: tiny_config(method="heterofl", heterofl=mlc.ConfigDict({"sbn_clients": 2}),  # noqa: E731
                                   **kw)
    assert B.batch_key(sbn(seed=0)) != B.batch_key(sbn(seed=1))
    assert B.batch_key(sbn(seed=0)) == B.batch_key(sbn(seed=0, lr=0.1))


def test_group_runs_in_sweep_order_up_to_k(tiny_config):
    runs = [S.Run(f"r{i}", "p.py") for i in range(7)]
    cfg = {"r0": tiny_config(seed=0), "r1": tiny_config(seed=1), "r2": tiny_config(local_steps=4),
           "r3": tiny_config(seed=2), "r4": tiny_config(diagnostics=True),
           "r5": tiny_config(seed=3, lr=0.1), "r6": tiny_config(seed=4, local_steps=4)}
    names = lambda groups: [[r.name for r in g] for g in groups]  # noqa: E731
    assert names(B.group_runs(runs, cfg, 2)) == [["r0", "r1"], ["r2", "r6"], ["r3", "r5"], ["r4"]]
    assert names(B.group_runs(runs, cfg, 3)) == [["r0", "r1", "r3"], ["r2", "r6"], ["r4"], ["r5"]]
    assert names(B.group_runs(runs, cfg, 1)) == [[f"r{i}"] for i in range(7)]
    with pytest.raises(B.BatchError, match="--batch=0"):
        B.group_runs(runs, cfg, 0)
    with pytest.raises(B.BatchError, match="differ in: local_steps: 5 -> 4"):
        B.check_batchable([cfg["r0"], cfg["r2"]])


def test_hyper_reads_as_a_traced_number():
    h = B.Hyper(jnp.float32(0.5), True)
    assert bool(h) and not bool(B.Hyper(jnp.float32(0.0), False))
    for got, want in ((h * 4.0, 2.0), (4.0 * h, 2.0), (h + 1, 1.5), (1 - h, 0.5), (h / 2, 0.25),
                      (1 / h, 2.0), (-h, -0.5), (jnp.asarray(h) * 2, 1.0)):
        assert float(got) == want
    import ml_collections as mlc
    o = B.OptionsView(mlc.ConfigDict({"lam": 1.0, "align": "fedproto"}), {"lam": h})
    assert o.lam is h and o["lam"] is h and o.align == "fedproto" and o.get("x", 3) == 3
    assert "align" in o and "lam" in o


# ---------------------------------------------------------------------------------------------
# padding


def test_pad_members_images_keep_each_clients_samples(tiny_config):
    from framp_jax.problem import build_problem
    probs = [build_problem(tiny_config(seed=s)) for s in (0, 1)]
    sizes = [p.data.train_x.shape[1] for p in probs]
    padded = B.pad_members([p.data for p in probs])
    n = max(sizes)
    for p, d in zip(probs, padded):
        assert d.train_x.shape[1] == n and d.train_y.shape[1] == n and d.union_x is None
        k = p.data.train_x.shape[1]
        np.testing.assert_array_equal(d.train_x[:, :k], np.asarray(p.data.train_x))
        assert not d.train_x[:, k:].any()
        np.testing.assert_array_equal(d.train_count, np.asarray(p.data.train_count))


def test_repad_graph_equals_padding_to_the_larger_shape():
    """Padding a stacked graph client array further gives exactly what pad_clients gives at the
    larger sizes (dense and sparse features)."""
    from framp_jax.data import graph_partition as gp
    from framp_jax.data.graph_modality import graph_fed_arrays
    from framp_jax.data.graphs import Graph
    rng = np.random.default_rng(0)
    n, k, f = 60, 3, 6
    y = rng.integers(0, k, n).astype(np.int32)
    x = (np.eye(k)[y] @ rng.standard_normal((k, f)) * (rng.random((n, f)) < 0.3)).astype(np.float32)
    src, dst = np.arange(n - 1), np.arange(1, n)
    e = np.concatenate([np.stack([src, dst]), np.stack([dst, src])], 1).astype(np.int32)
    clients = gp.partition_graph(Graph(x, y, e, k, {"name": "synthetic"}), 3, seed=5, method="bfs")
    small = gp.pad_clients(clients)
    n_big, e_big = small.labels.shape[1] + 7, small.graphs.senders.shape[1] + 5
    big = gp.pad_clients(clients, n_pad=n_big, e_pad=e_big)
    for features in ("dense", "sparse"):
        d_small = jax.device_get(graph_fed_arrays(small, np.ones(3), k, features))
        d_big = jax.device_get(graph_fed_arrays(big, np.ones(3), k, features))
        nnz = 0
        if features == "sparse":
            nnz = d_small.train_x.graphs.nodes.rows.shape[1] + 3
            from framp_jax.models.gcn import sparse_features
            d_big = d_big._replace(train_x=d_big.train_x._replace(graphs=d_big.train_x.graphs._replace(
                nodes=sparse_features(np.asarray(big.graphs.nodes), nnz_pad=nnz))))
        got = B._repad_graph(d_small.train_x, n_big, e_big, nnz)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(d_big.train_x)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert jax.tree.structure(got) == jax.tree.structure(d_big.train_x)


# ---------------------------------------------------------------------------------------------
# training


def _metric_rows(wd):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics_csv(f"{wd}/metrics.csv")]


def _max_diff(rows_a, rows_b):
    assert len(rows_a) == len(rows_b) and all(a.keys() == b.keys() for a, b in zip(rows_a, rows_b))
    return max(abs(a[k] - b[k]) for x, y in zip(rows_a, rows_b) for a, b in [(x, y)] for k in a)


@pytest.fixture(scope="module")
def alone(tiny_config, tmp_path_factory):
    """The runs a and b (2 rounds, a checkpoint every round) trained alone."""
    root = tmp_path_factory.mktemp("alone")
    cfgs = {"a": tiny_config(seed=0, lr=0.3, rounds=2, checkpoint_every=1),
            "b": tiny_config(seed=1, lr=0.2, rounds=2, checkpoint_every=1)}
    res = {n: train_alone(c, str(root / n), progress=False, **QUIET) for n, c in cfgs.items()}
    return cfgs, res, root


@pytest.mark.slow  # 1-3 min each on 2 busy cores (the runs alone: the fixture)
def test_unroll_members_equal_runs_alone_bit_for_bit_and_a_diverging_member_stops_alone(
        tiny_config, alone, tmp_path):
    cfgs, res, root = alone
    bad = tiny_config(seed=2, lr=1e6, rounds=2, checkpoint_every=1)
    wds = [str(tmp_path / n) for n in ("a", "b", "bad")]
    out = B.train_batch([cfgs["a"], cfgs["b"], bad], wds, mode="unroll", warn=lambda m: None,
                        **QUIET)
    assert isinstance(out[2], B.FrampError) and "NaN/Inf" in str(out[2])
    assert "NaN/Inf" in (tmp_path / "bad" / "error.txt").read_text()
    assert not (tmp_path / "bad" / "results.json").exists()
    for i, n in enumerate(("a", "b")):
        assert _max_diff(_metric_rows(wds[i]), _metric_rows(root / n)) == 0.0
        got = json.loads((tmp_path / n / "results.json").read_text())
        assert got["final"] == res[n]["final"] and got["per_client"] == res[n]["per_client"]
        assert got["batch"]["members"] == ["a", "b", "bad"] and got["batch"]["mode"] == "unroll"
        assert got["compiles"] == 1 and out[i]["final"] == res[n]["final"]
        cfg = json.loads((tmp_path / n / "config.json").read_text())
        assert cfg["seed"] == cfgs[n].seed and cfg["_resolved"]["config_hash"] == \
            json.loads((root / n / "config.json").read_text())["_resolved"]["config_hash"]
        assert S.run_state(str(tmp_path / n), cfgs[n])[0] == "finished"
        assert sorted(os.listdir(tmp_path / n / "checkpoints")) == ["1", "2"]
        assert list((tmp_path / n / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow  # 1-3 min each on 2 busy cores (the runs alone: the fixture)
def test_a_batch_resumes_from_its_members_checkpoints_bit_for_bit(tiny_config, alone, tmp_path):
    """A batch stopped after round 1 (its members' checkpoints) resumed to round 2 equals the
    runs trained alone; members whose checkpoints are at different rounds are refused."""
    cfgs, res, root = alone
    wds = [str(tmp_path / n) for n in ("a", "b")]
    first = [c.copy_and_resolve_references() for c in (cfgs["a"], cfgs["b"])]
    for c in first:
        c.rounds = 1
    B.train_batch(first, wds, mode="unroll", **QUIET)
    out = B.train_batch([cfgs["a"], cfgs["b"]], wds, resume=True, mode="unroll", **QUIET)
    for i, n in enumerate(("a", "b")):
        assert _max_diff(_metric_rows(wds[i]), _metric_rows(root / n)) == 0.0
        assert out[i]["final"] == res[n]["final"]
    # members whose checkpoints are at different rounds: refused before anything is written
    import shutil
    shutil.copytree(root / "a", tmp_path / "a_alone")  # checkpoints 1 and 2
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "2")  # b back at round 1
    longer = [c.copy_and_resolve_references() for c in (cfgs["a"], cfgs["b"])]
    for c in longer:
        c.rounds = 3
    before = (tmp_path / "b" / "metrics.csv").read_text()
    with pytest.raises(B.BatchError, match="different rounds .*a_alone: 2, b: 1"):
        B.train_batch(longer, [str(tmp_path / "a_alone"), wds[1]], resume=True, mode="unroll",
                      **QUIET)
    assert (tmp_path / "b" / "metrics.csv").read_text() == before


@pytest.mark.slow  # two compiles of FRAMP's round per mode: minutes on 2 busy cores
@pytest.mark.parametrize("mode", ["vmap", "map", "loop"])
def test_vmap_and_map_members_match_runs_alone_within_tolerance(tiny_config, tmp_path, mode):
    """FRAMP with every batchable value differing (seed, lr, framp.lam, framp.hn_lr): vmap and
    map within the tolerance, loop (the same traced program, called per member) bit for bit."""
    cs = [tiny_config(method="framp", seed=0, lr=0.3, rounds=3),
          tiny_config(method="framp", seed=1, lr=0.2, rounds=3)]
    cs[1].framp.lam, cs[1].framp.hn_lr = 0.5, 3e-3
    wds = [str(tmp_path / f"m{i}") for i in range(2)]
    B.train_batch(cs, wds, mode=mode, **QUIET)
    for i, c in enumerate(cs):
        train_alone(c, str(tmp_path / f"alone{i}"), progress=False, **QUIET)
        diff = _max_diff(_metric_rows(wds[i]), _metric_rows(tmp_path / f"alone{i}"))
        print(f"{mode} member {i}: max metrics.csv difference {diff:.3g}")
        assert diff <= (0.0 if mode == "loop" else VMAP_TOL)


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cora" / "cora.npz").is_file(), reason="shared/data/cora absent")
def test_graph_members_of_different_partitions_match_runs_alone(tmp_path):
    """Cora seeds 0 and 1 (graph_split_seed -1: each its own partition, padded to one shape),
    map mode: each member equals its run alone."""
    from conftest import load_script
    cs = []
    for s in (0, 1):
        c = load_script(Path(__file__).resolve().parents[1] / "experiments" / "configs"
                        / "fedavg_cora.py").get_config()
        c.data_dir, c.seed, c.rounds, c.local_steps, c.gcn_hidden, c.eval_every = \
            str(SHARED), s, 2, 2, 16, 1
        cs.append(c)
    wds = [str(tmp_path / f"m{i}") for i in range(2)]
    B.train_batch(cs, wds, mode="map", **QUIET)
    for i, c in enumerate(cs):
        train_alone(c, str(tmp_path / f"alone{i}"), progress=False, **QUIET)
        diff = _max_diff(_metric_rows(wds[i]), _metric_rows(tmp_path / f"alone{i}"))
        print(f"graph map member {i}: max metrics.csv difference {diff:.3g}")
        assert diff <= VMAP_TOL


_MESH_SCRIPT = r"""
import sys, json
sys.path.insert(0, sys.argv[2])
import jax
from conftest import build_tiny_config
from framp_jax import batched as B
assert len(jax.devices()) == 2
mesh = B.runs_mesh(4)
assert mesh is not None and mesh.shape == {"runs": 2}
cs = [build_tiny_config(sys.argv[1], seed=s, lr=0.3 - 0.05 * s, rounds=2) for s in range(4)]
out = B.train_batch(cs, [sys.argv[3] + f"/m{s}" for s in range(4)], mode="vmap",
                    log=lambda *a: None)
print("FINALS", json.dumps([o["final"]["local"]["mean"] for o in out]))
"""


@pytest.mark.slow
def test_vmap_batch_sharded_over_a_runs_mesh(tiny_npz, tmp_path):
    """4 members on a 2-device ``runs`` mesh (XLA's host platform split in two): trained, each
    written, the numbers those of one device within the tolerance."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    tests = str(Path(__file__).resolve().parent)
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, tiny_npz, tests, str(tmp_path / "mesh")],
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = json.loads(r.stdout.split("FINALS ")[-1])
    from conftest import build_tiny_config
    cs = [build_tiny_config(tiny_npz, seed=s, lr=0.3 - 0.05 * s, rounds=2) for s in range(4)]
    one = B.train_batch(cs, [str(tmp_path / f"one{s}") for s in range(4)], mode="vmap", **QUIET)
    assert np.allclose(sharded, [o["final"]["local"]["mean"] for o in one], atol=VMAP_TOL)


_MESH2_SCRIPT = r"""
import sys, json
sys.path.insert(0, sys.argv[2])
import jax
from conftest import build_tiny_config
from framp_jax import batched as B
from framp_jax.simulate import run
from framp_jax.rundir import read_metrics_csv
assert len(jax.devices()) == 4
cs = [build_tiny_config(sys.argv[1], seed=s, lr=0.3 - 0.05 * s, rounds=2, mesh_clients=2)
      for s in range(2)]
root = sys.argv[3]
out = B.train_batch(cs, [root + f"/m{s}" for s in range(2)], mode="vmap", log=lambda *a: None)
worst = 0.0
for s, c in enumerate(cs):
    run(c, root + f"/alone{s}", progress=False, log=lambda *a: None)
    a, b = read_metrics_csv(root + f"/m{s}/metrics.csv"), read_metrics_csv(root + f"/alone{s}/metrics.csv")
    worst = max([worst] + [abs(x[k] - y[k]) for x, y in zip(a, b) for k in x if k != "wall_s"])
print("WORST", worst)
"""


@pytest.mark.slow
def test_vmap_batch_on_a_runs_by_clients_mesh(tiny_npz, tmp_path):
    """Members of mesh_clients=2 on 4 devices: a 2 x 2 ("runs", "clients") mesh; each member
    equals its run alone on a 2-device clients mesh within the tolerance."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    tests = str(Path(__file__).resolve().parent)
    r = subprocess.run([sys.executable, "-c", _MESH2_SCRIPT, tiny_npz, tests, str(tmp_path)],
                       capture_output=True, text=True, timeout=1500, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = float(r.stdout.split("WORST ")[-1])
    print(f"runs x clients mesh: max metrics.csv difference {worst:.3g}")
    assert worst <= VMAP_TOL


# ---------------------------------------------------------------------------------------------
# sweep --batch


def test_batch_jobs_split_a_unit_by_the_round_its_runs_start_from(tmp_path):
    runs = [S.Run(n, "p.py") for n in ("a", "b", "c", "d", "e")]
    for n, r in (("b", 4), ("c", 4), ("d", 2)):
        (tmp_path / n / "checkpoints" / str(r)).mkdir(parents=True)
    units = [runs[:4], [runs[4]]]
    todo = [(runs[0], False), (runs[1], True), (runs[2], True), (runs[3], True), (runs[4], False)]
    jobs = S._batch_jobs(units, todo, str(tmp_path))
    shown = [([x.name for x in r], res) if isinstance(r, list) else (r.name, res) for r, res in jobs]
    assert shown == [("a", False), (["b", "c"], True), ("d", True), ("e", False)]


def _write_preset(path: Path, npz: str, **fields):
    fields = {**TINY_FIELDS, "dataset": f"npz:{npz}", **fields}
    path.write_text("from framp_jax.config import base_config\n\n\ndef get_config():\n"
                    "    c = base_config()\n"
                    f"    for k, v in {fields!r}.items():\n        setattr(c, k, v)\n"
                    "    return c\n")


@pytest.mark.slow  # a batch process and a run alone through the CLI
def test_sweep_batch_trains_batches_and_single_runs(tiny_npz, tmp_path):
    _write_preset(tmp_path / "tiny.py", tiny_npz, rounds=1)
    (tmp_path / "sw.py").write_text(
        "from framp_jax.sweep import grid\n\n\ndef get_sweep():\n"
        "    return grid({'a': 'tiny.py', 'bad': ('tiny.py', {'lr': 1e6}),"
        " 'c': ('tiny.py', {'local_steps': 4})}, seeds=(0,)) + grid({'a2': 'tiny.py'}, seeds=(1,))\n")
    sw, wd = str(tmp_path / "sw.py"), tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "framp_jax.cli", "sweep", "--sweep", sw, "--workdir",
                        str(wd), "--batch", "4", "--batch_mode", "unroll", "--noprogress"],
                       capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]  # bad_seed0 diverged
    assert "--batch 4: 4 runs in 2 units, 1 of them batches" in out, out
    assert "starting a batch of 3: a_seed0, bad_seed0, a2_seed1" in out, out
    assert "starting c_seed0" in out
    for n in ("a_seed0", "a2_seed1", "c_seed0"):
        assert json.loads((wd / n / "results.json").read_text())["rounds"] == 1
    assert "NaN/Inf" in (wd / "bad_seed0" / S.ERROR_TXT).read_text()
    states = {x["name"]: x["state"] for x in S.sweep_status(sw, str(wd))}
    assert states == {"a_seed0": "finished", "bad_seed0": "failed", "c_seed0": "finished",
                      "a2_seed1": "finished"}
    status = (wd / S.STATUS_TSV).read_text()
    assert status.count("(batch of 3)") == 3 + 2  # 3 starts, 2 done
