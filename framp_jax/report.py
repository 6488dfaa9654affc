"""Report over finished runs: ``framp-jax report RUN_OR_SWEEP_DIR... [BENCH_SERVER.json] --out DIR``.

Finds every run directory (one holding ``results.json``) under the given paths and writes
``DIR/REPORT.md`` and its plots, ``DIR/plots/*.png``:

- one section per setting (the protocol: dataset and its data file, model, clients, rounds,
  local work, partition, test prior, budgets, held-out clients), one row per method and variant
  (config fields that differ between runs of the same method in the setting, e.g.
  ``framp.extraction=width``): Local and Union accuracy per budget and their means, as mean ±
  sample standard deviation (ddof = 1) over seeds, the number of seeds, the data file with its
  exactness label and the framp_jax commit that made the runs;
- the published numbers of the same protocol beside ours (:mod:`framp_jax.reference_numbers`);
- unseen (held-out) clients, unseen budgets, bytes communicated and wall time per round where
  the runs record them; server time per round from a ``benchmarks/bench_server.py`` JSON given
  among the paths;
- plots: accuracy per budget with error bars, Local/Union mean against rounds (mean and ±1 std
  band over seeds), the per-client accuracy CDF per budget when results.json holds
  per-client accuracies, and the mask-reuse CDF (SPEC §2.6, FIARSE's Fig. 1) of the runs that
  recorded ``mask_reuse.npz`` (``config.record_mask_reuse``, :mod:`framp_jax.mask_reuse`).
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["find_runs", "load_run", "group_runs", "mean_std", "write_report", "data_label",
           "source_commit", "BUDGETS"]

BUDGETS = ("1/64", "1/16", "1/4", "1", "mean")

# The protocol: runs that differ here are in different settings (tables).
SETTING_FIELDS = ("dataset", "model", "num_clients", "clients_per_round", "rounds", "local_steps",
                  "batch_size", "partition", "alpha", "classes_per_client", "test_prior",
                  "budget_levels", "budget_dist", "heldout_frac", "graph_partition",
                  "graph_ratio_train", "graph_split_seed", "val_frac")
# Fields that never make two runs different results (or are the seed, shown as its own column).
_NOT_VARIANT = {"seed", "data_dir", "rounds", "checkpoint_every", "keep_checkpoints",
                "eval_every", "eval_model_chunk", "mesh_clients", "conv_impl", "max_loss_ratio",
                "union_subset", "client_map", "diagnostics", "record_mask_reuse"}

# Exactness labels of the shared data files, by sha256 (the data folders' README.md files).
DATA_LABELS = {
    "b7886735b05bd1c8f4d45deac6c80fc912c13e1da5261c9a88d1dfb6df6fe10a":
        "CIFAR-10 (lossless, 59,980 of 60,000 exact)",
    "b10833c0ef92364dc3e645621eb69e4f2e29e1764eb6c4627790507cb9f8037a": "CIFAR-10 (JPEG q75 copy)",
    "73a8f435649f5124c3b80815d934a113ec581169af4f4a3139133df03e3520de": "CIFAR-100 (bit-exact)",
    "794a2811090559ccc2cc3a06db4c4a2e0fc61ac2c0780358b1f26564ecaddd2e": "Cora (Planetoid, exact)",
    "b7d76d47a930ea5cfa50dc0dea86e93e6303aac5c64efc204502c2a0bf4fef38":
        "CiteSeer (Planetoid, exact)",
    "17cd7b371e929a19a1828ea023bf27067882287e2b97b8a8cfbdf0f4c659ceb2": "Amazon Photo (exact)",
    "71da5c6984f791245e46941086d83bb9922ee15f6baca4dec494d5f220c9fc14": "Amazon Computers (exact)",
    "5e7eba1eee802ab89f7e5cf332fd6867e37677abb72f75175738fef7c1298d4a": "Coauthor CS (exact)",
    "71dfa72eaf86b6c72068b0f9dfbab51aedccf8584cf11d4e8ec539801f6aa285":
        "Coauthor Physics (exact)",
}


def source_commit() -> str:
    """The git commit of the framp_jax source in use (``+dirty`` when tracked files differ from
    it), or ``"unknown"`` outside a git checkout. Recorded in config.json at train time."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain",
                                "--untracked-files=no", "--", "."], capture_output=True,
                               text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Reading runs
# ---------------------------------------------------------------------------------------------


def find_runs(paths: Iterable[str]) -> tuple[list[str], list[str]]:
    """``(finished run dirs, unfinished run dirs)`` under ``paths`` (run or sweep directories,
    searched recursively); a run dir holds results.json, an unfinished one config.json,
    checkpoints or error.txt without it."""
    done, unfinished = [], []
    for p in paths:
        if is_server_bench(p):
            continue
        if not os.path.isdir(p):
            from framp_jax.errors import FrampError
            raise FrampError(f"report: {p} is not a directory (give run or sweep directories, "
                             "or a benchmarks/bench_server.py JSON)")
        for root, dirs, files in os.walk(p):
            dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "tb"))
            if "results.json" in files:
                done.append(root)
                dirs[:] = []
            elif "config.json" in files or "error.txt" in files or "train.log" in files:
                unfinished.append(root)
                dirs[:] = []
    return done, unfinished


