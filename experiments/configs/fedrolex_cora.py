"""FedRolex on Cora (10 METIS subgraph clients): fedavg_cora's data, clients, budgets, rounds,
seed and client optimizer; FedRolex's defaults (rolling window) with width rates = budgets (see
below) on the engine's own GCN (``backbone="same"``, no BN: evaluation uses plain eval mode)."""
from framp_jax.config import sibling_config

from framp_jax.algorithms.fedrolex import fedrolex_defaults


def _base():
    return sibling_config(__file__, "fedavg_cora.py")


def get_config():
    c = _base()
    c.method = "fedrolex"
    c.fedrolex = fedrolex_defaults()
    c.fedrolex.backbone = "same"
    # GCN parameters grow ~linearly with the hidden width (the in_dim x hidden first layer
    # dominates), so rate = budget: hidden 128/32/8/2, prunable fractions on Cora 1, 0.235,
    # 0.058, 0.014 (the CNN/ResNet rates 1, 1/2, 1/4, 1/8 assume quadratic growth)
    c.fedrolex.rates = (1.0, 0.25, 0.0625, 0.015625)
    c.fedrolex.sbn = False
    c.fedrolex.eval_bn = "batch"
    return c
