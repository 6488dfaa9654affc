"""Options that reproduce the official codes: FedProto's prototype timing
(``framp.proto_timing``), FedRolex's ``weighting="width"`` and pFedHN's hypernetwork and HN
optimizer (``framp.hypernet="pfedhn"``, ``framp.hn_optimizer="sgd_momentum"``, ``embed_lr``).
Each is checked against a hand computation in numpy."""
from __future__ import annotations

import math

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import masks as M
from framp_jax import simulate
from framp_jax import width as W
from framp_jax.client import LocalConfig, local_train
from framp_jax.config import ConfigError, validate
from framp_jax.data.graph_modality import GraphModality
from framp_jax.data.image_modality import ImageModality
from framp_jax.problem import build_algorithm, build_problem
from framp_jax.losses import cross_entropy


def _framp_config(tiny_config, framp=None, **top):
    c = tiny_config(method="framp", **top)
    c.framp.chunk_size, c.framp.hn_hidden, c.framp.gen_hidden, c.framp.chunk_dim = 2048, 16, 32, 8
    for k, v in (framp or {}).items():
        c.framp[k] = v
    return c


def _quiet_run(c, path):
    return simulate.run(c, str(path), progress=False, log=lambda *_: None)


# =============================================================================================
# 1. FedProto's prototype timing: train-mode features of the last local epoch

def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _linear_loss(p, x, y, rng):
    """features f = x A, logits = f W + b; mean CE over labels >= 0."""
    del rng
    f = x @ p["A"]
    return cross_entropy(f @ p["W"] + p["b"], y), f


def _np_sgd_step(p, x, y, lr):
    """One SGD step of _linear_loss by hand (CE gradient of a linear softmax model)."""
    f = x @ p["A"]
    prob = _np_softmax(f @ p["W"] + p["b"])
    valid = (y >= 0).astype(np.float64)
    onehot = np.eye(p["W"].shape[1])[np.maximum(y, 0)]
    dz = (prob - onehot) * valid[:, None] / max(valid.sum(), 1.0)
    dW, db = f.T @ dz, dz.sum(0)
    dA = x.T @ (dz @ p["W"].T)
    return {"A": p["A"] - lr * dA, "W": p["W"] - lr * dW, "b": p["b"] - lr * db}, f


def _linear_params(rng, d=3, f=2, k=3):
    return {"A": rng.normal(size=(d, f)), "W": rng.normal(size=(f, k)), "b": rng.normal(size=k)}


@pytest.mark.parametrize("steps", [6, 5, 2])
def test_last_epoch_train_features_by_hand(steps):
    """6 valid samples (2 padding rows that must never be drawn), batch 2: an epoch is 3 steps.
    The prototypes are the per-class means of the features each of the last min(steps, 3)
    steps computed before its update; steps=6 is exactly the second data epoch (each sample
    once), steps=5 straddles two shuffles, steps=2 is shorter than an epoch (all steps)."""
    rng = np.random.default_rng(0)
    count, batch, lr, k = 6, 2, 0.5, 3
    x = rng.integers(0, 256, size=(8, 3)).astype(np.uint8)
    x[6:] = 255  # padding rows
    y = np.array([0, 1, 2, 0, 1, 1, 2, 2], np.int32)
    cfg = LocalConfig(steps=steps, batch_size=batch, lr=lr,
                      modality=ImageModality(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                                             augment=False))
    p0 = _linear_params(rng)
    key = jax.random.key(3)
    params, _, (sums, counts) = local_train(
        _linear_loss, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0), None,
        jnp.asarray(x), jnp.asarray(y), jnp.int32(count), key, cfg, proto_classes=k)
    # hand replay: the same batches (the sampler is not under test), numpy float64 maths
    kdata = jax.random.fold_in(key, 0)
    e = min(steps, math.ceil(count / batch))
    p, want_s, want_c, seen = p0, np.zeros((k, 2)), np.zeros(k), []
    for s in range(steps):
        xb, yb = cfg.modality.train_batch(kdata, jnp.asarray(x), jnp.asarray(y),
                                          jnp.int32(count), s, cfg)
        xb, yb = np.asarray(xb, np.float64), np.asarray(yb)
        assert not np.any(np.all(xb == 1.0, axis=1))  # no padding row was drawn
        p, f = _np_sgd_step(p, xb, yb, lr)
        if s >= steps - e:
            want_s += np.eye(k)[yb].T @ f
            want_c += np.eye(k)[yb].sum(0)
            seen.append(yb)
    np.testing.assert_allclose(np.asarray(counts), want_c)
    np.testing.assert_allclose(np.asarray(sums), want_s, rtol=1e-5, atol=1e-5)
    for name in p:
        np.testing.assert_allclose(np.asarray(params[name]), p[name], rtol=1e-5, atol=1e-5)
    if steps == 6:  # a whole data epoch: every valid sample exactly once
        np.testing.assert_array_equal(want_c, [2, 3, 1])


