"""FRAMP, small CNN on real CIFAR-10: the same data, clients, budgets, rounds and seed as
fedavg_cifar10_cpu.py (about 6 minutes on 2 idle CPU cores)."""
from framp_jax.config import sibling_config


def _base():
    return sibling_config(__file__, "fedavg_cifar10_cpu.py")


def get_config():
    c = _base()
    c.method = "framp"
    c.framp.chunk_size = 4096   # 39 chunks for the 156k-parameter CNN
    c.framp.proto_samples = 500  # prototypes from 500 of each client's 2500 samples (CPU time)
    c.framp.unseen_budgets = (1 / 256, 1 / 2)  # zero-shot at budgets never trained on
    return c
