"""FRAMP: hypernetwork, submodels, alignment, prototypes, HN update, robustness, determinism."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import masks as M
from framp_jax import simulate
from framp_jax.algorithms.framp import aggregate_prototypes
from framp_jax.client import local_train
from framp_jax.config import ConfigError, base_config, validate
from framp_jax.hypernet import chunked_hypernet
from framp_jax.losses import proto_align_batch, proto_align_fedproto
from framp_jax.models.cnn import make_cnn
from framp_jax.problem import build_algorithm, build_problem


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """4 learnable classes of 8x8 RGB images (class = dominant colour channel pattern)."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.integers(0, 90, (n, 8, 8, 3))
        for k in range(4):
            x[y == k, :, :, k % 3] += 120 + 40 * (k // 3)
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)
    xtr, ytr = make(480)
    xte, yte = make(160)
    p = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(p, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return str(p)


def tiny_config(path, **kw):
    c = base_config()
    c.method = "framp"
    c.dataset = f"npz:{path}"
    c.num_clients, c.clients_per_round, c.rounds = 8, 4, 3
    c.local_steps, c.batch_size, c.lr = 3, 10, 0.05
    c.eval_every, c.checkpoint_every = 3, 3
    c.framp.chunk_size = 2048
    c.framp.hn_hidden, c.framp.gen_hidden, c.framp.chunk_dim = 16, 32, 8
    for k, v in kw.items():
        node, *rest = k.split("__")
        if rest:
            c[node][rest[0]] = v
        else:
            c[k] = v
    return c


def _setup(c):
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    return prob, alg, alg.init(jax.random.key(c.seed), prob.data)


def test_hypernet_generates_template_at_init_scale():
    model = make_cnn(10, (32, 32, 3))
    tpl = model.init(jax.random.key(0))
    hn = chunked_hypernet(tpl, chunk_size=4096, hidden=32, gen_hidden=64, chunk_dim=8)
    desc = jax.random.uniform(jax.random.key(1), (6, 11))
    phi = hn.init(jax.random.key(2), desc)
    th = jax.vmap(hn.apply, (None, 0))(phi, desc)
    assert jax.tree.structure(th) == jax.tree.structure(jax.tree.map(lambda a: a[None], tpl))
    # standard He scale at step 0: theta = b * u with u ~ N(0, 1) on the init descriptors, so
    # every kernel's RMS is sqrt(2 / fan_in) within a few % (measured 0.98-1.01; a factor
    # sqrt(2) either way is far outside); hypernet.entry_scales is checked by hand in
    # tests/test_reported_numbers.py
    for name, fan_in in (("conv1", 3 * 3 * 3), ("conv2", 3 * 3 * 16), ("conv3", 3 * 3 * 32),
                         ("dense", 1024), ("classifier", 128)):
        rms = float(jnp.sqrt(jnp.mean(jnp.square(th[name]["kernel"]))))
        assert 0.9 < rms / np.sqrt(2.0 / fan_in) < 1.1, name
    assert float(jnp.std(th["dense"]["bias"])) < 0.05
    # different descriptors give different models
    assert float(jnp.abs(th["conv1"]["kernel"][0] - th["conv1"]["kernel"][1]).max()) > 1e-3


def test_quarter_budget_keeps_quarter_of_generated_prunable_entries():
    model = make_cnn(10, (32, 32, 3))
    tpl = model.init(jax.random.key(0))
    pr = model.prunable(tpl)
    hn = chunked_hypernet(tpl, chunk_size=4096, hidden=16, gen_hidden=32, chunk_dim=8)
    desc = jnp.ones((1, 5))
    th = hn.apply(hn.init(jax.random.key(1), desc), desc[0])
    P = M.num_prunable(th, pr)
    for b in (0.25, 1 / 16, 1 / 64):
        m = M.topk_mask(th, pr, b)
        kept = sum(int(x.sum()) for x, f in zip(jax.tree.leaves(m), jax.tree.leaves(pr)) if f)
        assert kept == int(np.floor(b * P))  # continuous values: no ties
        # non-prunable (hidden biases) always kept
        assert all(bool(jnp.all(x == 1)) for x, f in zip(jax.tree.leaves(m), jax.tree.leaves(pr)) if not f)


def test_pruned_entries_stay_zero_after_local_training(tiny_npz):
    c = tiny_config(tiny_npz)
    prob, alg, st = _setup(c)
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    parts = build(prob.ctx, resolve(c)[1])
    ids = jnp.array([0, 5])
    th = parts.generate(st["phi"], st["desc"][ids])
    x, y, n = prob.ctx.gather(prob.data, ids)
    keys = prob.ctx.client_keys(0, ids)
    budgets = jnp.array([0.25, 1 / 16])
    delta, theta, pro, cnt, loss, kept = jax.vmap(
        parts.client_topk, in_axes=(0, 0, 0, 0, 0, 0, None, None))(
        th, budgets, x, y, n, keys, st["protos"], st["proto_valid"])
    for i in range(2):
        thi = jax.tree.map(lambda a: a[i], th)
        m = M.topk_mask(thi, parts.prunable, budgets[i])
        for mm, tt, dd in zip(jax.tree.leaves(m), jax.tree.leaves(jax.tree.map(lambda a: a[i], theta)),
                              jax.tree.leaves(jax.tree.map(lambda a: a[i], delta))):
            assert bool(jnp.all(jnp.where(mm == 0, tt, 0.0) == 0.0))
            assert bool(jnp.all(jnp.where(mm == 0, dd, 0.0) == 0.0))
        # training moved the kept entries
        assert float(sum(jnp.abs(d[i]).sum() for d in jax.tree.leaves(delta))) > 0


def test_alignment_losses_match_hand_computation():
    f = jnp.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    y = jnp.array([0, 1, 2])
    protos = jnp.array([[0.0, 2.0], [1.0, 1.0], [5.0, 5.0]])
    valid = jnp.array([True, True, False])
    # fedproto: (|(1,0)|^2 + |(2,-1)|^2 + 0 [class 2 has no prototype]) / (3 * 2)
    assert np.isclose(float(proto_align_fedproto(f, y, protos, valid)), (1 + 5) / 6)
    # batch prototypes: classes 0 and 1 present with prototypes; (1 + 5) / (2 * 2)
    assert np.isclose(float(proto_align_batch(f, y, protos, valid)), (1 + 5) / 4)
    y2 = jnp.array([0, 0, 1])  # class 0 mean (2, 1): |(2,-1)|^2 = 5; class 1 (0,1)-(1,1): 1
    assert np.isclose(float(proto_align_batch(f, y2, protos, valid)), (5 + 1) / 4)
    assert float(proto_align_fedproto(f, y, protos, jnp.zeros(3, bool))) == 0.0


def test_prototype_aggregation_weights_by_counts_and_keeps_bank():
    protos = jnp.array([[[1.0], [10.0], [0.0]], [[4.0], [0.0], [0.0]]])  # [M=2, K=3, F=1]
    counts = jnp.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    bank = jnp.array([[9.0], [9.0], [7.0]])
    new, valid = aggregate_prototypes(protos, counts, jnp.array([True, True]), bank,
                                      jnp.array([True, True, True]))
    np.testing.assert_allclose(np.asarray(new)[:, 0], [(1 * 1 + 3 * 4) / 4, 10.0, 7.0])
    assert np.asarray(valid).tolist() == [True, True, True]
    uni, _ = aggregate_prototypes(protos, counts, jnp.array([True, True]), bank,
                                  jnp.zeros(3, bool), weighting="uniform")
    np.testing.assert_allclose(np.asarray(uni)[:, 0], [2.5, 10.0, 7.0])
    # a dropped client contributes nothing
    drop, _ = aggregate_prototypes(protos, counts, jnp.array([True, False]), bank, jnp.zeros(3, bool))
    np.testing.assert_allclose(np.asarray(drop)[:, 0], [1.0, 10.0, 7.0])
    nob, v2 = aggregate_prototypes(protos, counts, jnp.array([True, True]), bank,
                                   jnp.zeros(3, bool), keep=False)
    assert np.asarray(v2).tolist() == [True, True, False] and float(nob[2, 0]) == 0.0


def test_prototype_aggregation_per_feature_channel():
    """Width extraction: each (class, channel) is averaged over the clients holding the channel."""
    protos = jnp.array([[[1.0, 2.0]], [[3.0, 0.0]]])  # M=2, K=1, F=2
    counts = jnp.array([[1.0], [1.0]])
    dm = jnp.array([[1.0, 1.0], [1.0, 0.0]])         # client 1 lacks channel 1
    new, _ = aggregate_prototypes(protos, counts, jnp.array([True, True]), jnp.full((1, 2), 9.0),
                                  jnp.zeros(1, bool), dim_mask=dm)
    np.testing.assert_allclose(np.asarray(new), [[2.0, 2.0]])
    only1, _ = aggregate_prototypes(protos, counts, jnp.array([False, True]), jnp.full((1, 2), 9.0),
                                    jnp.zeros(1, bool), dim_mask=dm)
    np.testing.assert_allclose(np.asarray(only1), [[3.0, 9.0]])  # unheld channel keeps the bank


def test_width_extraction_trains_narrow_models(tiny_npz):
    from framp_jax import width as W
    c = tiny_config(tiny_npz, framp__extraction="width")
    prob, alg, st = _setup(c)
    wx_fracs = {}
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    parts = build(prob.ctx, resolve(c)[1])
    tpl = parts.template
    pr = parts.prunable
    th = parts.generate(st["phi"], st["desc"][:1])
    th0 = jax.tree.map(lambda a: a[0], th)
    from framp_jax.algorithms.framp_width import WidthExtraction
    wx = WidthExtraction(prob.ctx, c.framp.width_rates, tpl, pr)
    for b, r in wx.rates.items():
        nar = wx.narrow(th0, r)
        # genuinely narrower: conv2 kernel is [3,3,ceil(r*16)... ] of the largest-norm channels
        k2 = th0["conv2"]["kernel"]
        norms = jnp.sqrt(jnp.sum(jnp.square(k2), axis=(0, 1, 2)))
        keep = np.sort(np.argsort(-np.asarray(norms), kind="stable")[:W.width_of(k2.shape[-1], r)])
        assert nar["conv2"]["kernel"].shape[-1] == len(keep)
        np.testing.assert_array_equal(np.asarray(wx.indices(th0, r)["conv2"]), keep)
        wx_fracs[b] = wx.fractions[b]
    # parameter fraction falls roughly with rate^2 (the image-input and class axes are not cut)
    assert wx_fracs[1.0] == 1.0 and wx_fracs[0.25] < 0.35 and wx_fracs[1 / 64] < 0.05
    new, m = jax.jit(alg.round)(st, prob.data, jnp.int32(0))
    assert int(m["nan_clients"]) == 0 and np.isfinite(float(m["train_loss"]))
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(new["phi"]),
                                                                 jax.tree.leaves(st["phi"])))
    # a client of the 1/4 level trains the narrow pytree: its update (scattered back to full
    # size for the HN) is zero outside the entries the narrow model holds and moves inside
    # them; its prototypes and channel mask cover its kept feature channels only
    r = wx.rates[0.25]
    i = int(np.flatnonzero(np.isclose(np.asarray(prob.data.budgets), 0.25))[0])
    th_i = jax.tree.map(lambda a: a[0], parts.generate(st["phi"], st["desc"][i:i + 1]))
    x, y, n = prob.ctx.gather(prob.data, jnp.array([i]))
    key = prob.ctx.client_keys(0, jnp.array([i]))[0]
    delta, _, pro, _, _, dmask = wx.client(r, parts.train_with_prototypes)(
        x[0], y[0], n[0], key, th_i, st["protos"], st["proto_valid"])
    idx = wx.indices(th_i, r)
    held = W.scatter(jax.tree.map(jnp.zeros_like, th_i),
                     jax.tree.map(jnp.ones_like, wx.narrow(th_i, r)), wx.spec, idx)
    for d, h in zip(jax.tree.leaves(delta), jax.tree.leaves(held)):
        assert float(jnp.abs(jnp.where(h == 0, d, 0.0)).max()) == 0.0
        assert float(jnp.abs(d).max()) > 0
    assert float(held["conv2"]["kernel"].mean()) < 0.5  # genuinely narrower
    fidx = np.asarray(idx[wx.keep[0]])
    want = np.zeros(dmask.shape[0])
    want[fidx] = 1.0
    np.testing.assert_array_equal(np.asarray(dmask), want)
    assert float(jnp.abs(pro[:, want == 0]).max()) == 0.0
    # the evaluated models of that level are the narrow pytrees
    for g in alg.eval_groups(new, prob.data):
        b = float(prob.data.budgets[g.client_ids[0]])
        assert g.params["conv2"]["kernel"].shape[-1] == W.width_of(k2.shape[-1], wx.rates[b])


