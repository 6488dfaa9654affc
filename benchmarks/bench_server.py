"""Server time per round: each method's real round against the same round without local SGD,
side by side in one process.

For every method, the ``*_cifar10_cpu`` preset (FRAMP width: the FRAMP preset with
``framp.extraction="width"``) on its real data is built twice from one
:class:`~framp_jax.problem.Problem`:

- ``full``: the round as ``framp-jax train`` runs it;
- ``no_sgd``: the same method built on the same context with ``local.steps = 0``, so every
  client's local training loop is empty. What remains is the server's work (sampling, the
  cohort's models sent: FRAMP's hypernetwork generation and top-k extraction, FIARSE's top-k,
  HeteroFL/FedRolex/ScaleFL's slicing; the aggregation; FRAMP's VJP, optimizer step and
  prototype aggregation) plus the clients' work that is not SGD (the cohort's data gathered,
  FRAMP's prototype pass over each client's data). Its time is therefore an upper bound on the
  server time per round.

Both are jitted like ``simulate.run``'s round (``t`` traced), compiled and warmed up first, then
timed alternately (full, no_sgd, full, ...) from the same state so that a change of machine load
hits both alike. Prints seconds per round and the ratio no_sgd / full per method, and writes
``results/bench_server_<backend>.json`` (``framp-jax report ... results/bench_server_cpu.json``
puts it in the report).

    python benchmarks/bench_server.py                       # all methods, real CIFAR-10
    python benchmarks/bench_server.py --methods framp,fedavg --reps 3
    python benchmarks/bench_server.py --set dataset=npz:/tmp/tiny.npz --set num_clients=8 ...
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_round import _cpu_model  # noqa: E402  (benchmarks/ is not a package)
CONFIGS = os.path.join(ROOT, "experiments", "configs")
METHODS = ("fedavg", "local", "fiarse", "heterofl", "fedrolex", "scalefl", "framp", "framp_width")


def preset(method: str):
    """The method's CPU preset as ``framp-jax train`` would load it."""
    from framp_jax.config import sibling_config
    name = "framp" if method == "framp_width" else method
    c = sibling_config(os.path.join(CONFIGS, "x.py"), f"{name}_cifar10_cpu.py")
    if method == "framp_width":
        c.framp.extraction = "width"
    return c


def parse_set(text: str):
    """``KEY=VALUE`` (KEY may be dotted, e.g. ``framp.hn_lr``); VALUE a Python literal or a string."""
    if "=" not in text:
        raise SystemExit(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value


def apply_sets(c, sets):
    for key, value in sets:
        *path, last = key.split(".")
        node = c
        for p in path:
            node = node[p]
        if last not in node:
            raise SystemExit(f"--set {key}: no such config field")
        node[last] = value
    return c


def measure(method: str, sets, reps: int, warmup: int, log=print) -> dict:
    import jax
    import jax.numpy as jnp

    from framp_jax import config as C
    from framp_jax.problem import build_algorithm, build_problem

    c = apply_sets(preset(method), sets)
    C.validate(c)
    prob = build_problem(c, verbose=False)
    ctx, data = prob.ctx, prob.data
    ctx0 = ctx._replace(local=ctx.local._replace(steps=0))
    alg, alg0 = build_algorithm(ctx, c), build_algorithm(ctx0, c)
    state = alg.init(jax.random.key(c.seed), data)
    fns = {"full": jax.jit(alg.round), "no_sgd": jax.jit(alg0.round)}

    def once(name, t):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[name](state, data, jnp.int32(t)))
        return time.perf_counter() - t0

    first = {k: once(k, 0) for k in fns}          # compile + first run
    for i in range(warmup):
        for k in fns:
            once(k, 1 + i)
    times = {k: [] for k in fns}
    for i in range(reps):
        for k in fns:
            times[k].append(once(k, 1 + warmup + i))
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"method": method, "algorithm": alg.name, "first_call_s": first, "seconds": times,
           "median_s": med, "no_sgd_over_full": med["no_sgd"] / med["full"],
           "protocol": {k: c.get(k) for k in ("dataset", "model", "num_clients",
                                               "clients_per_round", "local_steps", "batch_size")}}
    log(f"{method:>12}: full {med['full']:.3f} s/round, no local SGD {med['no_sgd']:.3f} s/round "
        f"({100 * out['no_sgd_over_full']:.1f}% of the round)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds of each kind per method")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field of every preset (repeatable)")
    ap.add_argument("--out", default=None, help="JSON path (default results/bench_server_<backend>.json)")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown {bad}; allowed: {', '.join(METHODS)}")
    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("--reps must be >= 1 and --warmup >= 0")
    sets = [parse_set(s) for s in args.set]

    import jax
    backend = jax.default_backend()
    out = args.out or os.path.join(ROOT, "results", f"bench_server_{backend}.json")
    result = {"script": "benchmarks/bench_server.py", "argv": list(sys.argv[1:] if argv is None else argv),
              "backend": backend, "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
              "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "sets": dict(sets),
              "loadavg_start": list(os.getloadavg()),
              "what": "s/round of the real round (full) and of the same round with local.steps=0 "
                      "(no_sgd: server work plus the clients' non-SGD work), medians over reps, "
                      "timed alternately", "methods": {}}
    for m in methods:
        result["methods"][m] = measure(m, sets, args.reps, args.warmup)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        result["loadavg_end"] = list(os.getloadavg())
        with open(out, "w") as f:  # kept after every method: a cut run keeps what it measured
            json.dump(result, f, indent=1)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
