"""Time per local step per budget level: FRAMP's width extraction (narrower pytrees) against
top-k masks (full-size tensors with zeros), measured side by side in one run.

    python benchmarks/bench_width.py [--model cnn|resnet18] [--clients 10] [--steps 20] [--repeats 3]

For each budget level it generates client models with the chunked hypernetwork, extracts the
submodel (width: gather of the largest-norm channels; top-k: masked full tensors), and times
``jit(vmap(local_train))`` of ``steps`` SGD steps on real CIFAR-10 batches; prints ms per local
step (all clients of the level together) and the ratio to the full-width model. Writes
``results/bench_width_<backend>_<model>.json``.
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
    ap.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from framp_jax import masks as M
    from framp_jax import width as W
    from framp_jax.client import LocalConfig, local_train
    from framp_jax.data.vision import load_vision_dataset
    from framp_jax.hypernet import chunked_hypernet
    from framp_jax.losses import cross_entropy
    from framp_jax.models.family import model_family

    ds = load_vision_dataset("cifar10")
    n = 500
    x = jnp.asarray(ds.x_train[: a.clients * n].reshape(a.clients, n, 32, 32, 3))
    y = jnp.asarray(ds.y_train[: a.clients * n].reshape(a.clients, n).astype(np.int32))
    cnt = jnp.full((a.clients,), n, jnp.int32)
    family = model_family(a.model, 10, (32, 32, 3))
    model = family.make(1.0)
    tpl = model.init(jax.random.key(0))
    pr = model.prunable(tpl)
    hn = chunked_hypernet(tpl, chunk_size=4096 if a.model == "cnn" else 16384)
    desc = jax.random.uniform(jax.random.key(1), (a.clients, 11))
    theta = jax.jit(jax.vmap(hn.apply, (None, 0)))(hn.init(jax.random.key(2), desc), desc)
    spec = family.width_spec
    cfg = LocalConfig(steps=a.steps, batch_size=a.batch, lr=0.05)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(a.clients))

    def loss(p, xb, yb, rng):
        return cross_entropy(model.apply(p, xb, train=True)[0], yb)

    train = jax.jit(jax.vmap(lambda p, m, xx, yy, nn, kk: local_train(loss, p, m, xx, yy, nn, kk, cfg)[1]))
    train_nomask = jax.jit(jax.vmap(lambda p, xx, yy, nn, kk: local_train(loss, p, None, xx, yy, nn, kk, cfg)[1]))

    def timeit(f, *args):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t)
        return statistics.median(ts) / a.steps * 1e3

    rows = []
    total = M.num_prunable(tpl, pr)
    for budget, rate in ((1.0, 1.0), (0.25, 0.5), (1 / 16, 0.25), (1 / 64, 0.125)):
        def narrow(t, r=rate):  # as framp_width.WidthExtraction.narrow: every unit cut
            return W.gather(t, spec, W.norm_topk_indices(t, spec, r))
        nar = jax.jit(jax.vmap(narrow))(theta)
        frac = M.num_prunable(jax.tree.map(lambda z: z[0], nar), pr) / total
        masks = jax.jit(jax.vmap(lambda t, b=budget: M.topk_mask(t, pr, b)))(theta)
        t_width = timeit(train_nomask, nar, x, y, cnt, keys)
        t_topk = timeit(train, M.apply_mask(theta, masks), masks, x, y, cnt, keys)
        rows.append({"budget": budget, "width_rate": rate, "width_param_fraction": frac,
                     "ms_per_step_width": t_width, "ms_per_step_topk": t_topk})
        print(f"budget {budget:<9.6g} rate {rate:<6} params {frac:.4f}  width {t_width:8.2f} ms/step"
              f"  topk-mask {t_topk:8.2f} ms/step", flush=True)
    full = rows[0]["ms_per_step_width"]
    for r in rows:
        r["width_speedup_vs_full"] = full / r["ms_per_step_width"]
        r["width_speedup_vs_topk_same_budget"] = r["ms_per_step_topk"] / r["ms_per_step_width"]
    print("speed-up of width extraction vs the full model: "
          + ", ".join(f"{r['budget']:g}: {r['width_speedup_vs_full']:.2f}x" for r in rows))
    out = a.out or f"results/bench_width_{jax.default_backend()}_{a.model}.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": "python benchmarks/bench_width.py " + " ".join(
            f"--{k}={v}" for k, v in vars(a).items() if k != "out"),
            "backend": jax.default_backend(), "jax": jax.__version__, "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "clients": a.clients, "steps": a.steps,
            "batch": a.batch, "rows": rows,
            "note": "clients of one level vmapped together; ms per local step of all of them"},
            f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()
