"""FRAMP design study (issue 14), convergence: FRAMP (the preset, i.e. the study's choice
framp.base="fedavg" + framp.residual_head=False, and SPEC's FRAMP as ``framp_spec``),
FIARSE, HeteroFL, FedAvg and local-only on the CIFAR-10 CPU setting for 600 rounds (4x the
presets), evaluated every 25 rounds, 3 seeds: where each method's Union flattens and where the
curves cross (``framp-jax report`` plots Local and Union against rounds).

The runs are ``cifar10_cpu.py``'s (same variants and overrides: FIARSE records the mask reuse,
FRAMP the diagnostics) with more rounds. None of these methods depends on the total number of
rounds (ScaleFL, whose distillation starts at a fraction of them, is not here), so a finished
150-round run of ``cifar10_cpu`` continued to round 600 is this sweep's run: copy its directory
(its final checkpoint is round 150) into this sweep's workdir and the sweep resumes it there
(tests/test_engine.py: a run continued past its end equals the longer run)::

    for v in framp framp_spec fiarse heterofl fedavg local; do for s in 0 1 2; do
      [ -d runs/cifar10_cpu/${v}_seed$s/checkpoints ] && cp -a runs/cifar10_cpu/${v}_seed$s runs/framp_convergence_cifar10/; done; done
    framp-jax sweep --sweep experiments/sweeps/framp_convergence_cifar10.py --workdir runs/framp_convergence_cifar10
"""
from framp_jax.sweep import grid, sibling_module, before_validation

METHODS = ("framp", "fiarse", "heterofl", "fedavg", "local", "framp_spec")


def _sweep():
    variants = sibling_module(__file__, "cifar10_cpu.py").variants()
    return grid({m: variants[m] for m in METHODS}, seeds=(0, 1, 2),
                common={"rounds": 600, "checkpoint_every": 50})


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
