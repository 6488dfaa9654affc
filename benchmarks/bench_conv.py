"""Convolution formulation and client-mapping benchmark for framp_jax's local training.

Times, side by side in one process (repeats interleaved round-robin across the variants, so a
change of machine load hits every variant alike):

* the small CNN's local training of a round: C clients x S SGD steps x batch B, the
  ``framp_jax.client.local_train`` ``lax.scan`` mapped over clients, for
  ``conv_impl`` in {"xla", "im2col"} x client mapping in {``jax.vmap``, ``lax.map``};
* one jitted gradient step of the small CNN outside any scan (both conv impls), to show whether
  a slowdown comes from the scan/vmap context or from the convolution itself;
* ResNet-18 forward+backward on one batch: a jitted gradient step, and ``local_train`` over a few
  steps for one client (both conv impls).

Every compiled function is compiled ahead of time (``jit(...).lower(...).compile()``) and run
once before timing; the reported time is the median (and min) of the timed repeats.

    python benchmarks/bench_conv.py            # full (writes results/bench_conv_<backend>.json)
    python benchmarks/bench_conv.py --quick    # a short version
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from framp_jax.algorithms.fedavg import ce_loss
from framp_jax.client import LocalConfig, local_train
from framp_jax.data.image_modality import normalize
from framp_jax.models.cnn import make_cnn
from framp_jax.models.resnet import make_resnet18

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine_facts() -> dict:
    facts = {"python": platform.python_version(), "jax": jax.__version__,
             "jaxlib": getattr(__import__("jaxlib"), "__version__", "?"),
             "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
             "cpu_cores": os.cpu_count(), "machine": platform.machine(),
             "processor": _cpu_model()}
    try:
        facts["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return facts


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


class Variant:
    """A compiled function plus its arguments; ``unit`` divides the time for a per-unit figure."""

    def __init__(self, name, fn, args, unit_count, unit_name, max_seconds=float("inf")):
        self.name, self.args = name, args
        self.unit_count, self.unit_name = unit_count, unit_name
        t = time.perf_counter()
        self.compiled = jax.jit(fn).lower(*args).compile()
        self.compile_s = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(self.compiled(*args))  # warm-up run (already compiled AOT)
        self.warmup_s = time.perf_counter() - t
        self.times: list[float] = []
        # a variant so slow that its warm-up run alone exceeds the per-variant budget keeps that
        # run (compilation is excluded: it happened above) as its single timed sample
        self.warmup_counted = self.warmup_s >= max_seconds
        if self.warmup_counted:
            self.times.append(self.warmup_s)

    def run_once(self):
        t = time.perf_counter()
        jax.block_until_ready(self.compiled(*self.args))
        self.times.append(time.perf_counter() - t)

    def summary(self) -> dict:
        med = statistics.median(self.times)
        return {"name": self.name, "median_s": med, "min_s": min(self.times),
                "repeats": len(self.times), "times_s": self.times,
                "compile_s": self.compile_s, "warmup_s": self.warmup_s,
                "warmup_counted_as_sample": self.warmup_counted,
                f"median_s_per_{self.unit_name}": med / self.unit_count,
                "unit": self.unit_name, "units": self.unit_count}


def time_group(variants, repeats: int, max_seconds: float, log) -> None:
    """Round-robin repeats; a variant stops early (after >= 1 repeat) once it has used
    ``max_seconds`` of timed work."""
    for r in range(repeats):
        for v in variants:
            if v.times and sum(v.times) >= max_seconds:
                continue
            v.run_once()
            log(f"  [{r + 1}/{repeats}] {v.name}: {v.times[-1]:.3f} s")


def client_data(rng, clients, n_max, shape=(32, 32, 3), classes=10):
    x = rng.integers(0, 256, (clients, n_max) + shape, dtype=np.uint8)
    y = rng.integers(0, classes, (clients, n_max)).astype(np.int32)
    n = np.full((clients,), n_max, np.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(clients))
    return jnp.asarray(x), jnp.asarray(y), jnp.asarray(n), keys


def local_train_fn(model, cfg, mapping: str):
    """The per-round client training as fedavg's round does it, with the clients mapped by
    ``jax.vmap`` or sequentially by ``lax.map`` (``Context.vmap_clients`` with
    ``config.client_map`` "vmap" / "map")."""
    loss = ce_loss(model)

    def one(p, x, y, n, k):
        return local_train(loss, p, None, x, y, n, k, cfg)

    if mapping == "vmap":
        return jax.vmap(one, in_axes=(None, 0, 0, 0, 0))
    if mapping == "map":
        return lambda p, x, y, n, k: jax.lax.map(lambda a: one(p, *a), (x, y, n, k))
    raise ValueError(mapping)


def grad_step_fn(model):
    loss = ce_loss(model)

    def step(p, xb, yb):
        l, g = jax.value_and_grad(loss)(p, xb, yb, None)
        return jax.tree.map(lambda a, b: a - 0.05 * b, p, g), l
    return step


def one_batch(rng, batch, mean, std):
    x = jnp.asarray(rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    return normalize(x, mean, std), jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)


def fmt_table(rows, ref_name=None) -> str:
    ref = next((r for r in rows if r["name"] == ref_name), rows[0])
    lines = [f"{'variant':<44} {'median s':>10} {'min s':>9} {'per unit':>14} {'x ref':>8} {'n':>3}"]
    for r in rows:
        per = r[f"median_s_per_{r['unit']}"]
        lines.append(f"{r['name']:<44} {r['median_s']:>10.4f} {r['min_s']:>9.4f} "
                     f"{per * 1e3:>9.2f} ms/{r['unit'][:4]:<4} {r['median_s'] / ref['median_s']:>6.2f}x "
                     f"{r['repeats']:>3}")
    lines.append(f"(x ref: median time / median time of '{ref['name']}')")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps/repeats, small client data")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None, help="local steps (default 20; quick 2)")
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--n-max", type=int, default=None,
                    help="padded samples per client (default 2500 as the CIFAR-10 CPU preset; quick 500)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; quick 2)")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop repeating a variant once its timed runs used this long (default 120; quick 10)")
    ap.add_argument("--resnet-steps", type=int, default=None, help="ResNet-18 local steps (default 2; quick 1)")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--out", default=None, help="results JSON (default results/bench_conv_<backend>.json)")
    a = ap.parse_args(argv)
    q = a.quick
    steps = a.steps or (2 if q else 20)
    n_max = a.n_max or (500 if q else 2500)
    repeats = a.repeats or (2 if q else 5)
    max_s = a.max_seconds if a.max_seconds is not None else (10.0 if q else 120.0)
    r_steps = a.resnet_steps or (1 if q else 2)
    log = lambda s: print(s, flush=True)

    facts = machine_facts()
    log(f"backend={facts['backend']} jax={facts['jax']} devices={len(jax.devices())} "
        f"cores={facts['cpu_cores']} cpu={facts['processor']!r} loadavg={facts.get('loadavg_start')}")
    rng = np.random.default_rng(0)
    cfg = LocalConfig(steps=steps, batch_size=a.batch, lr=0.05)
    x, y, n, keys = client_data(rng, a.clients, n_max)
    mean, std = cfg.modality.mean, cfg.modality.std
    results = {"facts": facts, "settings": dict(clients=a.clients, steps=steps, batch=a.batch, n_max=n_max,
                                                repeats=repeats, max_seconds=max_s, quick=q,
                                                resnet_steps=r_steps),
               "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}

    # --- small CNN: local training of one round -------------------------------------------
    log(f"\n== small CNN local training: {a.clients} clients x {steps} steps x batch {a.batch} "
        f"(n_max {n_max}) ==")
    variants = []
    for impl in ("im2col", "xla"):
        model = make_cnn(10, (32, 32, 3), conv_impl=impl)
        p = model.init(jax.random.key(0))
        for mapping in ("vmap", "map"):
            name = f"cnn local_train {impl} {mapping}"
            log(f"compiling {name}")
            variants.append(Variant(name, local_train_fn(model, cfg, mapping), (p, x, y, n, keys),
                                    a.clients * steps, "client-step", max_s))
    time_group(variants, repeats, max_s, log)
    rows = [v.summary() for v in variants]
    results["cnn_local_train"] = rows

    # --- small CNN: one jitted grad step, no scan -----------------------------------------
    log(f"\n== small CNN one jitted gradient step (batch {a.batch}, no scan, no vmap) ==")
    xb, yb = one_batch(rng, a.batch, mean, std)
    gv = []
    for impl in ("im2col", "xla"):
        model = make_cnn(10, (32, 32, 3), conv_impl=impl)
        gv.append(Variant(f"cnn grad step {impl}", grad_step_fn(model),
                          (model.init(jax.random.key(0)), xb, yb), 1, "step"))
    # many cheap calls per repeat keep timer overhead out: time 20 calls as one repeat
    for v in gv:
        v.compiled_one, v.args_one = v.compiled, v.args
        v.compiled = _repeat_calls(v.compiled_one, 20)
        v.unit_count = 20
    time_group(gv, repeats * 2, max_s, log)
    grows = [v.summary() for v in gv]
    results["cnn_grad_step"] = grows

    # --- ResNet-18 -----------------------------------------------------------------------
    rrows = []
    if not a.skip_resnet:
        log(f"\n== ResNet-18 forward+backward, batch {a.batch}: one jitted grad step, and "
            f"local_train of {r_steps} step(s) for one client ==")
        rv = []
        rx, ry, rn, rk = client_data(rng, 1, min(n_max, 500))
        rcfg = LocalConfig(steps=r_steps, batch_size=a.batch, lr=0.05)
        for impl in ("im2col", "xla"):
            model = make_resnet18(10, (32, 32, 3), conv_impl=impl)
            p = model.init(jax.random.key(0))
            log(f"compiling resnet18 {impl}")
            rv.append(Variant(f"resnet18 grad step {impl}", grad_step_fn(model), (p, xb, yb), 1,
                              "step", max_s))
            if impl == "xla" and q:
                log("  skipping 'resnet18 local_train xla' in --quick: one step inside lax.scan takes "
                    "minutes on CPU (run the full version to time it)")
                continue
            loss = ce_loss(model)
            rv.append(Variant(f"resnet18 local_train {impl} ({r_steps} st)",
                              lambda p, x, y, n, k, loss=loss: local_train(loss, p, None, x, y, n, k, rcfg),
                              (p, rx[0], ry[0], rn[0], rk[0]), r_steps, "step", max_s))
        time_group(rv, max(2, repeats - 2), max_s, log)
        rrows = [v.summary() for v in rv]
        results["resnet18"] = rrows
    try:
        results["facts"]["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass

    # --- report --------------------------------------------------------------------------
    log("\n" + "=" * 96)
    log(f"backend {facts['backend']}, jax {facts['jax']}, {facts['cpu_cores']} cores, "
        f"loadavg start {facts.get('loadavg_start')} end {facts.get('loadavg_end')}")
    log(f"\nsmall CNN local training ({a.clients} clients x {steps} steps x batch {a.batch}):")
    log(fmt_table(rows, "cnn local_train im2col vmap"))
    by = {r["name"]: r["median_s"] for r in rows}
    ratios = {
        "xla_over_im2col_vmap": by["cnn local_train xla vmap"] / by["cnn local_train im2col vmap"],
        "xla_over_im2col_map": by["cnn local_train xla map"] / by["cnn local_train im2col map"],
        "vmap_over_map_im2col": by["cnn local_train im2col vmap"] / by["cnn local_train im2col map"],
        "vmap_over_map_xla": by["cnn local_train xla vmap"] / by["cnn local_train xla map"],
    }
    g = {r["name"]: r["median_s"] for r in grows}
    ratios["grad_step_xla_over_im2col"] = g["cnn grad step xla"] / g["cnn grad step im2col"]
    # the in-scan per-client-step cost vs the same step outside any scan
    for impl in ("im2col", "xla"):
        per = by[f"cnn local_train {impl} map"] / (a.clients * steps)
        ratios[f"scan_map_step_over_plain_step_{impl}"] = per / (g[f"cnn grad step {impl}"] / 20)
    log(f"\none jitted CNN gradient step (batch {a.batch}, 20 calls per repeat):")
    log(fmt_table(grows, "cnn grad step im2col"))
    if rrows:
        log(f"\nResNet-18 (batch {a.batch}):")
        log(fmt_table(rrows, "resnet18 grad step im2col"))
        rb = {r["name"]: r for r in rrows}
        ratios["resnet_grad_step_xla_over_im2col"] = (rb["resnet18 grad step xla"]["median_s"]
                                                      / rb["resnet18 grad step im2col"]["median_s"])
        if f"resnet18 local_train xla ({r_steps} st)" in rb:
            ratios["resnet_local_train_xla_over_im2col"] = (
                rb[f"resnet18 local_train xla ({r_steps} st)"]["median_s"]
                / rb[f"resnet18 local_train im2col ({r_steps} st)"]["median_s"])
    log("\nratios (median over median):")
    for k, v in ratios.items():
        log(f"  {k:<40} {v:8.2f}")
    results["ratios"] = ratios

    out = a.out or os.path.join(ROOT, "results", f"bench_conv_{facts['backend']}{'_quick' if q else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    log(f"\nwrote {out}")
    return results


def _repeat_calls(compiled, k):
    def run(*args):
        out = None
        for _ in range(k):
            out = jax.block_until_ready(compiled(*args))
        return out
    return run


if __name__ == "__main__":
    main()
