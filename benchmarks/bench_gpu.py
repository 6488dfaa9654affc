"""One round of every method at paper scale on the device at hand, float32 and bfloat16, against
a PyTorch loop of the same FedAvg round and the device's GEMM peak.

The round is the FIARSE protocol of ``experiments/configs/*_cifar10_resnet18.py``: ResNet-18 on
CIFAR-10-shaped data, 10 of 100 clients per round, each method's own client recipe (FedAvg,
FIARSE, FRAMP and FRAMP width: 100 steps x batch 20; HeteroFL 250 x 10; FedRolex 50 x 10;
ScaleFL 160 x 16). FedAvg has no ResNet-18 preset: it is the FIARSE preset with
``method="fedavg"``; FRAMP width is the FRAMP preset with ``framp.extraction="width"``. The
images are synthetic random uint8 arrays of CIFAR shape (500 per client), so no data files are
needed; the round's cost does not depend on the pixel values.

Each round is jitted exactly as ``simulate.run`` does (``jax.jit(alg.round,
donate_argnums=(0,))``, the round index traced). Reported per method and dtype: seconds per round
after compilation (median of ``--rounds`` timed rounds after one warm-up round, each ended by
``block_until_ready``), compile time, the matmul/conv FLOPs the round executes (counted on its
jaxpr: every ``dot_general``/``conv`` with the trip counts of ``scan``/``lax.map``; XLA's own
``cost_analysis`` counts a loop body once and is kept only for reference), achieved TFLOP/s,
its fraction of the measured bf16 GEMM peak, and the ratio to the PyTorch FedAvg round.

How it runs (one command, phases in subprocesses so a crash or a hang costs one entry):

1. compile, in parallel (``--compile-workers``, default 8 on an accelerator, 0 on CPU): every
   (method, dtype) program is traced and compiled once into a persistent compilation cache;
2. time, one after another: a worker loads each program from the cache and times its rounds;
   the GEMM peak is measured first; a job over ``--method-timeout`` (compile: over
   ``--compile-timeout``) is recorded as an error and the remaining jobs continue in a fresh
   worker;
3. the PyTorch loop (``--no-torch`` skips it; skipped with a note when torch or its device is
   missing);
4. ``--triton-compare``: FedAvg and FRAMP (im2col) again with XLA's Triton GEMM fusions on
   (``FRAMP_TRITON_GEMM=1``: the flag must be set before JAX starts, hence a separate worker);
5. ``--eval``: FRAMP's evaluation of every client's model by ``eval_model_chunk``.

``--deadline S`` stops starting programs S seconds after the start (later phases first lose
their entries, recorded as skipped).

Results go to ``results/bench_gpu_<device>.json`` (e.g. ``nvidia_h200``, ``cpu``), rewritten
after every entry so a partial run keeps what it measured. ``--tiny`` runs the same code on a
tiny problem (small CNN on 8x8 images, 2 clients x 2 steps) for a CPU smoke test.

framp_jax's configs need ``ml_collections``; where it is not installed the script provides a
minimal stand-in for ``ConfigDict`` (all the library's presets use). ``jraph`` and ``pymetis``
are only imported by the graph data path, which this script does not touch.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
CONFIGS = os.path.join(ROOT, "experiments", "configs")

METHODS = ("fedavg", "framp", "framp_width", "fiarse", "heterofl", "fedrolex", "scalefl")
DTYPES = ("float32", "bfloat16")
PRESETS = {"fedavg": "fiarse_cifar10_resnet18.py", "framp": "framp_cifar10_resnet18.py",
           "framp_width": "framp_cifar10_resnet18.py", "fiarse": "fiarse_cifar10_resnet18.py",
           "heterofl": "heterofl_cifar10_resnet18.py", "fedrolex": "fedrolex_cifar10_resnet18.py",
           "scalefl": "scalefl_cifar10_resnet18.py"}
TRITON_JOBS = ("fedavg/float32", "framp/float32", "fedavg/bfloat16")
SKIPPED = "skipped: --deadline reached"


T0 = float(os.environ.get("FRAMP_BENCH_T0", time.time()))  # workers: the parent's start


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", file=sys.stderr,
          flush=True)


# ---------------------------------------------------------------------------------------------
# Environment: optional packages


def _block_modules():
    """``FRAMP_BENCH_BLOCK=a,b``: make those imports fail (tests run the script as on a machine
    without them)."""
    for name in filter(None, os.environ.get("FRAMP_BENCH_BLOCK", "").split(",")):
        sys.modules[name.strip()] = None


CONFIG_DICT = "ml_collections"


def _ensure_ml_collections():
    """Install a minimal ``ml_collections.ConfigDict`` stand-in when the package is missing."""
    global CONFIG_DICT
    try:
        import ml_collections  # noqa: F401
        return CONFIG_DICT
    except ImportError:
        pass
    CONFIG_DICT = "stand-in ConfigDict (ml_collections not installed)"
    import copy
    import types

    class ConfigDict:
        def __init__(self, initial=None, **kwargs):
            object.__setattr__(self, "_fields", {})
            for k, v in dict(initial or {}, **kwargs).items():
                self[k] = v

        def __getattr__(self, k):
            try:
                return self._fields[k]
            except KeyError:
                raise AttributeError(k) from None

        def __setattr__(self, k, v):
            self._fields[k] = ConfigDict(v) if isinstance(v, dict) else v

        def __getitem__(self, k):
            return self._fields[k]

        def __setitem__(self, k, v):
            setattr(self, k, v)

        def __delitem__(self, k):
            del self._fields[k]

        def __delattr__(self, k):
            del self._fields[k]

        def __contains__(self, k):
            return k in self._fields

        def __iter__(self):
            return iter(self._fields)

        def __len__(self):
            return len(self._fields)

        def __repr__(self):
            return f"ConfigDict({self.to_dict()!r})"

        def get(self, k, default=None):
            return self._fields.get(k, default)

        def keys(self):
            return self._fields.keys()

        def values(self):
            return self._fields.values()

        def items(self):
            return self._fields.items()

        def to_dict(self):
            return {k: v.to_dict() if isinstance(v, ConfigDict) else v for k, v in self.items()}

        def to_json_best_effort(self, **kw):
            return json.dumps(self.to_dict(), default=str, **kw)

        def copy_and_resolve_references(self):
            return copy.deepcopy(self)

        def lock(self):
            return self

        def unlock(self):
            return self

        @contextlib.contextmanager
        def unlocked(self):
            yield self

    mod = types.ModuleType("ml_collections")
    mod.ConfigDict = ConfigDict
    mod.__framp_bench_stand_in__ = True
    sys.modules["ml_collections"] = mod
    return CONFIG_DICT


# ---------------------------------------------------------------------------------------------
# Problems


def split_job(job: str):
    """``"method/dtype"``, ``"method/dtype+triton"`` or ``"method/dtype@evalN"`` -> (method,
    dtype, triton)."""
    base, _, flag = job.split("@")[0].partition("+")
    method, dtype = base.split("/")
    return method, dtype, flag == "triton"


def eval_chunk(job: str):
    """N of an evaluation job ``"method/dtype@evalN"`` (``config.eval_model_chunk``), else None."""
    _, _, tail = job.partition("@eval")
    return int(tail) if tail else None


EVAL_UNION = (16, 200)  # union samples of the evaluation jobs (tiny, full)


def program(job: str, built, tiny: bool):
    """(jitted function, arguments, donates state?) that a job compiles and times: the round, or
    for ``@evalN`` jobs the evaluator of every client's model with ``eval_model_chunk=N``."""
    import jax
    import jax.numpy as jnp

    from framp_jax.eval import make_evaluator
    c, ctx, alg, data, state, _ = built
    if eval_chunk(job) is None:
        return jax.jit(alg.round, donate_argnums=(0,)), (state, data, jnp.int32(0)), True
    n = EVAL_UNION[0] if tiny else EVAL_UNION[1]
    evaluate = make_evaluator(alg, ctx, c.eval_batch, c.eval_model_chunk)
    return evaluate, (state, data, data.union_x[:n], data.union_y[:n]), False


