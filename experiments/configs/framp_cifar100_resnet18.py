"""FRAMP in the FIARSE protocol on CIFAR-100: framp_cifar10_resnet18.py with CIFAR-100 (same
clients, budgets, rounds, client optimizer and FRAMP options; the classifier and the prototype
bank have 100 classes)."""
from framp_jax.config import sibling_config


def get_config():
    c = sibling_config(__file__, "framp_cifar10_resnet18.py")
    c.dataset = "cifar100"
    return c
