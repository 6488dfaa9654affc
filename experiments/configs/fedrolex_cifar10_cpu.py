"""FedRolex, small CNN analogue on real CIFAR-10: the FedAvg CPU preset's data, clients, budgets,
rounds, seed and client optimizer, with FedRolex's rolling window (width rates 1, 1/2, 1/4, 1/8
for budgets 1, 1/4, 1/16, 1/64), HeteroFL's masked CE and label-wise output aggregation, the
pre-activation-style CNN (Scaler + BN after each conv), plain count-averaging and per-size
evaluation at roll 0 with sBN statistics.

sBN pass (labelled deviation for CPU): the first ``sbn_max_per_client`` = 500 training samples of
each of the 20 clients per level and evaluation (``--config.fedrolex.sbn_max_per_client=0`` for
all); ``--config.fedrolex.eval_bn=batch`` evaluates with batch statistics as the official
``main_resnet.py`` does; ``--config.fedrolex.eval_window=last`` evaluates each size at the last
round's window instead of roll 0."""
from framp_jax.config import sibling_config

from framp_jax.algorithms.fedrolex import fedrolex_defaults


def _fedavg_config():
    return sibling_config(__file__, "fedavg_cifar10_cpu.py")


def get_config():
    c = _fedavg_config()
    c.method = "fedrolex"
    c.fedrolex = fedrolex_defaults()
    c.fedrolex.sbn_max_per_client = 500
    return c
