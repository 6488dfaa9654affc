"""FRAMP, small CNN on real CIFAR-10 (the same data, clients, budgets, rounds and seed as
fedavg_cifar10_cpu.py), in the configuration chosen by the FRAMP design study
(results/sweeps/FRAMP_STUDY.md) on its declared criterion, score = (Local mean + Union mean) / 2
over seeds 0, 1, 2 (experiments/sweeps/framp_base_cifar10.py):

- ``framp.base="fedavg"`` (ours, not SPEC): each generated model is a shared base plus
  ``framp.residual_scale`` (0.1) x the hypernetwork's residual; the server moves the base by the
  clients' averaged updates (holders-mean) and still updates the hypernetwork by the VJP of the
  clients' deltas;
- ``framp.residual_head=False`` (ours): every client gets the shared base's classifier, the
  residual personalises the feature extractor only.

SPEC's FRAMP is ``framp_cifar10_cpu_spec.py`` (also: ``--config.framp.base=none
--config.framp.residual_head=true``)."""
from framp_jax.config import sibling_config

CHOSEN = {"base": "fedavg", "residual_head": False}


def get_config():
    c = sibling_config(__file__, "framp_cifar10_cpu_spec.py")
    for k, v in CHOSEN.items():
        c.framp[k] = v
    return c
