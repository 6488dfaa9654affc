"""FRAMP's design-study options (issue 14): several HN steps per round, a shared base updated by
the clients' updates (ours), a smoothed label histogram, the guarded FIARSE gradient factor, and
config hashes of earlier runs unchanged by the new fields."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import masks as M
from framp_jax import simulate
from framp_jax.algorithms.framp import build
from framp_jax.algorithms.registry import resolve
from framp_jax.config import ConfigError, base_config, validate
from framp_jax.descriptors import label_hist_budget
from framp_jax.problem import build_algorithm, build_problem

from test_framp import tiny_config, tiny_npz  # noqa: F401 (fixture)


def _setup(c):
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    parts = build(prob.ctx, resolve(c)[1])
    return prob, alg, parts, alg.init(jax.random.key(c.seed), prob.data)


def _cohort(prob, parts, st, t=0):
    """Round t's clients trained by hand: ids, generated models, masks, trained models."""
    ids = prob.ctx.sample_clients(t)
    base = st.base
    th = parts.generate(st.phi, st.desc[ids], None, ids, base)
    x, y, n = prob.ctx.gather(prob.data, ids)
    out = jax.vmap(parts.client_topk, in_axes=(0, 0, 0, 0, 0, 0, None, None))(
        th, prob.data.budgets[ids], x, y, n, prob.ctx.client_keys(t, ids), st.protos,
        st.proto_valid)
    masks = [M.topk_mask(jax.tree.map(lambda a: a[i], th), parts.prunable,
                         prob.data.budgets[ids][i]) for i in range(len(ids))]
    return ids, th, masks, out[1]


def test_two_hn_steps_match_hand_computation(tiny_npz):
    """hn_steps=2, SGD(lr) without clipping: phi1 = phi0 - lr grad L(phi0), phi2 = phi1 - lr
    grad L(phi1), L(phi) = 1/M sum_i 1/2 ||m_i * (gen_i(phi) - theta_i)||^2 with theta_i the
    client's trained model; written here client by client."""
    lr = 0.05
    c = tiny_config(tiny_npz, framp__hn_optimizer="sgd", framp__hn_lr=lr, framp__hn_clip=1e9,
                    framp__hn_steps=2)
    prob, alg, parts, st = _setup(c)
    ids, _, masks, trained = _cohort(prob, parts, st)
    m_cl = len(ids)

    def loss(ph):
        tot = 0.0
        for i in range(m_cl):
            g = parts.generate(ph, st.desc[ids[i:i + 1]], None, ids[i:i + 1])
            for a, m, tr in zip(jax.tree.leaves(g), jax.tree.leaves(masks[i]),
                                jax.tree.leaves(trained)):
                tot = tot + 0.5 * jnp.sum(jnp.square(m * (a[0] - tr[i])))
        return tot / m_cl

    phi = jax.tree.map(jnp.copy, st.phi)
    grad = jax.jit(jax.grad(loss))  # the same sums, compiled once instead of run op by op
    for _ in range(2):
        g = grad(phi)
        phi = jax.tree.map(lambda p, gg: p - lr * gg, phi, g)
    new, m = jax.jit(alg.round)(st, prob.data, jnp.int32(0))
    leaves = list(zip(jax.tree.leaves(phi), jax.tree.leaves(new.phi), jax.tree.leaves(st.phi)))
    moved = max(float(jnp.abs(a - p0).max()) for a, _, p0 in leaves)
    assert moved > 1e-4  # the steps did move phi
    # float32 sums in another order (client by client here, a vmapped VJP in the round): the
    # two agree to 1% of the largest step; one step fewer or another lr would be off by ~100%
    for a, b, p0 in leaves:
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-2 * moved)


