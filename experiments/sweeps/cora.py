"""Cora (10 METIS subgraph clients): every method's *_cora preset x seeds 0, 1, 2.

    framp-jax sweep --sweep experiments/sweeps/cora.py --workdir runs/cora
"""
from framp_jax.algorithms.registry import METHODS
from framp_jax.sweep import grid


def variants():
    return {m: f"../configs/{m}_cora.py" for m in METHODS}


def get_sweep():
    return grid(variants(), seeds=(0, 1, 2))
