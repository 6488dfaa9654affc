"""HeteroFL on CIFAR-100 in the FIARSE protocol: ``heterofl_cifar10_resnet18`` with CIFAR-100
(HeteroFL's CIFAR recipe is the same for both data sets)."""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heterofl_cifar10_resnet18.py")
    spec = importlib.util.spec_from_file_location("heterofl_cifar10_resnet18", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("cifar100")