def test_hn_gradient_is_vjp_of_client_deltas(tiny_npz):
    """With SGD(lr=1) and no clipping, phi_new = phi - grad_phi (1/M) sum_i <theta_i(phi), delta_i>
    where delta_i = theta_sent - theta_trained (pFedHN sign)."""
    c = tiny_config(tiny_npz, framp__hn_optimizer="sgd", framp__hn_lr=1.0, framp__hn_clip=1e9,
                    clients_per_round=8)
    prob, alg, st = _setup(c)
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    parts = build(prob.ctx, resolve(c)[1])
    ids = prob.ctx.sample_clients(0)
    desc = st["desc"][ids]
    th = parts.generate(st["phi"], desc)
    x, y, n = prob.ctx.gather(prob.data, ids)
    delta = jax.vmap(parts.client_topk, in_axes=(0, 0, 0, 0, 0, 0, None, None))(
        th, prob.data.budgets[ids], x, y, n, prob.ctx.client_keys(0, ids), st["protos"],
        st["proto_valid"])[0]
    phi0 = jax.tree.map(jnp.copy, st["phi"])
    direct = jax.grad(lambda ph: sum(jnp.vdot(a, b) for a, b in zip(
        jax.tree.leaves(parts.generate(ph, desc)), jax.tree.leaves(delta))) / len(ids))(phi0)
    new, _ = jax.jit(alg.round)(st, prob.data, jnp.int32(0))
    for a, b, g in zip(jax.tree.leaves(phi0), jax.tree.leaves(new["phi"]), jax.tree.leaves(direct)):
        np.testing.assert_allclose(np.asarray(a - b), np.asarray(g), rtol=2e-3, atol=1e-6)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(direct)) > 0


