"""Local-only training (each client trains its own budget-masked GCN on its own subgraph) on
Cora, with exactly fedavg_cora's data, clients, budgets, rounds and seed."""
from framp_jax.config import sibling_config


def _base():
    return sibling_config(__file__, "fedavg_cora.py")


def get_config():
    c = _base()
    c.method = "local"
    return c
