"""FIARSE in the FIARSE protocol on CIFAR-100: as fiarse_cifar10_resnet18.py, with one
threshold per ResNet stage group (``scope="groupwise"``), as the FIARSE README runs its
``fiarse_layerwise`` code for CIFAR-100."""
from framp_jax.config import sibling_config


def _cifar10_config():
    return sibling_config(__file__, "fiarse_cifar10_resnet18.py")


def get_config():
    c = _cifar10_config()
    c.dataset = "cifar100"
    c.fiarse.scope = "groupwise"
    return c