def _poison_model(model):
    """Returns NaN logits for any batch containing an all-white image."""
    def apply(params, x, *, train=False, rng=None):
        logits, f = model.apply(params, x, train=train, rng=rng)
        bad = jnp.any(jnp.all(x.reshape(x.shape[0], -1) >= 0.999, axis=-1))
        return logits + jnp.where(bad, jnp.nan, 0.0), f + jnp.where(bad, jnp.nan, 0.0)
    return model._replace(apply=apply)


def test_nan_client_changes_nothing(tiny_npz):
    c = tiny_config(tiny_npz, clients_per_round=8)
    prob = build_problem(c, verbose=False)
    ctx = prob.ctx._replace(model=_poison_model(prob.model))
    alg = build_algorithm(ctx, c)
    st0 = alg.init(jax.random.key(0), prob.data)
    rnd = jax.jit(alg.round)
    j = 3
    outs = []
    for label in (0, 2):  # two different poisoned datasets for client j
        d = prob.data._replace(train_x=prob.data.train_x.at[j].set(255),
                               train_y=prob.data.train_y.at[j].set(label))
        outs.append(rnd(jax.tree.map(jnp.copy, st0), d, jnp.int32(0)))
    (a, ma), (b, mb) = outs
    assert int(ma["nan_clients"]) == 1 and int(mb["nan_clients"]) == 1
    for x1, x2 in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert bool(jnp.all(x1 == x2))
        if jnp.issubdtype(x1.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(x1)))
    clean, mc = rnd(jax.tree.map(jnp.copy, st0), prob.data, jnp.int32(0))
    assert int(mc["nan_clients"]) == 0
    assert not all(bool(jnp.all(x1 == x2)) for x1, x2 in zip(jax.tree.leaves(a["phi"]),
                                                              jax.tree.leaves(clean["phi"])))


