"""One FedAvg round of framp_jax against a PyTorch reference of the same round, side by side.

framp_jax: the real jitted ``round`` of ``framp_jax.algorithms.fedavg.fedavg``, built by
``framp_jax.problem.build_problem``/``build_algorithm`` from the CPU preset
``experiments/configs/fedavg_cifar10_cpu.py`` on real CIFAR-10, jitted as ``simulate.run`` does
(``jax.jit(round, donate_argnums=(0,))``, ``t`` traced).

PyTorch reference (benchmark-only; ``pip install torch``; skipped with a message when missing):
the same small CNN (conv3x3 16/32/64 + ReLU + 2x2 max-pool, flatten, dense 128 + ReLU,
classifier), the same client partition of the same data, 10 sampled clients trained one after
another, each 20 SGD steps of batch 20 drawn from per-epoch shuffles, normalised and augmented
on tensors (4-pixel zero-pad random crop + horizontal flip, per image), then the sample-count
weighted parameter average. ``torch.set_num_threads(os.cpu_count())``.

Each side runs in its own worker subprocess (own thread pools, no shared allocator); both are
set up and warmed up first (compilation excluded), then the parent alternates single rounds
between the workers (jax, torch, jax, torch, ...) so that a change of machine load hits both
alike. ``--mode sequential`` instead runs all rounds of one worker, then the other's.

Variants (``--prototypes``, framp_jax only, built without touching the engine): ``jax`` is the
round as the preset configures it (``config.client_map="auto"``: clients by ``lax.map`` on CPU);
``jax_vmap`` is the real round with ``config.client_map="vmap"`` (the engine's mapping before
``client_map`` existed); ``jax_fast`` is a prototype round whose batching is ``fast_local_train``'s (epoch
permutations computed once per epoch, not twice per step; crop+flip as one gather,
bit-identical to ``image_modality.augment``), clients mapped as ``jax``.
``--profile`` times pieces of the framp_jax round (batching+augmentation, the gradient scan,
local training, aggregation) in the jax worker.

    python benchmarks/bench_round.py                 # writes results/bench_round_<backend>.json
    python benchmarks/bench_round.py --quick
    python benchmarks/bench_round.py --prototypes --profile
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "@@bench_round "  # worker protocol lines; anything else a worker prints is passed through
PRESET = os.path.join(ROOT, "experiments", "configs", "fedavg_cifar10_cpu.py")


def load_preset():
    from framp_jax.config import sibling_config
    return sibling_config(PRESET, os.path.basename(PRESET))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _emit(obj):
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _serve(setup_info, do_round):
    """Worker protocol: one JSON line when ready, then one per 'round' command."""
    _emit({"ready": True, **setup_info})
    t = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd == "round":
            t0 = time.perf_counter()
            loss = do_round(t)
            _emit({"round": t, "seconds": time.perf_counter() - t0, "loss": loss})
            t += 1


# ---------------------------------------------------------------------------------------------
# framp_jax worker


def jax_worker(variant: str, warmup: int, profile: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from framp_jax.problem import build_algorithm, build_problem

    c = load_preset()
    client_map, proto = PROTOTYPES.get(variant, (None, False))
    if client_map is not None:
        if "client_map" not in c:
            raise SystemExit(f"{variant}: this framp_jax has no config.client_map")
        c.client_map = client_map
    t0 = time.perf_counter()
    prob = build_problem(c, verbose=False)
    setup_s = time.perf_counter() - t0
    ctx, data = prob.ctx, prob.data
    alg = build_algorithm(ctx, c)
    round_impl = _proto_round(ctx, data) if proto else alg.round
    round_fn = jax.jit(round_impl, donate_argnums=(0,))
    state = {"s": alg.init(jax.random.key(c.seed), data)}

    def do_round(t):
        st, m = round_fn(state["s"], data, jnp.int32(t))
        state["s"] = jax.block_until_ready(st)
        return float(m["train_loss"])

    t0 = time.perf_counter()
    do_round(0)
    first_s = time.perf_counter() - t0
    warm = [_timed(do_round, 1 + i) for i in range(warmup)]
    info = {"variant": variant, "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": len(jax.devices()), "data_setup_s": setup_s, "first_round_s": first_s,
            "warmup_rounds_s": warm, "train_x_shape": list(data.train_x.shape),
            "conv_impl": str(c.conv_impl), "resolved_conv_impl": _resolved_impl(c.conv_impl),
            "client_map": str(c.get("client_map", "vmap")),
            "client_map_resolved": ctx.client_map_mode() if hasattr(ctx, "client_map_mode") else "vmap"}
    if proto:
        info["augment_fused_equals_client_augment"] = check_augment_fused()
        info["epochs_precomputed"] = epochs_needed(ctx.local, np.asarray(data.train_count)[ctx.train_ids])
    if profile:
        info["profile"] = profile_pieces(prob)
    offset = 1 + warmup

    _serve(info, lambda t: do_round(t + offset))


def _timed(fn, *a):
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def _resolved_impl(impl):
    from framp_jax.models.layers import resolve_conv_impl
    return resolve_conv_impl(impl)


def augment_fused(key, x, pad: int = 4):
    """Prototype of ``image_modality.augment`` with the same random draws and bit-identical output: the
    crop and the flip become one gather with per-image row/column indices, instead of
    pad + vmapped ``dynamic_slice`` + a reversed copy + a select."""
    import jax
    import jax.numpy as jnp
    b, h, w, c = x.shape
    kc, kf = jax.random.split(key)
    offs = jax.random.randint(kc, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(kf, 0.5, (b,))
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    j = jnp.arange(w)
    rows = offs[:, 0:1] + jnp.arange(h)                          # [b, h]
    cols = offs[:, 1:2] + jnp.where(flips[:, None], w - 1 - j, j)  # [b, w], flip folded in
    return xp[jnp.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def fast_local_train(loss_fn, params, x_u8, y, count, key, cfg, n_epochs: int):
    """Prototype of ``client.local_train`` (no mask/grad_transform) with on-device batching made
    cheap: the epoch permutations depend on (key, epoch) only, so they are computed once per call
    for the ``n_epochs`` epochs the steps can reach (one sort per epoch instead of two per step)
    and every step's batch is a slice of them (true epoch-wise shuffling); augmentation by
    ``augment_fused``."""
    import jax
    import jax.numpy as jnp
    import optax
    from framp_jax.client import make_optimizer
    from framp_jax.data.image_modality import _epoch_perm, normalize

    opt = make_optimizer(cfg)
    kdata, kloss, kperm = (jax.random.fold_in(key, i) for i in range(3))
    n_max, bsz = x_u8.shape[0], cfg.batch_size
    perms = jax.vmap(lambda e: _epoch_perm(jax.random.fold_in(kperm, e), count, n_max))(
        jnp.arange(n_epochs))

    def step(carry, s):
        p, opt_state = carry
        pos = s * bsz + jnp.arange(bsz)
        idx = perms[jnp.minimum(pos // count, n_epochs - 1), pos % count]
        xb = normalize(x_u8[idx], cfg.modality.mean, cfg.modality.std)
        if cfg.modality.augment:
            xb = augment_fused(jax.random.fold_in(kdata, s), xb)
        loss, g = jax.value_and_grad(loss_fn)(p, xb, y[idx], jax.random.fold_in(kloss, s))
        upd, opt_state = opt.update(g, opt_state, p)
        return (optax.apply_updates(p, upd), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(cfg.steps))
    return params, jnp.mean(losses)


def epochs_needed(cfg, counts) -> int:
    """Epochs that ``cfg.steps`` batches reach on the smallest client: a static bound from the
    host-side sample counts."""
    import math
    return max(1, math.ceil(cfg.steps * cfg.batch_size / max(1, int(min(counts)))))


def _proto_round(ctx, data):
    """Prototype round: fedavg's round (fedavg.py) with the fast batching of
    ``fast_local_train``; clients mapped by ``ctx.vmap_clients`` (so by ``config.client_map``) and
    aggregation as in fedavg.py."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from framp_jax.aggregate import masked_mean
    from framp_jax.algorithms.rounds import round_metrics
    from framp_jax.algorithms.fedavg import ce_loss
    from framp_jax.client import is_finite_tree

    loss_fn, cfg = ce_loss(ctx.model), ctx.local
    n_epochs = epochs_needed(cfg, np.asarray(data.train_count)[ctx.train_ids])

    def train_one(params, x, y, n, k):
        return fast_local_train(loss_fn, params, x, y, n, k, cfg, n_epochs)

    def round_fn(state, data, t):
        ids = ctx.sample_clients(t)
        x, y, n = ctx.gather(data, ids)
        keys = ctx.client_keys(t, ids)
        params = state["params"]
        new, losses = ctx.vmap_clients(lambda *a: train_one(params, *a))(x, y, n, keys)
        finite = jax.vmap(is_finite_tree)(new) & jnp.isfinite(losses)
        w = n.astype(jnp.float32) * finite
        return {"params": masked_mean(params, new, None, w)}, round_metrics(losses, finite)

    return round_fn


