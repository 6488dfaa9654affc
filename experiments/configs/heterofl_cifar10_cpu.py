"""HeteroFL, small CNN analogue on real CIFAR-10: the FedAvg CPU preset's data, clients, budgets,
rounds, seed and client optimizer, with HeteroFL's nested prefix submodels (width rates 1, 1/2,
1/4, 1/8 for budgets 1, 1/4, 1/16, 1/64), masked CE, label-wise output aggregation, and the
pre-activation-style CNN (Scaler + BN after each conv) evaluated with sBN statistics.

sBN pass (labelled deviation for CPU): the first ``sbn_max_per_client`` = 500 training samples of
each of the 20 clients (10 000 images, a fifth of the training set) per level and evaluation; the
official pass uses the whole training set (``--config.heterofl.sbn_max_per_client=0``)."""
from framp_jax.config import sibling_config

from framp_jax.algorithms.heterofl import heterofl_defaults


def _fedavg_config():
    return sibling_config(__file__, "fedavg_cifar10_cpu.py")


def get_config():
    c = _fedavg_config()
    c.method = "heterofl"
    c.heterofl = heterofl_defaults()
    c.heterofl.sbn_max_per_client = 500
    return c
