"""Collect finished runs into results/: copies each run's config.json, results.json and
metrics.csv to results/<name>/ and prints a Local/Union-per-budget markdown table.

    python experiments/report.py runs/framp_cifar10_cpu runs/fedavg_cifar10_cpu ... [--out results]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

KEYS = ("1/64", "1/16", "1/4", "1", "mean")


def row(name, res):
    f = res["final"]
    cells = [f"{100 * f.get('local', {}).get(k, float('nan')):.2f}" for k in KEYS]
    cells += [f"{100 * f.get('union', {}).get(k, float('nan')):.2f}" for k in KEYS]
    return (f"| {name} | {res['method']} | {res['dataset']} | {res['seed']} | {res['rounds']} | "
            + " | ".join(cells) + f" | {res['wall_s']:.0f} | {res['compiles']} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    print("| run | method | dataset | seed | rounds | " + " | ".join(f"Local {k}" for k in KEYS)
          + " | " + " | ".join(f"Union {k}" for k in KEYS) + " | wall s | compiles |")
    print("|" + "---|" * (5 + 2 * len(KEYS) + 2))
    for run in a.runs:
        path = os.path.join(run, "results.json")
        if not os.path.exists(path):
            print(f"| {run} | (no results.json: unfinished) |")
            continue
        res = json.load(open(path))
        name = os.path.basename(os.path.normpath(run))
        dst = os.path.join(a.out, name)
        os.makedirs(dst, exist_ok=True)
        for fn in ("config.json", "results.json", "metrics.csv"):
            src = os.path.join(run, fn)
            if os.path.exists(src) and not (os.path.exists(os.path.join(dst, fn))
                                            and os.path.samefile(src, os.path.join(dst, fn))):
                shutil.copy(os.path.join(run, fn), os.path.join(dst, fn))
        print(row(name, res))


if __name__ == "__main__":
    main()
