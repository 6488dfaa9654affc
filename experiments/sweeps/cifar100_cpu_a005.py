"""CPU-scale CIFAR-100, Dirichlet alpha = 0.05: the CIFAR-10 CPU presets of cifar10_cpu.py (every
method, FRAMP also with width extraction) with dataset=cifar100 and alpha=0.05, x seeds 0, 1, 2."""
from framp_jax.sweep import grid, sibling_module, before_validation


def _sweep():
    variants = sibling_module(__file__, "cifar10_cpu.py").variants()
    return grid(variants, seeds=(0, 1, 2), common={"dataset": "cifar100", "alpha": 0.05})


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