def make_config(method: str, dtype: str, tiny: bool, triton: bool = False):
    from framp_jax.config import sibling_config
    c = sibling_config(os.path.join(CONFIGS, "bench.py"), PRESETS[method])
    if method == "fedavg":
        c.method = "fedavg"
        if "fiarse" in c:
            del c["fiarse"]
    if method == "framp_width":
        c.framp.extraction = "width"
    c.compute_dtype = dtype
    if triton:
        c.conv_impl = "im2col"
    if tiny:
        c.model = "cnn"
        c.num_clients = 8
        c.clients_per_round = 2
        c.local_steps = 2
        c.batch_size = 4
        c.budget_dist = (2, 2, 2, 2)
        if method == "scalefl":  # the CNN's default level map (3 exits at most)
            c.scalefl.exits = ()
            c.scalefl.widths = ()
    return c


def shapes_for(tiny: bool):
    """(image shape, train samples per client, test samples per client, union samples)."""
    return ((8, 8, 3), 16, 8, 32) if tiny else ((32, 32, 3), 500, 100, 1000)


def build(job: str, tiny: bool):
    """Config, context, algorithm, synthetic data and initial state of one job."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from framp_jax import config as C
    from framp_jax.algorithms.base import FedData
    from framp_jax.client import LocalConfig
    from framp_jax.data.image_modality import ImageModality
    from framp_jax.data.vision import get_normalization
    from framp_jax.models.family import model_family
    from framp_jax.problem import build_algorithm, make_context

    method, dtype, triton = split_job(job)
    c = make_config(method, dtype, tiny, triton)
    if eval_chunk(job) is not None:
        c.eval_model_chunk = eval_chunk(job)
    C.validate(c)
    image, n_train, n_test, n_union = shapes_for(tiny)
    K, N = 10, c.num_clients
    rng = np.random.default_rng(0)
    ytr = rng.integers(0, K, (N, n_train)).astype(np.int32)
    lc = np.stack([np.bincount(r, minlength=K) for r in ytr]).astype(np.float32)
    budgets = C.assign_budgets(c)
    data = FedData(
        train_x=jnp.asarray(rng.integers(0, 256, (N, n_train) + image, dtype=np.uint8)),
        train_y=jnp.asarray(ytr), train_count=jnp.full((N,), n_train, jnp.int32),
        test_x=jnp.asarray(rng.integers(0, 256, (N, n_test) + image, dtype=np.uint8)),
        test_y=jnp.asarray(rng.integers(0, K, (N, n_test)).astype(np.int32)),
        test_count=jnp.full((N,), n_test, jnp.int32),
        budgets=jnp.asarray(budgets, jnp.float32), label_counts=jnp.asarray(lc),
        union_x=jnp.asarray(rng.integers(0, 256, (n_union,) + image, dtype=np.uint8)),
        union_y=jnp.asarray(rng.integers(0, K, n_union).astype(np.int32)))
    mean, std = get_normalization("cifar10", 3)
    modality = ImageModality(mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                             augment=bool(c.augment))
    local = LocalConfig(steps=c.local_steps, batch_size=c.batch_size, lr=c.lr, momentum=c.momentum,
                        weight_decay=c.weight_decay, grad_clip=c.grad_clip, min_count=n_train,
                        modality=modality)
    family = model_family(c.model, K, image, conv_impl=c.conv_impl,
                          compute_dtype=c.get("compute_dtype", "float32"))
    ctx = make_context(c, family, modality, K, budgets, np.arange(N), local)
    alg = build_algorithm(ctx, c)
    state = alg.init(jax.random.key(c.seed), data)
    from framp_jax.models.layers import resolve_conv_impl
    info = {"method": method, "dtype": dtype, "triton_gemm": triton,
            "eval_model_chunk": eval_chunk(job),
            "conv_impl": resolve_conv_impl(c.conv_impl), "client_map": ctx.client_map_mode(),
            "protocol": {"model": c.model, "image": list(image), "num_clients": N,
                         "clients_per_round": c.clients_per_round, "local_steps": c.local_steps,
                         "batch_size": c.batch_size, "train_per_client": n_train}}
    return c, ctx, alg, data, state, info


# ---------------------------------------------------------------------------------------------
# FLOPs


def matmul_flops(fn, *args) -> float:
    """FLOPs of every dot_general and convolution in ``fn``'s jaxpr (2 per multiply-add),
    multiplied by the trip counts of enclosing scans (``lax.scan``, ``lax.map``, static
    ``fori_loop``); ``cond`` counts its most expensive branch, a ``while`` of unknown trip count
    its body once."""
    import jax
    import numpy as np

    def eqn_flops(e):
        name = e.primitive.name
        if name == "dot_general":
            (lc, _), _ = e.params["dimension_numbers"]
            lhs = e.invars[0].aval.shape
            return 2.0 * float(np.prod(e.outvars[0].aval.shape)) * float(np.prod([lhs[d] for d in lc]))
        if name == "conv_general_dilated":
            rhs = e.invars[1].aval.shape
            out_dim = e.params["dimension_numbers"].rhs_spec[0]
            return 2.0 * float(np.prod(e.outvars[0].aval.shape)) * float(np.prod(rhs)) / rhs[out_dim]
        return 0.0

    def subjaxprs(v):
        items = v if isinstance(v, (list, tuple)) else (v,)
        for s in items:
            if hasattr(s, "eqns"):
                yield s
            elif hasattr(getattr(s, "jaxpr", None), "eqns"):
                yield s.jaxpr

    def walk(jaxpr) -> float:
        total = 0.0
        for e in jaxpr.eqns:
            total += eqn_flops(e)
            if e.primitive.name == "cond":
                total += max((walk(j) for j in subjaxprs(e.params["branches"])), default=0.0)
                continue
            inner = sum(walk(j) for v in e.params.values() for j in subjaxprs(v))
            if e.primitive.name == "scan":
                inner *= e.params["length"]
            total += inner
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _xla_flops(compiled):
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - informative only
        return None


# ---------------------------------------------------------------------------------------------
# Workers


def _device_info():
    import jax
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    slug = "cpu" if d.platform == "cpu" else "".join(ch if ch.isalnum() else "_" for ch in kind.lower()).strip("_")
    return {"device_kind": kind, "device": slug, "backend": jax.default_backend(),
            "jax": jax.__version__, "num_devices": len(jax.devices()), "config_dict": CONFIG_DICT,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


_OUT = sys.stdout  # workers: JSON result lines only; everything else printed goes to stderr


def _emit(obj):
    _OUT.write(json.dumps(obj) + "\n")
    _OUT.flush()


def _setup_jax_cache():
    import framp_jax  # noqa: F401 - before JAX starts its backend: XLA_FLAGS (Triton GEMM off)
    import jax
    d = os.environ.get("FRAMP_BENCH_CACHE")
    if d:
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        with contextlib.suppress(Exception):
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def compile_worker(job: str, tiny: bool):
    """Phase 1: trace, count FLOPs, compile into the persistent cache."""
    _setup_jax_cache()
    out = {"job": job, "phase": "compile", **_device_info()}
    try:
        built = build(job, tiny)
        out.update(built[-1])
        fn, fargs, _ = program(job, built, tiny)
        out["matmul_flops_per_round"] = matmul_flops(fn, *fargs)
        t0 = time.perf_counter()
        compiled = fn.lower(*fargs).compile()
        out["compile_s"] = time.perf_counter() - t0
        out["xla_cost_analysis_flops"] = _xla_flops(compiled)
    except Exception as e:  # noqa: BLE001 - recorded, the other jobs go on
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    _emit(out)


def _gemm(tiny: bool):
    import jax
    import jax.numpy as jnp
    n = 512 if tiny else (8192 if jax.default_backend() != "cpu" else 2048)
    res = {"n": n}
    for name, dtype, prec in (("bfloat16", jnp.bfloat16, None), ("float32", jnp.float32, None),
                              ("float32_highest", jnp.float32, "highest")):
        try:
            a = jax.random.normal(jax.random.key(0), (n, n), dtype)
            b = jax.random.normal(jax.random.key(1), (n, n), dtype)
            f = jax.jit(lambda a, b, prec=prec: jnp.dot(a, b, precision=prec))
            jax.block_until_ready(f(a, b))
            ts = []
            for _ in range(5 if tiny else 10):
                t0 = time.perf_counter()
                jax.block_until_ready(f(a, b))
                ts.append(time.perf_counter() - t0)
            s = statistics.median(ts)
            res[name] = {"s": s, "tflops": 2.0 * n ** 3 / s / 1e12}
        except Exception as e:  # noqa: BLE001
            res[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    res["note"] = ("float32 = default matmul precision (TF32 on NVIDIA GPUs since Ampere, as the "
                   "float32 rounds use); float32_highest = full float32")
    return res


def time_worker(jobs, tiny: bool, rounds: int, timeout: float, gemm: bool, flops: bool):
    """Phase 2: GEMM peak, then each job's program (from the cache when phase 1 ran), one warm-up
    and ``rounds`` timed rounds. A job over ``timeout`` seconds ends the worker (exit 3) after
    recording the timeout."""
    import gc

    import jax
    import jax.numpy as jnp
    _setup_jax_cache()
    dev = _device_info()
    if gemm:
        log(f"GEMM peak on {dev['device_kind']}")
        _emit({"job": "gemm", **dev, "gemm": _gemm(tiny)})
    for job in jobs:
        current = {"job": job, "phase": "time", **dev}
        timer = threading.Timer(timeout, lambda cur=current: (
            _emit({**cur, "error": f"timeout: over {timeout:.0f} s"}), os._exit(3)))
        timer.daemon = True
        timer.start()
        try:
            log(f"timing {job}")
            built = build(job, tiny)
            current.update(built[-1])
            fn, fargs, donates = program(job, built, tiny)
            del built
            if flops:  # no compile phase ran: count here, and this compile is the real one
                current["matmul_flops_per_round"] = matmul_flops(fn, *fargs)
            t0 = time.perf_counter()
            compiled = fn.lower(*fargs).compile()
            current["load_or_compile_s"] = time.perf_counter() - t0
            if flops:
                current["compile_s"] = current["load_or_compile_s"]
                current["xla_cost_analysis_flops"] = _xla_flops(compiled)
            times, losses = [], []
            for r in range(1 + rounds):
                t0 = time.perf_counter()
                if donates:  # a round: the state moves on, the round index is traced
                    state, m = compiled(fargs[0], *fargs[1:-1], jnp.int32(r))
                    jax.block_until_ready((state, m))
                    fargs = (state,) + fargs[1:]
                    losses.append(float(m["train_loss"]))
                else:  # an evaluation: the same call again
                    out = jax.block_until_ready(compiled(*fargs))
                times.append(time.perf_counter() - t0)
            current.update(warmup_s=times[0], round_times_s=times[1:],
                           s_per_round=statistics.median(times[1:]))
            if donates:
                current["train_losses"] = losses
            else:
                import hashlib

                import numpy as np
                current["eval_union_samples"] = int(fargs[2].shape[0])
                current["eval_output_sha"] = hashlib.sha256(
                    b"".join(np.asarray(a).tobytes() for a in out)).hexdigest()[:16]
                current["eval_mean_accuracy"] = [float(np.nanmean(np.asarray(a))) for a in out]
            del fargs, compiled
        except Exception as e:  # noqa: BLE001
            current["error"] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            timer.cancel()
        _emit(current)
        gc.collect()
        with contextlib.suppress(Exception):
            jax.clear_caches()


def torch_worker(tiny: bool, rounds: int, dtypes):
    """The same FedAvg round as a PyTorch loop in the style of the official FL code: clients one
    after another, each loading the global weights into a model and running SGD over batches
    of its data; data (uint8) and augmentation on the device; weighted parameter average."""
    try:
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except ImportError as e:
        _emit({"job": "torch", "skipped": f"torch not importable: {e}"})
        return
    import numpy as np

    backend = os.environ.get("FRAMP_BENCH_BACKEND", "cpu")
    if backend == "gpu" and not torch.cuda.is_available():
        _emit({"job": "torch", "skipped": "torch has no CUDA device (jax runs on the GPU)"})
        return
    dev = torch.device("cuda" if backend == "gpu" else "cpu")
    c = make_config("fedavg", "float32", tiny)
    image, n, _, _ = shapes_for(tiny)
    h, w, cin = image
    K, N, M = 10, c.num_clients, c.clients_per_round
    rng = np.random.default_rng(0)
    cx = torch.from_numpy(rng.integers(0, 256, (N, n, cin, h, w), dtype=np.uint8)).to(dev)
    cy = torch.from_numpy(rng.integers(0, K, (N, n)).astype(np.int64)).to(dev)
    from framp_jax.data.vision import get_normalization
    mean, std = get_normalization("cifar10", 3)
    mean = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(std, device=dev).view(1, -1, 1, 1)

    def bn(ch):  # static BN: batch statistics in training and evaluation (models/resnet.py)
        return nn.BatchNorm2d(ch, track_running_stats=False)

    class Block(nn.Module):
        def __init__(self, ci, co, stride):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(ci, co, 3, stride, 1, bias=False), bn(co)
            self.conv2, self.bn2 = nn.Conv2d(co, co, 3, 1, 1, bias=False), bn(co)
            self.shortcut = (nn.Sequential(nn.Conv2d(ci, co, 1, stride, bias=False), bn(co))
                             if stride != 1 or ci != co else nn.Identity())

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class ResNet18(nn.Module):  # framp_jax.models.resnet.make_resnet18
        def __init__(self):
            super().__init__()
            self.stem, self.stem_bn = nn.Conv2d(cin, 64, 3, 1, 1, bias=False), bn(64)
            layers, ci = [], 64
            for co, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [Block(ci, co, stride), Block(co, co, 1)]
                ci = co
            self.layers = nn.Sequential(*layers)
            self.classifier = nn.Linear(512, K)

        def forward(self, x):
            x = self.layers(F.relu(self.stem_bn(self.stem(x))))
            return self.classifier(x.mean(dim=(2, 3)))

    class SmallCNN(nn.Module):  # framp_jax.models.cnn.make_cnn (tiny runs)
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([nn.Conv2d(a, b, 3, padding=1)
                                        for a, b in ((cin, 16), (16, 32), (32, 64))])
            self.dense = nn.Linear(64 * (h // 8) * (w // 8), 128)
            self.classifier = nn.Linear(128, K)

        def forward(self, x):
            for conv in self.convs:
                x = F.max_pool2d(F.relu(conv(x)), 2)
            return self.classifier(F.relu(self.dense(x.flatten(1))))

    Net = SmallCNN if c.model == "cnn" else ResNet18
    torch.manual_seed(0)
    gen = torch.Generator(device=dev).manual_seed(0)
    pad, ar = 4, torch.arange(h, device=dev)

    def augment(x):  # per-image random crop of the zero-padded batch + horizontal flip
        b = x.shape[0]
        xp = F.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen, device=dev)
        rows = (off[:, 0:1] + ar)[:, None, :, None]
        cols = (off[:, 1:2] + ar)[:, None, None, :]
        crop = xp[torch.arange(b, device=dev)[:, None, None, None],
                  torch.arange(x.shape[1], device=dev)[None, :, None, None], rows, cols]
        flip = torch.rand(b, generator=gen, device=dev) < 0.5
        return torch.where(flip[:, None, None, None], crop.flip(3), crop)

    def batches(count):  # consecutive slices of per-epoch shuffles (a shuffling DataLoader)
        perm, pos = torch.randperm(count, generator=gen, device=dev), 0
        for _ in range(c.local_steps):
            if pos + c.batch_size > count:
                rest = perm[pos:]
                perm, pos = torch.randperm(count, generator=gen, device=dev), c.batch_size - len(rest)
                yield torch.cat([rest, perm[:pos]])
            else:
                pos += c.batch_size
                yield perm[pos - c.batch_size:pos]

    def run(dtype):
        global_model, local_model = Net().to(dev), Net().to(dev)
        amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bfloat16"
               else contextlib.nullcontext())

        def do_round():
            ids = torch.randperm(N)[:M].tolist()
            gstate = {k: v.detach().clone() for k, v in global_model.state_dict().items()}
            acc = {k: torch.zeros_like(v) for k, v in gstate.items()}
            losses = []
            for i in ids:
                local_model.load_state_dict(gstate)
                opt = torch.optim.SGD(local_model.parameters(), lr=c.lr,
                                      momentum=c.momentum, weight_decay=c.weight_decay)
                run_loss = torch.zeros((), device=dev)
                for idx in batches(n):
                    xb = augment((cx[i][idx].float().div_(255.0) - mean) / std)
                    with amp:
                        loss = F.cross_entropy(local_model(xb), cy[i][idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    run_loss += loss.detach().float()
                losses.append(run_loss / c.local_steps)
                with torch.no_grad():
                    for k, v in local_model.state_dict().items():
                        acc[k].add_(v, alpha=float(n))
            with torch.no_grad():
                global_model.load_state_dict({k: a / (n * M) for k, a in acc.items()})
            out = float(torch.stack(losses).mean())  # synchronises the device
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out

        times, losses = [], []
        for _ in range(1 + rounds):
            t0 = time.perf_counter()
            losses.append(do_round())
            times.append(time.perf_counter() - t0)
        return {"warmup_s": times[0], "round_times_s": times[1:],
                "s_per_round": statistics.median(times[1:]), "train_losses": losses}

    info = {"job": "torch", "torch": torch.__version__, "device": str(dev),
            "threads": torch.get_num_threads(),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "model": Net.__name__, "protocol": {"clients_per_round": M, "local_steps": c.local_steps,
                                                 "batch_size": c.batch_size, "lr": c.lr}}
    for dtype in dtypes:
        log(f"PyTorch loop {dtype}")
        try:
            info[dtype] = run(dtype)
        except Exception as e:  # noqa: BLE001
            info[dtype] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    _emit(info)


# ---------------------------------------------------------------------------------------------
# Parent


class Results:
    def __init__(self, args):
        self.args, self.path = args, args.out
        self.data = {"script": "benchmarks/bench_gpu.py", "argv": sys.argv[1:], "tiny": args.tiny,
                     "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds,
                     "methods": {}, "compile": {}, "triton_compare": {}, "eval": {},
                     "python": sys.version.split()[0], "cpu_count": os.cpu_count(),
                     "loadavg_start": _loadavg(),
                     "notes": ["synthetic random uint8 images of CIFAR-10 shape",
                               "s_per_round: median of the timed rounds after one warm-up round",
                               "matmul_flops_per_round: dot_general/conv FLOPs of the round's "
                               "jaxpr with scan/map trip counts; xla_cost_analysis_flops counts "
                               "loop bodies once (reference only)",
                               "ratio_to_torch_fedavg_f32: this round's time over the PyTorch "
                               "FedAvg float32 loop's (like for like for fedavg/float32 only)"]}

    def set_device(self, d):
        if "device" not in self.data and "device" in d:
            for k in ("device", "device_kind", "backend", "jax", "num_devices", "config_dict"):
                self.data[k] = d.get(k)
        if self.path is None and "device" in self.data:
            name = f"bench_gpu_{self.data['device']}{'_tiny' if self.args.tiny else ''}.json"
            self.path = os.path.join(ROOT, "results", name)

    def flush(self):
        self._derive()
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)

    def _derive(self):
        peak = (self.data.get("gemm") or {}).get("bfloat16", {}).get("tflops")
        torch_s = ((self.data.get("torch") or {}).get("float32") or {}).get("s_per_round")
        for key, e in (list(self.data["methods"].items()) + list(self.data["triton_compare"].items())
                       + list(self.data["eval"].items())):
            comp = self.data["compile"].get(e.get("job", key), {})
            for k in ("compile_s", "matmul_flops_per_round", "xla_cost_analysis_flops"):
                if k in comp and k not in e:
                    e[k] = comp[k]
            s, fl = e.get("s_per_round"), e.get("matmul_flops_per_round")
            if s and fl:
                e["tflops"] = fl / s / 1e12
                if peak:
                    e["fraction_of_bf16_peak"] = e["tflops"] / peak
            if s and torch_s:
                e["ratio_to_torch_fedavg_f32"] = s / torch_s


def _run_lines(cmd, env, timeout, on_line):
    """Run ``cmd``, feeding each stdout line (JSON) to ``on_line``; returns (returncode, stderr
    tail). stderr passes through to ours, and its tail is kept."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail = []

    def pump_err():
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line)
            del tail[:-40]
    th = threading.Thread(target=pump_err, daemon=True)
    th.start()
    finite = timeout is not None and timeout < float("inf")
    killer = threading.Timer(max(timeout, 0.1), proc.kill) if finite else None
    if killer:
        killer.start()
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                on_line(json.loads(line))
    rc = proc.wait()
    if killer:
        killer.cancel()
    th.join(timeout=5)
    return rc, "".join(tail)[-3000:]


