"""``benchmarks/profile_round.py``: kernel kinds and per-stream sums by hand, a tiny traced round
on the CPU, the refusal of a bad job before anything is built, and the committed H200 profile's
internal consistency."""
from __future__ import annotations

import json
import os

import pytest

from conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "profile_round.py")


@pytest.fixture(scope="module")
def pr():
    return load_script(SCRIPT)


def test_kernel_kinds_of_names_seen_on_an_h200(pr):
    cases = {"nvjet_sm90_tst_96x128_64x7_2x1_v_bz_TNN": "gemm",
             "sm90_xmma_gemm_bf16bf16_bf16f32": "gemm", "cutlass_80_tensorop_s1688gemm": "gemm",
             "cudnn::bn_fw_tr_1C11_kernel_NCHW": "conv", "convolution.12": "conv",
             "input_concatenate_transpose_fusion_2": "layout", "loop_transpose_fusion": "layout",
             "input_multiply_reduce_fusion_3": "reduce", "input_reduce_select_fusion": "reduce",
             "MemcpyD2D": "copy", "Memset": "copy", "loop_add_fusion_4": "other",
             "loop_convert_fusion": "other", "dot_general.61": "gemm"}
    assert {n: pr.kernel_kind(n) for n in cases} == cases


def test_stream_summary_by_hand(pr):
    # (name, start ns, duration ns): two gemms, one layout fusion, one reduce, one other, a gap
    ev = [("nvjet_a", 0, 2_000_000), ("input_concatenate_transpose_fusion", 2_000_000, 500_000),
          ("nvjet_a", 3_000_000, 2_000_000), ("input_reduce_fusion", 5_000_000, 1_000_000),
          ("loop_add_fusion", 6_000_000, 250_000)]
    s = pr.summarise_events(ev, top=2)
    assert s["events"] == 5
    assert s["busy_ms"] == pytest.approx(5.75)       # 2 + 0.5 + 2 + 1 + 0.25
    assert s["span_ms"] == pytest.approx(6.25)       # 0 .. 6.25 ms
    assert s["by_kind"] == pytest.approx({"gemm": 4.0, "conv": 0.0, "layout": 0.5, "reduce": 1.0,
                                          "copy": 0.0, "other": 0.25})
    assert s["top"] == [["nvjet_a", pytest.approx(4.0), 2], ["input_reduce_fusion", pytest.approx(1.0), 1]]


def test_tiny_round_traced_on_cpu(pr, tmp_path):
    out = tmp_path / "p.json"
    assert pr.main(["--tiny", "--jobs", "fedavg/float32", "--warmup", "1", "--top", "5",
                    "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["device"] == "cpu" and list(d["jobs"]) == ["fedavg/float32"]
    r = d["jobs"]["fedavg/float32"]
    assert r["protocol"]["local_steps"] == 2 and r["traced_round_wall_s"] > 0
    assert r["streams"], "no XLA thread events in the CPU trace"
    for s in r["streams"]:
        assert s["events"] > 0 and s["busy_ms"] > 0
        assert sum(s["by_kind"].values()) == pytest.approx(s["busy_ms"], rel=1e-9)
        assert len(s["top"]) <= 5
        assert [t[1] for t in s["top"]] == sorted((t[1] for t in s["top"]), reverse=True)


def test_bad_job_is_refused_before_anything_runs(pr, capsys):
    with pytest.raises(SystemExit) as e:
        pr.main(["--jobs", "fedavg/float16", "--out", "/nonexistent/x.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--jobs: 'fedavg/float16'" in err and "bfloat16" in err


def test_committed_h200_profile_is_consistent():
    d = json.load(open(os.path.join(ROOT, "results", "profile_round_nvidia_h200.json")))
    assert d["device"] == "nvidia_h200"
    for job, r in d["jobs"].items():
        gpu = [s for s in r["streams"] if s["events"] > 1000]
        assert len(gpu) == 1, job
        s = gpu[0]
        assert sum(s["by_kind"].values()) == pytest.approx(s["busy_ms"], rel=1e-9)
        assert s["busy_ms"] <= s["span_ms"] + 1e-6      # one stream: kernels do not overlap
