"""Every preset in experiments/configs loads, validates, and compares like with like: a method's
preset shares the data, clients, budgets, rounds and seed of the preset it is measured against."""
from __future__ import annotations

from pathlib import Path

import pytest

from framp_jax import config as C
from framp_jax.algorithms.registry import names

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
PRESETS = sorted(p.name for p in CONFIGS.glob("*.py"))
SHARED_KEYS = ("dataset", "model", "seed", "num_clients", "clients_per_round", "rounds",
               "local_steps", "batch_size", "lr", "partition", "alpha", "budget_levels",
               "budget_dist")


def _load(name):
    return C.sibling_config(str(CONFIGS / "x.py"), name)


# our variants of a method carry their own names (a preset named after a paper's method runs
# that method): name prefix -> the registered method it configures
VARIANTS = {"hybrid": "framp"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_validates(name):
    c = _load(name)
    C.validate(c)
    prefix = next((v for v, m in VARIANTS.items() if name.startswith(v + "_")), c.method)
    assert name.startswith(prefix + "_"), (name, c.method)
    assert VARIANTS.get(prefix, c.method) == c.method, (name, c.method)
    assert name[len(prefix) + 1:-3].startswith(c.dataset), (name, c.dataset)


@pytest.mark.parametrize("name", ["framp_cifar10_cpu.py", "framp_cora.py"])
def test_framp_presets_run_spec_framp_and_the_hybrid_is_named_apart(name):
    """framp_* runs SPEC's FRAMP (no shared global model, SPEC §1.1); the hybrid (a FedAvg base
    plus the hypernetwork's residual, ours) is hybrid_*."""
    c = _load(name)
    assert c.method == "framp" and c.framp.base == "none" and c.framp.residual_head
    h = _load(name.replace("framp_", "hybrid_"))
    assert h.method == "framp" and h.framp.base == "fedavg"


def test_every_method_has_its_cora_preset_and_framp_its_paper_scale_ones():
    for m in names():
        assert f"{m}_cora.py" in PRESETS, m
    for p in ("framp_cifar10_cpu.py", "framp_cifar10_resnet18.py", "framp_cifar100_resnet18.py"):
        assert p in PRESETS


@pytest.mark.parametrize("name,ref", [("framp_cifar10_resnet18.py", "fiarse_cifar10_resnet18.py"),
                                      ("framp_cifar100_resnet18.py", "fiarse_cifar100_resnet18.py"),
                                      ("framp_cifar10_cpu.py", "fedavg_cifar10_cpu.py")])
def test_framp_presets_share_the_protocol_of_their_reference(name, ref):
    a, b = _load(name), _load(ref)
    diff = [k for k in SHARED_KEYS if a[k] != b[k]]
    assert not diff, diff
    assert a.method == "framp" and a.framp.chunk_size >= 0
