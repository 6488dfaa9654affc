"""End to end: ``simulate.run`` on the tiny data set writes the DESIGN run directory, compiles
the round function once, is deterministic, resumes to the same state as an uninterrupted run,
and fails clearly on reused workdirs and NaN training."""
from __future__ import annotations

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from framp_jax import simulate
from framp_jax.checkpoint import CheckpointManager
from framp_jax.problem import build_problem
from framp_jax.rundir import read_metrics_csv

ROUNDS, CKPT_EVERY = 4, 2
BUDGET_KEYS = {"1", "1/4", "1/16", "1/64", "mean"}


def quiet(*a, **k):
    pass


def run(c, workdir, **kw):
    return simulate.run(c, str(workdir), progress=False, log=quiet, **kw)


def metrics_without_wall(workdir):
    return [{k: v for k, v in r.items() if k != "wall_s"}
            for r in read_metrics_csv(os.path.join(workdir, "metrics.csv"))]


def final_state(workdir, round=ROUNDS):
    with CheckpointManager(os.path.join(workdir, "checkpoints"), keep=None) as m:
        state, extra = m.restore(round)
    return state, extra


def assert_same_state(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
    """An uninterrupted FedAvg run of ROUNDS rounds with a checkpoint every CKPT_EVERY."""
    c = tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY)
    wd = tmp_path_factory.mktemp("engine") / "reference"
    res = run(c, wd)
    return c, str(wd), res


def test_results_json_follows_design(reference):
    c, wd, res = reference
    on_disk = json.loads(open(os.path.join(wd, "results.json")).read())
    assert on_disk == json.loads(json.dumps(res))
    assert on_disk["method"] == "fedavg" and on_disk["dataset"] == str(c.dataset)
    assert on_disk["seed"] == 0 and on_disk["rounds"] == ROUNDS
    assert on_disk["compiles"] == 1  # ROUNDS rounds, one trace of the round function
    assert on_disk["wall_s"] > 0
    final = on_disk["final"]
    # test metrics, the label-masked Local of every method, and the same on validation data
    assert set(final) == {"local", "union", "local_masked", "val/local", "val/union",
                          "val/local_masked"}
    for split in final:
        assert set(final[split]) == BUDGET_KEYS
        assert all(0.0 <= v <= 1.0 for v in final[split].values())
    # Union mean = mean over budget levels; Local mean lies within the per-level range
    levels = [final["union"][k] for k in ("1", "1/4", "1/16", "1/64")]
    assert final["union"]["mean"] == pytest.approx(np.mean(levels))
    loc = [final["local"][k] for k in ("1", "1/4", "1/16", "1/64")]
    assert min(loc) - 1e-9 <= final["local"]["mean"] <= max(loc) + 1e-9
    # eval_last=1: "final" is the last metrics row
    last = read_metrics_csv(os.path.join(wd, "metrics.csv"))[-1]
    for split in ("local", "union"):
        for k, v in final[split].items():
            assert v == pytest.approx(last[f"{split}/{k}"], rel=1e-12)