SERVER_BENCH_SCRIPT = "benchmarks/bench_server.py"


def is_server_bench(path: str) -> bool:
    """Whether ``path`` is a JSON file written by ``benchmarks/bench_server.py``."""
    if not (os.path.isfile(path) and path.endswith(".json")):
        return False
    try:
        return _read_json(path).get("script") == SERVER_BENCH_SCRIPT
    except (OSError, ValueError, AttributeError):
        return False


def server_time_lines(path: str) -> list[str]:
    """The report's server-time table from a ``bench_server.py`` JSON."""
    b = _read_json(path)
    rows = []
    for m, r in b["methods"].items():
        med = r["median_s"]
        n = len(r["seconds"]["full"])
        rows.append([m, str(n), f"{med['full']:.3f}", f"{med['no_sgd']:.3f}",
                     f"{100 * med['no_sgd'] / med['full']:.1f}"])
    sets = ", ".join(f"{k}={v}" for k, v in b.get("sets", {}).items()) or "none"
    return (["## Server time per round", "",
             f"From `{path}` (`python {SERVER_BENCH_SCRIPT} {' '.join(b.get('argv', []))}`; "
             f"{b.get('backend')}, {b.get('cpu_count')} cores, {b.get('cpu')}, jax {b.get('jax')}; "
             f"preset overrides: {sets}). Each method's `*_cifar10_cpu` preset on its data, the "
             "real jitted round (full) and the same method built with `local.steps = 0` (no "
             "local SGD: the server's generation/extraction, aggregation and update, plus the "
             "clients' non-SGD work such as FRAMP's prototype pass: an upper bound on the "
             "server time), median seconds per round over n rounds each, timed alternately:", ""]
            + _table(["method", "n", "full s/round", "no local SGD s/round", "% of the round"], rows)
            + [""])


def _read_json(path):
    with open(path) as f:
        return json.load(f)


class DamagedRunError(Exception):
    """A run directory whose files cannot be read as a run (the message names the file)."""


def _read_run_json(path, kind="a JSON object") -> dict:
    """A run's JSON file as a dict, or :class:`DamagedRunError` naming the file and what is
    wrong (missing, not UTF-8, not JSON, e.g. truncated, or not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise DamagedRunError(f"{path} is missing") from None
    except UnicodeDecodeError as e:
        raise DamagedRunError(f"{path} is not text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise DamagedRunError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
                              f"{e.colno}; truncated?)") from None
    except OSError as e:
        raise DamagedRunError(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(value, dict):
        raise DamagedRunError(f"{path} holds a JSON {type(value).__name__}, not {kind}")
    return value


def _read_metrics(path) -> list[dict]:
    if not os.path.exists(path):
        return []
    try:
        return _parse_metrics(path)
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise DamagedRunError(f"{path} cannot be read as CSV ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _parse_metrics(path) -> list[dict]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if None in r or "round" not in r:  # more cells than the header, or no round column
                raise csv.Error(f"line {len(rows) + 2} does not fit the header")
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    row[k] = v
            if not isinstance(row["round"], float):
                raise csv.Error(f"line {len(rows) + 2}: round {r['round']!r} is not a number")
            rows.append(row)
    return rows


def data_label(info: Mapping[str, Any] | None) -> str:
    """The data file and its exactness label, e.g. ``cifar10_jpeg.npz: CIFAR-10 (JPEG q75
    copy)``; the label of a file unknown here is the loader's description or ``unlabelled``."""
    info = info or {}
    f = info.get("file")
    name = os.path.basename(str(f)) if f else "unknown file"
    sha = info.get("sha256")
    label = DATA_LABELS.get(sha) if isinstance(sha, str) else None
    if label is None:
        label = info.get("description") or "unlabelled"
        if info.get("exact") is False and "copy" not in label:
            label += " (not exact)"
    return f"{name}: {label}"


def load_run(d: str) -> dict:
    """A finished run's files, read; :class:`DamagedRunError` (naming the file) when
    results.json, config.json or metrics.csv cannot be read as a run's."""
    res = _read_run_json(os.path.join(d, "results.json"))
    final = res.get("final", {})
    if not (isinstance(final, dict) and all(
            isinstance(v, dict) and all(x is None or (isinstance(x, (int, float))
                                                      and not isinstance(x, bool))
                                        for x in v.values()) for v in final.values())):
        raise DamagedRunError(f"{os.path.join(d, 'results.json')}: 'final' is not an object of "
                              "per-split objects of numbers")
    cfg = _read_run_json(os.path.join(d, "config.json"))
    resolved = cfg.get("_resolved", {})
    if not isinstance(resolved, dict):
        raise DamagedRunError(f"{os.path.join(d, 'config.json')}: '_resolved' is not an object")
    info = resolved.get("data") or res.get("dataset_info") or {}
    reuse = os.path.join(d, "mask_reuse.npz")
    return {"dir": d, "name": os.path.basename(os.path.normpath(d)), "results": res,
            "mask_reuse": reuse if os.path.exists(reuse) else None,
            "config": cfg, "metrics": _read_metrics(os.path.join(d, "metrics.csv")),
            "data": data_label(info), "data_sha256": info.get("sha256"),
            "commit": resolved.get("framp_jax_commit") or res.get("framp_jax_commit") or "unknown",
            "method": res.get("method", cfg.get("method", "?")),
            "seed": res.get("seed", cfg.get("seed"))}


