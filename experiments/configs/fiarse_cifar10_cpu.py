"""FIARSE, small CNN on real CIFAR-10: the FedAvg CPU preset's data, clients, budgets, rounds,
seed and learning rate, with FIARSE's threshold-masked training and server rule."""
from framp_jax.config import sibling_config

import ml_collections as mlc


def _fedavg_config():
    return sibling_config(__file__, "fedavg_cifar10_cpu.py")


def get_config():
    c = _fedavg_config()
    c.method = "fiarse"
    c.fiarse = mlc.ConfigDict()
    c.fiarse.scope = "global"        # global | groupwise (one threshold per stage group)
    c.fiarse.mask_grad = "masked"    # masked (what the official code runs) | fiarse_paper
    c.fiarse.server_lr = 1.0         # official --lr-global
    return c