def test_run_directory_contents(reference):
    c, wd, res = reference
    cfg = json.loads(open(os.path.join(wd, "config.json")).read())
    assert cfg["seed"] == 0 and cfg["lr"] == c.lr and cfg["method"] == "fedavg"
    assert cfg["_resolved"]["config_hash"] == simulate.config_hash(c)
    assert cfg["_resolved"]["data"]["num_classes"] == 4
    assert cfg["_resolved"]["data"]["union_size"] == 200

    rows = read_metrics_csv(os.path.join(wd, "metrics.csv"))
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1))  # eval_every=1
    for r in rows:
        assert r["union_samples"] == 200 and r["nan_clients"] == 0
        assert all(0 <= r[f"{s}/{k}"] <= 1 for s in ("local", "union") for k in BUDGET_KEYS)
    # it learns: the colours are easy, chance is 1/4
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.2
    assert rows[-1]["union/1"] >= 0.5

    with open(os.path.join(wd, "accuracy.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with CheckpointManager(os.path.join(wd, "checkpoints"), keep=None) as m:
        assert m.all_rounds() == [CKPT_EVERY, ROUNDS]
        extra = m.restore_extra(ROUNDS)
    assert extra["round"] == ROUNDS and extra["config_hash"] == simulate.config_hash(c)
    assert [h["round"] for h in extra["history"]] == list(range(1, ROUNDS + 1))


def test_tensorboard_events_match_metrics(reference):
    """The tb/ event file holds every metrics row, as TensorBoard's own reader sees it."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    c, wd, res = reference
    rows = read_metrics_csv(os.path.join(wd, "metrics.csv"))
    acc = ea.EventAccumulator(os.path.join(wd, "tb"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    for tag in ("local/mean", "union/mean", "train_loss", "union/1/64"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
        for e, r in zip(events, rows):
            assert e.value == pytest.approx(r[tag], rel=1e-6)  # float32 in TB


def test_same_config_and_seed_give_identical_metrics(reference, tmp_path):
    c, wd, res = reference
    res2 = run(c, tmp_path / "again")
    assert metrics_without_wall(tmp_path / "again") == metrics_without_wall(wd)
    assert res2["final"] == res["final"]
    assert_same_state(final_state(tmp_path / "again")[0], final_state(wd)[0])


def test_resume_after_kill_equals_uninterrupted(reference, tiny_config, tmp_path):
    c, wd, res = reference
    part = tmp_path / "killed"
    # "killed" right after the checkpoint of round CKPT_EVERY: the run stops there
    run(tiny_config(rounds=CKPT_EVERY, checkpoint_every=CKPT_EVERY), part)
    res2 = run(tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY), part, resume=True)
    assert res2["final"] == res["final"] and res2["rounds"] == ROUNDS
    assert res2["compiles"] == 1
    assert metrics_without_wall(part) == metrics_without_wall(wd)
    state, extra = final_state(part)
    assert_same_state(state, final_state(wd)[0])
    assert [h["round"] for h in extra["history"]] == list(range(1, ROUNDS + 1))


def test_resume_after_crash_equals_uninterrupted(reference, tiny_config, tmp_path, monkeypatch):
    c, wd, res = reference
    part = tmp_path / "crashed"
    calls = {"n": 0}
    real_eval_metrics = simulate.eval_metrics

    per_eval = 2 if c.val_frac > 0 else 1  # eval_metrics of the test data, then of validation

    def crash_in_last_round(*a, **k):
        calls["n"] += 1
        if calls["n"] == per_eval * (ROUNDS - 1) + 1:  # the last round's evaluation
            raise RuntimeError("simulated crash")
        return real_eval_metrics(*a, **k)

    monkeypatch.setattr(simulate, "eval_metrics", crash_in_last_round)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(c, part)
    monkeypatch.setattr(simulate, "eval_metrics", real_eval_metrics)
    with CheckpointManager(os.path.join(part, "checkpoints"), keep=None) as m:
        assert m.all_rounds() == [CKPT_EVERY]
    rows = read_metrics_csv(os.path.join(part, "metrics.csv"))
    assert [r["round"] for r in rows] == [1, 2, 3]  # row 3 is past the checkpoint
    assert not os.path.exists(os.path.join(part, "results.json"))

    res2 = run(c, part, resume=True)
    assert metrics_without_wall(part) == metrics_without_wall(wd)  # row 3 recomputed once
    assert res2["final"] == res["final"] and res2["compiles"] == 1
    assert_same_state(final_state(part)[0], final_state(wd)[0])


def test_workdir_with_checkpoints_needs_resume(reference):
    c, wd, _ = reference
    before = open(os.path.join(wd, "metrics.csv")).read()
    with pytest.raises(FileExistsError, match="resume"):
        run(c, wd)
    assert open(os.path.join(wd, "metrics.csv")).read() == before


def test_resume_with_another_config_is_refused(reference, tiny_config, tmp_path):
    c, wd, _ = reference
    copy = tmp_path / "copy"
    shutil.copytree(wd, copy)
    before = open(copy / "config.json").read()
    with pytest.raises(ValueError, match="different config"):
        run(tiny_config(rounds=ROUNDS, checkpoint_every=CKPT_EVERY, lr=0.2), copy, resume=True)
    # the workdir still describes the run its checkpoints belong to
    assert open(copy / "config.json").read() == before


def test_local_only_runs_and_keeps_masked_entries_zero(tiny_config, tmp_path):
    c = tiny_config(method="local", rounds=2)
    res = run(c, tmp_path / "local")
    assert res["method"] == "local" and res["compiles"] == 1
    for split in ("local", "union"):
        assert set(res["final"][split]) == BUDGET_KEYS
        assert all(0.0 <= v <= 1.0 for v in res["final"][split].values())
    state, _ = final_state(tmp_path / "local", round=2)
    budgets = np.repeat([1.0, 0.25, 0.0625, 0.015625], 2)
    masks, params = state["masks"], state["params"]
    kernels = [k for k in masks if k != "classifier"]
    for i, b in enumerate(budgets):
        # one top-k per layer group: each layer keeps floor(b * its prunable entries), at least 1
        for k in kernels:
            assert float(masks[k]["kernel"][i].sum()) == max(1, math.floor(b * masks[k]["kernel"][i].size))
        n_cls = masks["classifier"]["kernel"][i].size + masks["classifier"]["bias"][i].size
        kept_cls = float(masks["classifier"]["kernel"][i].sum()) + float(masks["classifier"]["bias"][i].sum())
        assert kept_cls == max(1, math.floor(b * n_cls))
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
        assert np.all(np.asarray(p)[np.asarray(m) == 0] == 0)
    # every client trains its own model: the trained clients all differ (with per-layer masks
    # every layer keeps entries, so small-budget clients learn too)
    ctx = build_problem(c).ctx
    trained = set(np.asarray(ctx.sample_clients(0)).tolist()) | \
        set(np.asarray(ctx.sample_clients(1)).tolist())
    trained = sorted(trained)
    flat = np.concatenate([np.asarray(p).reshape(len(budgets), -1) for p in jax.tree.leaves(params)],
                          axis=1)
    assert len(trained) >= 2
    assert len({flat[i].tobytes() for i in trained}) == len(trained)


def test_nan_loss_raises_naming_the_round(tiny_config, tmp_path):
    c = tiny_config(lr=1e30, rounds=3)
    with pytest.raises(simulate.NonFiniteError, match=r"round 1\b.*lr"):
        run(c, tmp_path / "nan")
