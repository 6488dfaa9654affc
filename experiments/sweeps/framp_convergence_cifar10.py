"""FRAMP design study (issue 14), convergence: FRAMP (the preset, i.e. the study's choice
framp.base="fedavg" + framp.residual_head=False, and SPEC's FRAMP as ``framp_spec``),
FIARSE, HeteroFL, FedAvg and local-only on the CIFAR-10 CPU setting for 600 rounds (4x the
presets), evaluated every 25 rounds, 3 seeds: where each method's Union flattens and where the
curves cross (``framp-jax report`` plots Local and Union against rounds).

    framp-jax sweep --sweep experiments/sweeps/framp_convergence_cifar10.py --workdir runs/framp_convergence_cifar10
"""
from framp_jax.sweep import grid


def get_sweep():
    v = {m: f"../configs/{m}_cifar10_cpu.py" for m in ("framp", "fiarse", "heterofl", "fedavg", "local")}
    v["framp_spec"] = "../configs/framp_cifar10_cpu_spec.py"
    return grid(v, seeds=(0, 1, 2), common={"rounds": 600, "checkpoint_every": 50})
