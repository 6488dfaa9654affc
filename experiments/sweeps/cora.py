"""Cora (10 METIS subgraph clients): every method's *_cora preset (FRAMP also as SPEC documents
it, ``framp_spec``) x seeds 0, 1, 2.

    framp-jax sweep --sweep experiments/sweeps/cora.py --workdir runs/cora
"""
from framp_jax.algorithms.registry import METHODS
from framp_jax.sweep import grid


def variants():
    v = {m: f"../configs/{m}_cora.py" for m in METHODS}
    v["framp_spec"] = "../configs/framp_cora_spec.py"
    # FRAMP (the preset) also records the design study's diagnostics, as in cifar10_cpu.py; they
    # leave training unchanged, so these runs equal framp_confirm's Cora runs, config hash included.
    v["framp"] = (v["framp"], {"diagnostics": True})
    return v


def get_sweep():
    return grid(variants(), seeds=(0, 1, 2))
