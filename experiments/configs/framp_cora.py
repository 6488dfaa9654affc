"""FRAMP on Cora (10 METIS subgraph clients): exactly fedavg_cora's data, clients, budgets,
rounds, seed and client optimizer; FRAMP's options as in framp_cifar10_cpu.py (GCN target,
P = 200,967 parameters for Cora's 1433 features: 50 chunks of 4096)."""
from importlib import util
from pathlib import Path


def _base():
    spec = util.spec_from_file_location("fedavg_cora", Path(__file__).with_name("fedavg_cora.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    c = _base()
    c.method = "framp"
    c.framp.chunk_size = 4096
    c.framp.unseen_budgets = (1 / 256, 1 / 128, 1 / 32, 1 / 8, 1 / 2)
    return c
