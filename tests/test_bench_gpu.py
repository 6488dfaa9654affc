"""Per-backend choices (conv formulation, client mapping, the XLA Triton flag) and
``benchmarks/bench_gpu.py``: its FLOP counter against hand counts, and tiny runs of the whole
script on the CPU (as on a machine without ml_collections, jraph and pymetis) whose JSON holds
positive timings for every requested method and dtype."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import framp_jax
from framp_jax.algorithms.base import Context
from framp_jax.client import LocalConfig
from framp_jax.models import layers

from conftest import load_script

HAVE_TORCH = importlib.util.find_spec("torch") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_gpu.py")


def _bench_module():
    return load_script(SCRIPT)


def test_xla_triton_flag_is_added_unless_set_or_disabled():
    env = {}
    assert framp_jax.configure_xla_flags(env) is True
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    framp_jax.configure_xla_flags(env)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=false"
    env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}  # the user's choice wins
    assert framp_jax.configure_xla_flags(env) is False
    assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"
    env = {"FRAMP_TRITON_GEMM": "1"}
    assert framp_jax.configure_xla_flags(env) is False and "XLA_FLAGS" not in env


def test_xla_flag_set_at_import_and_accepted_by_the_cpu_backend():
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "FRAMP_TRITON_GEMM")}
    code = ("import framp_jax, os, jax, jax.numpy as jnp; print(os.environ['XLA_FLAGS']); "
            "print(float(jax.jit(lambda a: a @ a)(jnp.ones((4, 4))).sum()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["--xla_gpu_enable_triton_gemm=false", "64.0"]


def test_auto_formulations_per_backend(monkeypatch):
    ctx = Context(model=None, family=None, modality=None, num_clients=4, num_classes=2,
                  budgets=np.ones(4), budget_levels=(1.0,), train_ids=np.arange(4),
                  clients_per_round=2, local=LocalConfig(), client_map="auto")
    want = {"cpu": ("im2col", "map"), "gpu": ("im2col", "vmap"), "tpu": ("xla", "vmap")}
    for backend, (impl, mapping) in want.items():
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert layers.resolve_conv_impl("auto") == impl
        assert ctx.client_map_mode() == mapping
        assert layers.resolve_conv_impl("xla") == "xla"


def test_matmul_flops_counts_scans_maps_and_convs():
    bench = _bench_module()
    a = jnp.ones((8, 16))
    b = jnp.ones((16, 4))
    assert bench.matmul_flops(lambda a, b: a @ b, a, b) == 2 * 8 * 16 * 4
    scan = lambda a, b: jax.lax.scan(lambda c, _: (c, a @ b), 0.0, None, length=5)[1]
    assert bench.matmul_flops(scan, a, b) == 5 * 2 * 8 * 16 * 4
    mapped = lambda xs, b: jax.lax.map(lambda x: x @ b, xs)           # 3 x [8, 16] @ [16, 4]
    assert bench.matmul_flops(mapped, jnp.ones((3, 8, 16)), b) == 3 * 2 * 8 * 16 * 4
    vm = lambda xs, b: jax.vmap(lambda x: x @ b)(xs)
    assert bench.matmul_flops(vm, jnp.ones((3, 8, 16)), b) == 3 * 2 * 8 * 16 * 4
    x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
    conv = lambda x, k: layers.conv2d(x, k, 1, "xla")                  # 2*6*6 outputs x 5 x 27
    assert bench.matmul_flops(conv, x, k) == 2 * (2 * 6 * 6 * 5) * 27
    im2col = lambda x, k: layers.conv2d(x, k, 1, "im2col")
    assert bench.matmul_flops(im2col, x, k) == 2 * (2 * 6 * 6 * 5) * 27
    # gradient (w.r.t. both) of a scan of two products per step: forward 2, backward 4
    loss = lambda a, b: jnp.sum(jax.lax.scan(lambda c, _: (c @ b @ b.T, None), a, None, length=4)[0])
    f = bench.matmul_flops(jax.grad(loss, argnums=(0, 1)), a, b)
    assert f == 3 * 4 * (2 * 2 * 8 * 16 * 4)


def _run_bench(tmp_path, *flags, block=True):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    if block:
        env["FRAMP_BENCH_BLOCK"] = "ml_collections,jraph,pymetis"
    proc = subprocess.run([sys.executable, SCRIPT, "--tiny", "--out", str(out), *flags],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc


def test_tiny_bench_every_dtype_and_torch(tmp_path):
    d, proc = _run_bench(tmp_path, "--methods", "fedavg,framp", "--dtypes", "float32,bfloat16",
                         "--rounds", "2", "--torch-rounds", "1")
    assert d["device"] == "cpu" and d["backend"] == "cpu" and d["tiny"] is True
    assert d["config_dict"].startswith("stand-in")  # ran without ml_collections
    assert set(d["methods"]) == {"fedavg/float32", "fedavg/bfloat16", "framp/float32",
                                 "framp/bfloat16"}
    for key, e in d["methods"].items():
        assert "error" not in e, (key, e.get("error"))
        assert len(e["round_times_s"]) == 2 and e["s_per_round"] > 0 and e["compile_s"] > 0
        assert e["matmul_flops_per_round"] > 0 and e["tflops"] > 0
        assert 0 < e["fraction_of_bf16_peak"]
        assert e["ratio_to_torch_fedavg_f32"] > 0 if HAVE_TORCH else "ratio_to_torch_fedavg_f32" not in e
        assert e["conv_impl"] == "im2col" and e["client_map"] == "map"
        assert all(np.isfinite(e["train_losses"]))
    # the tiny FedAvg round: 2 clients x 2 steps x batch 4 of the 8x8 small CNN (hand count:
    # 184 576 multiply-adds forward per image; backward twice that, less conv1's input gradient)
    per_image = 2 * (3 * 184_576 - 8 * 8 * 27 * 16)
    assert d["methods"]["fedavg/float32"]["matmul_flops_per_round"] == 2 * 2 * 4 * per_image
    assert d["methods"]["framp/float32"]["matmul_flops_per_round"] > 2 * 2 * 4 * per_image
    for dt in ("bfloat16", "float32", "float32_highest"):
        assert d["gemm"][dt]["tflops"] > 0
    t = d["torch"]
    assert "fedavg/float32" in proc.stdout
    if HAVE_TORCH:
        assert t["float32"]["s_per_round"] > 0 and t["bfloat16"]["s_per_round"] > 0
        assert "PyTorch FedAvg loop float32" in proc.stdout
    else:  # torch is optional: the loop is skipped with a note, the rest is measured
        assert t["skipped"].startswith("torch not importable")


@pytest.mark.slow  # ~150 s on 2 cores: the parallel-compile path and the Triton worker
def test_tiny_bench_compile_phase_and_triton_compare(tmp_path):
    """The accelerator path: programs compiled by parallel workers into a persistent cache,
    then timed from it; the Triton comparison in its own worker; the evaluation jobs."""
    d, _ = _run_bench(tmp_path, "--methods", "fedavg", "--dtypes", "float32", "--compile-workers",
                      "1", "--triton-compare", "--no-torch", "--no-gemm", "--rounds", "1", "--eval")
    e = d["methods"]["fedavg/float32"]
    assert e["s_per_round"] > 0 and e["compile_s"] > 0 and e["matmul_flops_per_round"] > 0
    assert e["xla_flags"] == "--xla_gpu_enable_triton_gemm=false"
    assert d["compile"]["fedavg/float32"]["compile_s"] == e["compile_s"]
    tr = d["triton_compare"]["fedavg/float32"]
    assert tr["triton_gemm"] is True and tr["s_per_round"] > 0
    assert "xla_gpu_enable_triton_gemm" not in tr["xla_flags"]
    assert tr["triton_off_s_per_round"] == e["s_per_round"] and tr["triton_on_over_off"] > 0
    assert "gemm" not in d and "torch" not in d
    # FRAMP's evaluation of every client's model, one model at a time and 4 at a time: timed,
    # and the same accuracies
    ev = d["eval"]
    assert set(ev) == {"framp/float32@eval0", "framp/float32@eval4"}
    for e in ev.values():
        assert e["s_per_round"] > 0 and e["eval_union_samples"] == 16
        assert e["same_accuracies_as_chunk0"] is True
    assert ev["framp/float32@eval4"]["eval_model_chunk"] == 4
