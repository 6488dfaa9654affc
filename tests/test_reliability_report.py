"""Issue 30, item 3 (and the report parts of 2 and 7): ``framp-jax report`` survives damaged
runs. A run whose results.json is truncated or not an object, whose metrics.csv is garbage or
whose config.json is missing is skipped with one warning line naming the file and listed under
"Unfinished or failed runs"; the other runs are reported. No runs at all, or an ``--out`` that
is a file or cannot be written, is a one-line error with exit status 2."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from framp_jax import config as C
from framp_jax import report as REP
from framp_jax.errors import FrampError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_dir(root: Path, name: str, seed: int = 0, local: float = 0.5) -> Path:
    d = root / name
    d.mkdir(parents=True)
    cfg = json.loads(json.dumps({**C.base_config().to_dict(), "method": "fedavg", "seed": seed}))
    cfg["_resolved"] = {"data": {"file": "/data/x.npz", "sha256": "0" * 64}}
    (d / "config.json").write_text(json.dumps(cfg))
    final = {s: {b: local for b in ("1/64", "1/16", "1/4", "1", "mean")}
             for s in ("local", "union")}
    (d / "results.json").write_text(json.dumps({
        "method": "fedavg", "dataset": "cifar10", "seed": seed, "rounds": cfg["rounds"],
        "final": final, "wall_s": 10.0, "compiles": 1}))
    (d / "metrics.csv").write_text(f"round,local/mean,union/mean\n10,{local},{local}\n")
    return d


DAMAGE = {
    "truncated_results": ("results.json", lambda p: p.write_text(p.read_text()[:40]),
                          "is not valid JSON"),
    "list_results": ("results.json", lambda p: p.write_text("[1, 2]"),
                     "holds a JSON list, not a JSON object"),
    "garbage_metrics": ("metrics.csv", lambda p: p.write_bytes(b"\xff\xfe\x00garbage\x9c" * 50),
                        "cannot be read as CSV"),
    "text_metrics": ("metrics.csv", lambda p: p.write_text("hello\nworld,1,2\n"),
                     "cannot be read as CSV"),
    "missing_config": ("config.json", lambda p: p.unlink(), "is missing"),
    "string_final": ("results.json", lambda p: p.write_text(json.dumps(
        {**json.loads(p.read_text()), "final": {"local": {"mean": "high"}}})),
        "'final' is not an object of per-split objects of numbers"),
}


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for s in range(2):
        _run_dir(root, f"good_s{s}", seed=s, local=0.4 + 0.2 * s)
    for name, (fname, damage, _) in DAMAGE.items():
        damage(_run_dir(root, name) / fname)
    return root


def test_report_skips_damaged_runs_and_lists_them(runs, tmp_path):
    warnings = []
    md = Path(REP.write_report([str(runs)], str(tmp_path / "rep"),
                               warn=warnings.append)).read_text()
    assert "2 finished runs" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| fedavg ")]
    assert len(rows) == 2  # the accuracy and the wall-time tables
    row = rows[0]
    assert "50.00 ± 14.14" in row  # the two good runs only: 40 and 60
    assert len(warnings) == len(DAMAGE)
    failed = md[md.index("## Unfinished or failed runs"):]
    for name, (fname, _, what) in DAMAGE.items():
        path = runs / name / fname
        w = next(w for w in warnings if f"{runs / name}:" in w)
        assert w.startswith(f"report: skipping {runs / name}: {path}") and what in w, w
        assert "\n" not in w
        assert f"- `{runs / name}`: damaged: {path}" in failed


def test_cli_report_of_damaged_runs_warns_and_writes(runs, tmp_path):
    r = _cli("report", str(runs), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == len(DAMAGE)
    assert all(ln.startswith("framp-jax: warning: report: skipping ") for ln in lines)
    assert (tmp_path / "rep" / "REPORT.md").is_file()


def test_report_of_no_runs_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FrampError, match=r"report: no runs under .*empty"):
        REP.write_report([str(tmp_path / "empty")], str(tmp_path / "rep"))
    assert not (tmp_path / "rep").exists()
    r = _cli("report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep"))
    assert r.returncode == 2 and r.stderr.strip() == (
        f"framp-jax: report: no runs under {tmp_path / 'empty'} (a run directory holds "
        "results.json, or config.json/checkpoints/error.txt while unfinished)"), r.stderr


def test_report_out_that_is_a_file_is_one_line(runs, tmp_path):
    out = tmp_path / "REPORT.md"
    out.write_text("not a directory")
    r = _cli("report", str(runs), "--out", str(out))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"framp-jax: report: --out {out} is a file, not a directory; give the directory to "
        "write REPORT.md and plots/ into")


def test_report_out_on_a_read_only_mount_names_out_not_workdir(runs, tmp_path, monkeypatch):
    real = os.makedirs

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(FrampError) as ei:
        REP.write_report([str(runs)], str(tmp_path / "ro" / "rep"))
    msg = str(ei.value)
    assert msg == (f"report: cannot create --out {tmp_path / 'ro' / 'rep'}: Read-only file "
                   f"system ({tmp_path / 'ro' / 'rep' / 'plots'}); choose another --out")
    assert "--workdir" not in msg and "free space" not in msg


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "framp_jax.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
