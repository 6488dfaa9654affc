"""``benchmarks/bench_batched.py``: a short run of the whole script on the CPU (the Cora
workload, K = 1 and 2, two modes, one timed round) writes a JSON with positive timings of the
separate run and of every batched program, and their ratios."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_batched.py")


@pytest.mark.slow  # a few compiles of the Cora round: minutes on 2 busy cores
def test_bench_batched_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--workloads", "cora", "--ks", "1,2",
                        "--modes", "loop,vmap", "--rounds", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    w = res["workloads"]["cora"]
    assert w["separate"]["s_per_round"] > 0 and not w["errors"], w.get("errors")
    assert set(w["batched"]) == {"loop/K1", "loop/K2", "vmap/K1", "vmap/K2"}
    for e in w["batched"].values():
        assert e["s_per_call"] > 0 and e["runs_rounds_per_s"] == pytest.approx(e["k"] / e["s_per_call"])
        assert e["vs_separate"] > 0 and e["compile_s"] > 0
    assert "cora" in r.stdout and "results:" in r.stdout
