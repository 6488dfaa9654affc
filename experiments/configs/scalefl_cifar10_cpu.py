"""ScaleFL, small CNN with early exits on real CIFAR-10: the FedAvg CPU preset's data, clients,
budgets, rounds, seed and local optimizer, with ScaleFL's level map for the CNN
(1/64 → 2 exits at width 0.5, 1/16 → 2 exits at width 1, 1/4 → 3 exits at width 0.5,
1 → the full model; see framp_jax/algorithms/scalefl.py) and no self-distillation (γ = 0, the
official default)."""
from framp_jax.config import sibling_config

from framp_jax.algorithms.scalefl import default_options


def _fedavg_config():
    return sibling_config(__file__, "fedavg_cifar10_cpu.py")


def get_config():
    c = _fedavg_config()
    c.method = "scalefl"
    c.scalefl = default_options()
    c.scalefl.exits = (3, 3, 2, 2)          # budget_levels order: 1, 1/4, 1/16, 1/64
    c.scalefl.widths = (1.0, 0.5, 1.0, 0.5)
    return c