def test_same_seed_same_metrics_and_one_compile(tiny_npz, tmp_path):
    c = tiny_config(tiny_npz)
    r1 = simulate.run(c, str(tmp_path / "a"), progress=False, log=lambda *_: None)
    r2 = simulate.run(c, str(tmp_path / "b"), progress=False, log=lambda *_: None)
    assert r1["final"] == r2["final"] and r1["compiles"] == 1
    rows = [open(tmp_path / d / "metrics.csv").read().splitlines() for d in "ab"]
    strip = lambda r: [",".join(x.split(",")[:-1]) for x in r]  # wall_s is the last column
    assert strip(rows[0]) == strip(rows[1])
    c2 = tiny_config(tiny_npz, seed=1)
    r3 = simulate.run(c2, str(tmp_path / "c"), progress=False, log=lambda *_: None)
    assert r3["final"] != r1["final"]


def test_unseen_clients_get_zero_shot_models(tiny_npz, tmp_path):
    c = tiny_config(tiny_npz, heldout_frac=0.5, clients_per_round=4, rounds=6,
                    framp__unseen_budgets=(1 / 256, 0.5))
    prob, alg, st = _setup(c)
    held = set(prob.info["heldout_ids"])
    assert len(held) == 4
    for t in range(30):  # held-out clients are never sampled
        assert not held & set(np.asarray(prob.ctx.sample_clients(t)).tolist())
    res = simulate.run(c, str(tmp_path / "u"), progress=False, log=lambda *_: None)
    assert set(res["final"]["unseen/local"]) >= {"1", "1/4", "1/16", "1/64", "mean"}
    assert 0.0 <= res["final"]["unseen/local"]["mean"] <= 1.0
    assert set(res["unseen_budgets"]) == {"1/256", "1/2"}
    # the zero-shot model of a held-out client comes from its descriptor alone
    h = sorted(held)
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    th = build(prob.ctx, resolve(c)[1]).generate(st["phi"], st["desc"][jnp.array(h[:2])])
    assert float(jnp.abs(th["classifier"]["kernel"][0] - th["classifier"]["kernel"][1]).max()) > 0


