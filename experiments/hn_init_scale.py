"""The scale of FRAMP's generated models at step 0 against the model's own initialisation, per
parameter leaf: std of the generated entries (first clients' descriptors) / std of
``model.init``. Loads the preset's data (the descriptors need the clients' label histograms).

    python experiments/hn_init_scale.py experiments/configs/framp_cifar10_cpu.py [--clients 4]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset")
    ap.add_argument("--clients", type=int, default=4)
    a = ap.parse_args()
    from framp_jax.algorithms import framp as F
    from framp_jax.algorithms.registry import resolve
    from framp_jax.problem import build_problem
    from framp_jax.sweep import _load_preset
    c = _load_preset(a.preset)
    prob = build_problem(c, verbose=False)
    fi = F.build(prob.ctx, resolve(c)[1])  # the preset's framp options over their defaults
    state = fi.algorithm.init(jax.random.key(int(c.seed)), prob.data)
    ids = jnp.arange(a.clients)
    theta = fi.generate(state.phi, state.desc[ids], None, ids, state.base)
    ref = prob.ctx.model.init(jax.random.key(int(c.seed)))
    print(f"{'leaf':32s} {'generated std (per client)':>40s} {'init std':>9s} {'ratio':>6s}")
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(theta), jax.tree.leaves(ref)):
        stds = np.asarray(g).reshape(a.clients, -1).std(1)
        r_std = float(np.std(np.asarray(r)))
        ratio = f"{stds.mean() / r_std:6.2f}" if r_std > 0 else "     -"
        print(f"{jax.tree_util.keystr(path):32s} {np.array2string(stds, precision=4):>40s} "
              f"{r_std:9.4f} {ratio}")


if __name__ == "__main__":
    main()
