"""Every committed sweep run keeps its identity: re-resolving each sweep file's runs gives the
config hash recorded in the run's committed ``config.json``. Catches a preset rename, a new
config field or a changed default that would make ``framp-jax sweep`` redo (or ``--resume``
refuse) finished runs, and a sweep file that no longer describes the runs committed under its
name."""
import glob
import json
import os

import pytest

from framp_jax.simulate import config_hash
from framp_jax.sweep import load_sweep, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEPS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "sweeps", "*.py"))
                if "def get_sweep" in open(p).read())  # fair_protocol.py is a shared module


def _committed(sweep_file):
    name = os.path.splitext(os.path.basename(sweep_file))[0]
    d = os.path.join(ROOT, "results", "sweeps", name)
    if not os.path.isdir(d):  # nothing committed (fair_final.py needs its selections first)
        return
    for run in load_sweep(sweep_file):
        cj = os.path.join(d, run.name, "config.json")
        if os.path.isfile(cj):
            with open(cj) as f:
                yield run, json.load(f)["_resolved"]["config_hash"]


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=[os.path.basename(s) for s in SWEEPS])
def test_committed_runs_keep_their_config_hash(sweep_file):
    pairs = list(_committed(sweep_file))
    changed = [run.name for run, stored in pairs if config_hash(resolve(run)) != stored]
    assert not changed, f"{len(changed)} of {len(pairs)} committed runs changed hash: {changed[:5]}"


def test_some_runs_are_checked():
    assert sum(len(list(_committed(s))) for s in SWEEPS) >= 250
