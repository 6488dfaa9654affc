"""The fair-comparison protocol's pieces (results/sweeps/FAIR.md): each client's validation
split, validation metrics beside the test ones, the label-masked Local column for every method,
the -HN and descriptor controls, and the generator initialisation matched to the network."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax.data.clients import validation_split


def test_validation_split_is_stratified_disjoint_and_seeded():
    y = np.array([0] * 20 + [1] * 9 + [2] * 1 + [3] * 5)
    ix = [np.arange(35), np.arange(0, 20)]
    tr, va = validation_split(y, ix, 0.2, seed=3)
    # per class floor(0.2 n + 1/2): 20 -> 4, 9 -> 2, 1 -> 0, 5 -> 1
    assert np.bincount(y[va[0]], minlength=4).tolist() == [4, 2, 0, 1]
    assert np.bincount(y[va[1]], minlength=4).tolist() == [4, 0, 0, 0]
    for a, t, v in zip(ix, tr, va):
        assert not set(t) & set(v) and sorted(np.concatenate([t, v])) == sorted(a)
    tr2, va2 = validation_split(y, ix, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(va, va2))
    _, va3 = validation_split(y, ix, 0.2, seed=4)
    assert not np.array_equal(va[0], va3[0])
    tr0, va0 = validation_split(y, ix, 0.0, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(tr0, ix)) and all(len(v) == 0 for v in va0)


def test_run_records_validation_and_masked_local_and_trains_on_train_only(tiny_config, tmp_path):
    from framp_jax.problem import build_problem
    from framp_jax.simulate import run
    c = tiny_config(method="fedavg", rounds=2, val_frac=0.2)
    prob = build_problem(c)
    d = prob.data
    # no validation sample among the training data; label counts (descriptors) from train only
    tc, vc = np.asarray(d.train_count), np.asarray(d.val_count)
    assert (vc > 0).all() and tc.sum() + vc.sum() == 400
    lc = np.asarray(d.label_counts)
    for i in range(c.num_clients):
        ty = np.asarray(d.train_y[i, :tc[i]])
        assert np.bincount(ty, minlength=lc.shape[1]).tolist() == lc[i].astype(int).tolist()
    assert d.union_val_y.shape[0] == vc.sum()
    res = run(c, str(tmp_path / "r"), progress=False, log=lambda *a: None)
    for split in ("local", "union", "local_masked", "val/local", "val/union", "val/local_masked"):
        assert set(res["final"][split]) >= {"1", "1/4", "mean"}, split
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert "val/union/mean" in rows[0] and "local_masked/mean" in rows[0]
    assert res["dataset_info"]["val_size"] == int(vc.sum())


def test_masked_local_column_is_the_label_masked_accuracy():
    """local_masked: logits of classes absent from the client's training data set to 0,
    computed alike for every method; Local itself uses the plain logits."""
    from framp_jax.algorithms.base import Algorithm, Context, EvalGroup, FedData
    from framp_jax.client import LocalConfig
    from framp_jax.data.image_modality import ImageModality
    from framp_jax.eval import make_evaluator
    K = 3
    # a "model" whose logits are fixed per sample: x[..., 0] holds the sample's logits row id
    table = jnp.asarray([[-1.0, -2.0, -0.5], [2.0, 1.0, 0.5], [-5.0, -4.0, -0.5]])

    def apply(p, x, train=False, rng=None):
        rows = table[x[:, 0, 0, 0].astype(jnp.int32)]
        return rows, rows

    modality = ImageModality(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    ctx = Context(model=None, family=None, modality=modality, num_clients=1, num_classes=K,
                  budgets=np.array([1.0]), budget_levels=(1.0,), train_ids=np.arange(1),
                  clients_per_round=1, local=LocalConfig(modality=modality))
    x = np.zeros((1, 3, 1, 1, 3), np.uint8)
    x[0, :, 0, 0, 0] = [0, 1, 2]
    ty = jnp.asarray([[2, 1, 2]], jnp.int32)
    lc = jnp.asarray([[0.0, 4.0, 1.0]])  # the client trained on classes 1 and 2 only
    data = FedData(None, None, None, jnp.asarray(x), ty, jnp.asarray([3]), jnp.ones((1,)), lc,
                   jnp.asarray(x[0]), ty[0])
    alg = Algorithm("t", None, None,
                    lambda s, d: [EvalGroup(apply, {"w": jnp.zeros(())}, np.array([0]), False)])
    evaluate = make_evaluator(alg, ctx, 3, with_masked=True)
    local, masked, union = evaluate(None, data, data.union_x, data.union_y)
    # plain argmax 2, 0, 2 -> 2/3. Masked (class 0's logit -> 0): 0, 1, 0 -> 1/3. The -1e9
    # variant would give 2, 1, 2 -> 3/3; zeroing the client's own classes instead, 1, 0, 1 -> 0
    np.testing.assert_allclose(np.asarray(local), [2 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(masked), [1 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(union), [2 / 3], rtol=1e-6)
    # the client's label counts decide: with class 0 only, classes 1 and 2 are zeroed
    _, m0, _ = evaluate(None, data._replace(label_counts=jnp.asarray([[4.0, 0.0, 0.0]])),
                        data.union_x, data.union_y)
    np.testing.assert_allclose(np.asarray(m0), [0.0], atol=1e-7)


def test_descriptor_controls_keep_the_budget_and_move_the_content():
    from framp_jax.descriptors import control_descriptors, label_hist_budget
    lc = np.arange(1, 25).reshape(6, 4) ** 2
    d = label_hist_budget(lc, jnp.array([1, 1, .25, .25, 1 / 16, 1 / 64]))
    p = np.asarray(control_descriptors(d, "label_hist+budget", "permute", jax.random.key(0)))
    d = np.asarray(d)
    np.testing.assert_array_equal(p[:, -1], d[:, -1])
    # a derangement: every client gets another client's histogram, all distinct, same multiset
    src = [int(np.flatnonzero((d[:, :-1] == p[i, :-1]).all(1))[0]) for i in range(6)]
    assert all(s != i for i, s in enumerate(src)) and sorted(src) == list(range(6))
    r = np.asarray(control_descriptors(jnp.asarray(d), "label_hist+budget", "random",
                                       jax.random.key(1)))
    np.testing.assert_array_equal(r[:, -1], d[:, -1])
    np.testing.assert_allclose(r[:, :-1].sum(1), 1.0, rtol=1e-5)
    assert (r[:, :-1] >= 0).all() and not np.allclose(r[:, :-1], d[:, :-1])


def test_generator_kernel_scale_model_matches_the_network_init():
    from framp_jax.hypernet import entry_scales
    key = jax.random.key(0)
    tmpl = {"conv": {"kernel": jax.random.uniform(key, (3, 3, 4, 8), minval=-0.2, maxval=0.2),
                     "bias": jnp.zeros((8,))}}
    gen = jax.tree.map(lambda _: True, tmpl)
    a, b = entry_scales(tmpl, gen, "model")
    std = float(np.std(np.asarray(tmpl["conv"]["kernel"], np.float64)))
    # leaf order: bias (8 entries) then kernel
    np.testing.assert_allclose(b[8:], std, rtol=1e-6)
    np.testing.assert_allclose(b[:8], 0.01)
    a_he, b_he = entry_scales(tmpl, gen, "he")
    np.testing.assert_allclose(b_he[8:], math.sqrt(2 / 36), rtol=1e-6)


def test_minus_hn_control_generates_the_base_alone(tiny_config):
    """framp.residual_scale=0 with base='fedavg' (SPEC §3.1's -HN): every client's generated
    model is the shared base, whatever its descriptor."""
    from framp_jax.algorithms import framp as F
    from framp_jax.algorithms.registry import resolve
    from framp_jax.problem import build_problem
    c = tiny_config(method="framp")
    c.framp.base, c.framp.residual_scale, c.framp.chunk_size = "fedavg", 0.0, 0
    prob = build_problem(c)
    fi = F.build(prob.ctx, resolve(c)[1])
    s = fi.algorithm.init(jax.random.key(0), prob.data)
    ids = jnp.arange(4)
    theta = fi.generate(s.phi, s.desc[ids], None, ids, s.base)
    for t, b in zip(jax.tree.leaves(theta), jax.tree.leaves(s.base)):
        np.testing.assert_array_equal(np.asarray(t), np.broadcast_to(np.asarray(b), t.shape))


def test_control_options_are_validated(tiny_config):
    from framp_jax import config as C
    c = tiny_config(method="framp")
    c.framp.residual_scale = 0.0
    with pytest.raises(C.ConfigError, match="residual_scale"):
        C.validate(c)
    c = tiny_config(method="framp")
    c.framp.descriptor, c.framp.descriptor_control = "onehot_budget", "permute"
    with pytest.raises(C.ConfigError, match="descriptor_control"):
        C.validate(c)
    c = tiny_config(method="framp")
    c.framp.gen_init = "xavier"
    with pytest.raises(C.ConfigError, match="gen_init"):
        C.validate(c)
    c = tiny_config(val_frac=0.7)
    with pytest.raises(C.ConfigError, match="val_frac"):
        C.validate(c)


def _fake_tuning(tmp_path, scores):
    """A tuning sweep of 2 methods x 2 candidates x 1 seed whose finished runs' final
    validation metrics are ``scores[name] = (val local, val union)`` (absent: not run)."""
    import textwrap
    from framp_jax.sweep import load_sweep, resolve
    from framp_jax.simulate import config_hash
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "cfg.py"
    cfg.write_text("from framp_jax.config import base_config\n"
                   "def get_config():\n    c = base_config(); c.rounds = 7; return c\n")
    sw = tmp_path / "tune.py"
    sw.write_text(textwrap.dedent('''
        from framp_jax.sweep import Run
        def get_sweep():
            return [Run(f"{m}__lr{lr}_seed5", "cfg.py", {"lr": lr, "seed": 5})
                    for m in ("fedavg", "local") for lr in (0.1, 0.2)]
    '''))
    wd = tmp_path / "wd"
    for run in load_sweep(str(sw)):
        if run.name not in scores:
            continue
        c = resolve(run)
        d = wd / run.name
        d.mkdir(parents=True)
        conf = json.loads(c.to_json_best_effort())
        conf["_resolved"] = {"config_hash": config_hash(c)}
        (d / "config.json").write_text(json.dumps(conf))
        vl, vu = scores[run.name]
        (d / "results.json").write_text(json.dumps({
            "rounds": 7, "final": {"val/local": {"mean": vl}, "val/union": {"mean": vu},
                                   "local": {"mean": 0.99}, "union": {"mean": 0.99}}}))
    return str(sw), str(wd)


def test_selection_reads_validation_only_and_refuses_unfinished(tmp_path):
    from framp_jax.selection import markdown, write_selection
    sw, wd = _fake_tuning(tmp_path, {
        "fedavg__lr0.1_seed5": (0.6, 0.2), "fedavg__lr0.2_seed5": (0.5, 0.4),
        "local__lr0.1_seed5": (0.7, 0.1), "local__lr0.2_seed5": (0.7, 0.1)})
    sel = write_selection(sw, wd)
    fa, lo = sel["methods"]["fedavg"], sel["methods"]["local"]
    # scores (0.6 + 0.2) / 2 = 0.4 < (0.5 + 0.4) / 2 = 0.45; the test numbers (0.99) are unread
    assert fa["chosen"] == "lr0.2" and fa["chosen_overrides"] == {"lr": 0.2}
    np.testing.assert_allclose([fa["scores"]["lr0.1"], fa["scores"]["lr0.2"]], [0.4, 0.45])
    assert lo["chosen"] == "lr0.1"  # a tie goes to the first declared candidate
    assert fa["candidates"] == 2 and fa["seeds"] == [5]
    assert json.load(open(f"{wd}/selection.json"))["methods"]["fedavg"]["chosen"] == "lr0.2"
    assert "| fedavg | lr0.2 | 2 | 5 |" in markdown(sel)
    sw2, wd2 = _fake_tuning(tmp_path / "b", {"fedavg__lr0.1_seed5": (0.6, 0.2)})
    sel2 = write_selection(sw2, wd2)
    assert sel2["methods"]["fedavg"]["chosen"] is None
    assert sel2["methods"]["fedavg"]["missing"] == ["lr0.2"]


def test_fair_protocol_gives_every_method_the_same_budget():
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "fp", os.path.join(root, "experiments", "sweeps", "fair_protocol.py"))
    P = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(P)
    for ds in ("cifar10", "cora"):
        counts = {m: len(P.candidates(m, ds)) for m in P.METHODS}
        assert set(counts.values()) == {4}, counts
        for m in P.METHODS:  # the client lr is tuned for every method, and candidates differ
            cands = list(P.candidates(m, ds).values())
            assert {c["lr"] for c in cands} == set(P.LRS[ds])
            assert len({json.dumps(c, sort_keys=True) for c in cands}) == 4
        runs = P.tuning_runs(ds)
        assert {int(r.name.rsplit("seed", 1)[1]) for r in runs} == set(P.SELECTION_SEEDS)
    assert not set(P.SELECTION_SEEDS) & set(P.REPORT_SEEDS)
    sel = {ds: {"methods": {m: {"chosen": "x", "chosen_overrides": {"lr": 0.1}}
                            for m in P.METHODS}} for ds in ("cifar10", "cora")}
    final = P.final_runs(sel)
    assert {int(r.name.rsplit("seed", 1)[1]) for r in final} == set(P.REPORT_SEEDS)
    from framp_jax.sweep import Run, resolve
    for r in final:  # every reported run is a valid config (held-out controls included)
        resolve(Run(r.name, os.path.join(root, "experiments", "sweeps", r.preset), r.overrides))
    names = {r.name.rsplit("_seed", 1)[0] for r in final}
    assert "cifar100_a005__heterofl_samenet" in names and "cora__framp_heldout_permuted" in names
    del sel["cora"]["methods"]["fiarse"]["chosen"]
    sel["cora"]["methods"]["fiarse"]["chosen"] = None
    with pytest.raises(ValueError, match="fiarse"):
        P.final_runs(sel)
