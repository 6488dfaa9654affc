"""FedRolex on CIFAR-100 in the FIARSE protocol: ``fedrolex_cifar10_resnet18`` with CIFAR-100
and 2500 rounds (FedRolex README, CIFAR-100 command)."""
from framp_jax.config import sibling_config


def get_config():
    return sibling_config(__file__, "fedrolex_cifar10_resnet18.py", "cifar100")