# name: (config.client_map override or None, prototype round?)
PROTOTYPES = {"jax_vmap": ("vmap", False), "jax_fast": (None, True)}


def check_augment_fused():
    """augment_fused must reproduce image_modality.augment exactly (same draws, same pixels)."""
    import jax
    import jax.numpy as jnp
    from framp_jax.data.image_modality import augment
    x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
    for i in range(4):
        k = jax.random.key(i)
        if not bool(jnp.array_equal(augment(k, x), augment_fused(k, x))):
            raise AssertionError("augment_fused differs from framp_jax.data.image_modality.augment")
    return True


def profile_pieces(prob, repeats: int = 3):
    """Median seconds of pieces of one round, each jitted on its own (same shapes as the round)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from framp_jax.aggregate import masked_mean
    from framp_jax.algorithms.fedavg import ce_loss
    from framp_jax.client import local_train

    ctx, data = prob.ctx, prob.data
    cfg, model = ctx.local, ctx.model
    get_batch = cfg.modality.train_batch
    loss_fn = ce_loss(model)
    params = model.init(ctx.init_key())
    ids = ctx.sample_clients(jnp.int32(0))
    x, y, n = ctx.gather(data, ids)
    keys = ctx.client_keys(jnp.int32(0), ids)
    steps = jnp.arange(cfg.steps)

    def batches_only(x, y, n, keys):
        def one(xx, yy, nn, kk):
            kd = jax.random.fold_in(kk, 0)
            def body(acc, s):
                xb, yb = get_batch(kd, xx, yy, nn, s, cfg)
                return acc + jnp.sum(xb) + jnp.sum(yb), None
            return jax.lax.scan(body, 0.0, steps)[0]
        return jax.vmap(one)(x, y, n, keys)

    n_epochs = epochs_needed(cfg, np.asarray(data.train_count)[ctx.train_ids])

    def batches_fast(x, y, n, keys):
        from framp_jax.data.image_modality import _epoch_perm, normalize
        def one(xx, yy, nn, kk):
            kd, kp = jax.random.fold_in(kk, 0), jax.random.fold_in(kk, 2)
            perms = jax.vmap(lambda e: _epoch_perm(jax.random.fold_in(kp, e), nn, xx.shape[0]))(
                jnp.arange(n_epochs))
            def body(acc, s):
                pos = s * cfg.batch_size + jnp.arange(cfg.batch_size)
                idx = perms[jnp.minimum(pos // nn, n_epochs - 1), pos % nn]
                xb = augment_fused(jax.random.fold_in(kd, s),
                                   normalize(xx[idx], cfg.modality.mean, cfg.modality.std))
                return acc + jnp.sum(xb) + jnp.sum(yy[idx]), None
            return jax.lax.scan(body, 0.0, steps)[0]
        return jax.vmap(one)(x, y, n, keys)

    fixed_x = jax.vmap(lambda xx, yy, nn, kk: get_batch(jax.random.fold_in(kk, 0), xx, yy, nn, 0, cfg))(
        x, y, n, keys)

    def grads_only(xb, yb, mapping):
        def one(xb1, yb1):
            def body(p, s):
                l, g = jax.value_and_grad(loss_fn)(p, xb1, yb1, None)
                return jax.tree.map(lambda a, b: a - cfg.lr * b, p, g), l
            p, ls = jax.lax.scan(body, params, steps)
            return p, jnp.mean(ls)
        if mapping == "vmap":
            return jax.vmap(one)(xb, yb)
        return jax.lax.map(lambda a: one(*a), (xb, yb))

    def local(x, y, n, keys, mapping):
        f = lambda xx, yy, nn, kk: local_train(loss_fn, params, None, xx, yy, nn, kk, cfg)
        if mapping == "vmap":
            return jax.vmap(f)(x, y, n, keys)
        return jax.lax.map(lambda a: f(*a), (x, y, n, keys))

    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(ids),) + a.shape), params)
    w = n.astype(jnp.float32)
    pieces = {
        "gather_clients": (lambda d: ctx.gather(d, ids), (data,)),
        "batching_augment_scan_vmap": (batches_only, (x, y, n, keys)),
        "batching_augment_scan_vmap_fast": (batches_fast, (x, y, n, keys)),
        "grad_scan_fixed_batch_vmap": (lambda a, b: grads_only(a, b, "vmap"), fixed_x),
        "grad_scan_fixed_batch_map": (lambda a, b: grads_only(a, b, "map"), fixed_x),
        "local_train_vmap": (lambda *a: local(*a, "vmap"), (x, y, n, keys)),
        "local_train_map": (lambda *a: local(*a, "map"), (x, y, n, keys)),
        "aggregate_masked_mean": (lambda s, ww: masked_mean(params, s, None, ww), (stacked, w)),
    }
    out = {}
    for name, (fn, args) in pieces.items():
        comp = jax.jit(fn).lower(*args).compile()
        jax.block_until_ready(comp(*args))
        ts = [_timed(lambda: jax.block_until_ready(comp(*args))) for _ in range(repeats)]
        out[name] = statistics.median(ts)
    return out


# ---------------------------------------------------------------------------------------------
# PyTorch worker


def torch_worker(warmup: int, threads: int):
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from framp_jax.data.clients import stack_clients
    from framp_jax.data.partition import partition_vision
    from framp_jax.data.vision import get_normalization, load_vision_dataset

    torch.set_num_threads(threads)
    c = load_preset()
    t0 = time.perf_counter()
    ds = load_vision_dataset(c.dataset, c.data_dir or None)
    part = partition_vision(ds.y_train, ds.y_test, c.num_clients, c.partition, c.alpha, c.seed,
                            c.test_prior, c.classes_per_client, ds.num_classes)
    tr = stack_clients(ds.x_train, ds.y_train, part.train)
    # NCHW uint8 per client, once (framp_jax keeps NHWC uint8 on the device likewise)
    cx = torch.from_numpy(np.ascontiguousarray(tr.x.transpose(0, 1, 4, 2, 3)))
    cy = torch.from_numpy(tr.y.astype(np.int64))
    counts = [int(v) for v in tr.count]
    mean, std = get_normalization(str(c.dataset), ds.x_train.shape[-1])
    mean = torch.tensor(mean).view(1, -1, 1, 1)
    std = torch.tensor(std).view(1, -1, 1, 1)
    setup_s = time.perf_counter() - t0
    k, (h, w) = ds.num_classes, ds.x_train.shape[1:3]

    class SmallCNN(nn.Module):  # framp_jax.models.cnn.make_cnn, channels (16, 32, 64), hidden 128
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
            self.dense = nn.Linear(64 * (h // 8) * (w // 8), 128)
            self.classifier = nn.Linear(128, k)

        def forward(self, x):
            for conv in (self.conv1, self.conv2, self.conv3):
                x = F.max_pool2d(F.relu(conv(x)), 2)
            return self.classifier(F.relu(self.dense(x.flatten(1))))

    torch.manual_seed(c.seed)
    gen = torch.Generator().manual_seed(c.seed)
    global_model, local_model = SmallCNN(), SmallCNN()
    pad = 4
    ar = torch.arange(h)

    def augment(x):  # per-image random crop of the zero-padded batch + horizontal flip
        b = x.shape[0]
        xp = F.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
        rows = (off[:, 0:1] + ar)[:, None, :, None]            # [B, 1, H, 1]
        cols = (off[:, 1:2] + ar)[:, None, None, :]            # [B, 1, 1, W]
        bi = torch.arange(b)[:, None, None, None]
        ci = torch.arange(x.shape[1])[None, :, None, None]
        crop = xp[bi, ci, rows, cols]
        flip = torch.rand(b, generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], crop.flip(3), crop)

    def batches(count):  # consecutive slices of per-epoch shuffles, as a shuffling DataLoader
        perm, pos = torch.randperm(count, generator=gen), 0
        for _ in range(c.local_steps):
            idx, got = [], 0
            while got < c.batch_size:
                if pos == count:
                    perm, pos = torch.randperm(count, generator=gen), 0
                take = min(c.batch_size - got, count - pos)
                idx.append(perm[pos:pos + take])
                pos, got = pos + take, got + take
            yield torch.cat(idx) if len(idx) > 1 else idx[0]

    def do_round(t):
        ids = torch.randperm(c.num_clients, generator=gen)[:c.clients_per_round].tolist()
        gstate = {n: p.detach().clone() for n, p in global_model.state_dict().items()}
        acc = {n: torch.zeros_like(p) for n, p in gstate.items()}
        total, losses = 0.0, []
        for i in ids:
            local_model.load_state_dict(gstate)
            opt = torch.optim.SGD(local_model.parameters(), lr=c.lr, momentum=c.momentum,
                                  weight_decay=c.weight_decay)
            xi, yi, cnt = cx[i], cy[i], counts[i]
            run = 0.0
            for idx in batches(cnt):
                assert idx.shape == (c.batch_size,)
                xb = (xi[idx].float().div_(255.0) - mean) / std
                if c.augment:
                    xb = augment(xb)
                loss = F.cross_entropy(local_model(xb), yi[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                run += loss.detach()
            losses.append(float(run) / c.local_steps)
            with torch.no_grad():
                for n, p in local_model.state_dict().items():
                    acc[n].add_(p, alpha=float(cnt))
            total += cnt
        with torch.no_grad():
            global_model.load_state_dict({n: a / total for n, a in acc.items()})
        return float(np.mean(losses))

    warm = [_timed(do_round, -1 - i) for i in range(warmup)]
    info = {"variant": "torch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "data_setup_s": setup_s,
            "warmup_rounds_s": warm, "mkldnn": bool(torch.backends.mkldnn.is_available())}
    _serve(info, do_round)


# ---------------------------------------------------------------------------------------------
# parent


class Worker:
    def __init__(self, variant, args):
        kind, threads = variant, None
        if variant.startswith("torch"):
            kind, threads = "torch", args.torch_threads[0] if variant == "torch" else int(variant[6:-1])
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--warmup", str(args.warmup)]
        cmd += ["--profile"] if args.profile and variant == "jax" else []
        cmd += ["--threads", str(threads)] if threads else []
        self.variant = variant
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, cwd=ROOT)
        self.info = self._read()
        self.times, self.losses = [], []

    def _read(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                rc = self.proc.wait()
                raise RuntimeError(f"worker {self.variant} exited with code {rc} before answering")
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stdout.write(f"[{self.variant}] {line}")

    def round(self):
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        r = self._read()
        self.times.append(r["seconds"])
        self.losses.append(r["loss"])
        return r["seconds"]

    def close(self):
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)


def torch_available():
    return importlib.util.find_spec("torch") is not None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per side (default 10; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds after compile (default 2; quick 1)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--mode", choices=("alternate", "sequential"), default="alternate")
    ap.add_argument("--prototypes", action="store_true", help="also time the lax.map-over-clients round")
    ap.add_argument("--profile", action="store_true", help="time pieces of the framp_jax round")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--torch-threads", default=str(os.cpu_count()),
                    help="comma list of torch thread counts; the first is the reference 'torch' "
                         "(default: the number of cores), others run as 'torch_<n>t'")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.rounds = a.rounds or (3 if a.quick else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)

    if a.worker == "jax" or a.worker in PROTOTYPES:
        return jax_worker(a.worker, a.warmup, a.profile)
    if a.worker == "torch":
        return torch_worker(a.warmup, a.threads or os.cpu_count())

    log = lambda s: print(s, flush=True)
    facts = {"cpu_cores": os.cpu_count(), "processor": _cpu_model(), "machine": platform.machine(),
             "python": platform.python_version()}
    try:
        facts["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    variants = ["jax"] + (list(PROTOTYPES) if a.prototypes else [])
    if a.skip_torch:
        log("torch part skipped (--skip-torch)")
    elif not torch_available():
        log("torch is not installed: the PyTorch reference is skipped. It is a benchmark-only "
            "dependency: `pip install torch` (CPU build) to compare.")
    else:
        a.torch_threads = [int(v) for v in str(a.torch_threads).split(",")]
        variants += ["torch"] + [f"torch_{n}t" for n in a.torch_threads[1:]]
    log(f"preset {os.path.relpath(PRESET, ROOT)}; {a.rounds} timed rounds per side after "
        f"compile + {a.warmup} warm-up round(s); mode {a.mode}; cores {facts['cpu_cores']}; "
        f"loadavg {facts.get('loadavg_start')}")
    workers = []
    try:
        for v in variants:  # set up one at a time: compilation must not overlap the other's
            log(f"starting worker {v} ...")
            w = Worker(v, a)
            log(f"  ready: {json.dumps({k: x for k, x in w.info.items() if k != 'profile'})}")
            workers.append(w)
        if a.mode == "alternate":
            for r in range(a.rounds):
                log(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{w.variant} {w.round():.3f}s" for w in workers))
        else:
            for w in workers:
                for r in range(a.rounds):
                    log(f"  {w.variant} round {r + 1}/{a.rounds}: {w.round():.3f}s")
    finally:
        for w in workers:
            w.close()
    try:
        facts["loadavg_end"] = list(os.getloadavg())
    except OSError:
        pass

    res = {"facts": facts, "preset": os.path.relpath(PRESET, ROOT), "mode": a.mode,
           "rounds_timed": a.rounds, "warmup_rounds": a.warmup,
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "workers": {}}
    for w in workers:
        res["workers"][w.variant] = {**w.info, "times_s": w.times, "losses": w.losses,
                                     "median_s": statistics.median(w.times), "min_s": min(w.times),
                                     "mean_s": statistics.fmean(w.times)}
    W = res["workers"]
    jx = W["jax"]
    res["jax_version"] = jx["jax"]
    res["backend"] = jx["backend"]
    res["jax_s_per_round"] = jx["median_s"]
    log("\n" + "=" * 80)
    log(f"backend {jx['backend']}, jax {jx['jax']}" + (f", torch {W['torch']['torch']} "
        f"({W['torch']['threads']} threads)" if "torch" in W else "") +
        f", {facts['cpu_cores']} cores, {facts['processor']}")
    log(f"loadavg start {facts.get('loadavg_start')} end {facts.get('loadavg_end')}")
    log(f"jax first round (compile + run): {jx['first_round_s']:.2f} s")
    log(f"{'variant':<10} {'median s/round':>15} {'min':>8} {'mean':>8}  rounds")
    for k, v in W.items():
        log(f"{k:<10} {v['median_s']:>15.3f} {v['min_s']:>8.3f} {v['mean_s']:>8.3f}  {len(v['times_s'])}")
    log(f"jax_s_per_round {jx['median_s']:.3f}")
    if "torch" in W:
        res["torch_version"] = W["torch"]["torch"]
        res["torch_threads"] = W["torch"]["threads"]
        res["torch_s_per_round"] = W["torch"]["median_s"]
        res["ratio_jax_over_torch"] = jx["median_s"] / W["torch"]["median_s"]
        res["ratio_jax_over_torch_min"] = jx["min_s"] / W["torch"]["min_s"]
        log(f"torch_s_per_round {W['torch']['median_s']:.3f}")
        log(f"ratio jax/torch {res['ratio_jax_over_torch']:.2f} (medians; mins: "
            f"{res['ratio_jax_over_torch_min']:.2f})")
    else:
        res["torch_s_per_round"] = None
        res["ratio_jax_over_torch"] = None
    for k in W:
        if k.startswith("torch_"):
            res[f"ratio_jax_over_{k}"] = jx["median_s"] / W[k]["median_s"]
            log(f"ratio jax/{k} ({W[k]['threads']} threads) {res[f'ratio_jax_over_{k}']:.2f}")
    for k in PROTOTYPES:
        if k in W:
            res[f"ratio_{k}_over_jax"] = W[k]["median_s"] / jx["median_s"]
            line = f"prototype {k} / jax: {res[f'ratio_{k}_over_jax']:.2f}"
            for tk in [t for t in W if t.startswith("torch")]:
                res[f"ratio_{k}_over_{tk}"] = W[k]["median_s"] / W[tk]["median_s"]
                line += f"; / {tk}: {res[f'ratio_{k}_over_{tk}']:.2f}"
            log(line)
    if "profile" in jx:
        log("\nframp_jax round pieces (separately jitted, median s):")
        for k, v in jx["profile"].items():
            log(f"  {k:<32} {v:8.3f}")
    out = a.out or os.path.join(ROOT, "results", f"bench_round_{jx['backend']}{'_quick' if a.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    log(f"\nwrote {out}")
    return res


if __name__ == "__main__":
    main()
