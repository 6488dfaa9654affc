"""FRAMP-hybrid (ours, not SPEC's FRAMP) on Cora (10 METIS subgraph clients; exactly
fedavg_cora's data, clients, budgets, rounds, seed and client optimizer; single-chunk
hypernetwork with Adam at lr 1e-2, see framp_cora.py): a shared FedAvg base plus a hypernetwork
residual, ``framp.base="fedavg"`` with ``framp.residual_head=False``, the configuration the first
FRAMP design study chose on CIFAR-10 test accuracy (results/sweeps/FRAMP_STUDY.md). SPEC §1.1's
FRAMP has no global model; SPEC's FRAMP is ``framp_cora.py``."""
from framp_jax.config import sibling_config

CHOSEN = {"base": "fedavg", "residual_head": False}


def get_config():
    c = sibling_config(__file__, "framp_cora.py")
    for k, v in CHOSEN.items():
        c.framp[k] = v
    return c