# ---------------------------------------------------------------------------------------------
# Grouping and statistics
# ---------------------------------------------------------------------------------------------


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _setting_key(run) -> tuple:
    c = run["config"] or {"dataset": run["results"].get("dataset"),
                          "rounds": run["results"].get("rounds")}
    return tuple((k, _hashable(c.get(k))) for k in SETTING_FIELDS) + (("data", run["data"]),)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


def _variant_fields(run) -> dict:
    from framp_jax.simulate import HASH_STABLE_DEFAULTS
    flat = _flatten({k: v for k, v in (run["config"] or {}).items() if k != "_resolved"})
    if run["config"]:  # runs made before a field existed ran with its (unchanged) default
        flat = {**HASH_STABLE_DEFAULTS, **flat}
    return {k: v for k, v in flat.items()
            if k not in _NOT_VARIANT and k not in SETTING_FIELDS and k != "method"}


def group_runs(runs: Sequence[dict]) -> "OrderedDict[tuple, OrderedDict[tuple, list]]":
    """``{setting key: {(method, variant label): [runs]}}``: CIFAR-10, CIFAR-100, Cora, CiteSeer,
    then other data sets; rows in the order their runs are found.
    The variant label names the config fields (besides seed) where a run differs from the most
    common value among the runs of its method in the setting, and the fields added to the config
    later (``simulate.HASH_STABLE_DEFAULTS``) where it differs from their default. Of runs with
    the same config (fields that only record, such as ``diagnostics``, aside) and seed, one is
    kept: the one that recorded more (mask reuse, diagnostics), else the first found."""
    from framp_jax.simulate import HASH_STABLE_DEFAULTS
    settings: OrderedDict = OrderedDict()
    for r in runs:
        settings.setdefault(_setting_key(r), []).append(r)
    order = ("cifar10", "cifar100", "cora", "citeseer")
    settings = OrderedDict(sorted(settings.items(), key=lambda kv: (
        order.index(dict(kv[0])["dataset"]) if dict(kv[0])["dataset"] in order else len(order),
        str(dict(kv[0])["dataset"]), repr(kv[0]))))
    out: OrderedDict = OrderedDict()
    for skey, rs in settings.items():
        by_method: OrderedDict = OrderedDict()
        for r in rs:
            by_method.setdefault(r["method"], []).append(r)
        rows: OrderedDict = OrderedDict()
        for method, mrs in by_method.items():
            fields = [_variant_fields(r) for r in mrs]
            # fields every run records (a field added to the config later is no difference)
            keys = sorted(set.intersection(*(set(f) for f in fields)))
            # a field added to the config later is also named wherever it is off its default,
            # even when every run of the method shares that value (e.g. only framp.base runs)
            varying = [k for k in keys if len({repr(f.get(k)) for f in fields}) > 1
                       or (k in HASH_STABLE_DEFAULTS
                           and any(repr(f.get(k)) != repr(HASH_STABLE_DEFAULTS[k]) for f in fields))]
            mode = {k: Counter(repr(f.get(k)) for f in fields).most_common(1)[0][0]
                    for k in varying}
            # a field added later is labelled where it differs from its default (the value every
            # run before it had), not from the most common value
            mode.update({k: repr(HASH_STABLE_DEFAULTS[k]) for k in varying
                         if k in HASH_STABLE_DEFAULTS})
            seen: dict = {}  # ident -> (row key, index in that row)
            for r, f in zip(mrs, fields):
                shown = [k for k in varying if repr(f.get(k)) != mode[k]]
                label = ", ".join(f"{k}={_fmt_value(f.get(k))}" for k in shown)
                rkey = (method, label, tuple(repr(f.get(k)) for k in varying))
                ident = (label, rkey[2], r["seed"])
                if ident in seen:
                    # the same training run (fields that only record, e.g. diagnostics or the
                    # mask reuse, make no variant): keep the copy that recorded more
                    k0, i0 = seen[ident]
                    kept = rows[k0][i0]
                    if _records(r) > _records(kept):
                        rows[k0][i0], r, kept = r, kept, r
                        kept.pop("duplicate", None)
                    r["duplicate"] = True
                    continue
                rows.setdefault(rkey, []).append(r)
                seen[ident] = (rkey, len(rows[rkey]) - 1)
        out[skey] = OrderedDict(((m, lab), v) for (m, lab, _), v in rows.items())
    return out


