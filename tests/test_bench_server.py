"""``benchmarks/bench_server.py``: its ``no_sgd`` round really trains nothing (FedAvg's model
comes back unchanged, while the full round moves it), a tiny end-to-end run writes positive
timings, and ``framp-jax report`` turns the JSON into the server-time table with the
hand-computed share of the round."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax import config as C
from framp_jax import report as REP
from framp_jax.problem import build_algorithm, build_problem

from conftest import TINY_FIELDS, load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_server.py"


def _bench():
    return load_script(SCRIPT)


def _tiny_sets(npz):
    fields = {k: v for k, v in TINY_FIELDS.items() if k not in ("rounds",)}
    return [("dataset", f"npz:{npz}")] + list(fields.items())


def test_no_sgd_round_leaves_fedavg_unchanged_and_full_round_moves_it(tiny_npz):
    b = _bench()
    c = b.apply_sets(b.preset("fedavg"), _tiny_sets(tiny_npz))
    C.validate(c)
    prob = build_problem(c, verbose=False)
    ctx, data = prob.ctx, prob.data
    ctx0 = ctx._replace(local=ctx.local._replace(steps=0))
    alg, alg0 = build_algorithm(ctx, c), build_algorithm(ctx0, c)
    s = alg.init(jax.random.key(0), data)
    s0, _ = jax.jit(alg0.round)(s, data, jnp.int32(0))
    s1, _ = jax.jit(alg.round)(s, data, jnp.int32(0))
    for a, a0, a1 in zip(jax.tree.leaves(s), jax.tree.leaves(s0), jax.tree.leaves(s1)):
        np.testing.assert_array_equal(np.asarray(a0), np.asarray(a))
    assert any(not np.array_equal(np.asarray(a), np.asarray(a1))
               for a, a1 in zip(jax.tree.leaves(s), jax.tree.leaves(s1)))


def test_tiny_run_writes_timings_and_the_report_table(tiny_npz, tmp_path):
    b = _bench()
    out = tmp_path / "bench_server_cpu.json"
    argv = ["--methods", "fedavg,framp", "--reps", "2", "--warmup", "0", "--out", str(out)]
    for k, v in _tiny_sets(tiny_npz):
        argv += ["--set", f"{k}={v}"]
    b.main(argv)
    res = json.loads(out.read_text())
    assert res["script"] == REP.SERVER_BENCH_SCRIPT and list(res["methods"]) == ["fedavg", "framp"]
    for m in res["methods"].values():
        assert len(m["seconds"]["full"]) == 2 and all(x > 0 for x in m["seconds"]["no_sgd"])
        assert m["protocol"]["num_clients"] == TINY_FIELDS["num_clients"]

    # the report's table from a JSON with known medians: 0.5 of 2.0 s is 25.0 %
    res["methods"] = {"fedavg": {"seconds": {"full": [2.0, 2.2, 1.9], "no_sgd": [0.5] * 3},
                                 "median_s": {"full": 2.0, "no_sgd": 0.5}}}
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps(res))
    assert REP.is_server_bench(str(fixed)) and not REP.is_server_bench(str(tmp_path))
    md = Path(REP.write_report([str(fixed)], str(tmp_path / "rep"))).read_text()
    assert "| fedavg | 3 | 2.000 | 0.500 | 25.0 |" in md
    assert "## Server time per round" in md
