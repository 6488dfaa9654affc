"""Record, or check against a record, what every preset computes in a short run: a refactor of
framp_jax must leave each preset's numbers bit for bit as they were.

    python experiments/presets_unchanged.py --record golden.json       # before a change
    python experiments/presets_unchanged.py --check golden.json        # after it

Each preset in ``experiments/configs/`` runs 2 rounds with 2 local steps and an evaluation after
every round (``framp_jax.simulate.run``); the record holds every metrics.csv value but the wall
time, the per-client Local and Union accuracies and the unseen-budget sweep, as exact float
reprs. The CPU-scale and graph presets run on their own data. The ResNet-18 presets run on a
small slice of CIFAR-10 (the first 800 training and 400 test images, written to a temporary npz)
with 8 clients, so that they take seconds; their code paths are the presets' own.
``--only REGEX`` restricts the presets (both modes); ``--record`` adds to an existing record
and skips the presets it already holds; ``--check`` prints each difference.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SHORT = {"rounds": 2, "local_steps": 2, "eval_every": 1, "checkpoint_every": 1, "eval_last": 1}
SMALL = {"num_clients": 8, "clients_per_round": 4}


def _load(path):
    from framp_jax.sweep import _load_preset
    return _load_preset(path)


def _tiny_cifar(tmp: str) -> str:
    from framp_jax.data.vision import load_vision_dataset
    ds = load_vision_dataset("cifar10", None)
    path = os.path.join(tmp, "cifar10_slice.npz")
    np.savez(path, x_train=ds.x_train[:800], y_train=ds.y_train[:800],
             x_test=ds.x_test[:400], y_test=ds.y_test[:400])
    return path


def _config(path: str, tmp: str):
    c = _load(path)
    for k, v in SHORT.items():
        c[k] = v
    if c.model == "resnet18":
        for k, v in SMALL.items():
            c[k] = v
        c.dataset = "npz:" + _tiny_cifar(tmp)
        for sub in ("heterofl", "fedrolex"):
            if sub in c and "sbn_clients" in c[sub]:
                c[sub].sbn_clients = min(int(c[sub].sbn_clients), 8)
    return c


def run_preset(path: str) -> dict:
    from framp_jax import simulate
    with tempfile.TemporaryDirectory() as tmp:
        c = _config(path, tmp)
        wd = os.path.join(tmp, "run")
        res = simulate.run(c, wd, progress=False, log=lambda *a, **k: None,
                           warn=lambda *a, **k: None)
        with open(os.path.join(wd, "metrics.csv")) as f:
            rows = [{k: v for k, v in r.items() if k != "wall_s"} for r in csv.DictReader(f)]
    pc = res.get("per_client", {})
    return {"metrics": rows,
            "local": [repr(x) for x in pc.get("local", [])],
            "union": [repr(x) for x in pc.get("union", [])],
            "unseen_budgets": {k: {kk: repr(vv) for kk, vv in v.items()}
                               for k, v in res.get("unseen_budgets", {}).items()},
            "compiles": res["compiles"]}


def _same(key, want, got) -> bool:
    """Recorded and new value equal; metrics.csv columns added after the record was made (e.g.
    the comm/* bytes of every method) are not differences: each recorded row must equal the new
    row restricted to the recorded columns."""
    if key == "metrics" and isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(
            {k: g.get(k) for k in w} == w for w, g in zip(want, got))
    return want == got


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--record")
    g.add_argument("--check")
    ap.add_argument("--only", default="")
    a = ap.parse_args(argv)
    presets = sorted(p for p in glob.glob(os.path.join(HERE, "configs", "*.py"))
                     if re.search(a.only, os.path.basename(p)))
    if a.check:
        with open(a.check) as f:
            ref = json.load(f)
    out, bad = {}, []
    if a.record and os.path.exists(a.record):
        with open(a.record) as f:
            out = json.load(f)
    for p in presets:
        name = os.path.basename(p)[:-3]
        if a.record and name in out:
            continue
        got = run_preset(p)
        out[name] = got
        if a.record:
            print(f"{name}: recorded ({len(got['metrics'])} evaluations)", flush=True)
            with open(a.record, "w") as f:  # after each preset: a crash keeps what was done
                json.dump(out, f, indent=1, sort_keys=True)
            continue
        want = ref.get(name)
        if want is None:
            print(f"{name}: not in the record", flush=True)
            continue
        diffs = [k for k in want if not _same(k, want[k], got.get(k))]
        print(f"{name}: {'same' if not diffs else 'DIFFERENT in ' + ', '.join(diffs)}", flush=True)
        for k in diffs:
            print(f"  {k}: recorded {json.dumps(want[k])[:400]}\n  {k}: now      "
                  f"{json.dumps(got.get(k))[:400]}")
            bad.append(name)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