def _env(base, cache, triton=False, preallocate=True):
    env = dict(base)
    env["FRAMP_BENCH_CACHE"] = cache
    env["PYTHONUNBUFFERED"] = "1"
    if triton:
        env["FRAMP_TRITON_GEMM"] = "1"
        flags = env.get("XLA_FLAGS", "").replace("--xla_gpu_enable_triton_gemm=false", "").strip()
        env["XLA_FLAGS"] = flags
        if not flags:
            env.pop("XLA_FLAGS")
    else:
        # set in the worker's environment, not left to the import of framp_jax: a worker that
        # touches JAX's backend before importing framp_jax would start without it
        from framp_jax import configure_xla_flags
        configure_xla_flags(env)
    if not preallocate:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {METHODS} (empty: only the GEMM peak and PyTorch loop)")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma list of float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per method (after 1 warm-up)")
    ap.add_argument("--torch-rounds", type=int, default=2, help="timed PyTorch rounds per dtype")
    ap.add_argument("--out", default=None, help="results JSON (default results/bench_gpu_<device>.json)")
    ap.add_argument("--triton-compare", action="store_true",
                    help=f"also time {', '.join(TRITON_JOBS)} with XLA's Triton GEMM on")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    ap.add_argument("--eval", action="store_true",
                    help="also time FRAMP's evaluation of every client's model on "
                         f"{EVAL_UNION[1]} union images with eval_model_chunk 0 (one model at a "
                         "time), 10 and 100")
    ap.add_argument("--no-gemm", action="store_true", help="skip the GEMM peak")
    ap.add_argument("--method-timeout", type=float, default=300.0,
                    help="seconds per program's timing (and its compile when no compile phase runs)")
    ap.add_argument("--compile-timeout", type=float, default=900.0,
                    help="seconds per program's compile in the parallel compile phase (a "
                         "multi-level method's round compiles for minutes on a GPU)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds after start when no further program is started and running "
                         "ones are stopped (recorded as skipped); 0 = none")
    ap.add_argument("--compile-workers", type=int, default=-1,
                    help="parallel compile processes (-1: 8 on an accelerator, 0 on CPU = compile "
                         "while timing)")
    ap.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: a "
                    "fresh temporary directory)")
    # internal worker modes
    ap.add_argument("--_compile", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_time", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_gemm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_flops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_torch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    _block_modules()
    if args._compile or args._time is not None or args._torch:
        sys.stdout = sys.stderr  # library prints go to stderr; results to _OUT
        _ensure_ml_collections()
    if args._compile:
        return compile_worker(args._compile, args.tiny)
    if args._time is not None:
        jobs = [j for j in args._time.split(",") if j]
        return time_worker(jobs, args.tiny, args.rounds, args.method_timeout, args._gemm,
                           args._flops)
    if args._torch:
        return torch_worker(args.tiny, args.torch_rounds, args._torch.split(","))

    methods = [m for m in args.methods.split(",") if m]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: {m!r} is not one of {METHODS}")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"--dtypes: {d!r} is not one of {DTYPES}")
    res = Results(args)
    deadline_at = T0 + args.deadline if args.deadline > 0 else float("inf")
    left = lambda: deadline_at - time.time()
    jobs = [f"{m}/{d}" for m in methods for d in dtypes]
    eval_jobs = [f"framp/{dtypes[0]}@eval{n}" for n in ((0, 4) if args.tiny else (0, 10, 100))
                 ] if args.eval else []
    triton_jobs = [f"{j}+triton" for j in TRITON_JOBS if split_job(j)[0] in methods
                   and split_job(j)[1] in dtypes] if args.triton_compare else []
    me = [sys.executable, os.path.abspath(__file__)] + (["--tiny"] if args.tiny else [])
    base_env = dict(os.environ, FRAMP_BENCH_T0=repr(T0))
    import tempfile
    cache_root = args.cache_dir or tempfile.mkdtemp(prefix="framp_bench_gpu_cache_")
    caches = {False: os.path.join(cache_root, "default"), True: os.path.join(cache_root, "triton")}
    has_accel = os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
    workers = args.compile_workers if args.compile_workers >= 0 else (8 if has_accel else 0)
    res.data["compile_workers"] = workers
    res.data["xla_flags_default"] = "framp_jax adds --xla_gpu_enable_triton_gemm=false unless FRAMP_TRITON_GEMM=1"
    log(f"bench_gpu: {len(jobs)} programs {jobs}; triton compare {triton_jobs}; "
        f"compile workers {workers}; cache {cache_root}")

    def on_result(d, table):
        res.set_device(d)
        key = d["job"].replace("+triton", "") if table == "triton_compare" else d["job"]
        if table == "compile":
            res.data["compile"][d["job"]] = d
            msg = (f"compiled {d['job']} in {d['compile_s']:.1f} s" if "compile_s" in d
                   else f"compile failed {d['job']}: {d.get('error', '')[:300]}")
        else:
            res.data[table][key] = d
            msg = (f"{d['job']}: {d['s_per_round']:.3f} s/round (rounds {['%.3f' % t for t in d['round_times_s']]}, "
                   f"warm-up {d['warmup_s']:.2f} s, load/compile {d['load_or_compile_s']:.1f} s)"
                   if "s_per_round" in d else f"{d['job']} failed: {d.get('error', '')[:300]}")
        log(msg)
        res.flush()

    # phase 1: parallel compiles into the persistent caches
    if workers > 0:
        from concurrent.futures import ThreadPoolExecutor
        all_jobs = ([(j, False) for j in jobs] + [(j, True) for j in triton_jobs]
                    + [(j, False) for j in eval_jobs])
        log(f"phase 1: compiling {len(all_jobs)} programs, {workers} at a time")
        lock = threading.Lock()

        def compile_one(item):
            job, triton = item
            got = []
            if left() <= 0:
                with lock:
                    on_result({"job": job, "error": SKIPPED}, "compile")
                return
            rc, tail = _run_lines(me + ["--_compile", job, "--method-timeout", str(args.method_timeout)],
                                  _env(base_env, caches[triton], triton, preallocate=False),
                                  min(args.compile_timeout, left()), got.append)
            with lock:
                if got:
                    on_result(got[-1], "compile")
                elif left() <= 0:
                    on_result({"job": job, "error": SKIPPED}, "compile")
                else:
                    on_result({"job": job, "error": f"compile worker exited {rc} without a "
                                                    f"result: {tail[-1500:]}"}, "compile")
        with ThreadPoolExecutor(max(1, workers)) as ex:
            list(ex.map(compile_one, all_jobs))

    def failed_compile(job):
        return "error" in res.data["compile"].get(job, {})

    # phase 2: timing, one program after another
    def time_jobs(job_list, triton, table, gemm):
        todo = [j for j in job_list if not failed_compile(j)]
        for j in job_list:
            if failed_compile(j):
                on_result({"job": j, "error": "compile failed: " + res.data["compile"][j]["error"]}, table)
        first = gemm
        while todo or first:
            if left() <= 0:
                for j in todo:
                    on_result({"job": j, "error": SKIPPED}, table)
                return
            done = []

            def on_line(d):
                if d["job"] == "gemm":
                    res.set_device(d)
                    res.data["gemm"] = d["gemm"]
                    g = d["gemm"]
                    log("GEMM TFLOP/s: " + ", ".join(f"{k} {v['tflops']:.1f}" for k, v in g.items()
                                                       if isinstance(v, dict) and "tflops" in v))
                    res.flush()
                    return
                done.append(d["job"])
                on_result(d, table)
            cmd = me + ["--_time", ",".join(todo), "--rounds", str(args.rounds),
                        "--method-timeout", str(args.method_timeout)] + (["--_gemm"] if first else []) + (
                           ["--_flops"] if workers == 0 else [])
            rc, tail = _run_lines(cmd, _env(base_env, caches[triton], triton),
                                  min(args.method_timeout * (len(todo) + 1) + 120, left()), on_line)
            first = False
            rest = [j for j in todo if j not in done]
            if rest and rc not in (0, 3):  # crashed without recording: record and skip that job
                why = SKIPPED if left() <= 0 else f"timing worker exited {rc}: {tail[-1500:]}"
                on_result({"job": rest[0], "error": why}, table)
                rest = rest[1:]
            todo = rest

    log("phase 2: timing")
    time_jobs(jobs, False, "methods", not args.no_gemm)

    if not args.no_torch and left() <= 0:
        res.data["torch"] = {"skipped": SKIPPED}
    elif not args.no_torch:
        log("phase 3: PyTorch loop")
        backend = res.data.get("backend", "cpu")
        env = dict(base_env, FRAMP_BENCH_BACKEND=backend)

        def on_torch(d):
            res.data["torch"] = d
            for dt in dtypes:
                r = d.get(dt, {})
                if "s_per_round" in r:
                    log(f"PyTorch {dt}: {r['s_per_round']:.3f} s/round")
            if "skipped" in d:
                log(f"PyTorch skipped: {d['skipped']}")
            res.flush()
        rc, tail = _run_lines(me + ["--_torch", ",".join(dtypes), "--torch-rounds", str(args.torch_rounds)],
                              env, min(args.method_timeout * 2, left()), on_torch)
        if "torch" not in res.data:
            res.data["torch"] = ({"skipped": SKIPPED} if left() <= 0 else
                                 {"error": f"torch worker exited {rc}: {tail[-1500:]}"})
            res.flush()

    if triton_jobs:
        log("phase 4: Triton GEMM on (FRAMP_TRITON_GEMM=1)")
        time_jobs(triton_jobs, True, "triton_compare", False)
        for key, e in res.data["triton_compare"].items():
            off = res.data["methods"].get(key, {}).get("s_per_round")
            e["triton_off_s_per_round"] = off
            if off and e.get("s_per_round"):
                e["triton_on_over_off"] = e["s_per_round"] / off

    if eval_jobs:
        log("phase 5: evaluation of every client's model, by model chunk")
        time_jobs(eval_jobs, False, "eval", False)
        ref = res.data["eval"].get(eval_jobs[0], {}).get("eval_output_sha")
        for e in res.data["eval"].values():
            if ref and "eval_output_sha" in e:
                e["same_accuracies_as_chunk0"] = e["eval_output_sha"] == ref
        res.flush()

    res.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    res.data["loadavg_end"] = _loadavg()
    res.data["wall_s"] = time.time() - T0
    res.flush()
    _summary(res.data)
    log(f"wrote {res.path}")
    if not args.cache_dir:
        import shutil
        shutil.rmtree(cache_root, ignore_errors=True)
    return 0


def _loadavg():
    with contextlib.suppress(OSError):
        return list(os.getloadavg())
    return None


def _summary(d):
    g = d.get("gemm") or {}
    t = d.get("torch") or {}
    print(f"\nbench_gpu on {d.get('device_kind')} (jax {d.get('jax')}), rounds timed: {d.get('rounds')}")
    if g:
        print("GEMM peak: " + ", ".join(f"{k} {v['tflops']:.1f} TFLOP/s" for k, v in g.items()
                                        if isinstance(v, dict) and "tflops" in v))
    for dt in DTYPES:
        if isinstance(t.get(dt), dict) and "s_per_round" in t[dt]:
            print(f"PyTorch FedAvg loop {dt}: {t[dt]['s_per_round']:.3f} s/round")
    if "skipped" in t:
        print(f"PyTorch: skipped ({t['skipped']})")
    print(f"{'method/dtype':24s} {'s/round':>8s} {'compile':>8s} {'TFLOP/s':>8s} {'%bf16pk':>8s} {'/torch':>7s}")
    for k, e in (list(d["methods"].items()) + [(k + "+triton", e) for k, e in d["triton_compare"].items()]
                 + list(d.get("eval", {}).items())):
        if "s_per_round" not in e:
            print(f"{k:24s} error: {e.get('error', '')[:100]}")
            continue
        f = lambda x, fmt: (fmt % x) if isinstance(x, (int, float)) else "-"
        print(f"{k:24s} {f(e['s_per_round'], '%8.3f')} {f(e.get('compile_s', e.get('load_or_compile_s')), '%8.1f')} "
              f"{f(e.get('tflops'), '%8.2f')} {f(100 * e['fraction_of_bf16_peak'] if 'fraction_of_bf16_peak' in e else None, '%7.1f%%')} "
              f"{f(e.get('ratio_to_torch_fedavg_f32'), '%7.2f')}")


if __name__ == "__main__":
    sys.exit(main())
