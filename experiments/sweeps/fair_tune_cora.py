"""Fair protocol, selection on Cora (10 METIS subgraph clients, GCN, 100 rounds): every
method's 4 declared candidates (fair_protocol.py) on the selection seed; then
``framp-jax select`` picks each method's configuration on validation only.

    framp-jax sweep --sweep experiments/sweeps/fair_tune_cora.py --workdir runs/fair_tune_cora
    framp-jax select --sweep experiments/sweeps/fair_tune_cora.py --workdir runs/fair_tune_cora
"""
from framp_jax.sweep import sibling_module

P = sibling_module(__file__, "fair_protocol.py")


def get_sweep():
    return P.tuning_runs("cora")


def protocol():
    return P, "cora"
