"""ScaleFL on Cora (10 METIS subgraph clients): fedavg_cora's data, clients, budgets, rounds,
seed and client optimizer; no self-distillation (gamma = 0, the official default), as in
scalefl_cifar10_cpu.py. The 2-layer GCN has at most 2 exits (``make_gcn(early_exit=True)``:
a head after layer 1, and the classifier); level map (exits, width) per budget 1, 1/4, 1/16,
1/64: (2, 1), (2, 1/4), (1, 1/16), (1, 1/64): GCN parameters grow ~linearly with the hidden
width (the in_dim x hidden first layer dominates) and dropping layer 2 saves little, so the
width carries the budget (prunable fractions on Cora 1, 0.235, 0.057, 0.014)."""
from framp_jax.config import sibling_config

from framp_jax.algorithms.scalefl import default_options


def _base():
    return sibling_config(__file__, "fedavg_cora.py")


def get_config():
    c = _base()
    c.method = "scalefl"
    c.scalefl = default_options()
    c.scalefl.exits = (2, 2, 1, 1)          # budget_levels order: 1, 1/4, 1/16, 1/64
    c.scalefl.widths = (1.0, 0.25, 0.0625, 0.015625)
    return c
