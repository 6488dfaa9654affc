"""Local-only training (each client trains its own budget-masked GCN on its own subgraph) on
Cora, with exactly fedavg_cora's data, clients, budgets, rounds and seed."""
from importlib import util
from pathlib import Path


def _base():
    spec = util.spec_from_file_location("fedavg_cora", Path(__file__).with_name("fedavg_cora.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    c = _base()
    c.method = "local"
    return c
