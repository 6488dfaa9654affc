"""FIARSE on Cora (10 METIS subgraph clients): fedavg_cora's data, clients, budgets, rounds,
seed and Adam lr, with FIARSE's options as in fiarse_cifar10_cpu.py. One forced difference:
weight_decay = 0, because FIARSE refuses weight decay (it would shrink pruned entries, which the
server would then count as trained; the official worker runs plain SGD)."""
from framp_jax.config import sibling_config

import ml_collections as mlc


def _base():
    return sibling_config(__file__, "fedavg_cora.py")


def get_config():
    c = _base()
    c.method = "fiarse"
    c.weight_decay = 0.0
    c.fiarse = mlc.ConfigDict()
    c.fiarse.scope = "global"        # global | groupwise (one threshold per stage group)
    c.fiarse.mask_grad = "masked"    # masked (what the official code runs) | fiarse_paper
    c.fiarse.server_lr = 1.0         # official --lr-global
    return c
