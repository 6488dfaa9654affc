"""Fair protocol, selection on CIFAR-10 (alpha 0.3, 20 clients, small CNN, 150 rounds): every
method's 4 declared candidates (fair_protocol.py) on the selection seed; then
``framp-jax select`` picks each method's configuration on validation only.

    framp-jax sweep --sweep experiments/sweeps/fair_tune_cifar10.py --workdir runs/fair_tune_cifar10
    framp-jax select --sweep experiments/sweeps/fair_tune_cifar10.py --workdir runs/fair_tune_cifar10
"""
from framp_jax.sweep import sibling_module

P = sibling_module(__file__, "fair_protocol.py")


def get_sweep():
    return P.tuning_runs("cifar10")


def protocol():
    return P, "cifar10"