# Options grouped so that every one is compiled and run through simulate.run in the default
# suite with 3 runs instead of 9 (each tiny run is mostly compile time). What each option does
# is checked by value on the components below (groupwise scope, batch_proto alignment, one-hot
# descriptors, fine-tuned evaluation, width extraction; shared rotation in
# test_shared_rotation_does_not_change_training), in test_fiarse.py / test_framp_variants.py
# (the FIARSE factor, func_emb descriptors, generate="backbone" with head_in_topk) and above
# (the alignment losses).
@pytest.mark.parametrize("opt", [
    dict(framp__generate="backbone", framp__scope="groupwise", framp__align="batch_proto",
         framp__descriptor="onehot_budget", framp__proto_rotation="shared",
         framp__proto_noise_std=0.1),
    dict(framp__mask_grad="fiarse_paper", framp__descriptor="func_emb+budget",
         framp__func_emb_steps=2, framp__eval_mode="finetuned", framp__finetune_steps=2),
    dict(framp__extraction="width")], ids=["backbone-groupwise-batchproto-onehot-rotation",
                                         "fiarsegrad-funcemb-finetuned", "width"])
def test_options_run(tiny_npz, tmp_path, opt):
    c = tiny_config(tiny_npz, rounds=2, eval_every=2, **opt)
    res = simulate.run(c, str(tmp_path / "o"), progress=False, log=lambda *_: None)
    assert 0.0 <= res["final"]["local"]["mean"] <= 1.0 and res["compiles"] == 1


def _parts(prob, c):
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    return build(prob.ctx, resolve(c)[1])


def _kept_per_group(theta, prunable, groups):
    """{group: (nonzero prunable entries, prunable entries)} of one model."""
    out = {}
    for x, f, g in zip(jax.tree.leaves(theta), jax.tree.leaves(prunable), jax.tree.leaves(groups)):
        if f:
            k, n = out.get(g, (0, 0))
            out[g] = (k + int(np.count_nonzero(np.asarray(x))), n + x.size)
    return out


