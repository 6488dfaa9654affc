"""FRAMP on Cora (10 METIS subgraph clients): exactly fedavg_cora's data, clients, budgets,
rounds, seed and client optimizer; FRAMP's options as in framp_cifar10_cpu.py (GCN target,
P = 200,967 parameters for Cora's 1433 features: 50 chunks of 4096)."""
from framp_jax.config import sibling_config


def _base():
    return sibling_config(__file__, "fedavg_cora.py")


def get_config():
    c = _base()
    c.method = "framp"
    c.framp.chunk_size = 4096
    c.framp.unseen_budgets = (1 / 256, 1 / 128, 1 / 32, 1 / 8, 1 / 2)
    return c
