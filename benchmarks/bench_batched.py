"""Batched runs (framp_jax/batched.py) against separate runs: runs x rounds per second.

Three workloads, each in its own worker process (a crash or an out-of-memory costs one entry):

- ``cifar10_cpu``: the CIFAR-10 CPU preset (``experiments/configs/fedavg_cifar10_cpu.py``,
  ``--method framp`` for ``framp_cifar10_cpu.py``): small CNN, 10 of 20 clients x 20 steps x
  batch 20;
- ``cora``: the Cora preset (``fedavg_cora.py``): GCN, 10 subgraph clients x 10 full-batch Adam
  steps; the real graph when found, else a synthetic graph of Cora's size;
- ``resnet18``: the paper-scale round (FIARSE protocol, ``fiarse_cifar10_resnet18.py`` as FedAvg):
  ResNet-18, 10 of 100 clients x 100 steps x batch 20, synthetic CIFAR-shaped data.

Members: K runs of the preset with seeds 0..K-1 and client learning rates lr x (1 + 0.05 i) (so
both the seed and a batchable hyperparameter differ). For each K in ``--ks`` and each mode in
``--modes`` (vmap, loop, unroll, map) the batched round (``batched.make_batched_round``, as
``train_batch`` builds it) is compiled ahead of time; the separate run is member 0's own
``jax.jit(alg.round)`` (as ``simulate.run`` jits it; K separate runs on one device take K times
as long, as every member costs the same). After one warm-up call each, the programs are timed
round-robin (``--rounds`` rounds each, ``block_until_ready`` after every call), so a change of
load on a shared machine hits all of them. Reported: median (and minimum) seconds per call, runs x
rounds per second (K / s), its ratio to the separate runs' (1 / s; also from the minima, less
touched by other load), compile seconds and their ratio to K separate runs' compiles; on an accelerator the
ResNet-18 round's matmul/conv FLOPs (counted on the jaxpr, benchmarks/bench_gpu.py) give TFLOP/s
and the fraction of the measured bf16 GEMM peak per K.

``--quick``: 3 timed rounds, the CPU-sized workloads (on a CPU the ResNet-18 round is left out
unless named in ``--workloads``; then 1 local step); K up to 4 for the unrolled mode.
Data are synthetic unless ``--data real`` (the CIFAR-10 file then must be found; Cora: the real
graph whenever found). Writes ``results/bench_batched_<device>[_quick].json`` (rewritten after
every workload). The goal on a GPU: 8 batched small-CNN or GCN runs >= 5x the throughput of 8
separate runs; on a 2-core CPU: batching never slower than separate runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
CONFIGS = os.path.join(ROOT, "experiments", "configs")
WORKLOADS = ("cifar10_cpu", "cora", "resnet18")
T0 = time.time()


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", file=sys.stderr,
          flush=True)


def _bench_gpu():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "benchmarks",
                                                                            "bench_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# members


def member_configs(workload, k, method, quick, dtype):
    from framp_jax.config import sibling_config
    preset = {"cifar10_cpu": f"{method}_cifar10_cpu.py", "cora": f"{method}_cora.py",
              "resnet18": "fiarse_cifar10_resnet18.py"}[workload]
    out = []
    for i in range(k):
        c = sibling_config(os.path.join(CONFIGS, "x.py"), preset)
        if workload == "resnet18":
            c.method = "fedavg"
            if "fiarse" in c:
                del c["fiarse"]
            c.compute_dtype = dtype
            if quick:
                c.local_steps = 1
        c.seed = i
        c.lr = float(c.lr) * (1 + 0.05 * i)
        out.append(c)
    return out


def synthetic_image_problem(c, n_train, n_test, n_union, seed):
    """A Problem of random uint8 CIFAR-shaped images (bench_gpu.py's data), ``n_train``
    training samples per client."""
    import jax.numpy as jnp
    import numpy as np
    from framp_jax import config as C
    from framp_jax.algorithms.base import FedData
    from framp_jax.client import LocalConfig
    from framp_jax.data.image_modality import ImageModality
    from framp_jax.data.vision import get_normalization
    from framp_jax.models.family import model_family
    from framp_jax.problem import Problem, make_context
    image, K, N = (32, 32, 3), 10, c.num_clients
    rng = np.random.default_rng(seed)
    ytr = rng.integers(0, K, (N, n_train)).astype(np.int32)
    lc = np.stack([np.bincount(r, minlength=K) for r in ytr]).astype(np.float32)
    budgets = C.assign_budgets(c)
    data = FedData(
        train_x=jnp.asarray(rng.integers(0, 256, (N, n_train) + image, dtype=np.uint8)),
        train_y=jnp.asarray(ytr), train_count=jnp.full((N,), n_train, jnp.int32),
        test_x=jnp.asarray(rng.integers(0, 256, (N, n_test) + image, dtype=np.uint8)),
        test_y=jnp.asarray(rng.integers(0, K, (N, n_test)).astype(np.int32)),
        test_count=jnp.full((N,), n_test, jnp.int32),
        budgets=jnp.asarray(budgets, jnp.float32), label_counts=jnp.asarray(lc),
        union_x=jnp.asarray(rng.integers(0, 256, (n_union,) + image, dtype=np.uint8)),
        union_y=jnp.asarray(rng.integers(0, K, n_union).astype(np.int32)))
    mean, std = get_normalization("cifar10", 3)
    modality = ImageModality(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                             augment=bool(c.augment))
    local = LocalConfig(steps=c.local_steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, grad_clip=c.grad_clip, min_count=n_train,
                        modality=modality)
    family = model_family(c.model, K, image, conv_impl=c.conv_impl,
                          compute_dtype=c.get("compute_dtype", "float32"))
    ctx = make_context(c, family, modality, K, budgets, np.arange(N), local)
    return Problem(c, data, ctx.model, ctx, {"synthetic": True}, "")


def synthetic_cora(seed=0):
    """A random graph of Cora's size: 2708 nodes, 1433 sparse binary features, 7 classes,
    ~5300 edges, with community structure (edges mostly within a class)."""
    import numpy as np
    from framp_jax.data.graphs import Graph
    rng = np.random.default_rng(seed)
    n, f, k = 2708, 1433, 7
    y = rng.integers(0, k, n).astype(np.int32)
    x = (rng.random((n, f)) < 0.0127).astype(np.float32)
    src = rng.integers(0, n, 8000)
    same = rng.random(8000) < 0.8
    by_class = [np.flatnonzero(y == c) for c in range(k)]
    dst = np.where(same, [rng.choice(by_class[y[s]]) for s in src], rng.integers(0, n, 8000))
    keep = src != dst
    e = np.stack([src[keep], dst[keep]])
    e = np.unique(np.concatenate([e, e[::-1]], 1), axis=1).astype(np.int32)
    return Graph(x, y, e, k, {"name": "synthetic_cora"})


def problems(workload, configs, data):
    from framp_jax.problem import build_problem
    if workload == "resnet18":
        return [synthetic_image_problem(c, 500, 100, 1000, c.seed) for c in configs]
    if workload == "cifar10_cpu":
        if data == "real":
            return [build_problem(c) for c in configs]
        return [synthetic_image_problem(c, 2250, 500, 2000, c.seed) for c in configs]
    # cora: the real graph if found, else a synthetic one of its size
    from framp_jax.data import graphs as G
    if G.find_graph_file("cora", None) is None:
        import framp_jax.data.graphs as graphs
        graph = synthetic_cora()
        graphs_load = graphs.load_graph
        graphs.load_graph = lambda name, data_dir=None: graph
        try:
            return [build_problem(c, verbose=False) for c in configs]
        finally:
            graphs.load_graph = graphs_load
    return [build_problem(c, verbose=False) for c in configs]


# ---------------------------------------------------------------------------------------------
# one workload (a worker process)


def worker(a):
    import jax
    import jax.numpy as jnp
    from framp_jax import batched as B
    from framp_jax.problem import build_algorithm
    bg = _bench_gpu()
    dev = bg._device_info()
    kmax = max(a.ks)
    configs = member_configs(a.workload, kmax, a.method, a.quick, a.dtype)
    t = time.time()
    probs = problems(a.workload, configs, a.data)
    if a.workload == "cora" and probs[0].info.get("name") == "synthetic_cora":
        dev["graph"] = "synthetic (Cora's size)"
    algs = [build_algorithm(p.ctx, c) for p, c in zip(probs, configs)]
    states = [alg.init(jax.random.key(c.seed), p.data) for alg, c, p in zip(algs, configs, probs)]
    log(f"{a.workload}: {kmax} members built in {time.time() - t:.1f} s")
    min_count = min(int(p.ctx.local.min_count) for p in probs)
    programs = {}  # name -> [fn, S, D, H, k, compile_s]

    def add(name, fn, S, D, H, k):
        t0 = time.time()
        try:
            compiled = fn.lower(S, D, H, jnp.int32(0)).compile()
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the rest go on
            log(f"{name}: {type(e).__name__}: {str(e)[:300]}")
            return {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        programs[name] = [compiled, S, D, H, k, time.time() - t0]
        log(f"{name}: compiled in {time.time() - t0:.1f} s")
        return None

    errors = {}
    alone = jax.jit(lambda s, d, h, t: algs[0].round(s, d, t), donate_argnums=(0,))
    fresh = lambda st: jax.tree.map(jnp.copy, st)  # noqa: E731 - every program donates its own
    add("separate", alone, fresh(states[0]), B.training_data(probs[0].data), None, 1)
    for mode in a.modes:
        for k in a.ks:
            if mode == "unroll" and k > a.unroll_max:
                continue
            name = f"{mode}/K{k}"
            fn, D, H, _ = B.make_batched_round(mode, configs[:k], probs[:k], algs[:k], min_count)
            S = ([fresh(s) for s in states[:k]] if mode in ("unroll", "loop")
                 else jax.device_put(B.stack(states[:k])))
            err = add(name, fn, S, D, H, k)
            if err:
                errors[name] = err
    for n, p in list(programs.items()):  # warm-up; a program that fails (memory) is dropped
        try:
            p[1], _ = p[0](p[1], p[2], p[3], jnp.int32(0))
            jax.block_until_ready(p[1])
        except Exception as e:  # noqa: BLE001
            log(f"{n}: {type(e).__name__}: {str(e)[:300]}")
            errors[n] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            del programs[n]
    if "separate" not in programs:
        print("RESULT " + json.dumps({"workload": a.workload, "error": errors.get("separate")}))
        return
    times = {n: [] for n in programs}
    for r in range(a.rounds):
        for n, p in programs.items():
            t0 = time.perf_counter()
            p[1], m = p[0](p[1], p[2], p[3], jnp.int32(r + 1))
            jax.block_until_ready((p[1], m))
            times[n].append(time.perf_counter() - t0)
        log(f"timed round {r + 1}/{a.rounds}")
    sep = statistics.median(times["separate"])
    sep_min = min(times["separate"])
    out = {"workload": a.workload, "method": a.method if a.workload != "resnet18" else "fedavg",
           "dtype": a.dtype if a.workload == "resnet18" else "float32", **dev,
           "protocol": {"clients_per_round": configs[0].clients_per_round,
                        "local_steps": configs[0].local_steps, "batch_size": configs[0].batch_size,
                        "model": configs[0].model},
           "separate": {"s_per_round": sep, "runs_rounds_per_s": 1.0 / sep, "min_s": sep_min,
                        "compile_s": programs["separate"][5], "samples_s": times["separate"]},
           "batched": {}, "errors": errors}
    flops = None
    if a.workload == "resnet18" and dev["backend"] != "cpu":
        flops = bg.matmul_flops(jax.jit(algs[0].round), states[0], probs[0].data, jnp.int32(0))
        out["matmul_flops_per_round"] = flops
        out["gemm"] = bg._gemm(False)
        out["separate"]["tflops"] = flops / sep / 1e12
    peak = (out.get("gemm") or {}).get("bfloat16", {}).get("tflops")
    for n, p in programs.items():
        if n == "separate":
            continue
        s = statistics.median(times[n])
        k = p[4]
        e = {"mode": n.split("/")[0], "k": k, "s_per_call": s, "runs_rounds_per_s": k / s,
             "vs_separate": (k / s) / (1.0 / sep), "min_s": min(times[n]),
             "vs_separate_min": (k / min(times[n])) / (1.0 / sep_min), "compile_s": p[5],
             "compile_vs_separate": p[5] / (k * programs["separate"][5]),
             "samples_s": times[n]}
        if flops:
            e["tflops"] = k * flops / s / 1e12
            if peak:
                e["fraction_of_bf16_peak"] = e["tflops"] / peak
        out["batched"][n] = e
    if flops and peak:
        out["separate"]["fraction_of_bf16_peak"] = out["separate"]["tflops"] / peak
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------------------------------------
# main


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 timed rounds, CPU-sized workloads")
    ap.add_argument("--workloads", default=None, help=f"comma list of {WORKLOADS}")
    ap.add_argument("--ks", default=None, help="members per batch (default 1,2,4,8; on an "
                    "accelerator also 16,32)")
    ap.add_argument("--modes", default=None, help="vmap,loop,unroll,map (default: vmap on an "
                    "accelerator; all four on a CPU)")
    ap.add_argument("--unroll-max", type=int, default=None, help="largest K of the unrolled mode "
                    "(its compile grows with K; default 8, 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10, 3 quick)")
    ap.add_argument("--method", default="fedavg", help="preset method of cifar10_cpu and cora")
    ap.add_argument("--dtype", default="float32", help="ResNet-18 round's compute dtype")
    ap.add_argument("--data", default="synthetic", choices=("synthetic", "real"),
                    help="CIFAR-10 images (Cora: the real graph whenever found)")
    ap.add_argument("--timeout", type=float, default=3000.0, help="seconds per workload")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_worker", dest="workload", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import jax
    backend = jax.default_backend()
    accel = backend != "cpu"
    a.ks = [int(x) for x in (a.ks or ("1,2,4,8,16,32" if accel else "1,2,4,8")).split(",")]
    a.modes = (a.modes or ("vmap" if accel else "loop,unroll,map,vmap")).split(",")
    a.rounds = a.rounds or (3 if a.quick else 10)
    a.unroll_max = a.unroll_max or (4 if a.quick else 8)
    if a.workload:
        return worker(a)
    workloads = (a.workloads.split(",") if a.workloads else
                 [w for w in WORKLOADS if accel or not a.quick or w != "resnet18"])
    dev = _bench_gpu()._device_info()
    out_path = a.out or os.path.join(ROOT, "results", f"bench_batched_{dev['device']}"
                                     f"{'_quick' if a.quick else ''}.json")
    res = {"script": "benchmarks/bench_batched.py", "argv": sys.argv[1:], **dev,
           "cpu_count": os.cpu_count(), "loadavg_start": _loadavg(),
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "ks": a.ks, "modes": a.modes,
           "rounds": a.rounds, "quick": a.quick, "workloads": {}}
    for w in workloads:
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", w, "--ks",
               ",".join(map(str, a.ks)), "--modes", ",".join(a.modes), "--rounds", str(a.rounds),
               "--unroll-max", str(a.unroll_max), "--method", a.method, "--dtype", a.dtype,
               "--data", a.data] + (["--quick"] if a.quick else [])
        log(f"workload {w}: {' '.join(cmd[2:])}")
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=a.timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            res["workloads"][w] = (json.loads(line[-1][7:]) if line else
                                   {"error": f"worker exit status {p.returncode}"})
        except subprocess.TimeoutExpired:
            res["workloads"][w] = {"error": f"over --timeout {a.timeout} s"}
        res["loadavg_end"] = _loadavg()
        os.makedirs(os.path.dirname(out_path), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
        _print(res["workloads"][w], w)
    print(f"results: {out_path}")
    return 0


def _print(w, name):
    if "error" in w and "separate" not in w:
        print(f"{name}: {w['error']}")
        return
    sep = w["separate"]
    print(f"\n{name} ({w.get('method')}, {w.get('device_kind')}): separate run "
          f"{sep['s_per_round']:.3f} s/round = {sep['runs_rounds_per_s']:.3f} runs x rounds/s"
          + (f", {sep['tflops']:.1f} TFLOP/s" if "tflops" in sep else ""))
    print(f"{'mode/K':12s} {'s/call':>8s} {'runs*rnd/s':>11s} {'vs sep':>7s} {'(min)':>6s} "
          f"{'compile':>8s} {'vs K sep':>8s} {'%bf16pk':>8s}")
    for n, e in w["batched"].items():
        pk = e.get("fraction_of_bf16_peak")
        print(f"{n:12s} {e['s_per_call']:8.3f} {e['runs_rounds_per_s']:11.3f} "
              f"{e['vs_separate']:7.2f} {e['vs_separate_min']:6.2f} {e['compile_s']:8.1f} "
              f"{e['compile_vs_separate']:8.2f} {'' if pk is None else f'{100 * pk:7.1f}%':>8s}")
    for n, e in w.get("errors", {}).items():
        print(f"{n:12s} error: {e['error'][:100]}")


if __name__ == "__main__":
    sys.exit(main())
