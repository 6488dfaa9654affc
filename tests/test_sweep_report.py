"""framp-jax sweep and framp-jax report: the committed sweep files resolve and validate; a bad
entry stops a sweep before anything runs, naming the run and the field; an interrupted sweep
(kill -9) continues where it stopped without running a finished run twice, records a failing
run and goes on, and gives the same numbers as the runs made one by one; report tables against
hand-computed means and sample standard deviations."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from framp_jax import config as C
from framp_jax import reference_numbers as R
from framp_jax import report as REP
from framp_jax import sweep as S
from framp_jax.algorithms.registry import names

from conftest import TINY_FIELDS

SWEEPS = Path(__file__).resolve().parents[1] / "experiments" / "sweeps"
SWEEP_FILES = sorted(p.name for p in SWEEPS.glob("*.py")
                     if "def get_sweep" in p.read_text())  # fair_protocol.py: a shared module


# ---------------------------------------------------------------------------------------------
# Committed sweep files
# ---------------------------------------------------------------------------------------------


def test_the_reproduction_sweeps_are_committed():
    for name in ("cifar10_cpu.py", "cifar100_cpu_a005.py", "cifar100_cpu_a03.py", "cora.py",
                 "citeseer.py", "unseen_cifar10.py"):
        assert name in SWEEP_FILES, name


@pytest.mark.parametrize("name", SWEEP_FILES)
def test_sweep_file_resolves_and_validates(name):
    if name == "fair_final.py" and not (SWEEPS.parents[1] / "results" / "sweeps" / "fair_tune_cifar10"
                                        / "selection.json").is_file():
        pytest.skip("fair_final.py reads the committed selections (tests/test_validation.py "
                    "resolves its runs from made-up ones)")
    resolved = S.validate_sweep(str(SWEEPS / name))  # validates every config; runs nothing
    assert resolved
    variants = {}
    for run, c in resolved:
        assert run.name.endswith(f"_seed{c.seed}"), run.name
        variants.setdefault(run.name.rsplit("_seed", 1)[0], set()).add(c.seed)
    # the fair protocol's sweeps: selection seed 100, report seeds 200-202 (fair_protocol.py)
    seeds = {0, 1, 2} if not name.startswith("fair_") else (
        {100} if name.startswith("fair_tune") else {200, 201, 202})
    assert all(s == seeds for s in variants.values()), variants
    cfgs = [c for _, c in resolved]
    if name.startswith("cifar100_cpu_a"):
        alpha = {"cifar100_cpu_a005.py": 0.05, "cifar100_cpu_a03.py": 0.3}[name]
        assert {c.dataset for c in cfgs} == {"cifar100"} and {c.alpha for c in cfgs} == {alpha}
    if name == "citeseer.py":
        assert {c.dataset for c in cfgs} == {"citeseer"}
    if name in ("cifar10_cpu.py", "cora.py", "citeseer.py"):
        assert {c.method for c in cfgs} == set(names())
    if name.startswith("cifar"):
        assert {c.framp.extraction for c in cfgs if c.method == "framp"} == {"topk", "width"}
    if name == "unseen_cifar10.py":
        for c in cfgs:  # clients held out at every budget level
            assert c.heldout_frac > 0 and all(len(ids) >= 1 for ids in C.heldout_ids(c))


def test_grid_and_ablations_name_and_override_runs():
    runs = S.grid({"a": "p.py", "b": ("p.py", {"lr": 0.1})}, seeds=(0, 1),
                  axes={"framp.lam": (0.0, 1.0)}, common={"rounds": 5})
    assert [r.name for r in runs] == ["a_lam0_seed0", "a_lam0_seed1", "a_lam1_seed0",
                                      "a_lam1_seed1", "b_lam0_seed0", "b_lam0_seed1",
                                      "b_lam1_seed0", "b_lam1_seed1"]
    assert runs[-1].overrides == {"rounds": 5, "lr": 0.1, "framp.lam": 1.0, "seed": 1}
    abl = S.ablations("framp", "p.py", {"nolam": {"framp.lam": 0.0}}, seeds=(3,),
                      base={"rounds": 7})
    assert [(r.name, r.overrides) for r in abl] == [
        ("framp_seed3", {"rounds": 7, "seed": 3}),
        ("framp_nolam_seed3", {"rounds": 7, "framp.lam": 0.0, "seed": 3})]


def test_format_override():
    assert S.format_override("budget_levels", (1.0, 0.25)) == "--config.budget_levels=(1.0, 0.25)"
    assert S.format_override("augment", False) == "--config.augment=false"
    assert S.format_override("lr", 1e6) == "--config.lr=1000000.0"
    assert S.format_override("framp.extraction", "width") == "--config.framp.extraction=width"


# ---------------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------------


def _write_preset(path: Path, npz: str, **fields):
    fields = {**TINY_FIELDS, "dataset": f"npz:{npz}", **fields}
    path.write_text("from framp_jax.config import base_config\n\n\ndef get_config():\n"
                    "    c = base_config()\n"
                    f"    for k, v in {fields!r}.items():\n        setattr(c, k, v)\n"
                    "    return c\n")
    return path


def _write_sweep(path: Path, variants: str):
    path.write_text("from framp_jax.sweep import grid\n\n\ndef get_sweep():\n"
                    f"    return grid({variants}, seeds=(0,))\n")
    return str(path)


def _cli(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "framp_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def test_bad_entry_stops_the_sweep_before_any_run(tiny_npz, tmp_path):
    _write_preset(tmp_path / "tiny.py", tiny_npz)
    sw = _write_sweep(tmp_path / "sw.py", '{"ok": "tiny.py", "neg": ("tiny.py", {"alpha": -1.0})}')
    with pytest.raises(S.SweepError, match=r"sweep run 'neg_seed0': config\.alpha=-1\.0"):
        S.run_sweep(sw, str(tmp_path / "runs"))
    assert not (tmp_path / "runs" / "ok_seed0").exists()  # nothing ran
    sw2 = _write_sweep(tmp_path / "sw2.py", '{"typo": ("tiny.py", {"framp.lamb": 1.0})}')
    with pytest.raises(S.SweepError, match=r"'typo_seed0': config has no field 'framp.lamb'"):
        S.validate_sweep(sw2)
    r = _cli("sweep", "--sweep", sw, "--workdir", str(tmp_path / "runs"))
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "neg_seed0" in lines[0] and "config.alpha" in lines[0], r.stderr


def _n_starts(rundir: Path) -> int:
    log = rundir / S.TRAIN_LOG
    return sum(ln.startswith("# ") for ln in log.read_text().splitlines()) if log.exists() else 0


def _fake_finished(rundir: Path, c, lr=None, **fields):
    """A finished run directory of config ``c`` without training: config.json (with ``lr`` and
    ``fields`` changed in it, the config hash recorded as ``c``'s) and results.json."""
    from framp_jax.simulate import config_hash
    cfg = json.loads(c.to_json_best_effort())
    cfg.update(fields)
    if lr is not None:
        cfg["lr"] = lr
    cfg["_resolved"] = {"config_hash": config_hash(c)}
    rundir.mkdir(parents=True)
    (rundir / "config.json").write_text(json.dumps(cfg))
    (rundir / "results.json").write_text(json.dumps({"rounds": c.rounds, "final": {}}))


def test_sweep_skips_a_finished_run_and_records_a_failed_one(tiny_npz, tmp_path):
    """Without training: a run directory holding results.json of the same config is skipped
    (also with another data_dir, which is not in the config hash), one of another config is
    refused, and a run whose data turn out corrupt after validation fails with its error
    recorded while the sweep goes on."""
    _write_preset(tmp_path / "tiny.py", tiny_npz)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    sw = _write_sweep(tmp_path / "sw.py", '{"done": "tiny.py", "other": "tiny.py", '
                                          f'"broken": ("tiny.py", {{"dataset": "npz:{corrupt}"}})}}')
    wd = tmp_path / "runs"
    runs = {r.name: r for r in S.load_sweep(sw)}
    for name, lr in (("done_seed0", None), ("other_seed0", 0.123)):
        _fake_finished(wd / name, S.resolve(runs[name]), lr, data_dir="/elsewhere")
    mtime = (wd / "done_seed0" / "results.json").stat().st_mtime_ns
    lines = []
    out = S.run_sweep(sw, str(wd), jobs=2, log=lines.append)
    assert (out["runs"], out["done"], out["failed"], out["skipped"]) == (3, 0, 2, 1), out
    assert "different config (changed: lr: 0.123 -> 0.3)" in out["errors"]["other_seed0"]
    assert str(corrupt) in out["errors"]["broken_seed0"]
    assert (wd / "broken_seed0" / S.ERROR_TXT).read_text().strip() == out["errors"]["broken_seed0"]
    assert (wd / "done_seed0" / "results.json").stat().st_mtime_ns == mtime
    assert not (wd / "done_seed0" / S.TRAIN_LOG).exists() and _n_starts(wd / "broken_seed0") == 1
    assert lines[1].startswith("sweep: other_seed0 FAILED: it holds a finished run of a ")
    assert lines[0] == "sweep: 3 runs, 1 already finished, 1 to run, 1 not runnable, 2 at a time"
    assert lines[-1].startswith("sweep: 0 done, 2 failed, 1 skipped, 0 left; elapsed ")
    status = (wd / S.STATUS_TSV).read_text()
    assert "\tbroken_seed0\tfailed\t" in status and "\tother_seed0\tfailed\t" in status
    with pytest.raises(S.SweepError, match="--jobs=0"):
        S.run_sweep(sw, str(wd), jobs=0)


def test_sweep_survives_kill_and_failure_and_matches_single_runs(tiny_npz, tmp_path):
    """Three runs: ``a`` (3 rounds), ``b`` (12 rounds, killed with the sweep after its first
    checkpoint) and ``bad`` (lr 1e6: validates, then diverges in round 1)."""
    from framp_jax.simulate import run as train_run
    _write_preset(tmp_path / "tiny.py", tiny_npz, checkpoint_every=1, rounds=3)
    sw = _write_sweep(tmp_path / "sw.py", '{"a": "tiny.py", "b": ("tiny.py", {"rounds": 12}), '
                                          '"bad": ("tiny.py", {"lr": 1e6})}')
    wd = tmp_path / "runs"
    args = ["sweep", "--sweep", sw, "--workdir", str(wd), "--jobs", "1"]
    p = subprocess.Popen([sys.executable, "-m", "framp_jax.cli", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ck = wd / "b_seed0" / "checkpoints"
    deadline = time.time() + 400
    while not (ck.is_dir() and any(n.isdigit() for n in os.listdir(ck))):
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    time.sleep(1.0)  # the killed sweep's training child dies with it (PR_SET_PDEATHSIG)
    assert (wd / "a_seed0" / "results.json").exists()
    assert not (wd / "b_seed0" / "results.json").exists()  # killed mid-run
    a_mtime = (wd / "a_seed0" / "results.json").stat().st_mtime_ns

    r = _cli(*args)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]  # one run failed
    out = r.stdout
    assert "3 runs, 1 already finished, 2 to run" in out
    assert "1 done, 1 failed, 1 skipped, 0 left" in out
    assert (wd / "a_seed0" / "results.json").stat().st_mtime_ns == a_mtime  # not run again
    assert _n_starts(wd / "a_seed0") == 1 and _n_starts(wd / "b_seed0") == 2
    assert "resumed from round" in (wd / "b_seed0" / S.TRAIN_LOG).read_text()
    err = (wd / "bad_seed0" / S.ERROR_TXT).read_text()
    assert "NaN/Inf" in err and not (wd / "bad_seed0" / "results.json").exists()
    status = (wd / S.STATUS_TSV).read_text().splitlines()
    assert sum("\tbad_seed0\tfailed\t" in ln for ln in status) == 1
    assert sum("\tb_seed0\tresume\t" in ln for ln in status) == 1
    rec = json.loads((wd / S.SWEEP_JSON).read_text())
    assert [x["name"] for x in rec["runs"]] == ["a_seed0", "b_seed0", "bad_seed0"]


    # the same runs made one by one give the same final numbers
    for run in S.load_sweep(sw)[:2]:
        single = train_run(S.resolve(run), str(tmp_path / "single" / run.name), progress=False,
                           log=lambda *a, **k: None)
        swept = json.loads((wd / run.name / "results.json").read_text())
        for split in ("local", "union"):
            for k, v in single["final"][split].items():
                assert swept["final"][split][k] == pytest.approx(v, abs=1e-6), (run.name, split, k)
        assert swept["per_client"]["local"] == pytest.approx(
            [x for x in single["per_client"]["local"]], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

FIARSE_C10 = {**R.FIARSE_PROTOCOL, "dataset": "cifar10", "alpha": 0.3}


def _fake_run(root: Path, name, method, seed, local_mean, union_mean, *, local_1=0.5,
              config=None, framp=None, sha="b10833c0ef92364dc3e645621eb69e4f2e29e1764eb6c4627790507cb9f8037a",
              commit=None, per_client=None, unseen=None):
    d = root / name
    d.mkdir(parents=True)
    cfg = C.base_config().to_dict()
    cfg.update({"method": method, "seed": seed, **(config or {})})
    cfg["framp"] = {**cfg["framp"], **(framp or {})}
    cfg = json.loads(json.dumps(cfg))  # tuples -> lists, as in config.json
    cfg["_resolved"] = {"data": {"file": "/data/cifar10/cifar10_jpeg.npz", "sha256": sha},
                        **({"framp_jax_commit": commit} if commit else {})}
    (d / "config.json").write_text(json.dumps(cfg))
    final = {"local": {"1/64": 0.1, "1/16": 0.2, "1/4": 0.3, "1": local_1, "mean": local_mean},
             "union": {"1/64": 0.1, "1/16": 0.2, "1/4": 0.3, "1": 0.4, "mean": union_mean}}
    if unseen is not None:
        final["unseen/local"] = {"mean": unseen}
        final["unseen/union"] = {"mean": unseen / 2}
    res = {"method": method, "dataset": cfg["dataset"], "seed": seed, "rounds": cfg["rounds"],
           "final": final, "wall_s": 10.0 * cfg["rounds"], "compiles": 1}
    if per_client:
        res["per_client"] = per_client
    (d / "results.json").write_text(json.dumps(res))
    rows = ["round,local/mean,union/mean,comm/down_bytes",
            f"10,{local_mean / 2},{union_mean / 2},1000000",
            f"20,{local_mean},{union_mean},3000000"]
    (d / "metrics.csv").write_text("\n".join(rows) + "\n")
    return d


def _table_row(md: str, first_cell: str, after: str = "") -> list[str]:
    text = md[md.index(after):] if after else md
    for ln in text.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in\n{text[:3000]}")


def test_report_means_stds_groups_and_references(tmp_path):
    runs = tmp_path / "runs"
    # FIARSE protocol, FIARSE's independent test priors: the reference applies with local columns
    fia = {**FIARSE_C10, "test_prior": "fiarse_independent"}
    for s, (lm, um) in enumerate([(0.50, 0.20), (0.60, 0.30), (0.70, 0.70)]):
        _fake_run(runs, f"fiarse_s{s}", "fiarse", s, lm, um, config=fia,
                  commit="0123456789abcdef0123")
    _fake_run(runs, "heterofl_s0", "heterofl", 0, 0.40, 0.30, config=fia)
    # the same method with another option: its own row, labelled by the option
    for s, lm in enumerate([0.30, 0.50]):
        _fake_run(runs, f"framp_s{s}", "framp", s, lm, 0.1, config=fia)
        _fake_run(runs, f"framp_width_s{s}", "framp", s, lm + 0.1, 0.1, config=fia,
                  framp={"extraction": "width"})
    # another alpha: another setting, no reference
    _fake_run(runs, "fiarse_a01", "fiarse", 0, 0.9, 0.9, config={**fia, "alpha": 0.1},
              unseen=0.4, per_client={"budget": [1.0, 1.0, 0.25, 0.25], "heldout": [1],
                                      "local": [0.5, 0.9, 0.25, None], "union": [0.1] * 4})
    (tmp_path / "runs" / "unfinished").mkdir()
    (tmp_path / "runs" / "unfinished" / "error.txt").write_text("round 1: diverged\n")

    out = tmp_path / "report"
    md = Path(REP.write_report([str(runs)], str(out))).read_text()
    assert md.count("\n## ") == 4  # 2 settings, unfinished runs, notes
    sections = md.split("\n## ")
    first = next(x for x in sections if "alpha=0.3," in x.splitlines()[0])
    second = next(x for x in sections if "alpha=0.1," in x.splitlines()[0])
    row = _table_row(first, "fiarse")
    header = _table_row(first, "method (variant)")
    col = {h: i for i, h in enumerate(header)}
    assert row[col["n"]] == "3" and row[col["seeds"]] == "0, 1, 2"
    # local mean: 50, 60, 70 -> 60 ± 10; union mean: 20, 30, 70 -> 40 ± sqrt(0.07) = 26.46
    assert row[col["Local mean"]] == "60.00 ± 10.00"
    assert row[col["Union mean"]] == "40.00 ± 26.46"
    assert row[col["Local 1/4"]] == "30.00 ± 0.00"
    assert row[col["data"]] == "cifar10_jpeg.npz: CIFAR-10 (JPEG q75 copy)"
    assert row[col["commit"]] == "0123456789"
    h = _table_row(first, "heterofl")
    assert h[col["Local mean"]] == "40.00" and h[col["n"]] == "1" and h[col["commit"]] == "unknown"
    f1 = _table_row(first, "framp")
    f2 = _table_row(first, "framp (framp.extraction=width)")
    # 30, 50 -> 40 ± 14.14; 40, 60 -> 50 ± 14.14
    assert f1[col["Local mean"]] == "40.00 ± 14.14" and f2[col["Local mean"]] == "50.00 ± 14.14"
    # published numbers beside ours: FIARSE's local mean 77.04, global (union mean) 73.75
    ref = _table_row(first, "fiarse", after="Published numbers")
    assert ref[1:5] == ["local/mean", "60.00 ± 10.00", "77.04", "-17.04"]
    ref_h = [ln for ln in first.splitlines() if ln.startswith("| heterofl | union/mean |")]
    assert ref_h and "| 30.00 | 66.05 | -36.05 |" in ref_h[0]
    assert "framp | local/mean" not in md  # no published FRAMP numbers
    # the alpha=0.1 setting: no reference, unseen clients, a per-client CDF
    assert "No reference for this protocol" in second and "alpha: 0.1 (reference 0.3)" in second
    assert _table_row(second, "fiarse", after="Unseen clients")[col["Local mean"]] == "40.00"
    assert "_client_cdf.png" in second and "_client_cdf.png" not in first
    for fn in ("setting1_budgets.png", "setting1_rounds.png", "setting2_budgets.png",
               "setting2_rounds.png"):
        assert (out / "plots" / fn).stat().st_size > 1000
    cdf = [ln for ln in second.splitlines() if "_client_cdf.png" in ln][0]
    assert (out / cdf[cdf.index("(") + 1:-1]).stat().st_size > 1000
    # communication: (1 + 3) / 2 MB per round, the same in every run
    assert _table_row(first, "fiarse", after="Communication per round")[2:4] == ["2.000 ± 0.000", "–"]
    assert "round 1: diverged" in md


def test_report_of_a_missing_directory_is_one_line(tmp_path):
    r = _cli("report", str(tmp_path / "nope"), "--out", str(tmp_path / "rep"))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"framp-jax: report: {tmp_path / 'nope'} is not a directory (give run or sweep "
        "directories, or a benchmarks/bench_server.py JSON)"), r.stderr


def test_reference_match_needs_the_protocol():
    c = {**FIARSE_C10, "test_prior": "matched"}
    nums, source = R.match(c, "fiarse")
    assert nums == {"union/mean": 73.75} and "SPEC §3.2" in source  # local needs the priors
    nums, _ = R.match({**c, "test_prior": "fiarse_independent"}, "heterofl")
    assert nums["local/1/64"] == 60.24 and nums["union/mean"] == 66.05
    assert R.match({**c, "rounds": 150}, "fiarse") is None
    assert R.match({**c, "model": "cnn"}, "fiarse") is None
    assert R.match(c, "framp") is None
    t7 = {**R.FIARSE_PROTOCOL, "dataset": "cifar100", "alpha": 0.05, "test_prior": "matched"}
    nums, source = R.match(t7, "fedrolex")
    assert nums["local/mean"] == 12.63 and nums["union/mean"] == 11.67 and "Table 7" in source
    assert R.match({**t7, "budget_dist": [1, 1, 1, 1]}, "fedrolex") is None


def test_data_labels():
    assert REP.data_label({"file": "/x/cifar10_webp.npz", "sha256": "b7886735b05bd1c8f4d45deac6c80fc912c13e1da5261c9a88d1dfb6df6fe10a"}) \
        == "cifar10_webp.npz: CIFAR-10 (lossless, 59,980 of 60,000 exact)"
    assert REP.data_label({"file": "/x/mine.npz", "sha256": "00", "description": "mine.npz"}) \
        == "mine.npz: mine.npz"
    assert REP.data_label(None) == "unknown file: unlabelled"


def test_mean_std_is_the_sample_std():
    m, s, n = REP.mean_std([1.0, 2.0, 4.0, None, float("nan")])
    assert n == 3 and m == pytest.approx(7 / 3)
    assert s == pytest.approx(np.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2))
    assert REP.mean_std([0.5]) == (0.5, None, 1)


def test_report_score_and_diagnostics_table(tmp_path):
    """score = (Local mean + Union mean) / 2 over seeds; diagnostics from the last metrics row."""
    runs = tmp_path / "runs"
    for s, (lm, um, pres, cos) in enumerate([(0.6, 0.2, 0.5, 0.9), (0.4, 0.4, 0.7, 0.7)]):
        d = _fake_run(runs, f"framp_base_s{s}", "framp", s, lm, um, framp={"base": "fedavg"})
        (d / "metrics.csv").write_text(
            "round,local/mean,union/mean,diag/union_present/mean,diag/cos_same_budget\n"
            f"10,0.1,0.1,0.0,0.0\n20,{lm},{um},{pres},{cos}\n")
    d = _fake_run(runs, "framp_s0", "framp", 0, 0.5, 0.1)  # no diagnostics recorded, made
    cfg = json.loads((d / "config.json").read_text())     # before framp.base existed
    del cfg["framp"]["base"]
    (d / "config.json").write_text(json.dumps(cfg))
    md = Path(REP.write_report([str(runs)], str(tmp_path / "rep"))).read_text()
    header = _table_row(md, "method (variant)", after="Score and diagnostics")
    col = {h: i for i, h in enumerate(header)}
    # a field added to the config later is labelled where it differs from its default; FRAMP
    # with a shared FedAvg base is named what it is, the hybrid (not SPEC's FRAMP)
    row = _table_row(md, "hybrid", after="Score and diagnostics")
    assert row[col["score"]] == "40.00 ± 0.00"            # (0.6+0.2)/2 = (0.4+0.4)/2 = 0.4
    assert row[col["Union, classes present"]] == "60.00 ± 14.14"  # 50, 70
    assert row[col["cos same budget"]] == "0.800 ± 0.141"
    assert row[col["Union, classes absent"]] == "–"
    plain = _table_row(md, "framp", after="Score and diagnostics")
    assert plain[col["score"]] == "30.00" and plain[col["cos same budget"]] == "–"
    # ... also where every run of the method shares that value (no plain "framp" row to differ from)
    md2 = Path(REP.write_report([str(runs / "framp_base_s0"), str(runs / "framp_base_s1")],
                                str(tmp_path / "rep2"))).read_text()
    assert _table_row(md2, "hybrid")[1] == "2"
    assert "| framp |" not in md2


def test_report_keeps_the_repeat_that_recorded_more(tmp_path):
    """Runs that differ only in what they record (diagnostics, mask reuse) are one training run:
    the report keeps, per seed, the copy with the diagnostics even when it is found second, lists
    the other as a repeat, and marks a diagnostics cell made from fewer seeds than the row's."""
    a, b = tmp_path / "a", tmp_path / "b"
    for s in (0, 1):
        _fake_run(a, f"framp_spec_seed{s}", "framp", s, 0.5 + s / 10, 0.2)
    d = _fake_run(b, "framp_diag_seed0", "framp", 0, 0.5, 0.2,
                  config={"diagnostics": True, "record_mask_reuse": True})
    (d / "metrics.csv").write_text("round,local/mean,union/mean,diag/union_present/mean\n"
                                   "20,0.5,0.2,0.3\n")
    md = Path(REP.write_report([str(a), str(b)], str(tmp_path / "rep"))).read_text()
    header = _table_row(md, "method (variant)", after="Score and diagnostics")
    row = _table_row(md, "framp", after="Score and diagnostics")
    assert row[1] == "2"
    assert row[header.index("score")] == "37.50 ± 3.54"  # (0.5+0.2)/2, (0.6+0.2)/2
    assert row[header.index("Union, classes present")] == "30.00 (n=1)"
    repeats = next(ln for ln in md.splitlines() if ln.startswith("- Left out as repeats"))
    assert str(a / "framp_spec_seed0") in repeats and "framp_diag_seed0" not in repeats
    assert _table_row(md, "framp")[-1] == "framp_diag_seed0, framp_spec_seed1"


def test_report_says_where_framp_is_ahead_of_every_other_method(tmp_path):
    runs = tmp_path / "runs"
    for s, (lm, um) in enumerate([(0.40, 0.5), (0.50, 0.6)]):   # 45 ± 7.07, 55 ± 7.07
        _fake_run(runs, f"fedavg_s{s}", "fedavg", s, lm, um)
    for s, lm in enumerate([0.6, 0.7]):                          # 65 ± 7.07, Local 1: 80
        _fake_run(runs, f"framp_s{s}", "framp", s, lm, 0.25, local_1=0.8)
    for s, lm in enumerate([0.45, 0.55]):                        # 50 ± 7.07: +5 within noise
        _fake_run(runs, f"frampb_s{s}", "framp", s, lm, 0.25, framp={"base": "fedavg"})
    md = Path(REP.write_report([str(runs)], str(tmp_path / "rep"))).read_text()
    after = "FRAMP against the best other method"
    header = _table_row(md, "FRAMP (variant)", after=after)
    col = {h: i for i, h in enumerate(header)}
    row = _table_row(md, "framp", after=after)
    assert row[col["Local mean"]] == "**+20.00** (fedavg)"
    assert row[col["Local 1"]] == "**+30.00** (fedavg)"
    assert row[col["Local 1/64"]] == "+0.00 (fedavg)"          # a tie is not ahead
    assert row[col["Union mean"]] == "-30.00 (fedavg)"
    rowb = _table_row(md, "hybrid", after=after)  # FRAMP with a FedAvg base
    assert rowb[col["Local mean"]] == "**+5.00~** (fedavg)"
    assert ("- **framp**: on Local it is ahead of every other method at 1, the mean and not "
            "ahead at 1/64, 1/16, 1/4; on Union it is ahead of every other method at no budget "
            "and not ahead at 1/64, 1/16, 1/4, 1, the mean.") in md
    assert "Within one seed std (`~`): Local mean." in md


def test_select_runs_patterns():
    runs = [S.Run(n, "p.py") for n in ("fedavg_seed0", "fedavg_seed1", "framp_seed0", "framp_spec_seed0")]
    names = lambda rs: [r.name for r in rs]  # noqa: E731
    assert names(S.select_runs(runs, None)) == names(runs) == names(S.select_runs(runs, " , "))
    assert names(S.select_runs(runs, "framp_seed*")) == ["framp_seed0"]
    # sweep order kept, a run matched by two patterns taken once
    assert names(S.select_runs(runs, "framp_*, fedavg_seed1,*_seed1")) == [
        "fedavg_seed1", "framp_seed0", "framp_spec_seed0"]
    assert names(S.select_runs(runs, ["fedavg_seed?"])) == ["fedavg_seed0", "fedavg_seed1"]
    with pytest.raises(S.SweepError, match=r"--only pattern 'heterofl_\*' matches no run.*fedavg_seed0"):
        S.select_runs(runs, "fedavg_*,heterofl_*")


def test_sweep_only_runs_just_the_selected_runs(tiny_npz, tmp_path):
    """``framp-jax sweep --only``: only the selected run is attempted (here one whose data file is
    corrupt, so it fails fast after validation with its error recorded), the other is left
    untouched (no directory); a pattern matching nothing is one line on stderr and nothing runs."""
    _write_preset(tmp_path / "tiny.py", tiny_npz)
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip file")
    sw = _write_sweep(tmp_path / "sw.py", f'{{"a": ("tiny.py", {{"dataset": "npz:{corrupt}"}}), '
                                          '"b": "tiny.py"}')
    wd = tmp_path / "runs"
    r = _cli("sweep", "--sweep", sw, "--workdir", str(wd), "--only", "zz*,a_*")
    assert r.returncode == 2 and "'zz*' matches no run" in r.stderr and not wd.exists(), r.stderr[-2000:]
    r = _cli("sweep", "--sweep", sw, "--workdir", str(wd), "--only", "a_*", "--noprogress")
    assert r.returncode == 1, r.stderr[-3000:]  # the one selected run failed
    assert "--only selects 1 of 2 runs" in r.stdout + r.stderr
    assert str(corrupt) in (wd / "a_seed0" / S.ERROR_TXT).read_text()
    assert _n_starts(wd / "a_seed0") == 1 and not (wd / "b_seed0").exists()
    assert [x["state"] for x in S.sweep_status(sw, str(wd))] == ["failed", "new"]


def test_sweep_status_reads_every_state_and_changes_nothing(tiny_npz, tmp_path):
    """``framp-jax sweep --status`` without training: finished, other (a finished run of another
    config), partial (latest checkpoint named), failed (its error.txt), running (a live process
    recorded in the run's lock file; a dead pid is not running) and new."""
    from framp_jax.rundir import LOCK_NAME
    _write_preset(tmp_path / "tiny.py", tiny_npz)
    names = ("fin", "oth", "part", "bad", "run", "dead", "new")
    sw = _write_sweep(tmp_path / "sw.py", "{" + ", ".join(f'"{n}": "tiny.py"' for n in names) + "}")
    wd = tmp_path / "runs"
    runs = {r.name: r for r in S.load_sweep(sw)}
    for name, lr in (("fin_seed0", None), ("oth_seed0", 0.123)):
        _fake_finished(wd / name, S.resolve(runs[name]), lr)
    for name in ("part_seed0", "run_seed0"):
        for r in (2, 4):
            (wd / name / "checkpoints" / str(r)).mkdir(parents=True)
    (wd / "bad_seed0").mkdir()
    (wd / "bad_seed0" / S.ERROR_TXT).write_text("data file corrupt\n")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "framp-test"])
    dead = subprocess.Popen([sys.executable, "-c", "pass", "framp-test"])
    dead.wait()
    try:
        host = socket.gethostname() or "localhost"
        for name, pid in (("run_seed0", sleeper.pid), ("dead_seed0", dead.pid)):
            (wd / name).mkdir(exist_ok=True)
            (wd / name / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host,
                                                           "started": "T0"}))
        before = sorted(str(p) for p in wd.rglob("*"))
        rows = {r["name"]: r for r in S.sweep_status(sw, str(wd))}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(str(p) for p in wd.rglob("*")) == before  # nothing created or removed
    got = {n: rows[n]["state"] for n in rows}
    assert got == {"fin_seed0": "finished", "oth_seed0": "other", "part_seed0": "partial",
                   "bad_seed0": "failed", "run_seed0": "running", "dead_seed0": "new",
                   "new_seed0": "new"}
    c = S.resolve(runs["part_seed0"])
    assert rows["part_seed0"]["detail"] == f"checkpoint at round 4 of {c.rounds}"
    assert rows["run_seed0"]["detail"] == (f"pid {sleeper.pid}, started T0; "
                                           f"checkpoint at round 4 of {c.rounds}")
    assert rows["bad_seed0"]["detail"] == "last error: data file corrupt"
    assert "lr: 0.123 -> 0.3" in rows["oth_seed0"]["detail"]
    text = S.format_status(list(rows.values()))
    assert text.splitlines()[-1] == ("7 runs: 1 finished, 1 running, 1 partial, 1 failed, 2 new, "
                                     "1 other")
    assert [S.sweep_status(sw, str(wd), only="fin_*")[0]["state"]] == ["finished"]
    r = _cli("sweep", "--sweep", sw, "--workdir", str(wd), "--status", "--only", "part_*,new_*")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [f"part_seed0  partial   checkpoint at round 4 of {c.rounds}",
                                     "new_seed0   new", "2 runs: 1 partial, 1 new"]
