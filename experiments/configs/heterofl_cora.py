"""HeteroFL on Cora (10 METIS subgraph clients): fedavg_cora's data, clients, budgets, rounds,
seed and client optimizer; HeteroFL's defaults (masked CE, label-wise output aggregation) with
width rates = budgets (see below) on the engine's own GCN (``backbone="same"``; the GCN has no
BN, so no sBN pass)."""
from framp_jax.config import sibling_config

from framp_jax.algorithms.heterofl import heterofl_defaults


def _base():
    return sibling_config(__file__, "fedavg_cora.py")


def get_config():
    c = _base()
    c.method = "heterofl"
    c.heterofl = heterofl_defaults()
    c.heterofl.backbone = "same"
    # GCN parameters grow ~linearly with the hidden width (the in_dim x hidden first layer
    # dominates), so rate = budget: hidden 128/32/8/2, prunable fractions on Cora 1, 0.235,
    # 0.058, 0.014 (the CNN/ResNet rates 1, 1/2, 1/4, 1/8 assume quadratic growth)
    c.heterofl.rates = (1.0, 0.25, 0.0625, 0.015625)
    c.heterofl.sbn = False
    return c