def test_groupwise_scope_keeps_the_budget_in_every_stage(tiny_npz):
    """scope="groupwise": every stage (conv1, conv2, conv3, dense, classifier) of every
    client's evaluated model keeps floor(budget * P_stage) of its prunable entries (generated
    values are continuous: no ties); the global top-k of the same generated models does not."""
    c = tiny_config(tiny_npz, framp__scope="groupwise")
    prob, alg, st = _setup(c)
    parts = _parts(prob, c)
    groups = M.stage_groups(parts.template)
    assert len(set(jax.tree.leaves(groups))) == 5
    ids = jnp.arange(prob.ctx.num_clients)
    budgets = np.asarray(prob.data.budgets)
    models = parts.models_at(st, st.desc, prob.data.budgets, ids)
    gen = parts.generate(st.phi, st.desc)
    differs = False
    for i in range(len(budgets)):
        mi = jax.tree.map(lambda a: a[i], models)
        for g, (kept, n) in _kept_per_group(mi, parts.prunable, groups).items():
            assert kept == max(int(np.floor(budgets[i] * n)), 1), (i, g, kept, n)
        gi = jax.tree.map(lambda a: a[i], gen)
        glob = M.apply_mask(gi, M.topk_mask(gi, parts.prunable, budgets[i]))
        differs |= any(kept != max(int(np.floor(budgets[i] * n)), 1) for kept, n in
                       _kept_per_group(glob, parts.prunable, groups).values())
    assert differs


def test_batch_proto_alignment_in_the_local_loss(tiny_npz):
    """align="batch_proto", lam=0.5: the local loss is CE + 0.5 * sum over the batch's classes
    with a prototype of ||mean feature - P_c||^2 / (classes * F), by hand (numpy); the FedProto
    form gives another value on the same batch."""
    c = tiny_config(tiny_npz, framp__align="batch_proto", framp__lam=0.5)
    prob = build_problem(c, verbose=False)
    parts = _parts(prob, c)
    model = prob.ctx.model
    p = parts.template
    x = jax.random.normal(jax.random.key(3), (10, 8, 8, 3))
    y = jnp.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 3])
    f_dim = model.feature_dim
    protos = jax.random.normal(jax.random.key(4), (4, f_dim))
    valid = jnp.array([True, True, False, True])  # class 2 has no prototype
    rng = jax.random.key(5)
    got = float(parts.make_loss(protos, valid)(p, x, y, rng))
    logits, feats = model.apply(p, x, train=True, rng=rng)
    lg, f, yy = np.asarray(logits, np.float64), np.asarray(feats, np.float64), np.asarray(y)
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    ce = float(np.mean(lse - lg[np.arange(10), yy]))
    pr = np.asarray(protos, np.float64)
    sq = [np.sum((f[yy == k].mean(0) - pr[k]) ** 2) for k in (0, 1, 3)]
    batch = sum(sq) / (3 * f_dim)
    fedproto = sum(np.sum((f[j] - pr[yy[j]]) ** 2) for j in range(10) if yy[j] != 2) / (10 * f_dim)
    assert abs(got - (ce + 0.5 * batch)) < 1e-4 * max(1.0, got)
    assert abs(batch - fedproto) > 1e-3


def test_onehot_budget_descriptors_give_one_model_per_level(tiny_npz):
    """descriptor="onehot_budget": client i's descriptor is the one-hot of its budget level, so
    clients of one level get the same generated model and clients of other levels others."""
    c = tiny_config(tiny_npz, framp__descriptor="onehot_budget")
    prob, alg, st = _setup(c)
    levels = list(c.budget_levels)
    budgets = np.asarray(prob.data.budgets)
    want = np.eye(len(levels))[[levels.index(b) for b in budgets.tolist()]]
    np.testing.assert_array_equal(np.asarray(st.desc), want)
    th = jax.tree.leaves(_parts(prob, c).generate(st.phi, st.desc))
    for i in range(1, len(budgets)):
        same = all(bool(jnp.all(a[0] == a[i])) for a in th)
        assert same == (budgets[i] == budgets[0]), i


