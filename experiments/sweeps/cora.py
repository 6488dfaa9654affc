"""Cora (10 METIS subgraph clients): every method's *_cora preset (FRAMP also as SPEC documents
it, ``framp_spec``) x seeds 0, 1, 2.

    framp-jax sweep --sweep experiments/sweeps/cora.py --workdir runs/cora
"""
from framp_jax.algorithms.registry import METHODS
from framp_jax.sweep import grid, before_validation


def variants():
    v = {m: f"../configs/{m}_cora.py" for m in METHODS}
    v["framp"] = "../configs/hybrid_cora.py"  # "framp" here: the hybrid (ours)
    v["framp_spec"] = "../configs/framp_cora.py"
    # FRAMP (the preset) also records the design study's diagnostics, as in cifar10_cpu.py; they
    # leave training unchanged, so these runs equal framp_confirm's Cora runs, config hash included.
    v["framp"] = (v["framp"], {"diagnostics": True})
    return v


def _sweep():
    return grid(variants(), seeds=(0, 1, 2))


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
