"""HeteroFL, small CNN analogue on real CIFAR-10: the FedAvg CPU preset's data, clients, budgets,
rounds, seed and client optimizer, with HeteroFL's nested prefix submodels (width rates 1, 1/2,
1/4, 1/8 for budgets 1, 1/4, 1/16, 1/64), masked CE, label-wise output aggregation, and the
pre-activation-style CNN (Scaler + BN after each conv) evaluated with sBN statistics.

sBN pass (labelled deviation for CPU): the first ``sbn_max_per_client`` = 500 training samples of
each of the 20 clients (10 000 images, a fifth of the training set) per level and evaluation; the
official pass uses the whole training set (``--config.heterofl.sbn_max_per_client=0``)."""
import importlib.util
import os

from framp_jax.algorithms.heterofl import heterofl_defaults


def _fedavg_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fedavg_cifar10_cpu.py")
    spec = importlib.util.spec_from_file_location("fedavg_cifar10_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    c = _fedavg_config()
    c.method = "heterofl"
    c.heterofl = heterofl_defaults()
    c.heterofl.sbn_max_per_client = 500
    return c