def _records(run) -> int:
    """How much a run recorded beyond its accuracies: 1 for the mask-reuse counts, 1 for the
    diagnostics (config.diagnostics)."""
    last = (run.get("metrics") or [{}])[-1]
    return int(bool(run.get("mask_reuse"))) + int(any(k.startswith("diag/") for k in last))


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(_fmt_value(x) for x in v) + ")"
    return str(v)


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
    """``(mean, sample std with ddof=1 or None for one value, n)`` of the finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    if v.size == 0:
        return float("nan"), None, 0
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def _cell(values, scale=100.0, digits=2) -> str:
    m, s, n = mean_std(values)
    if n == 0:
        return "–"
    return f"{scale * m:.{digits}f}" + ("" if s is None else f" ± {scale * s:.{digits}f}")


def _final(run, split, b):
    v = run["results"].get("final", {}).get(split, {}).get(b)
    return None if v is None else float(v)


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _budget_text(c) -> str:
    from fractions import Fraction
    lv = c.get("budget_levels")
    if not lv:
        return "?"
    names = [str(Fraction(float(x)).limit_denominator(4096)) for x in lv]
    dist = c.get("budget_dist") or []
    return ", ".join(names) + (f" (shares {':'.join(_fmt_value(x) for x in dist)})" if dist else "")


def _setting_title(skey) -> str:
    c = dict(skey)
    vision = c.get("model") in ("cnn", "resnet18")
    parts = [f"{c.get('dataset')}", f"model {c.get('model')}",
             f"{c.get('num_clients')} clients, {c.get('clients_per_round')} per round",
             f"{c.get('rounds')} rounds", f"{c.get('local_steps')} local steps"
             + (f" of batch {c.get('batch_size')}" if vision else " (full batch)")]
    if vision:
        part = c.get("partition")
        if part in ("dirichlet", "balanced_dirichlet"):
            part += f" alpha={_fmt_value(c.get('alpha'))}"
        elif part == "shards":
            part += f" {c.get('classes_per_client')} classes per client"
        parts.append(f"{part}, test prior {c.get('test_prior')}")
    else:
        parts.append(f"graph partition {c.get('graph_partition')}")
    parts.append(f"budgets {_budget_text(c)}")
    if vision and c.get("val_frac"):
        parts.append(f"validation: {_fmt_value(c.get('val_frac'))} of each client's training data")
    if c.get("heldout_frac"):
        parts.append(f"heldout_frac={_fmt_value(c.get('heldout_frac'))}")
    return "; ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _row_name(method, label):
    """A row's name says what runs: FRAMP with a shared FedAvg base is our hybrid, not SPEC's
    FRAMP (SPEC §1.1: no global model)."""
    if method == "framp" and "framp.base=fedavg" in (label or ""):
        method = "hybrid"
        label = ", ".join(p for p in label.split(", ") if p != "framp.base=fedavg")
    return f"{method}" + (f" ({label})" if label else "")


def _seed_text(rs):
    return ", ".join(str(r["seed"]) for r in rs)


def _commits(rs):
    cs = sorted({r["commit"] for r in rs})
    return ", ".join(c if c == "unknown" else c[:10] + ("+dirty" if c.endswith("+dirty") else "")
                     for c in cs)


def _accuracy_rows(rows, split_prefix=""):
    out = []
    for (method, label), rs in rows.items():
        cells = [_row_name(method, label), str(len(rs)), _seed_text(rs)]
        for split in ("local", "union"):
            cells += [_cell([_final(r, split_prefix + split, b) for r in rs]) for b in BUDGETS]
        out.append(cells)
    return out


def _framp_vs_others(rows) -> list[str]:
    """For each FRAMP row: its mean minus the best other method's mean (over seeds) in every
    Local/Union budget column, and a plain sentence of where it is ahead of every other method."""
    framp = [(k, rs) for k, rs in rows.items() if k[0] == "framp"]
    others = [(k, rs) for k, rs in rows.items() if k[0] != "framp"]
    if not framp or not others:
        return []
    cols = [(split, b) for split in ("local", "union") for b in BUDGETS]
    best_of = {}  # column -> (mean, std, row name) of the best non-FRAMP row, None if none
    for col in cols:
        best = None
        for (om, ol), ors in others:
            om_, osd, on = mean_std([_final(r, *col) for r in ors])
            if on and (best is None or om_ > best[0]):
                best = (om_, osd, _row_name(om, ol))
        best_of[col] = best
    name = lambda bs: ", ".join("the mean" if x == "mean" else x for x in bs)
    table, sentences = [], []
    for (method, label), rs in framp:
        cells, ahead, behind, close = [_row_name(method, label), str(len(rs))], {}, {}, []
        for split, b in cols:
            m, sd, n = mean_std([_final(r, split, b) for r in rs])
            best = best_of[(split, b)]
            if n == 0 or best is None:
                cells.append("–")
                continue
            diff = 100 * (m - best[0])
            noise = 100 * max(sd or 0.0, best[1] or 0.0)
            within = abs(diff) < noise
            mark = "~" if within else ""
            cells.append(f"{'**' if diff > 0 else ''}{diff:+.2f}{mark}{'**' if diff > 0 else ''} "
                         f"({best[2]})")
            (ahead if diff > 0 else behind).setdefault(split, []).append(b)
            if within:
                close.append(f"{split.capitalize()} {b}")
        table.append(cells)
        parts = []
        for split in ("local", "union"):
            a, bh = ahead.get(split, []), behind.get(split, [])
            parts.append(f"on {split.capitalize()} it is ahead of every other method at "
                         f"{name(a) if a else 'no budget'}"
                         + (f" and not ahead at {name(bh)}" if bh else ""))
        sentences.append(f"- **{_row_name(method, label)}**: " + "; ".join(parts) + "."
                         + (f" Within one seed std (`~`): {', '.join(close)}." if close else ""))
    return (["FRAMP against the best other method of this setting (points: FRAMP's mean minus "
             "the highest mean of any non-FRAMP method in the column, that method in brackets; "
             "bold where FRAMP is ahead; `~` where the gap is smaller than the larger of the two "
             "sample stds over seeds):", ""]
            + _table(["FRAMP (variant)", "n"] + [f"{s.capitalize()} {b}" for s, b in cols], table)
            + [""] + sentences + [""])


def _acc_header(first="method (variant)"):
    return ([first, "n", "seeds"] + [f"Local {b}" for b in BUDGETS]
            + [f"Union {b}" for b in BUDGETS])


def _reference_lines(rows, config) -> list[str]:
    from framp_jax.reference_numbers import REFERENCES, match
    lines, table = [], []
    for (method, label), rs in rows.items():
        m = match(config, method)
        if m is None:
            continue
        nums, source = m
        for key, ref in nums.items():
            split, b = key.split("/", 1)
            ours, _, n = mean_std([_final(r, split, b) for r in rs])
            diff = "–" if n == 0 else f"{100 * ours - ref:+.2f}"
            table.append([_row_name(method, label), key, _cell([_final(r, split, b) for r in rs]),
                          f"{ref:.2f}", diff, source])
    if table:
        lines += ["Published numbers for this protocol (ours minus reference in points):", ""]
        lines += _table(["method (variant)", "metric", "ours", "reference", "difference",
                         "source"], table)
    else:
        from framp_jax.reference_numbers import protocol_mismatch
        near = min(REFERENCES, key=lambda ref: len(protocol_mismatch(config, ref["protocol"])))
        diffs = protocol_mismatch(config, near["protocol"])
        lines.append("No reference for this protocol: the published numbers (SPEC §3.2, §3.3) "
                     "are for the FIARSE protocol; this setting differs in "
                     + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "") + ".")
    return lines


def _mb(x):
    return None if x is None else x / 1e6


def _comm_and_time_rows(rows):
    out, any_comm = [], False
    for (method, label), rs in rows.items():
        cells = [_row_name(method, label), str(len(rs))]
        for col in ("comm/down_bytes", "comm/up_bytes", "comm/mask_bytes"):
            per_run = []
            for r in rs:
                vals = [row[col] for row in r["metrics"]
                        if isinstance(row.get(col), float) and math.isfinite(row[col])]
                per_run.append(_mb(float(np.mean(vals))) if vals else None)
            any_comm |= any(v is not None for v in per_run)
            cells.append(_cell(per_run, scale=1.0, digits=3))
        cells.append(_cell([r["results"].get("wall_s", float("nan")) / max(r["results"].get(
            "rounds", 1), 1) for r in rs], scale=1.0, digits=2))
        out.append(cells)
    return out, any_comm


def _unseen_budget_rows(rows):
    out = []
    labels = sorted({b for rs in rows.values() for r in rs
                     for b in r["results"].get("unseen_budgets", {})}, key=_budget_value)
    if not labels:
        return labels, out
    for (method, label), rs in rows.items():
        if not any(r["results"].get("unseen_budgets") for r in rs):
            continue
        cells = [_row_name(method, label), str(len(rs))]
        for split in ("local", "union"):
            cells += [_cell([r["results"].get("unseen_budgets", {}).get(b, {}).get(split)
                             for r in rs]) for b in labels]
        out.append(cells)
    return labels, out


DIAG_COLUMNS = (("diag/union_present/mean", "Union, classes present"),
                ("diag/union_absent/mean", "Union, classes absent"),
                ("diag/cos_same_budget", "cos same budget"),
                ("diag/cos_cross_budget", "cos across budgets"),
                ("diag/gen_cos_same_budget", "generated cos same budget"),
                ("diag/gen_cos_cross_budget", "generated cos across budgets"))


def _last_metric(run, col):
    """``col`` at the run's last evaluation (metrics.csv), or None."""
    for row in reversed(run["metrics"]):
        v = row.get(col)
        if isinstance(v, float):
            return v if math.isfinite(v) else None
    return None