def test_finetuned_evaluation_trains_the_evaluated_models_not_the_server(tiny_npz):
    """eval_mode="finetuned", finetune_steps=2: the evaluated model of client i is its
    generated, budget-masked model after 2 local steps (mask = its nonzero prunable entries,
    key fold_in(fold_in(key(seed), 4), i)), by replaying local_train; pruned entries stay 0;
    the server state is not changed and the generated models are what eval_mode="generated"
    evaluates."""
    from framp_jax.client import local_train
    c = tiny_config(tiny_npz, framp__eval_mode="finetuned", framp__finetune_steps=2)
    prob, alg, st = _setup(c)
    parts = _parts(prob, c)
    before = [np.asarray(a).copy() for a in jax.tree.leaves(st)]
    ids = jnp.arange(prob.ctx.num_clients)
    evaluated = jax.jit(lambda s, d: alg.eval_groups(s, d)[0].params)(st, prob.data)
    generated = parts.models_at(st, st.desc, prob.data.budgets, ids)
    for a, b in zip(before, jax.tree.leaves(st)):
        np.testing.assert_array_equal(a, np.asarray(b))
    c_gen = tiny_config(tiny_npz)
    prob_g = build_problem(c_gen, verbose=False)
    alg_g = build_algorithm(prob_g.ctx, c_gen)
    plain = alg_g.eval_groups(st, prob_g.data)[0].params
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(generated)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = 0.0
    for e, g, f in zip(jax.tree.leaves(evaluated), jax.tree.leaves(generated),
                       jax.tree.leaves(parts.prunable)):
        if f:
            assert bool(jnp.all(jnp.where(g == 0, e, 0.0) == 0.0))
        moved = max(moved, float(jnp.abs(e - g).max()))
    assert moved > 1e-4
    i = 5
    g_i = jax.tree.map(lambda a: a[i], generated)
    mask = jax.tree.map(lambda a, f: (a != 0).astype(a.dtype) if f else jnp.ones_like(a),
                        g_i, parts.prunable)
    root = jax.random.fold_in(jax.random.key(c.seed), 4)
    want = local_train(parts.make_loss(st.protos, st.proto_valid), g_i, mask,
                       prob.data.train_x[i], prob.data.train_y[i], prob.data.train_count[i],
                       jax.random.fold_in(root, i), prob.ctx.local._replace(steps=2))[0]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(evaluated)):
        np.testing.assert_allclose(np.asarray(b[i]), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_shared_rotation_does_not_change_training(tiny_npz):
    """A secret rotation shared by the clients hides prototypes from the server but leaves the
    alignment targets (and so training) unchanged, up to float rounding: the server's bank is
    the plain bank times the rotation R (fold 5 of the seed's key), so every prototype keeps
    its norm and changes its coordinates."""
    from framp_jax.algorithms.framp import random_rotation
    outs, banks = [], []
    for rot in ("none", "shared"):
        c = tiny_config(tiny_npz, framp__proto_rotation=rot)
        prob, alg, st = _setup(c)
        rnd = jax.jit(alg.round)
        for t in range(2):
            st, m = rnd(st, prob.data, jnp.int32(t))
        outs.append(float(m["train_loss"]))
        banks.append((np.asarray(st.protos, np.float64), np.asarray(st.proto_valid)))
    assert np.isclose(outs[0], outs[1], rtol=1e-4)
    (plain, v0), (rotated, v1) = banks
    assert v0.all() and (v0 == v1).all()
    r = np.asarray(random_rotation(jax.random.fold_in(jax.random.key(c.seed), 5),
                                   plain.shape[1]), np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(len(r)), atol=1e-5)
    scale = np.abs(plain).max()
    np.testing.assert_allclose(rotated, plain @ r, atol=1e-3 * scale)
    np.testing.assert_allclose(np.linalg.norm(rotated, axis=1), np.linalg.norm(plain, axis=1),
                               rtol=1e-3)
    assert np.abs(rotated - plain).max() > 0.1 * scale


def test_framp_config_errors(tiny_npz):
    for k, v in [("framp__extraction", "magic"), ("framp__lam", -1.0), ("framp__hypernet", "nope"),
                 ("framp__width_rates", (1.0, 0.5))]:
        c = tiny_config(tiny_npz, **{k: v})
        with pytest.raises(ConfigError, match=k.split("__")[1]):
            validate(c)
