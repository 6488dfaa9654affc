"""CPU-scale CIFAR-10 reproduction: every method's *_cifar10_cpu preset (FRAMP also as SPEC
documents it, ``framp_spec``, and with width extraction) x seeds 0, 1, 2.

    framp-jax sweep --sweep experiments/sweeps/cifar10_cpu.py --workdir runs/cifar10_cpu
"""
from framp_jax.sweep import grid, before_validation

METHODS = ("fedavg", "local", "framp", "fiarse", "heterofl", "fedrolex", "scalefl")


def variants():
    v = {m: f"../configs/{m}_cifar10_cpu.py" for m in METHODS}
    # SPEC's FRAMP beside the preset (the design study's choice), and FRAMP with width
    # extraction, which framp.base does not support, from SPEC's FRAMP
    v["framp"] = "../configs/hybrid_cifar10_cpu.py"  # "framp" here: the hybrid (ours)
    v["framp_spec"] = "../configs/framp_cifar10_cpu.py"
    v["framp_width"] = ("../configs/framp_cifar10_cpu.py", {"framp.extraction": "width"})
    # FIARSE also records the mask-reuse counts for the report's CDF (Fig. 1); recording leaves
    # the training computation unchanged.
    v["fiarse"] = (v["fiarse"], {"record_mask_reuse": True})
    # FRAMP (the preset) also records the design study's diagnostics (issue 14: generated-model
    # cosine similarity, Union split into present/absent classes); they leave training unchanged
    # (tests/test_diagnostics.py), so these runs equal framp_base_cifar10's framp_base_sharedhead
    # and framp_confirm's runs of the same setting, config hash included.
    v["framp"] = (v["framp"], {"diagnostics": True})
    return v


def _sweep():
    return grid(variants(), seeds=(0, 1, 2))


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