def run_score(run):
    """The design study's selection criterion: (Local mean + Union mean) / 2 of results.json
    ``final`` (None when either is missing)."""
    lo, un = _final(run, "local", "mean"), _final(run, "union", "mean")
    return None if lo is None or un is None else (lo + un) / 2


def _diagnostic_rows(rows):
    """Per method (variant): the score and the diagnostics of the last evaluation
    (config.diagnostics), mean ± std over seeds; [] when no run recorded diagnostics."""
    if not any(_last_metric(r, DIAG_COLUMNS[0][0]) is not None or
               _last_metric(r, DIAG_COLUMNS[2][0]) is not None for rs in rows.values() for r in rs):
        return []
    out = []
    for (method, label), rs in rows.items():
        cells = [_row_name(method, label), str(len(rs)), _cell([run_score(r) for r in rs])]
        for col, _ in DIAG_COLUMNS:
            scale = 100.0 if col.startswith("diag/union") else 1.0
            vals = [_last_metric(r, col) for r in rs]
            k = sum(v is not None for v in vals)
            cells.append(_cell(vals, scale=scale, digits=2 if scale == 100.0 else 3)
                         + (f" (n={k})" if 0 < k < len(rs) else ""))
        out.append(cells)
    return out


def _budget_value(label: str) -> float:
    try:
        a, _, b = label.partition("/")
        return float(a) / float(b or 1)
    except ValueError:
        return float("inf")


