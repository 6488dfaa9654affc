"""Mask reuse (config.record_mask_reuse, framp_jax/mask_reuse.py): the counts against a hand
computation from the run's saved states, kill/resume equivalence, one compilation, the refusals,
FRAMP's round_masks hook, the report's mask-reuse CDF; and the bytes every method communicates
per round (comm/* metrics) against hand counts of the parameters of the tiny config."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from framp_jax import config as C
from framp_jax import simulate
from framp_jax.checkpoint import CheckpointManager
from framp_jax.errors import CheckpointError
from framp_jax.mask_reuse import FILENAME, kept_fractions, load
from framp_jax.problem import build_algorithm, build_problem

QUIET = dict(progress=False, log=lambda *a, **k: None, warn=lambda *a, **k: None)


# ---------------------------------------------------------------------------------------------
# config (the field's default, hash and validation: tests/test_diagnostics.py)


def test_method_without_masks_is_refused_before_the_first_round(tiny_config, tmp_path):
    for method in ("fedavg", "heterofl"):
        wd = tmp_path / method
        with pytest.raises(C.ConfigError, match="record_mask_reuse.*round_masks"):
            simulate.run(tiny_config(method=method, record_mask_reuse=True), str(wd), **QUIET)
        assert not (wd / "metrics.csv").exists() and not (wd / FILENAME).exists()


# ---------------------------------------------------------------------------------------------
# FIARSE end to end: hand computation, resume, compiles


def _fiarse(tiny_config, **kw):
    return tiny_config(method="fiarse", record_mask_reuse=True, checkpoint_every=1,
                       keep_checkpoints=10, eval_every=2, local_steps=2, **kw)


def _hand_counts(c, workdir, rounds):
    """counts [L, P] and n [L] recomputed in numpy from the run's initial state and its
    checkpoints: round t's participants (ctx.sample_clients), each one's mask = |w| >= the
    k-th largest prunable |w| of the global model before round t, k = floor(budget · P)."""
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    state0 = alg.init(jax.random.key(c.seed), prob.data)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), keep=None)
    levels = [float(b) for b in c.budget_levels]
    flags = jax.tree.leaves(prob.model.prunable(state0.params))
    counts, n = None, np.zeros(len(levels))
    budgets = np.asarray(prob.data.budgets)
    try:
        for t in range(rounds):
            state = state0 if t == 0 else ckpt.restore(t, target=state0)[0]
            w = np.concatenate([np.abs(np.asarray(x)).ravel() for x, f in
                                zip(jax.tree.leaves(state.params), flags) if f])
            P = w.size
            counts = np.zeros((len(levels), P)) if counts is None else counts
            for i in np.asarray(prob.ctx.sample_clients(t)):
                b = float(budgets[i])
                k = min(max(int(np.floor(np.float32(b) * np.float32(P))), 1), P)
                tau = np.sort(w)[P - k]
                lvl = levels.index(b)
                counts[lvl] += (w >= tau)
                n[lvl] += 1
    finally:
        ckpt.close()
    return counts, n


@pytest.fixture(scope="module")
def fiarse_runs(tiny_config, tmp_path_factory):
    """A 4-round FIARSE run, a 2-round one resumed to 4, and a copy of the 2-round one."""
    root = tmp_path_factory.mktemp("mask_reuse")
    full = simulate.run(_fiarse(tiny_config, rounds=4), str(root / "full"), **QUIET)
    short = simulate.run(_fiarse(tiny_config, rounds=2), str(root / "part"), **QUIET)
    after2 = load(str(root / "part" / FILENAME))
    shutil.copytree(root / "part", root / "part_copy")
    resumed = simulate.run(_fiarse(tiny_config, rounds=4), str(root / "part"), resume=True, **QUIET)
    return root, full, short, resumed, after2


def test_counts_match_a_hand_computation(tiny_config, fiarse_runs):
    root, full, *_ = fiarse_runs
    d = load(str(root / "full" / FILENAME))
    assert int(d["round"]) == 4
    np.testing.assert_array_equal(d["budget_levels"], np.float32([1.0, 0.25, 0.0625, 0.015625]))
    counts, n = _hand_counts(_fiarse(tiny_config, rounds=4), str(root / "full"), 4)
    np.testing.assert_array_equal(d["n"], n)
    assert n.sum() == 4 * 4  # 4 participants in each of 4 rounds
    np.testing.assert_array_equal(d["counts"], counts)
    # each level's kept fraction is about its budget (ties can keep a few more)
    for b, f in kept_fractions(d).items():
        assert f.mean() == pytest.approx(b, rel=0.05, abs=2e-3)


def test_resume_gives_the_same_counts_and_compiles_once(fiarse_runs):
    root, full, short, resumed, after2 = fiarse_runs
    a, b = load(str(root / "full" / FILENAME)), load(str(root / "part" / FILENAME))
    for k in ("counts", "n", "budget_levels", "round"):
        np.testing.assert_array_equal(a[k], b[k])
    assert int(after2["round"]) == 2 and after2["n"].sum() == 8
    assert np.all(after2["counts"] <= a["counts"])
    for res in (full, short, resumed):
        assert res["compiles"] == 1 and res["mask_reuse"]["compiles"] == 1
    on_disk = json.loads((root / "full" / "results.json").read_text())
    assert on_disk["compiles"] == 1 and on_disk["mask_reuse"]["file"] == FILENAME


def test_resume_refuses_counts_of_another_round(tiny_config, fiarse_runs, tmp_path):
    root = fiarse_runs[0]
    wd = tmp_path / "copy"
    shutil.copytree(root / "part_copy", wd)
    d = load(str(wd / FILENAME))
    np.savez(wd / FILENAME, **{**d, "round": np.int64(1)})
    with pytest.raises(CheckpointError, match=r"mask_reuse\.npz counts 1 rounds but the "
                                              r"checkpoint restored is round 2"):
        simulate.run(_fiarse(tiny_config, rounds=4), str(wd), resume=True, **QUIET)
    os.remove(wd / FILENAME)
    with pytest.raises(CheckpointError, match=r"mask_reuse\.npz is missing"):
        simulate.run(_fiarse(tiny_config, rounds=4), str(wd), resume=True, **QUIET)


# ---------------------------------------------------------------------------------------------
# FRAMP's hook


def test_framp_round_masks_are_the_topk_masks_of_the_generated_models(tiny_npz):
    from test_framp import tiny_config as framp_config
    from framp_jax import masks as M
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    from framp_jax.algorithms.rounds import draw_cohort

    c = framp_config(tiny_npz, record_mask_reuse=True)
    prob = build_problem(c, verbose=False)
    ctx = prob.ctx
    fr = build(ctx, resolve(c)[1])
    alg = fr.algorithm
    state = alg.init(jax.random.key(c.seed), prob.data)
    t = 1
    masks, budgets, valid = jax.jit(alg.round_masks)(state, prob.data, jnp.int32(t))
    co = draw_cohort(ctx, prob.data, t)
    np.testing.assert_array_equal(np.asarray(budgets), np.asarray(prob.data.budgets)[co.ids])
    assert np.asarray(valid).all() and np.asarray(valid).shape == (c.clients_per_round,)
    theta = fr.generate(state.phi, state.desc[co.ids], None, co.ids, state.base)
    flags = jax.tree.leaves(fr.prunable)
    for i in range(c.clients_per_round):
        th = jax.tree.map(lambda a: np.asarray(a[i]), theta)
        w = np.concatenate([np.abs(x).ravel() for x, f in zip(jax.tree.leaves(th), flags) if f])
        P = w.size
        k = min(max(int(np.floor(np.float32(budgets[i]) * np.float32(P))), 1), P)
        tau = np.sort(w)[P - k]
        for m, x, f in zip(jax.tree.leaves(masks), jax.tree.leaves(th), flags):
            want = (np.abs(x) >= tau) if f else np.ones_like(x)
            np.testing.assert_array_equal(np.asarray(m[i]), want.astype(np.float32))
        mi = jax.tree.map(lambda a: a[i], masks)
        ref = M.topk_mask(jax.tree.map(jnp.asarray, th), fr.prunable, budgets[i])
        for a, b in zip(jax.tree.leaves(mi), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    width = framp_config(tiny_npz, framp__extraction="width")
    prob_w = build_problem(width, verbose=False)
    assert build_algorithm(prob_w.ctx, width).round_masks is None


# ---------------------------------------------------------------------------------------------
# report


def _report_run(root: Path, name, method, seed, reuse=None, alpha=0.3):
    d = root / name
    d.mkdir(parents=True)
    cfg = json.loads(json.dumps({**C.base_config().to_dict(), "method": method, "seed": seed,
                                 "alpha": alpha}))
    cfg["_resolved"] = {"data": {"file": "/data/x.npz", "sha256": "0" * 64}}
    (d / "config.json").write_text(json.dumps(cfg))
    final = {s: {b: 0.5 for b in ("1/64", "1/16", "1/4", "1", "mean")} for s in ("local", "union")}
    (d / "results.json").write_text(json.dumps({"method": method, "dataset": "cifar10",
                                                "seed": seed, "rounds": 100, "final": final,
                                                "wall_s": 10.0, "compiles": 1}))
    (d / "metrics.csv").write_text("round,local/mean,union/mean\n100,0.5,0.5\n")
    if reuse is not None:
        counts, n = reuse
        from framp_jax.mask_reuse import save
        save(str(d / FILENAME), counts, n, (1.0, 0.25, 0.0625, 0.015625), 100)
    return d


def test_report_plots_the_mask_reuse_cdf(tmp_path):
    from framp_jax import report as REP
    rng = np.random.default_rng(0)
    runs = tmp_path / "runs"
    n = np.float32([40, 30, 20, 10])
    for s in range(2):
        counts = np.floor(rng.uniform(0, 1, (4, 500)) * n[:, None]).astype(np.float32)
        _report_run(runs, f"fiarse_s{s}", "fiarse", s, (counts, n))
    _report_run(runs, "fedavg_s0", "fedavg", 0)
    _report_run(runs, "fedavg_a01", "fedavg", 0, alpha=0.1)  # another setting, nothing recorded
    out = tmp_path / "report"
    md = Path(REP.write_report([str(runs)], str(out))).read_text()
    sections = md.split("\n## ")
    with_runs = next(x for x in sections if "alpha=0.3," in x.splitlines()[0])
    other = next(x for x in sections if "alpha=0.1," in x.splitlines()[0])
    lines = [ln for ln in md.splitlines() if "_mask_reuse.png" in ln]
    assert len(lines) == 1 and lines[0] in with_runs and "_mask_reuse.png" not in other
    png = out / lines[0][lines[0].index("(") + 1:-1]
    assert png.stat().st_size > 1000
    assert len(list((out / "plots").glob("*_mask_reuse.png"))) == 1
    assert "averaged over the seeds" in md
    assert "not recorded during training, so it is not plotted" not in md
    assert "2 of these 4 runs recorded it" in md
    # the pooled fractions: the mean over the two seeds of counts / n
    runs_ = [REP.load_run(str(runs / f"fiarse_s{s}")) for s in range(2)]
    fr, used = REP._mask_reuse_fractions(runs_)
    assert used == 2
    a, b = (load(r["mask_reuse"]) for r in runs_)
    np.testing.assert_allclose(fr[0.25], (a["counts"][1] / 30 + b["counts"][1] / 30) / 2)
    md2 = Path(REP.write_report([str(runs / "fedavg_s0")], str(tmp_path / "r2"))).read_text()
    assert "none of these runs recorded it" in md2 and "mask_reuse.png" not in md2


# ---------------------------------------------------------------------------------------------
# bytes communicated per round


def _one_round(c, t=0):
    prob = build_problem(c, verbose=False)
    alg = build_algorithm(prob.ctx, c)
    state = alg.init(jax.random.key(c.seed), prob.data)
    _, m = jax.jit(alg.round)(state, prob.data, jnp.int32(t))
    return prob, state, {k: float(v) for k, v in m.items()}


def _size(shapes) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))


def test_comm_bytes_fedavg_and_local(tiny_config):
    prob, state, m = _one_round(tiny_config(method="fedavg", local_steps=1))
    n_params = _size(state.params)
    assert n_params == _size(jax.eval_shape(prob.model.init, jax.random.key(0)))
    assert m["comm/down_bytes"] == m["comm/up_bytes"] == 4 * n_params * 4
    assert m["comm/mask_bytes"] == 0.0
    _, _, m = _one_round(tiny_config(method="local", local_steps=1))
    assert m["comm/down_bytes"] == m["comm/up_bytes"] == m["comm/mask_bytes"] == 0.0


def test_comm_bytes_fiarse(tiny_config):
    c = tiny_config(method="fiarse", local_steps=1)
    prob, state, m = _one_round(c, t=1)
    flags = jax.tree.leaves(prob.model.prunable(state.params))
    leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    w = np.concatenate([np.abs(x).ravel() for x, f in zip(leaves, flags) if f])
    P, unmasked = w.size, sum(x.size for x, f in zip(leaves, flags) if not f)
    total = 0
    for i in np.asarray(prob.ctx.sample_clients(1)):
        b = float(np.asarray(prob.data.budgets)[i])
        k = min(max(int(np.floor(np.float32(b) * np.float32(P))), 1), P)
        total += int(np.sum(w >= np.sort(w)[P - k])) + unmasked
    assert m["comm/down_bytes"] == m["comm/up_bytes"] == 4 * total
    assert m["comm/mask_bytes"] == 0.0


def _level_valid(ctx, t):
    return [(b, int(np.sum(np.asarray(v))))
            for b, _, v in ctx.sample_clients_by_level(jnp.int32(t))]


@pytest.mark.parametrize("method", ["heterofl", "fedrolex_random", "scalefl"])
def test_comm_bytes_of_the_narrow_submodels(tiny_config, method):
    # 3 participants over 4 budget levels: one level gets a padding slot (valid False) that
    # must not count
    kw = dict(local_steps=1, clients_per_round=3)
    if method == "fedrolex_random":
        c = tiny_config(method="fedrolex", **kw)
        c.fedrolex = ml_collections.ConfigDict({"algo": "random"})
    else:
        c = tiny_config(method=method, **kw)
    prob, state, m = _one_round(c, t=0)
    ctx, fam = prob.ctx, prob.ctx.family
    per_level = _level_valid(ctx, 0)
    assert sum(v for _, v in per_level) == 3 and min(v for _, v in per_level) == 0
    key = jax.random.key(0)
    down = mask = 0
    if method == "scalefl":
        from framp_jax.algorithms.scalefl import DEFAULT_LEVELS
        for b, nv in per_level:
            h, w = DEFAULT_LEVELS["cnn"][b]
            down += 4 * nv * _size(jax.eval_shape(fam.make_exits(w, h).init, key))
    else:
        from framp_jax import width as W
        rates = dict(zip((1.0, 0.25, 0.0625, 0.015625), (1.0, 0.5, 0.25, 0.125)))
        sizes = W.unit_sizes(state.params, fam.preact_spec)
        for b, nv in per_level:
            r = rates[b]
            down += 4 * nv * _size(jax.eval_shape(fam.make_preact(r).init, key))
            if method == "fedrolex_random":
                mask += 4 * nv * sum(W.width_of(C_, r) for C_ in sizes.values())
    assert m["comm/down_bytes"] == m["comm/up_bytes"] == down > 0
    assert m["comm/mask_bytes"] == mask


def test_comm_bytes_framp_width(tiny_npz):
    """FRAMP width: each participant gets and returns its narrow pytree whole (biases narrowed
    too), and prototypes on the feature channels it holds (+ K class counts up); no mask. Hand
    count: the parameters of the family's network built at the level's width, as HeteroFL's
    count is; a padding slot (3 participants over 4 levels) counts nothing."""
    from test_framp import tiny_config as framp_config

    c = framp_config(tiny_npz, local_steps=1, clients_per_round=3, framp__extraction="width")
    prob, _, m = _one_round(c, t=0)
    ctx, fam, K = prob.ctx, prob.ctx.family, prob.ctx.num_classes
    per_level = _level_valid(ctx, 0)
    assert sum(v for _, v in per_level) == 3 and min(v for _, v in per_level) == 0
    rates = dict(zip((1.0, 0.25, 0.0625, 0.015625), c.framp.width_rates))
    down = up = 0
    for b, nv in per_level:
        net = fam.make(rates[b])
        n = _size(jax.eval_shape(net.init, jax.random.key(0))) + K * net.feature_dim
        down, up = down + 4 * nv * n, up + 4 * nv * (n + K)
    assert fam.make(0.125).feature_dim < prob.model.feature_dim
    assert m["comm/down_bytes"] == down > 0
    assert m["comm/up_bytes"] == up
    assert m["comm/mask_bytes"] == 0.0


@pytest.mark.parametrize("variant", ["all", "backbone", "backbone_headwhole"])
def test_comm_bytes_framp_topk(tiny_npz, variant):
    """FRAMP top-k: each participant gets and returns its kept generated entries, the entries
    outside the top-k whole, and its K x F prototypes (+ K class counts up); a local classifier
    (generate="backbone") is never sent, whether or not it is in the top-k."""
    from test_framp import tiny_config as framp_config
    from framp_jax.algorithms.framp import build
    from framp_jax.algorithms.registry import resolve
    from framp_jax.algorithms.rounds import draw_cohort

    kw = {"all": {}, "backbone": {"framp__generate": "backbone"},
          "backbone_headwhole": {"framp__generate": "backbone", "framp__head_in_topk": False}}
    c = framp_config(tiny_npz, local_steps=1, **kw[variant])
    prob, state, m = _one_round(c, t=1)
    fr = build(prob.ctx, resolve(c)[1])
    co = draw_cohort(prob.ctx, prob.data, 1)
    heads = (None if variant == "all"
             else jax.tree.map(lambda a: a[co.ids], state.heads))
    theta = fr.generate(state.phi, state.desc[co.ids], heads, co.ids, state.base)
    local = variant != "all"
    budgets = np.asarray(prob.data.budgets)[np.asarray(co.ids)]
    K, F = prob.ctx.num_classes, prob.model.feature_dim
    down = 0
    for i, b in enumerate(budgets):
        th = {k: jax.tree.map(lambda a: np.asarray(a[i]), v) for k, v in theta.items()}
        w = np.concatenate([np.abs(x).ravel() for x, f in
                            zip(jax.tree.leaves(th), jax.tree.leaves(fr.prunable)) if f])
        P = w.size
        k = min(max(int(np.floor(np.float32(b) * np.float32(P))), 1), P)
        tau = np.sort(w)[P - k]
        for name in th:
            if local and name == "classifier":
                continue  # the client's own classifier stays on the client
            for x, f in zip(jax.tree.leaves(th[name]), jax.tree.leaves(fr.prunable[name])):
                down += int(np.sum(np.abs(x) >= tau)) if f else x.size
        down += K * F
    assert m["comm/down_bytes"] == 4 * down
    assert m["comm/up_bytes"] == 4 * (down + K * len(budgets))
    if local:  # the local classifier is in the top-k or whole: it was counted before
        _, _, m_all = _one_round(framp_config(tiny_npz, local_steps=1), t=1)
        assert m["comm/down_bytes"] < m_all["comm/down_bytes"]

