"""FedRolex on CIFAR-100 in the FIARSE protocol: ``fedrolex_cifar10_resnet18`` with CIFAR-100
and 2500 rounds (FedRolex README, CIFAR-100 command)."""
import importlib.util
import os


def get_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fedrolex_cifar10_resnet18.py")
    spec = importlib.util.spec_from_file_location("fedrolex_cifar10_resnet18", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("cifar100")
