"""Mixed precision on the CPU presets: ``config.compute_dtype="bfloat16"`` (activations and
matmuls in bf16; master parameters, optimizer state, norm statistics, losses, top-k thresholds
and aggregation in float32) against the float32 runs of the same presets and seeds in
``experiments/sweeps/cifar10_cpu.py``. Claim checked: bf16 reaches the float32 accuracy within
seed noise (seeds 0, 1, 2 each; report them together:
``framp-jax report results/sweeps/cifar10_cpu results/sweeps/bf16_cifar10 --out DIR``).

    framp-jax sweep --sweep experiments/sweeps/bf16_cifar10.py --workdir runs/bf16_cifar10
"""
from framp_jax.sweep import grid, before_validation


def _sweep():
    return grid({m: f"../configs/{m}_cifar10_cpu.py" for m in ("fedavg", "fiarse")},
                seeds=(0, 1, 2), common={"compute_dtype": "bfloat16"})


def get_sweep():
    return before_validation(_sweep())  # made before the validation protocol (FAIR.md)
