"""CiteSeer: every method's *_cora preset with dataset=citeseer x seeds 0, 1, 2."""
from framp_jax.sweep import grid, sibling_module, before_validation


def _sweep():
    variants = sibling_module(__file__, "cora.py").variants()
    return grid(variants, seeds=(0, 1, 2), common={"dataset": "citeseer"})


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
