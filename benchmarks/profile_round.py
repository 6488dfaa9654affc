"""Where a paper round's device time goes: one round of a ``bench_gpu.py`` program traced with
``jax.profiler`` and summarised kernel by kernel.

For each job (``bench_gpu.py``'s syntax, ``method/dtype``, e.g. ``fedavg/bfloat16``) the round
is built exactly as ``bench_gpu.py`` builds it (the FIARSE protocol, synthetic CIFAR-shaped
data; ``--tiny``: the small CNN on 8x8 images), compiled, run ``--warmup`` times, then one round
is traced. From the trace (the ``.xplane.pb`` that ``jax.profiler.trace`` writes, read with
jaxlib's profile reader) it reports, per device stream (on a CPU: per XLA thread of the host):

* ``events``, ``busy_ms`` (sum of the kernels' durations) and ``span_ms`` (first start to last
  end): busy close to span means the device never waits for the host;
* ``by_kind``: busy time split into ``gemm`` (cuBLAS/nvjet/CUTLASS matmuls), ``conv`` (cuDNN),
  ``layout`` (XLA fusions whose name says concatenate or transpose: im2col patches, layout
  changes), ``reduce`` (reduction fusions: batch-norm statistics, losses, norms), ``copy``
  (memcpy/memset) and ``other`` (the remaining fusions); the kinds partition ``busy_ms``;
* ``top``: the ``--top`` kernels by total time (name, ms, calls).

On a GPU a stream's kernels do not overlap. On a CPU the host's events nest (an executor event
holds the kernels it runs), so there busy can exceed span: the CPU run is a smoke test.

Results go to ``--out`` (default ``results/profile_round_<device>.json``). The trace files
themselves go to a temporary directory (``--trace-dir`` keeps them)."""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KINDS = ("gemm", "conv", "layout", "reduce", "copy", "other")


def _bench_gpu():
    """``benchmarks/bench_gpu.py`` (the programs, their builders and its helpers), loaded by path."""
    mod = sys.modules.get("framp_bench_gpu")
    if mod is None:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "framp_bench_gpu", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_gpu.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules["framp_bench_gpu"] = mod
        spec.loader.exec_module(mod)
    return mod


def kernel_kind(name: str) -> str:
    """The kind of one trace event by its name (see the module docstring)."""
    n = name.lower()
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "cublas", "xmma", "dot")):
        return "gemm"
    if any(s in n for s in ("cudnn", "convolution", "conv_")):
        return "conv"
    if "memcpy" in n or "memset" in n:
        return "copy"
    if "concatenate" in n or "transpose" in n:
        return "layout"
    if "reduce" in n:
        return "reduce"
    return "other"


def summarise_events(events, top: int) -> dict:
    """``events``: (name, start_ns, duration_ns) of one stream -> the per-stream summary."""
    tot, cnt, kinds = collections.Counter(), collections.Counter(), dict.fromkeys(KINDS, 0.0)
    lo, hi = float("inf"), float("-inf")
    for name, start, dur in events:
        tot[name] += dur
        cnt[name] += 1
        kinds[kernel_kind(name)] += dur / 1e6
        lo, hi = min(lo, start), max(hi, start + dur)
    return {"events": len(events), "busy_ms": sum(tot.values()) / 1e6,
            "span_ms": (hi - lo) / 1e6 if events else 0.0, "by_kind": kinds,
            "top": [[n, t / 1e6, cnt[n]] for n, t in tot.most_common(top)]}


def summarise_trace(path: str, top: int) -> list:
    """Per-stream summaries of one ``.xplane.pb``: every line of a ``/device:`` plane (GPU/TPU
    streams); where there is none (CPU), the host's XLA threads (``tf_XLA*`` lines)."""
    from jax._src.lib import _profile_data
    prof = _profile_data.ProfileData.from_file(path)
    planes = list(prof.planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    out = []
    for plane in device or planes:
        for line in plane.lines:
            if not device and not line.name.startswith("tf_XLA"):
                continue
            evs = [(e.name, e.start_ns, e.duration_ns) for e in line.events]
            if evs:
                out.append({"plane": plane.name, "line": line.name, **summarise_events(evs, top)})
    return out


def profile_job(job: str, tiny: bool, warmup: int, top: int, trace_dir: str) -> dict:
    import jax
    import jax.numpy as jnp

    bg = _bench_gpu()
    bg._ensure_ml_collections()
    built = bg.build(job, tiny)
    info = built[-1]
    fn, fargs, _ = bg.program(job, built, tiny)  # a round: main() admits method/dtype jobs only
    del built
    compiled = fn.lower(*fargs).compile()
    state, rest = fargs[0], fargs[1:-1]
    for r in range(warmup):
        state, m = compiled(state, *rest, jnp.int32(r))
        jax.block_until_ready((state, m))
    logdir = os.path.join(trace_dir, job.replace("/", "_"))
    t0 = time.perf_counter()
    with jax.profiler.trace(logdir):
        state, m = compiled(state, *rest, jnp.int32(warmup))
        jax.block_until_ready((state, m))
    wall = time.perf_counter() - t0
    files = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise RuntimeError(f"{job}: jax.profiler wrote no .xplane.pb under {logdir}")
    return {"job": job, **info, "traced_round_wall_s": wall, "warmup_rounds": warmup,
            "streams": summarise_trace(sorted(files)[-1], top)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", default="fedavg/bfloat16",
                    help="comma list of bench_gpu.py jobs, method/dtype")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--warmup", type=int, default=2, help="rounds run before the traced one")
    ap.add_argument("--top", type=int, default=30, help="kernels listed per stream")
    ap.add_argument("--out", default=None, help="JSON (default results/profile_round_<device>.json)")
    ap.add_argument("--trace-dir", default=None, help="keep the raw traces here")
    args = ap.parse_args(argv)
    bg = _bench_gpu()
    jobs = [j for j in args.jobs.split(",") if j]
    for j in jobs:  # checked before anything is built
        parts = j.split("/")
        if len(parts) != 2 or parts[0] not in bg.METHODS or parts[1] not in bg.DTYPES:
            ap.error(f"--jobs: {j!r} is not method/dtype with method in {bg.METHODS} and "
                     f"dtype in {bg.DTYPES}")
    if args.warmup < 1:
        ap.error(f"--warmup: {args.warmup} (at least 1: the first round includes one-time work)")
    bg._setup_jax_cache()  # imports framp_jax first: its XLA flags before the backend starts
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="framp_profile_round_")
    result = {"script": "benchmarks/profile_round.py", "argv": sys.argv[1:] if argv is None else argv,
              **bg._device_info(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "jobs": {}}
    path = args.out or os.path.join(ROOT, "results", f"profile_round_{result['device']}.json")
    for job in jobs:
        bg.log(f"profiling {job}")
        r = profile_job(job, args.tiny, args.warmup, args.top, trace_dir)
        result["jobs"][job] = r
        for s in r["streams"]:
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in s["by_kind"].items() if v)
            bg.log(f"{job} {s['line']}: {s['events']} events, busy {s['busy_ms']:.1f} ms of "
                   f"{s['span_ms']:.1f} ms ({kinds})")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)
    if not args.trace_dir:
        import shutil
        shutil.rmtree(trace_dir, ignore_errors=True)
    bg.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