def _warn(msg: str) -> None:
    import sys
    print(f"framp-jax: warning: {msg}", file=sys.stderr, flush=True)


def _check_out_dir(out_dir: str) -> None:
    """``--out`` must be a directory this process can write (created if missing)."""
    from framp_jax.errors import FrampError
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FrampError(f"report: --out {out_dir} is a file, not a directory; give the "
                         "directory to write REPORT.md and plots/ into")
    try:
        os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    except OSError as e:
        raise FrampError(f"report: cannot create --out {out_dir}: {e.strerror or e}"
                         + (f" ({e.filename})" if e.filename else "")
                         + "; choose another --out") from None
    if not os.access(os.path.join(out_dir, "plots"), os.W_OK) or not os.access(out_dir, os.W_OK):
        raise FrampError(f"report: cannot write into --out {out_dir}: permission denied or a "
                         "read-only file system; choose another --out")


def write_report(paths: Sequence[str], out_dir: str, warn=None) -> str:
    """Writes ``out_dir/REPORT.md`` and its plots for the runs under ``paths``; returns the
    path of REPORT.md. A run whose results.json, config.json or metrics.csv cannot be read is
    skipped with one ``warn`` line (default: stderr) naming the file, and listed among the
    unfinished or failed runs; no run at all is an error."""
    done, unfinished = find_runs(paths)
    benches = [p for p in paths if is_server_bench(p)]
    if not done and not unfinished and not benches:
        from framp_jax.errors import FrampError
        raise FrampError(f"report: no runs under {', '.join(paths)} (a run directory holds "
                         "results.json, or config.json/checkpoints/error.txt while unfinished)")
    _check_out_dir(out_dir)
    runs, damaged = [], {}
    for d in done:  # a damaged run is skipped (one warning line) and listed as failed
        try:
            runs.append(load_run(d))
        except DamagedRunError as e:
            damaged[d] = f"damaged: {e}"
            (warn or _warn)(f"report: skipping {d}: {e}")
    unfinished = sorted(set(unfinished) | set(damaged))
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)
    groups = group_runs(runs)
    md = ["# framp_jax results", "",
          f"{len(runs)} finished runs from {', '.join(paths)}. Accuracies in %: the mean over "
          "seeds of each run's results.json `final` value, ± the sample standard deviation "
          "(ddof = 1) where there are 2 or more seeds (n = number of seeds). Local = mean "
          "over clients of their own test set's accuracy (per budget: over the clients of that "
          "budget; mean: over all clients); Union = accuracy on the union of all clients' test "
          "sets (per budget; mean: over the budgets).", ""]
    notes = []
    for i, (skey, rows) in enumerate(groups.items(), 1):
        c = dict(skey)
        first = next(iter(rows.values()))[0]
        md += [f"## {i}. {_setting_title(skey)}", "",
               f"Data: {c['data']}. framp_jax commit: {_commits([r for rs in rows.values() for r in rs])}.", ""]
        md += _table(_acc_header() + ["data", "commit", "runs"],
                     [cells + [c["data"], _commits(rs), ", ".join(r["name"] for r in rs)]
                      for cells, rs in zip(_accuracy_rows(rows), rows.values())])
        md += [""] + _reference_lines(rows, first["config"] or {}) + [""]
        md += _framp_vs_others(rows)
        if any(_final(r, "unseen/local", "mean") is not None for rs in rows.values() for r in rs):
            md += ["Unseen clients (held out of training, evaluated zero-shot). FRAMP generates "
                   "each held-out client's model from its descriptor; the other methods give it "
                   "the model of its budget level that the trained clients get, so their Union "
                   "here repeats their trained clients' Union at that budget:", ""]
            md += _table(_acc_header(), [cells for cells, rs in zip(
                _accuracy_rows(rows, "unseen/"), rows.values())
                if any(_final(r, "unseen/local", "mean") is not None for r in rs)]) + [""]
        labels, ub = _unseen_budget_rows(rows)
        if ub:
            md += ["Unseen budgets (every trained client's model at budgets never used in "
                   "training, zero-shot; mean over the trained clients):", ""]
            md += _table(["method (variant)", "n"] + [f"Local {b}" for b in labels]
                         + [f"Union {b}" for b in labels], ub) + [""]
        dr = _diagnostic_rows(rows)
        if dr:
            md += ["Score and diagnostics: score = (Local mean + Union mean) / 2 (%); Union "
                   "split into the classes present in / absent from each client's training "
                   "data (%, mean over budgets); mean cosine similarity of the evaluated models "
                   "of pairs of clients with the same / different budgets, and of the generated "
                   "models before the budget mask (FRAMP); at the last evaluation "
                   "(config.diagnostics; – where not recorded):", ""]
            md += _table(["method (variant)", "n", "score"] + [h for _, h in DIAG_COLUMNS], dr) + [""]
        ct, any_comm = _comm_and_time_rows(rows)
        if any_comm:
            md += ["Communication per round (MB, metrics.csv `comm/*`: the bytes of the "
                   "evaluated rounds, averaged) and wall time per round (s, results.json "
                   "`wall_s` / rounds: the whole simulated round with evaluations):", ""]
            md += _table(["method (variant)", "n", "down MB", "up MB", "mask MB",
                          "wall s/round"], ct) + [""]
        else:
            md += ["Wall time per round (s, results.json `wall_s` / rounds; no bytes "
                   "communicated are recorded for these runs):", ""]
            md += _table(["method (variant)", "n", "wall s/round"],
                         [[x[0], x[1], x[-1]] for x in ct]) + [""]
        md += _plots(i, skey, rows, out_dir, notes)
    if unfinished:
        md += ["## Unfinished or failed runs", ""]
        for d in unfinished:
            md.append(f"- `{d}`: {damaged.get(d) or _unfinished_why(d)}")
        md.append("")
    dups = [r["dir"] for r in runs if r.get("duplicate")]
    n_reuse = sum(1 for r in runs if r.get("mask_reuse") and not r.get("duplicate"))
    for p in benches:
        md += server_time_lines(p)
    md += ["## Notes", "",
           ("- Server time per round: see the section above (benchmarks/bench_server.py); the "
            "wall time in the tables is the whole round with its evaluations." if benches else
            "- Server time per round is not recorded in the runs; the wall time above is the "
            "whole round with its evaluations (`benchmarks/bench_server.py` measures it; give "
            "its JSON to `framp-jax report` to add its table)."),
           "- The mask-reuse CDF (for each prunable parameter, the fraction of a budget level's "
           "(client, round) masks that keep it) is plotted only for runs that recorded it during "
           "training (config.record_mask_reuse=True, which writes mask_reuse.npz; methods with "
           "masks over the full model: FIARSE and FRAMP with top-k extraction); "
           + (f"{n_reuse} of these {len(runs)} runs recorded it." if n_reuse
              else "none of these runs recorded it.")]
    if notes:
        md.append(f"- Setting(s) {', '.join(map(str, notes))}: results.json holds no per-client "
                  "accuracies (runs made before they were recorded), so there is no per-client "
                  "accuracy CDF.")
    if dups:
        md.append("- Left out as repeats of a run with the same config and seed: "
                  + ", ".join(f"`{d}`" for d in dups))
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


