"""Model selection on validation data only: the tune step of a fair comparison.

A tuning sweep file (e.g. ``experiments/sweeps/fair_tune_cifar10.py``) names its runs
``<method>__<candidate>_seed<s>``: every method's declared candidate configurations on the
selection seeds. :func:`select` reads the finished runs' ``results.json`` and scores each
candidate by the mean, over the selection seeds, of

    score = (final val/local/mean + final val/union/mean) / 2

(validation metrics only: each client's validation split and their union; no test number is
read), and picks the highest per method (ties: the first declared candidate). A method whose
candidates have not all finished on every selection seed is left unselected, and said so.

``framp-jax select --sweep FILE --workdir DIR`` writes ``DIR/selection.json`` and
``DIR/SELECTION.md`` (the chosen configuration of every method, from how many candidates, on
which seeds, with every candidate's score).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict

from framp_jax.errors import FrampError

SCORE_KEYS = ("val/local", "val/union")
SCORE = "(val/local/mean + val/union/mean) / 2"
_NAME = re.compile(r"^(?P<method>.+?)__(?P<cand>.+)_seed(?P<seed>\d+)$")


class SelectionError(FrampError, ValueError):
    """A tuning sweep cannot be selected from (named in the message)."""


def val_score(results: dict) -> float:
    """The selection score of one run's results.json: (val Local + val Union) / 2 of ``final``;
    NaN when the run has no validation metrics."""
    fin = results.get("final", {}) if isinstance(results, dict) else {}
    vals = []
    for k in SCORE_KEYS:
        v = fin.get(k, {}).get("mean") if isinstance(fin.get(k), dict) else None
        vals.append(float("nan") if v is None else float(v))
    return (vals[0] + vals[1]) / 2


def _read_results(path: str):
    try:
        with open(path) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) else None


def select(sweep_file: str, workdir: str) -> dict:
    """Each method's chosen candidate from the tuning sweep's finished runs in ``workdir``."""
    from framp_jax.sweep import load_sweep, resolve, run_state
    runs = load_sweep(sweep_file)
    table: "OrderedDict[str, OrderedDict[str, dict]]" = OrderedDict()
    for run in runs:
        m = _NAME.match(run.name)
        if m is None:
            raise SelectionError(
                f"sweep run {run.name!r} of {sweep_file}: a tuning run is named "
                "<method>__<candidate>_seed<s> (experiments/sweeps/fair_protocol.py)")
        cand = table.setdefault(m["method"], OrderedDict()).setdefault(
            m["cand"], {"overrides": {k: v for k, v in run.overrides.items() if k != "seed"},
                        "runs": {}})
        rundir = os.path.join(workdir, run.name)
        state, _ = run_state(rundir, resolve(run))
        res = _read_results(os.path.join(rundir, "results.json")) if state == "finished" else None
        cand["runs"][int(m["seed"])] = None if res is None else val_score(res)
    out = {"sweep": os.path.basename(sweep_file), "score": SCORE, "methods": OrderedDict()}
    for method, cands in table.items():
        seeds = sorted({s for c in cands.values() for s in c["runs"]})
        scores = OrderedDict()
        missing = []
        for label, c in cands.items():
            vals = [c["runs"].get(s) for s in seeds]
            if any(v is None for v in vals):
                missing.append(label)
                scores[label] = None
            else:
                scores[label] = sum(vals) / len(vals)
        entry = {"candidates": len(cands), "seeds": seeds, "scores": scores,
                 "overrides": {k: c["overrides"] for k, c in cands.items()}}
        if missing:
            entry.update(chosen=None, missing=missing)
        else:
            finite = [(v, i, k) for i, (k, v) in enumerate(scores.items()) if not math.isnan(v)]
            if not finite:
                entry.update(chosen=None, missing=[], note="no candidate has validation metrics")
            else:
                best = max(finite, key=lambda t: (t[0], -t[1]))
                entry.update(chosen=best[2], chosen_overrides=cands[best[2]]["overrides"],
                             missing=[])
        out["methods"][method] = entry
    return out


def markdown(sel: dict) -> str:
    """The selection as a markdown table: chosen candidate, from how many, on which seeds."""
    lines = [f"Selection from `{sel['sweep']}` on validation only: score = {sel['score']} "
             "(final evaluation), mean over the selection seeds; highest wins, ties to the first "
             "declared candidate.", "",
             "| method | chosen | candidates | seeds | score of each candidate |",
             "|---|---|---|---|---|"]
    for m, e in sel["methods"].items():
        chosen = e["chosen"] or ("not selected: unfinished " + ", ".join(e["missing"])
                                 if e.get("missing") else e.get("note", "not selected"))
        sc = "; ".join(f"{k} {'-' if v is None else f'{100 * v:.2f}'}"
                       for k, v in e["scores"].items())
        lines.append(f"| {m} | {chosen} | {e['candidates']} | "
                     f"{', '.join(map(str, e['seeds']))} | {sc} |")
    return "\n".join(lines) + "\n"


def write_selection(sweep_file: str, workdir: str) -> dict:
    """:func:`select`, written to ``workdir/selection.json`` and ``workdir/SELECTION.md``."""
    if not os.path.isdir(workdir):
        raise SelectionError(f"--workdir {workdir} does not exist (run the tuning sweep first: "
                             f"framp-jax sweep --sweep {sweep_file} --workdir {workdir})")
    sel = select(sweep_file, workdir)
    from framp_jax.rundir import write_json_atomic
    write_json_atomic(os.path.join(workdir, "selection.json"), sel)
    with open(os.path.join(workdir, "SELECTION.md"), "w") as f:
        f.write(markdown(sel))
    return sel


def load_selection(path: str) -> dict:
    """A ``selection.json``, or a :class:`SelectionError` saying how to make it."""
    if not os.path.isfile(path):
        raise SelectionError(f"{path} does not exist: run the tuning sweep and `framp-jax "
                             "select` first (experiments/sweeps/fair_protocol.py)")
    with open(path) as f:
        return json.load(f)
