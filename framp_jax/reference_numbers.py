"""Published accuracies (%) that framp_jax runs can be compared with, copied from SPEC §3.2 and
§3.3, each with the protocol it was measured under. :func:`match` pairs a run's config with a
table only when that protocol matches; anything else has no reference.

Keys follow results.json ``final``: ``local/<size>`` (mean local-test accuracy of the clients of
that size: FIARSE's "Model(s)"), ``local/mean`` (FIARSE's "Local"; Table 7's "Local") and
``union/mean`` (FIARSE's "Global": the mean over sizes of the accuracy on the full test set;
Table 7's "Union").
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# SPEC §2.3-§2.5: the FIARSE protocol (ResNet-18 sBN, 100 clients, 10 per round, 800 rounds,
# balanced Dirichlet, sizes 1, 1/4, 1/16, 1/64 with 25 clients each)
FIARSE_PROTOCOL = {
    "model": "resnet18", "num_clients": 100, "clients_per_round": 10, "rounds": 800,
    "local_steps": 100, "batch_size": 20, "partition": "balanced_dirichlet",
    "budget_levels": (1.0, 0.25, 0.0625, 0.015625), "budget_dist": (25, 25, 25, 25),
    "heldout_frac": 0.0,
}

# The columns of every table below, in this order.
COLUMNS = ("local/mean", "local/1/64", "local/1/16", "local/1/4", "local/1", "union/mean")


def _reference(source: str, dataset: str, alpha: float,
               rows: Mapping[str, tuple[float, ...]],
               local_requires: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One :data:`REFERENCES` entry: the FIARSE protocol on ``dataset`` with Dirichlet ``alpha``,
    and ``rows`` ``{method: values in COLUMNS order}`` (a short row gives only its first columns).
    ``local_requires``: the config fields the local columns are valid under."""
    numbers = {}
    for method, values in rows.items():
        if len(values) > len(COLUMNS):
            raise ValueError(f"{source}: {method} has {len(values)} values for {len(COLUMNS)} "
                             "columns")
        numbers[method] = dict(zip(COLUMNS, values))
    return {
        "source": source,
        "protocol": {**FIARSE_PROTOCOL, "dataset": dataset, "alpha": alpha},
        "local_requires": dict(local_requires or {}),
        "numbers": numbers,
    }


def _load_tables() -> list[dict[str, Any]]:
    """The tables of ``reference_numbers.json`` (beside this module) as :data:`REFERENCES`
    entries. FIARSE partitions the test split with independently drawn priors, so its "Local"
    and "Model(s)" numbers compare only with ``test_prior="fiarse_independent"`` (SPEC §2.2:
    the tables' ``local_requires``). Only alpha = 0.05 and CIFAR-100 are stated for the FRAMP
    paper's Table 7; the rest of its protocol is taken to be FIARSE's (SPEC §3.3 calls it the
    strong-heterogeneity setting of the same comparison); FIARSE's row there is partly
    unreadable, so only the values SPEC gives are in it."""
    import json
    import os
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "reference_numbers.json")) as f:
        tables = json.load(f)["tables"]
    return [_reference(t["source"], t["dataset"], t["alpha"],
                       {m: tuple(v) for m, v in t["rows"].items()}, t["local_requires"] or None)
            for t in tables]


REFERENCES: list[dict[str, Any]] = _load_tables()


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        if not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))) or len(a) != len(b):
            return False
        return all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


def protocol_mismatch(config: Mapping[str, Any], protocol: Mapping[str, Any]) -> list[str]:
    """The protocol fields where ``config`` differs: ``["rounds: 150 (reference 800)", ...]``."""
    return [f"{k}: {config.get(k)!r} (reference {v!r})" for k, v in protocol.items()
            if not _same(config.get(k), v)]


def match(config: Mapping[str, Any], method: str) -> tuple[dict, str] | None:
    """``(numbers in %, source)`` of the reference for a run of ``method`` with ``config`` (a
    config.json dict), only where the protocol matches; the local columns are dropped where the
    run's test prior is not the one the reference used. None when there is none."""
    for ref in REFERENCES:
        if protocol_mismatch(config, ref["protocol"]) or method not in ref["numbers"]:
            continue
        nums = dict(ref["numbers"][method])
        source = ref["source"]
        if any(not _same(config.get(k), v) for k, v in ref["local_requires"].items()):
            nums = {k: v for k, v in nums.items() if not k.startswith("local/")}
            source += (" (local columns need "
                       + ", ".join(f"{k}={v}" for k, v in ref["local_requires"].items()) + ")")
        if nums:
            return nums, source
    return None
