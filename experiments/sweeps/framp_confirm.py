"""FRAMP design study (issue 14), confirmation: the configuration chosen on CIFAR-10 by the
declared criterion, applied unchanged to Cora and to CIFAR-100 (alpha 0.05), against SPEC's
default FRAMP and the baselines of the same settings (``cora.py``, ``cifar100_cpu_a005.py``).

The candidate, fixed before any of these runs: ``framp.base="fedavg"`` with
``framp.residual_head=False`` (ours: the generated model is base + 0.1 x (HN(d_i) - offset) on
the feature extractor, every client gets the shared base's classifier; see
``framp_base_cifar10.py``), the best 3-seed score on CIFAR-10 when this file was written.
Everything else is the setting's SPEC FRAMP preset (``*_spec.py``); the FRAMP presets
``hybrid_cora.py`` and ``hybrid_cifar10_cpu.py`` now hold this configuration. Criterion as on CIFAR-10: score = (Local mean +
Union mean) / 2 of results.json "final", averaged over seeds 0, 1, 2.

    framp-jax sweep --sweep experiments/sweeps/framp_confirm.py --workdir runs/framp_confirm
"""
from framp_jax.sweep import grid, before_validation

CHOSEN = {"framp.base": "fedavg", "framp.residual_head": False}


def _sweep():
    cora = grid({"cora_framp_base_sharedhead": ("../configs/framp_cora.py", CHOSEN)},
                seeds=(0, 1, 2), common={"diagnostics": True})
    c100 = grid({"c100a005_framp_base_sharedhead": ("../configs/framp_cifar10_cpu.py", CHOSEN)},
                seeds=(0, 1, 2), common={"dataset": "cifar100", "alpha": 0.05, "diagnostics": True})
    return cora + c100


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
