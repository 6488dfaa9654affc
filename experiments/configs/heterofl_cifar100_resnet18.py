"""HeteroFL on CIFAR-100 in the FIARSE protocol: ``heterofl_cifar10_resnet18`` with CIFAR-100
(HeteroFL's CIFAR recipe is the same for both data sets)."""
from framp_jax.config import sibling_config


def get_config():
    return sibling_config(__file__, "heterofl_cifar10_resnet18.py", "cifar100")
