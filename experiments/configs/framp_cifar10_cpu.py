"""SPEC's FRAMP (the paper's method as SPEC documents it), small CNN on real CIFAR-10: the same
data, clients, budgets, rounds and seed as fedavg_cifar10_cpu.py. ``hybrid_cifar10_cpu.py``
is our hybrid (a shared FedAvg base plus a hypernetwork residual, not SPEC's FRAMP); the design
study's sweep files start from this one."""
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
