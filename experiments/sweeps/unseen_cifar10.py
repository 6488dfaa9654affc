"""Unseen clients on CPU-scale CIFAR-10: the *_cifar10_cpu presets with heldout_frac=0.2, i.e.
one of the five clients of every budget level held out of training and evaluated zero-shot
(results.json "unseen/local", "unseen/union"), x seeds 0, 1, 2. Local training has no model
for a client that never trained, so it is not in this sweep."""
from framp_jax.sweep import grid, sibling_module, before_validation


def _sweep():
    variants = sibling_module(__file__, "cifar10_cpu.py").variants()
    variants.pop("local")
    return grid(variants, seeds=(0, 1, 2), common={"heldout_frac": 0.2})


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