def test_shared_base_generation_and_update_by_hand(tiny_npz):
    """framp.base='fedavg' (ours): theta_i = base + s (HN(d_i) - offset); after the round the
    base moves by base_lr x the mean, over the clients that kept each entry, of their updates
    (trained - sent)."""
    s, blr = 0.1, 0.5
    c = tiny_config(tiny_npz, framp__base="fedavg", framp__base_lr=blr, framp__residual_scale=s)
    prob, alg, parts, st = _setup(c)
    ids, th, masks, trained = _cohort(prob, parts, st)
    raw = parts.generate(st.phi, st.desc[ids], None, ids)  # the HN alone
    for (path, a), r, b in zip(jax.tree_util.tree_leaves_with_path(th), jax.tree.leaves(raw),
                               jax.tree.leaves(st.base)):
        off = 1.0 if path[-1].key == "scale" else 0.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b + s * (r - off)), rtol=1e-6,
                                   atol=1e-7)
    new, _ = jax.jit(alg.round)(st, prob.data, jnp.int32(0))
    sent = [np.asarray(a) for a in jax.tree.leaves(th)]
    for k, (b0, b1) in enumerate(zip(jax.tree.leaves(st.base), jax.tree.leaves(new.base))):
        num = np.zeros(b0.shape)
        den = np.zeros(b0.shape)
        for i in range(len(ids)):
            m = np.asarray(jax.tree.leaves(masks[i])[k])
            upd = np.asarray(jax.tree.leaves(trained)[k][i]) - m * sent[k][i]
            num += m * upd
            den += m
        want = np.asarray(b0) + blr * np.where(den > 0, num / np.maximum(den, 1), 0.0)
        np.testing.assert_allclose(np.asarray(b1), want, rtol=1e-5, atol=1e-6)
    assert any(float(jnp.abs(a - b).max()) > 1e-4
               for a, b in zip(jax.tree.leaves(st.base), jax.tree.leaves(new.base)))


def test_shared_head_takes_the_base_classifier(tiny_npz):
    c = tiny_config(tiny_npz, framp__base="fedavg", framp__residual_head=False)
    prob, alg, parts, st = _setup(c)
    ids = jnp.arange(4)
    th = parts.generate(st.phi, st.desc[ids], None, ids, st.base)
    for a, b in zip(jax.tree.leaves(th["classifier"]), jax.tree.leaves(st.base["classifier"])):
        np.testing.assert_array_equal(np.asarray(a), np.broadcast_to(np.asarray(b), a.shape))
    body = [k for k in th if k != "classifier"]
    assert any(float(jnp.abs(th[k_][leaf_] - st.base[k_][leaf_]).max()) > 0
               for k_ in body for leaf_ in th[k_])