def _unfinished_why(d: str) -> str:
    """An unfinished run's error.txt (one line), or what it lacks."""
    try:
        with open(os.path.join(d, "error.txt"), encoding="utf-8", errors="replace") as f:
            why = " ".join(f.read().split())
        return why or "failed (error.txt is empty)"
    except OSError:
        return "no results.json yet"


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _plots(i, skey, rows, out_dir, notes) -> list[str]:
    title = dict(skey)["dataset"]
    md = []
    names = [_row_name(m, lab) for (m, lab) in rows]
    # accuracy per budget, error bars = sample std over seeds
    fig = _figure(max(8, 1.2 * len(names) + 6), 4)
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(BUDGETS))
    for ax, split in zip(axes, ("local", "union")):
        for j, rs in enumerate(rows.values()):
            ms = [mean_std([_final(r, split, b) for r in rs]) for b in BUDGETS]
            has_std = any(s is not None for _, s, _ in ms)  # one seed: no error bar
            ax.bar(x + (j - (len(names) - 1) / 2) * width, [100 * m for m, _, _ in ms], width,
                   yerr=[100 * (s or 0.0) for _, s, _ in ms] if has_std else None, capsize=2,
                   label=names[j])
        ax.set_xticks(x, list(BUDGETS))
        ax.set_title(f"{split.capitalize()} ({title})")
        ax.set_xlabel("budget")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fn = f"plots/setting{i}_budgets.png"
    fig.savefig(os.path.join(out_dir, fn))
    md += [f"![accuracy per budget]({fn})", ""]
    # Local / Union mean against rounds
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2, sharey=True)
    drawn = False
    for ax, split in zip(axes, ("local", "union")):
        for name, rs in zip(names, rows.values()):
            series = [{row["round"]: row.get(f"{split}/mean") for row in r["metrics"]
                       if isinstance(row.get(f"{split}/mean"), float)} for r in rs]
            series = [s for s in series if s]
            if not series:
                continue
            common = sorted(set.intersection(*(set(s) for s in series)))
            if not common:
                continue
            v = 100 * np.array([[s[t] for t in common] for s in series])
            m = v.mean(0)
            (line,) = ax.plot(common, m, label=f"{name} (n={len(series)})")
            if len(series) > 1:
                sd = v.std(0, ddof=1)
                ax.fill_between(common, m - sd, m + sd, alpha=0.2, color=line.get_color())
            drawn = True
        ax.set_title(f"{split.capitalize()} mean ({title})")
        ax.set_xlabel("round")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    if drawn:
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fn = f"plots/setting{i}_rounds.png"
        fig.savefig(os.path.join(out_dir, fn))
        md += [f"![Local and Union mean against rounds (band: ±1 sample std over seeds)]({fn})",
               ""]
    # per-client accuracy CDF per budget
    have = [(name, rs) for name, rs in zip(names, rows.values())
            if any("per_client" in r["results"] for r in rs)]
    if have:
        levels = [b for b in BUDGETS if b != "mean"]
        fig = _figure(3.2 * len(levels), 3.4)
        axes = fig.subplots(1, len(levels), sharey=True)
        for ax, b in zip(axes, levels):
            for name, rs in have:
                accs = []
                for r in rs:
                    pc = r["results"].get("per_client")
                    if not pc:
                        continue
                    held = set(pc.get("heldout", []))
                    for cid, (bud, acc) in enumerate(zip(pc["budget"], pc["local"])):
                        if cid not in held and acc is not None and _budget_label(bud) == b:
                            accs.append(100 * acc)
                if accs:
                    xs = np.sort(accs)
                    ax.step(np.concatenate([xs[:1], xs]),
                            np.arange(len(xs) + 1) / len(xs), where="post", label=name)
            ax.set_title(f"budget {b}")
            ax.set_xlabel("client local accuracy (%)")
            ax.grid(True, alpha=0.3)
        axes[0].set_ylabel("fraction of clients")
        axes[-1].legend(fontsize=6)
        fig.tight_layout()
        fn = f"plots/setting{i}_client_cdf.png"
        fig.savefig(os.path.join(out_dir, fn))
        md += [f"![per-client Local accuracy CDF per budget, pooled over seeds]({fn})", ""]
    else:
        notes.append(i)
    md += _mask_reuse_plot(i, names, rows, out_dir)
    return md


