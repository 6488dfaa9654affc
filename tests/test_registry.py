"""The method registry: a new method is one module-level ``Method`` plus one registry entry.

The tiny example method below ("server-step FedAvg": the server moves the global model by
``server_lr`` times the unweighted mean of the clients' deltas) is written the way
ARCHITECTURE.md tells a user to write one: options with defaults, a validation that reads the
config only, a factory composing ``algorithms/rounds.py``. It is registered with
``registry.register`` (the runtime form of the one registry line) and then runs through the
whole engine: config validation, ``framp-jax``'s ``simulate.run``, one compile for all rounds.
Its round is checked against a hand computation: every participant trained one by one with
``local_train``, deltas averaged with numpy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from framp_jax import config as C
from framp_jax.algorithms import registry
from framp_jax.algorithms.base import Algorithm, EvalGroup
from framp_jax.algorithms.registry import Method
from framp_jax.algorithms.rounds import (budget_groups, draw_cohort, finite_clients,
                                         model_init_key, round_metrics, train_cohort)
from framp_jax.client import local_train
from framp_jax.losses import cross_entropy


# -- the example method: what a user writes in framp_jax/algorithms/server_step.py ----------

def server_step_defaults():
    o = mlc.ConfigDict()
    o.server_lr = 0.5
    return o


def validate_server_step(c, opts):
    C.check(opts.server_lr > 0, "server_step.server_lr", opts.server_lr, "a step size > 0")


def server_step(ctx, opts):
    model, local = ctx.model, ctx.local

    def loss(p, x, y, rng):
        return cross_entropy(model.apply(p, x, train=True, rng=rng)[0], y)

    def init(key, data):
        return {"params": model.init(model_init_key(ctx, key))}

    def round_fn(state, data, t):
        g = state["params"]
        co = draw_cohort(ctx, data, t)
        new, losses = train_cohort(ctx, lambda x, y, n, k: local_train(loss, g, None, x, y, n, k,
                                                                       local), co)
        ok = finite_clients(new, losses)
        w = ok.astype(jnp.float32) / jnp.maximum(jnp.sum(ok), 1)
        step = jax.tree.map(lambda a, b: jnp.tensordot(w, a - b[None], axes=1), new, g)
        g = jax.tree.map(lambda b, d: b + opts.server_lr * d, g, step)
        return {"params": g}, round_metrics(losses, ok)

    def eval_groups(state, data):
        return [EvalGroup(model.apply, state["params"], ids, per_client=False)
                for ids in budget_groups(ctx).values()]

    return Algorithm("server_step", init, round_fn, eval_groups)


METHOD = Method("server_step", server_step, server_step_defaults, validate_server_step)


@pytest.fixture
def registered():
    registry.register(METHOD)
    yield METHOD
    registry.unregister(METHOD.name)


def test_registry_lists_the_built_in_methods():
    assert registry.names() == ("fedavg", "local", "framp", "heterofl", "fedrolex", "fiarse",
                                "scalefl")
    for name in registry.names():
        m = registry.get_method(name)
        assert m.name == name and callable(m.factory)
    with pytest.raises(C.ConfigError, match="config.method='nope'"):
        registry.get_method("nope")


def test_unregister_restores_the_list(registered):
    assert "server_step" in registry.names()
    registry.unregister("server_step")
    assert "server_step" not in registry.names()
    registry.register(METHOD)  # the fixture unregisters it again


def test_options_validated_before_any_data(registered):
    c = C.base_config()  # CIFAR-10: validation reads the config only, no data is opened
    c.method = "server_step"
    C.validate(c)  # defaults only
    c.server_step = mlc.ConfigDict({"server_lr": -1.0})
    with pytest.raises(C.ConfigError, match=r"config.server_step.server_lr=-1.0 is not allowed"):
        C.validate(c)
    c.server_step = mlc.ConfigDict({"sever_lr": 1.0})
    with pytest.raises(C.ConfigError, match=r"config.server_step.sever_lr=1.0 .*server_lr"):
        C.validate(c)
    _, opts = registry.resolve(C.base_config())
    assert opts is None  # fedavg has no options


def test_example_method_runs_end_to_end(registered, tiny_config, tmp_path):
    from framp_jax import simulate
    from framp_jax.problem import build_algorithm, build_problem

    c = tiny_config(method="server_step", rounds=3, local_steps=2)
    c.server_step = mlc.ConfigDict({"server_lr": 0.5})
    res = simulate.run(c, str(tmp_path / "run"), progress=False, log=lambda *a, **k: None)
    assert res["method"] == "server_step" and res["compiles"] == 1
    assert set(res["final"]["union"]) >= {"1", "1/4", "1/16", "1/64", "mean"}

    # one round against a hand computation
    prob = build_problem(c)
    alg = build_algorithm(prob.ctx, c)
    state = alg.init(jax.random.key(c.seed), prob.data)
    new, m = jax.jit(alg.round)(state, prob.data, jnp.int32(0))
    ctx, data = prob.ctx, prob.data
    ids = np.asarray(ctx.sample_clients(jnp.int32(0)))
    keys = ctx.client_keys(jnp.int32(0), jnp.asarray(ids))
    loss = lambda p, x, y, rng: cross_entropy(ctx.model.apply(p, x, train=True, rng=rng)[0], y)
    g0 = jax.tree.map(np.asarray, state["params"])
    trained, losses = [], []
    for j, i in enumerate(ids):
        p, l = jax.jit(lambda x, y, n, k: local_train(loss, state["params"], None, x, y, n, k,
                                                      ctx.local))(
            data.train_x[i], data.train_y[i], data.train_count[i], keys[j])
        trained.append(jax.tree.map(np.asarray, p))
        losses.append(float(l))
    want = jax.tree.map(lambda g, *ps: g + 0.5 * np.mean([q - g for q in ps], axis=0), g0,
                        *trained)
    got = jax.tree.map(np.asarray, new["params"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert abs(float(m["train_loss"]) - np.mean(losses)) < 1e-5
    # the update is not a no-op: the check above can fail
    assert max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(g0))) > 1e-4
