"""The fair-comparison tables (results/sweeps/FAIR.md's numbers) from the committed runs: the
selections (``framp-jax select`` of fair_tune_*.py) and the reported runs of fair_final.py.

    python experiments/fair_report.py --tune results/sweeps/fair_tune_cifar10 \
        results/sweeps/fair_tune_cora --final results/sweeps/fair_final --out results/sweeps/FAIR_TABLES.md

Every number is the mean ± sample std (ddof 1) over the report seeds of a run's results.json
``final`` (the last evaluation), in %. Rows are named by what runs (fair_protocol.py): ``framp``
= SPEC's FRAMP, ``hybrid`` = FedAvg base + hypernetwork residual (ours), ``framp_nohn`` = the -HN
control; ``*_samenet`` = HeteroFL / FedRolex on the plain CNN every other method runs; the
``*_permuted`` / ``*_heldout*`` rows are the descriptor and zero-shot controls. A tuning run or
a reported run that is missing is listed, never filled in.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import OrderedDict

import numpy as np

NETWORK = {"heterofl": "CNN + BN/Scaler, sBN (official)", "fedrolex": "CNN + BN/Scaler, sBN (official)"}
COLUMNS = (("local", "Local"), ("union", "Union"), ("local_masked", "Local (label-masked)"),
           ("val/local", "val Local"), ("val/union", "val Union"))


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cell(vals):
    vals = [100 * v for v in vals if v is not None and np.isfinite(v)]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"


def selection_section(tune_dirs) -> list[str]:
    out = ["## Selection (validation only, selection seeds)", ""]
    for d in tune_dirs:
        md = os.path.join(d, "SELECTION.md")
        out.append(f"### {os.path.basename(os.path.normpath(d))}")
        out.append("")
        out.append(open(md).read() if os.path.isfile(md) else f"(no {md} yet)\n")
    return out


def _protocol():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweeps", "fair_protocol.py")
    spec = importlib.util.spec_from_file_location("fair_protocol", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _choices(tune_dirs) -> dict:
    """setting -> method -> 'label (of N; seeds ...)' from the tuning dirs' selection.json."""
    P = _protocol()
    out = {}
    for d in tune_dirs:
        sel = _read(os.path.join(d, "selection.json"))
        if not sel:
            continue
        tune_ds = os.path.basename(os.path.normpath(d)).replace("fair_tune_", "")
        for setting, _, _ in P.REPORTED.get(tune_ds, ()):
            out[setting] = {m: f"{e['chosen']} (of {e['candidates']}; seed "
                               f"{', '.join(map(str, e['seeds']))})"
                            for m, e in sel["methods"].items() if e.get("chosen")}
    return out


def final_section(final_dir, choices=None) -> list[str]:
    runs = OrderedDict()
    for rd in sorted(glob.glob(os.path.join(final_dir, "*__*_seed*"))):
        m = re.match(r"^(?P<setting>.+?)__(?P<row>.+)_seed(?P<seed>\d+)$", os.path.basename(rd))
        res = _read(os.path.join(rd, "results.json"))
        if m is None or not isinstance(res, dict):
            continue
        runs.setdefault(m["setting"], OrderedDict()).setdefault(m["row"], []).append(
            (int(m["seed"]), res))
    out = ["## Reported runs (report seeds, never used for selection)", ""]
    if not runs:
        out.append(f"(no finished run in {final_dir} yet)")
    for setting, rows in runs.items():
        out += [f"### {setting}", "",
                "| row | network | chosen on validation | n | seeds | "
                + " | ".join(h for _, h in COLUMNS) + " | zero-shot Local | zero-shot Union |",
                "|---|---|---|---|---|" + "---|" * (len(COLUMNS) + 2)]
        for row, rs in rows.items():
            method = row.split("_")[0]
            net = ("plain CNN" if row.endswith("_samenet") else NETWORK.get(method, "plain CNN")) \
                if not setting.startswith(("cora", "citeseer")) else "GCN"
            cells = [_cell([r["final"].get(k, {}).get("mean") for _, r in rs]) for k, _ in COLUMNS]
            cells += [_cell([r["final"].get(f"unseen/{k}", {}).get("mean") for _, r in rs])
                      for k in ("local", "union")]
            base = next((m for m in sorted((choices or {}).get(setting, {}), key=len,
                                           reverse=True) if row == m or row.startswith(m + "_")),
                        None)
            chosen = (choices or {}).get(setting, {}).get(base, "-")
            out.append(f"| {row} | {net} | {chosen} | {len(rs)} | {', '.join(str(s) for s, _ in rs)} | "
                       + " | ".join(cells) + " |")
        out.append("")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tune", nargs="+", required=True)
    ap.add_argument("--final", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    lines = ["# Fair comparison: tables", "",
             "Made by `python experiments/fair_report.py` (its docstring says how to read them); "
             "the protocol is experiments/sweeps/fair_protocol.py, the discussion "
             "results/sweeps/FAIR.md.", ""]
    lines += selection_section(a.tune)
    lines += final_section(a.final, _choices(a.tune))
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