def _mask_reuse_fractions(rs) -> tuple[dict, int]:
    """``({budget: kept fraction per prunable parameter}, seeds)`` of one variant's runs that
    hold mask_reuse.npz: each run's ``counts / n`` per budget level, averaged over its seeds
    (runs whose parameter count differs from the first one's are left out)."""
    from framp_jax.mask_reuse import kept_fractions, load
    per_level: dict = {}
    used, size = 0, None
    for r in rs:
        if not r.get("mask_reuse"):
            continue
        try:
            fr = kept_fractions(load(r["mask_reuse"]))
        except (OSError, ValueError, KeyError):
            continue
        p = next(iter(fr.values())).shape[0] if fr else None
        if p is None or (size is not None and p != size):
            continue
        size, used = p, used + 1
        for b, f in fr.items():
            per_level.setdefault(b, []).append(f)
    return {b: np.mean(fs, axis=0) for b, fs in sorted(per_level.items())}, used


def _mask_reuse_plot(i, names, rows, out_dir) -> list[str]:
    """One panel per method (variant) with mask_reuse.npz: the empirical CDF over the prunable
    parameters of their kept fraction, one curve per budget level."""
    have = []
    for name, rs in zip(names, rows.values()):
        fr, n = _mask_reuse_fractions(rs)
        if fr:
            have.append((name, fr, n))
    if not have:
        return []
    fig = _figure(3.6 * len(have), 3.4)
    axes = fig.subplots(1, len(have), sharey=True, squeeze=False)[0]
    for ax, (name, fr, n) in zip(axes, have):
        for b, f in fr.items():
            # the ECDF at each distinct value (at most 2000 of them drawn, each exact)
            xs, cnt = np.unique(f, return_counts=True)
            ys = np.cumsum(cnt) / len(f)
            idx = np.unique(np.linspace(0, len(xs) - 1, min(len(xs), 2000)).astype(np.int64))
            ax.step(np.concatenate([[0.0], xs[idx]]), np.concatenate([[0.0], ys[idx]]),
                    where="post", label=f"budget {_budget_label(b)}")
        ax.set_title(f"{name} (seeds: {n})", fontsize=8)
        ax.set_xlabel("fraction of masks keeping the parameter")
        ax.set_xlim(0.0, 1.0)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("fraction of prunable parameters")
    axes[-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fn = f"plots/setting{i}_mask_reuse.png"
    fig.savefig(os.path.join(out_dir, fn))
    caption = ("Mask reuse (FIARSE's Fig. 1): for each prunable parameter, the fraction of a "
               "budget level's (client, round) masks that keep it (mask_reuse.npz `counts / n`), "
               "averaged over the seeds of each method (variant) (seeds: the number of runs "
               "averaged), shown as the empirical CDF over the prunable parameters, one curve "
               "per budget level.")
    return [caption, "", f"![mask-reuse CDF per budget level, averaged over seeds]({fn})", ""]


def _budget_label(b) -> str:
    from fractions import Fraction
    return str(Fraction(float(b)).limit_denominator(4096))


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="framp_jax report over run and sweep directories")
    ap.add_argument("runs", nargs="+", help="run directories or directories holding them")
    ap.add_argument("--out", required=True, help="output directory (REPORT.md, plots)")
    a = ap.parse_args(argv)
    print(f"report: {write_report(a.runs, a.out)}")


if __name__ == "__main__":
    main()
