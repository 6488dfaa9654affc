"""FIARSE in the FIARSE protocol on CIFAR-100: as fiarse_cifar10_resnet18.py, with one
threshold per ResNet stage group (``scope="groupwise"``), as the FIARSE README runs its
``fiarse_layerwise`` code for CIFAR-100."""
import importlib.util
import os


def _cifar10_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fiarse_cifar10_resnet18.py")
    spec = importlib.util.spec_from_file_location("fiarse_cifar10_resnet18", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def get_config():
    c = _cifar10_config()
    c.dataset = "cifar100"
    c.fiarse.scope = "groupwise"
    return c