def test_last_epoch_train_full_batch_graph_ignores_unlabelled_nodes():
    """Full-batch (graph) clients: each step is an epoch, so only the last step's features
    count; labels < 0 (non-train and padding nodes) are left out."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = np.array([0, -1, 1, 1, -1], np.int32)
    cfg = LocalConfig(steps=3, lr=0.3, modality=GraphModality(3))
    p0 = _linear_params(rng)
    _, _, (sums, counts) = local_train(
        _linear_loss, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p0), None,
        jnp.asarray(x), jnp.asarray(y), jnp.int32(3), jax.random.key(0), cfg, proto_classes=3)
    p = p0
    for _ in range(2):
        p, _ = _np_sgd_step(p, x.astype(np.float64), y, 0.3)
    f = x.astype(np.float64) @ p["A"]  # the third (last) step's forward, before its update
    np.testing.assert_allclose(np.asarray(counts), [1, 2, 0])
    np.testing.assert_allclose(np.asarray(sums), [f[0], f[2] + f[3], [0, 0]], rtol=1e-5,
                               atol=1e-6)


def _train_shifted(model):
    """The model with features + 1 in training mode (a visible train/eval difference)."""
    def apply(params, x, *, train=False, rng=None):
        logits, f = model.apply(params, x, train=train, rng=rng)
        return logits, f + (1.0 if train else 0.0)
    return model._replace(apply=apply)


def test_framp_last_epoch_prototypes_match_a_python_replay(tiny_config):
    """FRAMP's client with proto_timing="last_epoch_train": its prototypes are the class means
    of the training-mode features of the last epoch's steps (ceil(n_i / batch) = 5 of 8),
    reproduced by a plain Python loop of masked SGD steps; the round's bank with
    proto_weighting="uniform" is the unweighted mean over the clients holding each class."""
    c = _framp_config(tiny_config, {"proto_timing": "last_epoch_train",
                                    "proto_weighting": "uniform"}, local_steps=8)
    prob = build_problem(c, verbose=False)
    ctx = prob.ctx._replace(model=_train_shifted(prob.model))
    alg = build_algorithm(ctx, c)
    st = alg.init(jax.random.key(0), prob.data)
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    parts = build(ctx, resolve(c)[1])
    ids = ctx.sample_clients(0)
    theta = parts.generate(st["phi"], st["desc"][ids], None, ids)
    x, y, n = ctx.gather(prob.data, ids)
    keys = ctx.client_keys(0, ids)
    budgets = prob.data.budgets[ids]
    cfg = ctx.local
    loss_fn = parts.make_loss(st["protos"], st["proto_valid"])
    grad = jax.jit(jax.grad(loss_fn))
    feats = jax.jit(lambda p, xb: ctx.model.apply(p, xb, train=True)[1])
    client = jax.jit(parts.client_topk)
    pros, cnts = [], []
    for i in range(len(ids)):
        th = jax.tree.map(lambda a: a[i], theta)
        _, _, pro, cnt, _, _ = client(th, budgets[i], x[i], y[i], n[i], keys[i], st["protos"],
                                      st["proto_valid"])
        m = M.topk_mask(th, parts.prunable, budgets[i])
        p = M.apply_mask(th, m)
        kdata, kloss = jax.random.fold_in(keys[i], 0), jax.random.fold_in(keys[i], 1)
        e = min(cfg.steps, -(-int(n[i]) // cfg.batch_size))
        sums, cts = np.zeros((ctx.num_classes, ctx.model.feature_dim)), np.zeros(ctx.num_classes)
        for s in range(cfg.steps):
            xb, yb = cfg.modality.train_batch(kdata, x[i], y[i], n[i], s, cfg)
            if s >= cfg.steps - e:
                oh = np.eye(ctx.num_classes)[np.asarray(yb)]
                sums += oh.T @ np.asarray(feats(p, xb), np.float64)
                cts += oh.sum(0)
            g = grad(p, xb, yb, jax.random.fold_in(kloss, s))
            p = jax.tree.map(lambda a, gg, mm: a - cfg.lr * gg * mm, p, g, m)
        assert e < cfg.steps and cts.sum() == e * cfg.batch_size
        np.testing.assert_allclose(np.asarray(cnt), cts)
        np.testing.assert_allclose(np.asarray(pro), sums / np.maximum(cts, 1)[:, None],
                                   rtol=2e-4, atol=2e-5)
        pros.append(np.asarray(pro))
        cnts.append(np.asarray(cnt))
    # the default (SPEC §1.6, eval-mode pass) differs: no +1 shift, other parameters
    c2 = _framp_config(tiny_config, local_steps=8)
    alg2 = build_algorithm(prob.ctx._replace(model=_train_shifted(prob.model)), c2)
    th0 = jax.tree.map(lambda a: a[0], theta)
    post = jax.jit(build(ctx, resolve(c2)[1]).client_topk)(th0, budgets[0], x[0], y[0], n[0],
                                                           keys[0], st["protos"],
                                                           st["proto_valid"])[2]
    assert float(np.abs(np.asarray(post) - pros[0]).max()) > 0.5
    # uniform weighting of the uploaded prototypes in the round's bank
    new, _ = jax.jit(alg.round)(st, prob.data, jnp.int32(0))
    have = np.stack(cnts) > 0
    want = (np.stack(pros) * have[..., None]).sum(0) / np.maximum(have.sum(0), 1)[:, None]
    np.testing.assert_allclose(np.asarray(new["protos"])[have.any(0)], want[have.any(0)],
                               rtol=2e-4, atol=2e-5)


@pytest.mark.slow  # ~45 s; the top-k path's run and the hand computations stay in the default suite
def test_width_extraction_with_last_epoch_prototypes_compiles_once(tiny_config, tmp_path):
    c = _framp_config(tiny_config, {"extraction": "width", "proto_timing": "last_epoch_train"},
                      rounds=2, eval_every=2)
    res = _quiet_run(c, tmp_path / "w")
    assert res["compiles"] == 1 and 0.0 <= res["final"]["local"]["mean"] <= 1.0


def test_proto_timing_is_validated(tiny_config):
    c = _framp_config(tiny_config, {"proto_timing": "during"})
    with pytest.raises(ConfigError, match="proto_timing") as e:
        validate(c)
    assert e.value.field == "framp.proto_timing" and "last_epoch_train" in str(e.value)
    c = _framp_config(tiny_config, {"proto_timing": "last_epoch_train", "proto_samples": 10})
    with pytest.raises(ConfigError, match="proto_samples"):
        validate(c)


# =============================================================================================
# 2. FedRolex weighting="width"

def test_fedrolex_width_weighting_by_hand():
    """Three clients at widths 1, 1/2, 1/4 of the small CNN (prefix windows). Every hidden
    kernel entry = Σ_i k_i θ_i / Σ_i k_i over its holders, k_i = ceil(r_i · O) of that kernel;
    biases and the output layer (label-wise rows) are the plain mean over their holders."""
    from framp_jax.algorithms.heterofl import Part, combine, combine_official_counts
    from framp_jax.models.cnn import make_cnn
    rng = np.random.default_rng(0)
    g = make_cnn(4, (8, 8, 3)).init(jax.random.key(0))  # 8x8 images: dense input = 64 channels
    from framp_jax.models.cnn import cnn_spec
    spec = cnn_spec()
    sizes = W.unit_sizes(g, spec)
    rates = (1.0, 0.5, 0.25)
    lmasks = np.array([[1, 1, 1, 1], [1, 0, 1, 0], [0, 1, 1, 0]], np.float32)
    parts, narrow = [], []
    for r, lm in zip(rates, lmasks):
        idx = W.prefix_indices(sizes, r)
        sub = W.gather(g, spec, idx)
        for a, b in zip(jax.tree.leaves(sub), jax.tree.leaves(g)):  # a prefix of every axis
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[tuple(slice(0, s) for s in a.shape)])
        sub = jax.tree.map(lambda a: a + jnp.asarray(rng.normal(size=a.shape), jnp.float32), sub)
        narrow.append(sub)
        parts.append(Part(jax.tree.map(lambda a: a[None], sub), idx, jnp.ones((1,)),
                          jnp.asarray(lm[None])))
    out = combine(g, spec, parts, True, "width")

    def expect(path, glob, *subs):
        name = tuple(getattr(k, "key", k) for k in path)
        glob = np.asarray(glob, np.float64)
        num, den = np.zeros_like(glob), np.zeros_like(glob)
        for sub, lm in zip(subs, lmasks):
            sub = np.asarray(sub, np.float64)
            w = np.ones(sub.shape)
            if name[0] == "classifier":
                w = w * (lm if name[1] == "bias" else lm[None, :])
            elif sub.ndim >= 2:
                w = w * sub.shape[-1]  # ceil(rate · O)
            sl = tuple(slice(0, s) for s in sub.shape)
            num[sl] += w * sub
            den[sl] += w
        return np.where(den > 0, num / np.where(den > 0, den, 1), glob)

    want = jax.tree_util.tree_map_with_path(expect, g, *narrow)
    err = max(float(np.abs(np.asarray(a) - b).max())
              for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(want)))
    assert err < 1e-5
    # the weights matter: conv1's first 4 output channels (held by all three) differ from avg
    avg = combine(g, spec, parts, True, "avg")
    assert float(jnp.abs(avg["conv1"]["kernel"][..., :4] - out["conv1"]["kernel"][..., :4]).max()) > 1e-3
    np.testing.assert_array_equal(np.asarray(avg["conv1"]["bias"]), np.asarray(out["conv1"]["bias"]))
    # with the official count aliasing, kernels are width-weighted and counted leaves unchanged
    tmp = jax.tree.map(jnp.ones_like, g)
    bug_w, _ = combine_official_counts(g, spec, parts, tmp, True, "width")
    bug_a, _ = combine_official_counts(g, spec, parts, tmp, True, "avg")
    np.testing.assert_allclose(np.asarray(bug_w["dense"]["kernel"]), np.asarray(out["dense"]["kernel"]),
                               atol=1e-6)
    np.testing.assert_array_equal(np.asarray(bug_w["classifier"]["kernel"]),
                                  np.asarray(bug_a["classifier"]["kernel"]))


def test_fedrolex_weighting_is_validated_before_data_loads(tiny_config, tmp_path):
    bad = tmp_path / "not_an_archive.npz"
    bad.write_bytes(b"loading this would fail")
    c = tiny_config(method="fedrolex", dataset=f"npz:{bad}")
    c.fedrolex = ml_collections.ConfigDict({"weighting": "size"})
    with pytest.raises(ConfigError) as e:
        validate(c)
    assert e.value.field == "fedrolex.weighting" and "'size'" in str(e.value)
    assert "avg" in str(e.value) and "width" in str(e.value)
    with pytest.raises(ConfigError):
        build_problem(c, verbose=False)


@pytest.mark.slow  # ~60 s; the weighting itself is checked by hand in the default suite
def test_fedrolex_width_weighting_compiles_once(tiny_config, tmp_path):
    from framp_jax.algorithms.fedrolex import fedrolex_defaults
    c = tiny_config(method="fedrolex", rounds=2, eval_every=2)
    c.fedrolex = fedrolex_defaults()
    c.fedrolex.weighting = "width"
    res = _quiet_run(c, tmp_path / "r")
    assert res["compiles"] == 1 and 0.0 <= res["final"]["local"]["mean"] <= 1.0


# =============================================================================================
# 3. pFedHN: its HN optimizer and its hypernetwork

def _np_torch_sgd(params, grads, lr, embed_lr, momentum, wd, clip):
    """torch: clip_grad_norm_(clip) (coef = clip / (norm + 1e-6), at most 1), then SGD with
    param groups: d = g + wd·p; buf = d (first step) or momentum·buf + d; p -= lr_group·buf."""
    p = {k: v.astype(np.float64).copy() for k, v in params.items()}
    buf = {}
    for g in grads:
        norm = math.sqrt(sum(float(np.sum(np.square(v))) for v in g.values()))
        coef = min(1.0, clip / (norm + 1e-6))
        for k in p:
            d = g[k] * coef + wd * p[k]
            buf[k] = d if k not in buf else momentum * buf[k] + d
            p[k] = p[k] - (embed_lr if k == "client_embed" else lr) * buf[k]
    return p


def test_sgd_momentum_hn_optimizer_by_hand():
    """Two steps of hn_optimizer("sgd_momentum"): the first gradient is clipped (norm > 5),
    weight decay reaches every parameter (also the embedding rows with zero gradient),
    momentum carries over, the embedding rows step with embed_lr."""
    import optax

    from framp_jax.hypernet import hn_optimizer
    rng = np.random.default_rng(0)
    params = {"client_embed": rng.normal(size=(3, 2)), "w": rng.normal(size=(2, 2))}
    g1 = {"client_embed": np.array([[4.0, -3.0], [0, 0], [0, 0]]), "w": rng.normal(size=(2, 2)) * 3}
    g2 = {"client_embed": np.array([[0, 0], [0.2, 0.1], [0, 0]]), "w": rng.normal(size=(2, 2)) * 0.1}
    opt = hn_optimizer("sgd_momentum", 0.1, 5.0, momentum=0.9, weight_decay=0.05, embed_lr=0.7)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = opt.init(p)
    for g in (g1, g2):
        upd, state = opt.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, upd)
    want = _np_torch_sgd(params, [g1, g2], 0.1, 0.7, 0.9, 0.05, 5.0)
    err = max(float(np.abs(np.asarray(p[k]) - want[k]).max()) for k in want)
    assert err < 1e-5
    assert math.sqrt(sum(np.sum(v ** 2) for v in g1.values())) > 5.0
    # the untouched embedding row 2 still moved (weight decay), by the embed learning rate
    row = params["client_embed"][2]
    np.testing.assert_allclose(np.asarray(p["client_embed"][2]),
                               row - 0.7 * 0.05 * row - 0.7 * (0.9 * 0.05 * row + 0.05 * (row - 0.7 * 0.05 * row)),
                               rtol=1e-5)


def test_sgd_momentum_hn_optimizer_matches_torch():
    """Three steps of hn_optimizer("sgd_momentum") against torch.optim.SGD (two param groups,
    clip_grad_norm_ first; the first gradient is clipped): against live torch where it is
    installed, and always against its recording (tests/fixtures/torch_reference.npz, written
    by tests/fixtures/make_torch_fixtures.py), so the comparison runs without torch too."""
    import importlib.util
    import os
    import sys

    import optax

    from framp_jax.hypernet import hn_optimizer
    fixtures = os.path.join(os.path.dirname(__file__), "fixtures")
    with np.load(os.path.join(fixtures, "torch_reference.npz")) as f:
        keys = ("client_embed", "w")
        params = {k: f[f"sgd/params/{k}"] for k in keys}
        grads = [{k: f[f"sgd/grad{i}/{k}"] for k in keys} for i in range(3)]
        refs = {"recorded": {k: f[f"sgd/want/{k}"] for k in keys}}
    assert math.sqrt(sum(np.sum(v ** 2) for v in grads[0].values())) > 50.0  # clipped
    if importlib.util.find_spec("torch") is not None:
        sys.path.insert(0, fixtures)
        import torch_models
        refs["live torch"] = torch_models.sgd_momentum_reference(
            params, grads, lr=0.01, embed_lr=0.3, momentum=0.9, weight_decay=1e-3, clip=50.0)
    opt = hn_optimizer("sgd_momentum", 0.01, 50.0, momentum=0.9, weight_decay=1e-3, embed_lr=0.3)
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    state = opt.init(p)
    for g in grads:
        upd, state = opt.update({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, p)
        p = optax.apply_updates(p, upd)
    for what, want in refs.items():
        for k in want:
            np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{k} vs {what}")
    # the embedding rows moved by embed_lr: with the main lr they would be elsewhere
    assert np.abs(refs["recorded"]["client_embed"] - params["client_embed"]).max() > 1e-2


def test_default_hn_optimizers_unchanged():
    """adam/sgd without embed_lr are the previous chain(clip, adam | sgd)."""
    import optax

    from framp_jax.hypernet import hn_optimizer
    p = {"a": jnp.arange(4.0), "client_embed": jnp.ones((2, 2))}
    g = {"a": jnp.array([3.0, -1.0, 0.5, 2.0]), "client_embed": jnp.full((2, 2), 0.3)}
    for kind, ref in (("adam", optax.adam(1e-3)), ("sgd", optax.sgd(1e-3))):
        a, b = hn_optimizer(kind, 1e-3, 2.0), optax.chain(optax.clip_by_global_norm(2.0), ref)
        ua, _ = a.update(g, a.init(p), p)
        ub, _ = b.update(g, b.init(p), p)
        for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pfedhn_hypernet_by_hand():
    """embedding row → Linear → [ReLU → Linear] × 2 → one linear head per generated leaf;
    a client outside seen_ids uses the mean of the seen rows; ungenerated leaves are zeros."""
    from framp_jax.hypernet import pfedhn_hypernet, pfedhn_num_params
    template = {"lin": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros((2,))},
                "norm": {"scale": jnp.zeros((2,))},
                "classifier": {"kernel": jnp.zeros((2, 4)), "bias": jnp.zeros((4,))}}
    generated = {"lin": {"kernel": True, "bias": True}, "norm": {"scale": True},
                 "classifier": {"kernel": False, "bias": False}}
    hn = pfedhn_hypernet(template, generated, num_clients=4, seen_ids=[0, 1, 2], embed_dim=3,
                         hidden=5, layers=2)
    phi = hn.init(jax.random.key(0), None)
    n_phi = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(phi))
    assert n_phi == pfedhn_num_params(template, generated, num_clients=4, embed_dim=3, hidden=5,
                                      layers=2) == 4 * 3 + 4 * 5 + 2 * 6 * 5 + 6 * (6 + 2 + 2)
    bound = 1 / math.sqrt(5)
    b_scale = np.asarray(phi["heads"]["norm"]["scale"]["b"])
    assert np.all(np.abs(b_scale - 1.0) <= bound)  # norm scales start around 1
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), phi)

    def by_hand(cid):
        emb = P["client_embed"]
        e = emb[cid] if cid < 3 else emb[:3].mean(0)
        h = e @ P["trunk"][0]["w"] + P["trunk"][0]["b"]
        for lyr in P["trunk"][1:]:
            h = np.maximum(h, 0) @ lyr["w"] + lyr["b"]
        hd = P["heads"]
        return {"kernel": (h @ hd["lin"]["kernel"]["w"] + hd["lin"]["kernel"]["b"]).reshape(3, 2),
                "bias": h @ hd["lin"]["bias"]["w"] + hd["lin"]["bias"]["b"],
                "scale": h @ hd["norm"]["scale"]["w"] + hd["norm"]["scale"]["b"]}

    desc = jnp.zeros((4, 7))  # unused by this HN
    out = jax.jit(jax.vmap(hn.apply, (None, 0, 0)))(phi, desc, jnp.arange(4))
    assert out["lin"]["kernel"].shape == (4, 3, 2) and out["classifier"]["kernel"].shape == (4, 2, 4)
    err = 0.0
    for cid in range(4):
        want = by_hand(cid)
        for got, w in ((out["lin"]["kernel"][cid], want["kernel"]), (out["lin"]["bias"][cid], want["bias"]),
                       (out["norm"]["scale"][cid], want["scale"])):
            err = max(err, float(np.abs(np.asarray(got) - w).max()))
    assert err < 1e-5
    assert not np.any(np.asarray(out["classifier"]["kernel"]))
    assert float(jnp.abs(out["lin"]["kernel"][0] - out["lin"]["kernel"][1]).max()) > 1e-3
    with pytest.raises(ValueError, match="client id"):
        hn.apply(phi, desc[0])


def test_pfedhn_refuses_large_targets_before_data_loads(tiny_config):
    c = tiny_config(method="framp", model="resnet18", dataset="cifar10")
    c.framp.hypernet = "pfedhn"
    with pytest.raises(ConfigError, match="parameters") as e:
        validate(c)
    assert e.value.field == "framp.hypernet" and "'pfedhn'" in str(e.value)
    c = tiny_config(method="framp", model="gcn", dataset="coauthor_cs")
    c.framp.hypernet = "pfedhn"
    with pytest.raises(ConfigError, match="chunked"):
        validate(c)
    for model, ds in (("cnn", "cifar10"), ("gcn", "cora")):
        c = tiny_config(method="framp", model=model, dataset=ds)
        c.framp.hypernet = "pfedhn"
        validate(c)
    c = _framp_config(tiny_config, {"embed_lr": 0.1})  # no embedding rows in the chunked HN
    with pytest.raises(ConfigError, match="embed_lr"):
        validate(c)
    c = _framp_config(tiny_config, {"hn_optimizer": "rmsprop"})
    with pytest.raises(ConfigError, match="sgd_momentum"):
        validate(c)


def test_pfedhn_round_updates_the_sampled_embedding_rows(tiny_config):
    """With plain SGD the HN step touches only the embedding rows of the round's clients; a
    held-out client is generated from the mean of the trainable clients' rows."""
    c = _framp_config(tiny_config, {"hypernet": "pfedhn", "hn_optimizer": "sgd", "hn_lr": 0.1,
                                    "embed_lr": 0.5}, heldout_frac=0.5,
                       clients_per_round=2)
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    st = alg.init(jax.random.key(0), prob.data)
    new, m = jax.jit(alg.round)(st, prob.data, jnp.int32(0))
    assert np.isfinite(float(m["train_loss"]))
    moved = np.flatnonzero(np.any(np.asarray(new["phi"]["client_embed"]
                                             != st["phi"]["client_embed"]), axis=1))
    assert moved.tolist() == sorted(np.asarray(prob.ctx.sample_clients(0)).tolist())
    held = np.asarray(prob.info["heldout_ids"])
    assert len(held) >= 2
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    gen = build(prob.ctx, resolve(c)[1]).generate
    th = gen(st["phi"], st["desc"][held[:2]], None, jnp.asarray(held[:2]))
    for a in jax.tree.leaves(th):
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(a[1]))
    seen = np.asarray(prob.ctx.train_ids)
    phi_mean = dict(st["phi"], client_embed=st["phi"]["client_embed"].at[seen[0]].set(
        st["phi"]["client_embed"][seen].mean(0)))
    ref = gen(phi_mean, st["desc"][seen[:1]], None, jnp.asarray(seen[:1]))
    for a, b in zip(jax.tree.leaves(th), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=1e-5, atol=1e-6)


def test_pfedhn_framp_run_compiles_once(tiny_config, tmp_path):
    c = _framp_config(tiny_config, {"hypernet": "pfedhn", "hn_optimizer": "sgd_momentum",
                                    "hn_lr": 1e-2, "embed_lr": 5e-2,
                                    "proto_timing": "last_epoch_train"})
    res = _quiet_run(c, tmp_path / "p")
    assert res["compiles"] == 1 and res["rounds"] == 3
    assert 0.0 <= res["final"]["local"]["mean"] <= 1.0
