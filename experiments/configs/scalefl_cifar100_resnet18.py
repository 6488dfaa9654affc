"""ScaleFL in the FIARSE protocol on CIFAR-100: scalefl_cifar10_resnet18.py with the dataset
changed (ScaleFL's ``config.py`` uses the same client recipe for both CIFAR datasets)."""
from importlib import util
from pathlib import Path


def get_config():
    spec = util.spec_from_file_location("scalefl_cifar10_resnet18",
                                        Path(__file__).with_name("scalefl_cifar10_resnet18.py"))
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config("cifar100")