def test_hist_smoothing_by_hand():
    lc = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    d = np.asarray(label_hist_budget(lc, np.array([1.0, 0.25]), smoothing=0.5))
    np.testing.assert_allclose(d[0, :3], [3.5 / 5.5, 0.5 / 5.5, 1.5 / 5.5], rtol=1e-6)
    np.testing.assert_allclose(d[1, :3], [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(d[:, 3], [0.0, 2 / 6], rtol=1e-6)
    plain = np.asarray(label_hist_budget(lc, np.array([1.0, 0.25])))
    np.testing.assert_allclose(plain[0, :3], [0.75, 0.0, 0.25])
    np.testing.assert_allclose(plain[1, :3], [0.0, 0.0, 0.0])


def test_onehot_budget_and_func_emb_descriptors(tiny_npz):
    """onehot_budget: the budget's level, by hand; func_emb+budget: a unit-norm mean feature
    per client, then beta(s); two clients differ, and it is the same when computed again."""
    from framp_jax.descriptors import budget_code, compute_descriptors, onehot_budget, with_budget
    levels = [1.0, 0.25, 1 / 16, 1 / 64]
    d = np.asarray(onehot_budget([0.25, 1.0, 1 / 64, 1 / 16, 0.25], levels))
    np.testing.assert_array_equal(d.argmax(1), [1, 0, 3, 2, 1])
    np.testing.assert_array_equal(d.sum(1), np.ones(5))
    with pytest.raises(ValueError, match="onehot_budget"):
        with_budget(jnp.asarray(d), "onehot_budget", 0.5, levels)
    c = tiny_config(tiny_npz, framp__descriptor="func_emb+budget", framp__func_emb_steps=2)
    prob = build_problem(c, verbose=False)
    model = prob.ctx.model
    budgets = np.asarray(prob.data.budgets)
    # on this tiny CNN, global top-k of the seed model prunes conv2 and conv3 whole at 1/16 and
    # 1/64 (as it prunes the dense layer of the CIFAR-10 CPU CNN): those embeddings are zero
    with pytest.warns(RuntimeWarning, match=r"4 of 8 clients \(budgets 0.0625, 0.015625\)"):
        e = np.asarray(compute_descriptors("func_emb+budget", model, prob.ctx, prob.data, 2))
    norms = np.linalg.norm(e[:, :-1], axis=1)
    np.testing.assert_allclose(norms[budgets >= 0.25], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(norms[budgets < 0.25], 0.0)
    np.testing.assert_allclose(e[:, -1], np.asarray(budget_code(budgets)), rtol=1e-6)
    assert np.abs(e[0, :-1] - e[1, :-1]).max() > 1e-4
    with pytest.warns(RuntimeWarning):
        again = compute_descriptors("func_emb+budget", model, prob.ctx, prob.data, 2)
    np.testing.assert_array_equal(np.asarray(again), e)


def test_fiarse_paper_gradient_drops_no_client(tiny_npz):
    """mask_grad="fiarse_paper": a client's gradient is scaled, on its prunable entries only,
    by 1 + 2 tau |w| / (|w| + tau)^2 with tau its budget's top-k threshold of the generated
    model (by hand, numpy), 1 on the other leaves; where |w| = tau = 0 (a zero bias of a
    budget-1 client whose tau is 0) the factor is 1, not 0/0. Clients of budgets 1 and 1/4
    train to finite updates, and the 1/4 client's differs from mask_grad="masked"."""
    from framp_jax.algorithms.framp import fiarse_grad_factor
    trained = {}
    for mg in ("masked", "fiarse_paper"):
        c = tiny_config(tiny_npz, framp__mask_grad=mg)
        prob, alg, parts, st = _setup(c)
        budgets = np.asarray(prob.data.budgets)
        ids = jnp.array([int(np.flatnonzero(budgets == 1.0)[0]),
                         int(np.flatnonzero(budgets == 0.25)[0])])
        th = parts.generate(st.phi, st.desc[ids], None, ids, st.base)
        x, y, n = prob.ctx.gather(prob.data, ids)
        out = jax.vmap(parts.client_topk, in_axes=(0, 0, 0, 0, 0, 0, None, None))(
            th, prob.data.budgets[ids], x, y, n, prob.ctx.client_keys(0, ids), st.protos,
            st.proto_valid)
        trained[mg] = out[1]
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(out[0]))
    th1 = jax.tree.map(lambda a: a[1], th)
    tau = float(M.topk_threshold(th1, parts.prunable, 0.25))
    assert tau > 0
    factor = fiarse_grad_factor(th1, parts.prunable, tau)(th1, jax.tree.map(jnp.ones_like, th1))
    for w, f, pr in zip(jax.tree.leaves(th1), jax.tree.leaves(factor),
                        jax.tree.leaves(parts.prunable)):
        a = np.abs(np.asarray(w, np.float64))
        want = 1 + 2 * tau * a / (a + tau) ** 2 if pr else np.ones_like(a)
        np.testing.assert_allclose(np.asarray(f), want, rtol=1e-5)
    zero = {"b": jnp.array([0.0, 0.5]), "k": jnp.array([0.0, 0.0])}
    f0 = fiarse_grad_factor(zero, {"b": True, "k": False}, 0.0)(zero, jax.tree.map(jnp.ones_like, zero))
    np.testing.assert_array_equal(np.asarray(f0["b"]), [1.0, 1.0])
    quarter = max(float(np.abs(np.asarray(a[1]) - np.asarray(b[1])).max()) for a, b in
                  zip(jax.tree.leaves(trained["masked"]), jax.tree.leaves(trained["fiarse_paper"])))
    assert quarter > 1e-4


def test_base_residual_head_and_hist_smoothing_by_value(tiny_npz):
    """base="fedavg", residual_head=False (the preset's variant): every client's classifier is
    the shared base's, the other leaves are base + residual_scale * (HN output - its offset),
    by hand. hist_smoothing=1: the descriptors' histograms are (n_ik + 1) / (n_i + K) and
    their last entry the budget code."""
    from framp_jax.descriptors import budget_code
    c = tiny_config(tiny_npz, framp__base="fedavg", framp__residual_head=False,
                    framp__hist_smoothing=1.0)
    prob, alg, parts, st = _setup(c)
    n = prob.ctx.num_clients
    ids = jnp.arange(n)
    theta = parts.generate(st.phi, st.desc, None, ids, st.base)
    raw = parts.generate(st.phi, st.desc, None, ids)
    for (path, t), r, b in zip(jax.tree_util.tree_leaves_with_path(theta), jax.tree.leaves(raw),
                               jax.tree.leaves(st.base)):
        name = jax.tree_util.keystr(path)
        if name.startswith("['classifier']"):
            np.testing.assert_array_equal(np.asarray(t), np.broadcast_to(np.asarray(b), t.shape))
        else:
            off = 1.0 if name.endswith("['scale']") else 0.0
            np.testing.assert_allclose(np.asarray(t), np.asarray(b)[None] + 0.1 * (np.asarray(r) - off),
                                       rtol=1e-5, atol=1e-7, err_msg=name)
            assert float(jnp.abs(t[0] - t[1]).max()) > 0  # personalised
    lc = np.asarray(prob.data.label_counts, np.float64)
    k = lc.shape[1]
    d = np.asarray(st.desc, np.float64)
    np.testing.assert_allclose(d[:, :k], (lc + 1) / (lc.sum(1, keepdims=True) + k), rtol=1e-6)
    np.testing.assert_allclose(d[:, k], np.asarray(budget_code(prob.data.budgets)), rtol=1e-6)


# 3 runs cover each variant (each tiny run is mostly compile time): the preset's
# base + no residual head alone, the base with the residual head, and several HN steps both
# with and without the base (the latter with the local classifier outside the top-k).
@pytest.mark.parametrize("opt", [dict(framp__base="fedavg", framp__residual_head=False),
                                 dict(framp__base="fedavg", framp__hn_steps=2,
                                      framp__hist_smoothing=1.0),
                                 dict(framp__generate="backbone", framp__hn_steps=3,
                                      framp__head_in_topk=False)],
                         ids=["preset-base", "base-residual-hnsteps2-smooth",
                              "backbone-hnsteps3-head-whole"])
def test_variants_run_and_compile_once(tiny_npz, tmp_path, opt):
    c = tiny_config(tiny_npz, rounds=3, eval_every=3, **opt)
    res = simulate.run(c, str(tmp_path / "v"), progress=False, log=lambda *_: None)
    assert 0.0 <= res["final"]["local"]["mean"] <= 1.0 and res["compiles"] == 1


def test_base_resumes_bit_for_bit(tiny_npz, tmp_path):
    c = tiny_config(tiny_npz, rounds=4, eval_every=2, checkpoint_every=2, framp__base="fedavg")
    full = simulate.run(c, str(tmp_path / "full"), progress=False, log=lambda *_: None)
    c2 = tiny_config(tiny_npz, rounds=2, eval_every=2, checkpoint_every=2, framp__base="fedavg")
    simulate.run(c2, str(tmp_path / "part"), progress=False, log=lambda *_: None)
    res = simulate.run(c, str(tmp_path / "part"), resume=True, progress=False, log=lambda *_: None)
    assert res["final"] == full["final"]


@pytest.mark.parametrize("field,value", [("hn_steps", 0), ("base", "sum"), ("base_lr", 0.0),
                                         ("residual_scale", -1.0), ("hist_smoothing", -0.1)])
def test_bad_options_name_the_field(tiny_npz, field, value):
    c = tiny_config(tiny_npz)
    c.framp[field] = value
    with pytest.raises(ConfigError, match=f"framp.{field}"):
        validate(c)


def test_incompatible_options_are_refused(tiny_npz):
    for kw, field in ((dict(framp__base="fedavg", framp__extraction="width"), "framp.base"),
                      (dict(framp__base="fedavg", framp__generate="backbone"), "framp.base"),
                      (dict(framp__hn_steps=2, framp__extraction="width"), "framp.hn_steps"),
                      (dict(framp__residual_head=False), "framp.residual_head"),
                      (dict(framp__hist_smoothing=1.0, framp__descriptor="budget_only"),
                       "framp.hist_smoothing")):
        with pytest.raises(ConfigError, match=field):
            validate(tiny_config(tiny_npz, **kw))


def test_new_fields_at_default_keep_the_config_hash():
    """Runs made before these fields existed keep their hash (so sweeps skip them and
    checkpoints resume); a changed value changes it."""
    c = base_config()
    old = simulate.hashed_config(c)
    assert "hn_steps" not in old["framp"] and "base" not in old["framp"]
    assert "diagnostics" not in old
    h0 = simulate.config_hash(c)
    c.framp.hn_steps = 2
    assert simulate.config_hash(c) != h0
    c.framp.hn_steps = 1
    assert simulate.config_hash(c) == h0
    c.framp.base = "fedavg"
    assert simulate.config_hash(c) != h0


def test_committed_runs_keep_their_hash():
    """A preset's config today, with the run fields of the sweeps made before the validation
    protocol (sweep.BEFORE_VALIDATION), hashes as the committed run made from it did."""
    import json
    import os
    from framp_jax.sweep import BEFORE_VALIDATION, _load_preset
    root = os.path.join(os.path.dirname(__file__), "..")
    for run, preset in (("results/sweeps/cifar10_cpu/fedavg_seed0", "fedavg_cifar10_cpu.py"),
                        ("results/sweeps/cora/framp_spec_seed1", "framp_cora.py")):
        stored = json.load(open(os.path.join(root, run, "config.json")))
        c = _load_preset(os.path.join(root, "experiments/configs", preset))
        c.seed = stored["seed"]
        for k, v in BEFORE_VALIDATION.items():
            c[k] = v
        assert simulate.config_hash(c) == stored["_resolved"]["config_hash"], run


def test_head_in_topk_false_keeps_the_local_classifier_whole(tiny_npz):
    """generate="backbone": with head_in_topk=False the local classifier is evaluated whole at
    every budget and the budget's top-k runs over the backbone's prunable entries alone (by
    hand, numpy); at the default it competes in the one global top-k."""
    for in_topk in (True, False):
        c = tiny_config(tiny_npz, framp__generate="backbone", framp__head_in_topk=in_topk)
        prob, alg, parts, st = _setup(c)
        ids = jnp.arange(prob.ctx.num_clients)
        budgets = prob.data.budgets
        models = parts.models_at(st, st.desc, budgets, ids)
        gen = parts.generate(st.phi, st.desc, st.heads, ids, st.base)
        full = parts.prunable if in_topk else dict(
            parts.prunable, classifier=jax.tree.map(lambda _: True, parts.prunable["classifier"]))
        assert jax.tree.leaves(parts.prunable["classifier"]) == [in_topk] * 2
        for i in range(prob.ctx.num_clients):
            g = jax.tree.map(lambda a: np.asarray(a[i]), gen)
            m = jax.tree.map(lambda a: np.asarray(a[i]), models)
            named = [(jax.tree_util.keystr(p), x, f) for (p, x), f in zip(
                jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(full))]
            ranked = [k for k, _, f in named if f and (in_topk or not k.startswith("['classifier']"))]
            flat = np.sort(np.abs(np.concatenate([x.ravel() for k, x, _ in named if k in ranked])))
            kk = int(np.clip(np.floor(float(budgets[i]) * flat.size), 1, flat.size))
            tau = flat[::-1][kk - 1]
            for (k, x, _), got in zip(named, jax.tree.leaves(m)):
                want = np.where(np.abs(x) >= tau, x, 0.0) if k in ranked else x
                np.testing.assert_array_equal(got, want, err_msg=f"{in_topk} {i} {k}")
        if in_topk:  # at the smallest budget the classifier loses entries to the top-k
            small = int(np.argmin(np.asarray(budgets)))
            k = np.asarray(models["classifier"]["kernel"][small])
            assert np.sum(k == 0) > 0
    with pytest.raises(ConfigError, match="framp.head_in_topk"):
        validate(tiny_config(tiny_npz, framp__head_in_topk=False, framp__extraction="width"))
    c = base_config()
    h0 = simulate.config_hash(c)
    assert "head_in_topk" not in simulate.hashed_config(c)["framp"]
    c.framp.head_in_topk = False
    assert simulate.config_hash(c) != h0
