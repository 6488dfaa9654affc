"""FRAMP-hybrid (ours, not SPEC's FRAMP), small CNN on real CIFAR-10 (the same data, clients,
budgets, rounds and seed as fedavg_cifar10_cpu.py): the configuration the first FRAMP design
study chose on test accuracy (results/sweeps/FRAMP_STUDY.md; selected on test, see
results/sweeps/FAIR.md for the validation-selected comparison):

- ``framp.base="fedavg"``: each generated model is a shared base plus
  ``framp.residual_scale`` (0.1) x the hypernetwork's residual; the server moves the base by the
  clients' averaged updates (holders-mean) and still updates the hypernetwork by the VJP of the
  clients' deltas. SPEC §1.1's FRAMP has no global model;
- ``framp.residual_head=False``: every client gets the shared base's classifier, the
  residual personalises the feature extractor only.

SPEC's FRAMP is ``framp_cifar10_cpu.py``."""
from framp_jax.config import sibling_config

CHOSEN = {"base": "fedavg", "residual_head": False}


def get_config():
    c = sibling_config(__file__, "framp_cifar10_cpu.py")
    for k, v in CHOSEN.items():
        c.framp[k] = v
    return c
