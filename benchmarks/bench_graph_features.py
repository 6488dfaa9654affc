"""Dense vs sparse (coordinate-list) node features for the GCN: one whole jitted round of a
graph preset, the two variants built side by side in one process and timed interleaved.

    python benchmarks/bench_graph_features.py [--dataset coauthor_physics] [--config fedavg_cora.py]
                                              [--rounds 3] [--warmup 1]

Both variants are the engine's real round (``problem.build_problem`` + ``build_algorithm``,
``jax.jit(alg.round)`` as ``simulate.run`` jits it) on the same partition of the real graph,
differing only in ``config.graph_features``. The first call (compile) and ``--warmup`` rounds
are excluded; the timed rounds alternate dense, sparse, dense, ... Prints the median seconds per
round of each, their ratio, and the largest difference of the global parameters after the same
rounds (the two formulations compute the same function up to float summation order). Writes
``results/bench_graph_features_<backend>_<dataset>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="coauthor_physics")
    ap.add_argument("--config", default="fedavg_cora.py")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from framp_jax.config import sibling_config
    from framp_jax.problem import build_algorithm, build_problem

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    load0 = os.getloadavg()
    variants = {}
    for feats in ("dense", "sparse"):
        c = sibling_config(os.path.join(root, "experiments", "configs", "x.py"), a.config)
        c.dataset, c.graph_features = a.dataset, feats
        t0 = time.time()
        prob = build_problem(c, verbose=False)
        alg = build_algorithm(prob.ctx, c)
        state = alg.init(jax.random.key(c.seed), prob.data)
        fn = jax.jit(alg.round)
        t1 = time.time()
        state, _ = fn(state, prob.data, jnp.asarray(0, jnp.int32))
        jax.block_until_ready(state)
        compile_s = time.time() - t1
        for t in range(1, 1 + a.warmup):
            state, _ = fn(state, prob.data, jnp.asarray(t, jnp.int32))
        jax.block_until_ready(state)
        variants[feats] = dict(fn=fn, state=state, data=prob.data, t=1 + a.warmup, times=[],
                               setup_s=t1 - t0, first_round_s=compile_s, info=prob.info)
        print(f"{feats}: setup {t1 - t0:.1f} s, first round (compile + run) {compile_s:.1f} s", flush=True)

    for _ in range(a.rounds):
        for feats, v in variants.items():
            t0 = time.time()
            v["state"], _ = v["fn"](v["state"], v["data"], jnp.asarray(v["t"], jnp.int32))
            jax.block_until_ready(v["state"])
            v["times"].append(time.time() - t0)
            v["t"] += 1

    med = {f: statistics.median(v["times"]) for f, v in variants.items()}
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(variants["dense"]["state"]), jax.tree.leaves(variants["sparse"]["state"]))
               if jnp.issubdtype(x.dtype, jnp.floating))
    info = variants["dense"]["info"]
    out = {
        "dataset": a.dataset, "config": a.config, "rounds_timed": a.rounds, "warmup": a.warmup,
        "num_features": info["num_features"], "n_pad": info["n_pad"], "e_pad": info["e_pad"],
        "seconds_per_round": {f: v["times"] for f, v in variants.items()},
        "median_s": med, "dense_over_sparse": med["dense"] / med["sparse"],
        "setup_s": {f: v["setup_s"] for f, v in variants.items()},
        "first_round_s": {f: v["first_round_s"] for f, v in variants.items()},
        "max_abs_param_diff_after_same_rounds": diff,
        "jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "processor": platform.processor(),
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    }
    print(f"{a.dataset} ({info['num_features']} features, n_pad {info['n_pad']}): "
          f"dense {med['dense']:.2f} s/round, sparse {med['sparse']:.2f} s/round, "
          f"ratio dense/sparse {out['dense_over_sparse']:.1f}x; max |param diff| {diff:.2e}")
    path = a.out or os.path.join(root, "results", f"bench_graph_features_{jax.default_backend()}_{a.dataset}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
