"""Per-layer kept fraction of a finished (or checkpointed) FRAMP top-k run's evaluated models:
for every prunable parameter leaf and budget level, the fraction of its entries that the budget's
top-k mask keeps, averaged over the clients of that level. A leaf at 0.000 is pruned whole (for
a dense layer: the model's output no longer depends on its input).

    python experiments/kept_fractions.py --sweep experiments/sweeps/framp_design_cifar10.py \\
        --workdir runs/framp_design_cifar10 --run framp_backbone_seed0

Restores the run's newest intact checkpoint (refused unless its config hash is the run's) and
loads the run's data (the descriptors need the clients' label histograms).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np


def kept_table(params, prunable, budgets) -> tuple[list[str], list[float], np.ndarray]:
    """(leaf names, budget levels, kept[leaf, level]) of stacked client models ``params``
    (leading axis: clients) whose pruned entries are exact zeros."""
    budgets = np.asarray(budgets, np.float64)
    levels = sorted(set(budgets.tolist()), reverse=True)
    names, rows = [], []
    for (path, x), p in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(prunable)):
        if not p:
            continue
        nz = np.asarray(x != 0).reshape(x.shape[0], -1).mean(1)  # per client
        names.append(jax.tree_util.keystr(path))
        rows.append([float(nz[budgets == b].mean()) for b in levels])
    return names, levels, np.asarray(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--run", required=True)
    a = ap.parse_args(argv)
    from framp_jax import sweep as S
    from framp_jax.algorithms import framp as F
    from framp_jax.algorithms.registry import resolve
    from framp_jax.checkpoint import CheckpointManager
    from framp_jax.problem import build_problem
    from framp_jax.simulate import config_hash

    runs = {r.name: r for r in S.load_sweep(a.sweep)}
    if a.run not in runs:
        sys.exit(f"kept_fractions: --run {a.run!r} is not in {a.sweep} "
                 f"(its runs: {', '.join(runs)})")
    c = S.resolve(runs[a.run])
    if c.method != "framp" or c.framp.extraction != "topk":
        sys.exit(f"kept_fractions: run {a.run!r} is method={c.method!r}, "
                 f"framp.extraction={c.framp.get('extraction')!r}; allowed: framp with 'topk'")
    ckdir = os.path.join(a.workdir, a.run, "checkpoints")
    ckpt = CheckpointManager(ckdir)
    if ckpt.latest_round() is None:
        sys.exit(f"kept_fractions: no checkpoint in {ckdir}")
    prob = build_problem(c, verbose=False)
    fi = F.build(prob.ctx, resolve(c)[1])
    state = fi.algorithm.init(jax.random.key(int(c.seed)), prob.data)
    state, extra = ckpt.restore_latest_intact(target=state, expected_config_hash=config_hash(c))
    params = fi.algorithm.eval_groups(state, prob.data)[0].params
    names, levels, kept = kept_table(params, fi.prunable, prob.data.budgets)
    print(f"{a.run}: round {int(extra['round'])}, kept fraction of each prunable leaf per budget "
          f"(mean over the level's clients; {prob.ctx.num_clients} clients)")
    print(f"{'leaf':40s} " + " ".join(f"{b:>8g}" for b in levels))
    for n, row in zip(names, kept):
        print(f"{n:40s} " + " ".join(f"{v:8.3f}" for v in row))


if __name__ == "__main__":
    main()
