"""FRAMP on Cora (10 METIS subgraph clients; exactly fedavg_cora's data, clients, budgets, rounds,
seed and client optimizer; single-chunk hypernetwork with Adam at lr 1e-2, see
framp_cora_spec.py) in the configuration the FRAMP design study chose on CIFAR-10 and confirmed
unchanged on Cora (results/sweeps/FRAMP_STUDY.md, experiments/sweeps/framp_confirm.py):
``framp.base="fedavg"`` with ``framp.residual_head=False`` (ours, not SPEC; see
framp_cifar10_cpu.py). SPEC's FRAMP is ``framp_cora_spec.py``."""
from framp_jax.config import sibling_config

CHOSEN = {"base": "fedavg", "residual_head": False}


def get_config():
    c = sibling_config(__file__, "framp_cora_spec.py")
    for k, v in CHOSEN.items():
        c.framp[k] = v
    return c
