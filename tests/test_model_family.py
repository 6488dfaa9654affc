"""models/family.py: every ``make*`` of a ModelFamily is, bit for bit, the model the engine built
from run-level config fields before families existed (simulate.build_model,
graph_engine.build_graph_problem, heterofl.model_family, scalefl.models), compute-dtype wrapping
included; the width specs describe ``make(r)``'s params; the moved specs are still reachable
from framp_jax.width."""
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax import width as W
from framp_jax.models import exits as E
from framp_jax.models.cnn import make_cnn
from framp_jax.models.family import ModelFamily, model_family
from framp_jax.models.gcn import make_gcn, make_gcn_width
from framp_jax.models.layers import with_compute_dtype
from framp_jax.models.preact import make_preact_cnn, make_preact_resnet18
from framp_jax.models.resnet import make_resnet18

K = 10
RATES = (1.0, 0.5, 0.25)
GCN_IN, GCN_HIDDEN, GCN_DROPOUT, GCN_K = 12, 16, 0.3, 5


class Graph(NamedTuple):
    nodes: jnp.ndarray
    senders: jnp.ndarray
    receivers: jnp.ndarray


def _graph():
    rng = np.random.default_rng(0)
    n, e = 9, 20
    return Graph(jnp.asarray(rng.standard_normal((n, GCN_IN)), jnp.float32),
                 jnp.asarray(rng.integers(0, n, e), jnp.int32),
                 jnp.asarray(rng.integers(0, n, e), jnp.int32))


def _images(shape, n=2):
    return jnp.asarray(np.random.default_rng(1).standard_normal((n,) + shape), jnp.float32)


# today's constructors, as the consumers call them (model, input shape, conv_impl, dtype)
def _ref_make(name, shape, r, ci, dt):
    if name == "cnn":  # simulate.build_model (r = 1) / heterofl.model_family "same"
        return with_compute_dtype(make_cnn(K, shape, width=r, conv_impl=ci), dt)
    return with_compute_dtype(make_resnet18(K, shape, width=r, conv_impl=ci), dt)


def _ref_preact(name, shape, r, ci, dt):  # heterofl.model_family "preact"
    mk = make_preact_cnn if name == "cnn" else make_preact_resnet18
    return with_compute_dtype(mk(K, shape, width=r, conv_impl=ci), dt)


def _ref_exits(name, shape, w, h, ci, dt):  # scalefl.models
    return with_compute_dtype(E.make_exits_model(name, K, shape, w, h, ci), dt)


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _run(m, x, key, apply_kwargs, extra):
    p = m.init(key)
    return (p, [m.apply(p, x, **kw) for kw in apply_kwargs],
            [getattr(m, f)(p, x) for f in extra])


def _program(m, x, key, apply_kwargs, extra) -> str:
    """The StableHLO text of init + every apply/extra call (lowering only, no compile): two
    models with the same text run the same program, so they give bit-identical outputs."""
    def run(k, x):  # one name for every model: the module is called jit_run
        return _run(m, x, k, apply_kwargs, extra)
    return jax.jit(run).lower(key, x).as_text()


def _assert_same_models(pairs, x, key=jax.random.key(7), apply_kwargs=({},), extra=(),
                        execute=(0,)):
    """For each (got, ref): the same fields (but the functions), the same prunable flags and the
    same lowered program for ``init`` from ``key`` followed by ``apply`` on ``x`` (with each of
    ``apply_kwargs``) and the ``extra`` methods; for the pairs at the indices ``execute`` also the
    same params and outputs, run eagerly (XLA compiles are slow on a small CPU machine; eager
    op-by-op runs share their compiles between got and ref). Returns got's param shapes."""
    out = []
    for i, (got, ref) in enumerate(pairs):
        assert type(got) is type(ref)
        for f in got._fields:
            if not callable(getattr(ref, f)):
                assert getattr(got, f) == getattr(ref, f), f
        shapes = jax.eval_shape(got.init, key)
        assert got.prunable(shapes) == ref.prunable(shapes)
        assert (_program(got, x, key, apply_kwargs, extra)
                == _program(ref, x, key, apply_kwargs, extra)), got.name
        if i in execute:
            _assert_same_tree(_run(got, x, key, apply_kwargs, extra),
                              _run(ref, x, key, apply_kwargs, extra))
        out.append(shapes)
    return out


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def _assert_prefix_gather_is(full_params, spec, narrow_model, r):
    sizes = W.check_spec(full_params, spec)
    nar = jax.eval_shape(lambda p: W.gather(p, spec, W.prefix_indices(sizes, r)), full_params)
    ref = jax.eval_shape(narrow_model.init, jax.random.key(0))
    assert jax.tree.structure(nar) == jax.tree.structure(ref)
    assert _shapes(nar) == _shapes(ref)


def test_model_family_fields():
    assert ModelFamily._fields == ("name", "make", "width_spec", "feature_units", "make_exits",
                                   "max_exits", "make_preact", "preact_spec", "input_shape")


IMAGE_CASES = [("cnn", (32, 32, 3)), ("cnn", (28, 28, 1)), ("resnet18", (16, 16, 3))]
IMAGE_IDS = [f"{n}-{'x'.join(map(str, s))}" for n, s in IMAGE_CASES]


@pytest.mark.parametrize("name,shape", IMAGE_CASES, ids=IMAGE_IDS)
def test_image_family_make_is_todays_model(name, shape):
    fam = model_family(name, K, list(shape))  # any sequence; the family keeps a tuple
    assert fam.name == name and fam.input_shape == shape
    assert fam.make() is fam.make(1) is fam.make(1.0)
    models = [fam.make(r) for r in RATES]
    assert all(fam.make(r) is m for m, r in zip(models, RATES))  # cached per rate
    full = _assert_same_models([(m, _ref_make(name, shape, r, "auto", "float32"))
                                for m, r in zip(models, RATES)], _images(shape))[0]
    for m, r in zip(models, RATES):
        _assert_prefix_gather_is(full, fam.width_spec, m, r)
    # the feature unit is the classifier's input, as wide as the features
    sizes = W.check_spec(full, fam.width_spec)
    (fu,) = fam.feature_units
    assert sizes[fu] == fam.make().feature_dim
    assert W.Bind(("classifier", "kernel"), 0, fu, "in") in fam.width_spec.binds
    assert fam.feature_units == {"cnn": ("dense",), "resnet18": ("stage4",)}[name]


@pytest.mark.parametrize("name,shape", IMAGE_CASES, ids=IMAGE_IDS)
def test_image_family_preact_is_todays_model(name, shape):
    fam = model_family(name, K, shape)
    models = [fam.make_preact(r) for r in RATES]
    assert all(fam.make_preact(r) is m for m, r in zip(models, RATES))
    full = _assert_same_models([(m, _ref_preact(name, shape, r, "auto", "float32"))
                                for m, r in zip(models, RATES)], _images(shape),
                               apply_kwargs=({}, {"train": True}), extra=("batch_stats",))[0]
    for m, r in zip(models, RATES):
        _assert_prefix_gather_is(full, fam.preact_spec, m, r)
    from framp_jax.models import preact
    assert fam.preact_spec == (preact.preact_cnn_spec() if name == "cnn"
                               else preact.preact_resnet18_spec())


@pytest.mark.parametrize("name,shape", IMAGE_CASES, ids=IMAGE_IDS)
def test_image_family_exits_are_todays_models(name, shape):
    fam = model_family(name, K, shape)
    assert fam.max_exits == {"cnn": 3, "resnet18": 4}[name]
    levels = ((1.0, fam.max_exits), (0.5, 2), (0.25, 1))
    models = [fam.make_exits(w, h) for w, h in levels]
    assert all(fam.make_exits(w, h) is m for m, (w, h) in zip(models, levels))
    assert all(m.max_exits == fam.max_exits for m in models)
    _assert_same_models([(m, _ref_exits(name, shape, w, h, "auto", "float32"))
                         for m, (w, h) in zip(models, levels)], _images(shape),
                        extra=("apply_exits",))


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
@pytest.mark.parametrize("ci", ["xla", "im2col"])
def test_conv_impl_reaches_every_model(name, ci, monkeypatch):
    """A non-default conv_impl is what every conv of the main, pre-activation and exit models
    runs with."""
    from framp_jax.models import cnn, exits, layers, preact, resnet
    used = []

    def spy(x, kernel, stride=1, impl="im2col"):
        used.append(impl)
        return layers.conv2d(x, kernel, stride, impl)

    for mod in (cnn, exits, preact, resnet):
        monkeypatch.setattr(mod, "conv2d", spy)
    shape = (8, 8, 3)
    fam = model_family(name, K, shape, conv_impl=ci)
    x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
    for m in (fam.make(0.5), fam.make_preact(0.5), fam.make_exits(0.5, 2)):
        used.clear()
        jax.eval_shape(lambda k, x: m.apply(m.init(k), x), jax.random.key(0), x)
        assert used and set(used) == {ci}, m.name


@pytest.mark.parametrize("name,shape", [("cnn", (32, 32, 3)), ("resnet18", (16, 16, 3))],
                         ids=["cnn", "resnet18"])
def test_bfloat16_wraps_main_preact_and_exit_models(name, shape):
    """compute_dtype='bfloat16' wraps what today's code wraps: the main model
    (simulate.build_model), both HeteroFL backbones and ScaleFL's exit models."""
    fam = model_family(name, K, shape, compute_dtype="bfloat16")
    f32 = model_family(name, K, shape)
    x, key, r = _images(shape), jax.random.key(7), 0.5
    pairs = [(fam.make(r), _ref_make(name, shape, r, "auto", "bfloat16")),
             (fam.make_preact(r), _ref_preact(name, shape, r, "auto", "bfloat16")),
             (fam.make_exits(r, 2), _ref_exits(name, shape, r, 2, "auto", "bfloat16"))]
    _assert_same_models(pairs, x, execute=(0,) if name == "cnn" else ())
    for (got, _), plain in zip(pairs, [f32.make(r), f32.make_preact(r), f32.make_exits(r, 2)]):
        assert "bf16" in _program(got, x, key, ({},), ())  # computed in bfloat16 ...
        assert "bf16" not in _program(plain, x, key, ({},), ())
        out = jax.eval_shape(lambda k, x: got.apply(got.init(k), x), key, x)
        assert {a.dtype for a in jax.tree.leaves(out)} == {jnp.dtype(jnp.float32)}  # ... f32 out


def test_gcn_family_is_todays_models():
    fam = model_family("gcn", GCN_K, (GCN_IN,), gcn_hidden=GCN_HIDDEN, dropout=GCN_DROPOUT,
                       conv_impl="xla")  # conv_impl is the image models'
    assert (fam.name, fam.input_shape, fam.max_exits) == ("gcn", (GCN_IN,), 2)
    assert fam.make_preact is None and fam.preact_spec is None
    g, key = _graph(), jax.random.key(3)
    kws = ({}, {"train": True, "rng": key})  # dropout in training
    models = [fam.make(r) for r in RATES]
    assert all(fam.make(r) is m for m, r in zip(models, RATES)) and fam.make() is models[0]
    levels = ((1.0, 2), (0.5, 2), (0.25, 1))
    exit_models = [fam.make_exits(w, h) for w, h in levels]
    pairs = (
        # the engine's main model (graph_engine: make_gcn(in_dim, k, hidden, dropout)) ...
        [(fam.make(), make_gcn(GCN_IN, GCN_K, GCN_HIDDEN, GCN_DROPOUT))]
        # ... and heterofl's width-r model: make_gcn_width(in_dim, k, width_of(hidden, r), dropout)
        + [(m, make_gcn_width(GCN_IN, GCN_K, W.width_of(GCN_HIDDEN, r), GCN_DROPOUT))
           for m, r in zip(models, RATES)])
    full = _assert_same_models(pairs, g, apply_kwargs=kws)[0]
    for m, r in zip(models, RATES):
        _assert_prefix_gather_is(full, fam.width_spec, m, r)
    sizes = W.check_spec(full, fam.width_spec)
    assert fam.feature_units == ("conv2",) and sizes["conv2"] == fam.make().feature_dim
    assert W.Bind(("classifier", "kernel"), 0, "conv2", "in") in fam.width_spec.binds
    # scalefl.models: make_exits_model("gcn", K, (in_dim,), w, h, conv_impl, hidden=, dropout=)
    _assert_same_models(
        [(m, E.make_exits_model("gcn", GCN_K, (GCN_IN,), w, h, "auto", hidden=GCN_HIDDEN,
                                dropout=GCN_DROPOUT)) for m, (w, h) in zip(exit_models, levels)],
        g, apply_kwargs=kws, extra=("apply_exits",))


def test_gcn_family_refuses_bfloat16_and_image_shapes():
    with pytest.raises(ValueError, match="float32"):
        model_family("gcn", 3, (4,), compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="in_dim"):
        model_family("gcn", 3, (8, 8, 3))


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match=r"'vit'.*'cnn', 'resnet18', 'gcn'"):
        model_family("vit", K, (32, 32, 3))
    with pytest.raises(ValueError, match="compute_dtype"):
        model_family("cnn", K, (32, 32, 3), compute_dtype="float16")
    with pytest.raises(ValueError, match="conv_impl"):
        model_family("cnn", K, (32, 32, 3), conv_impl="cudnn")


def test_width_specs_live_beside_their_models():
    from framp_jax.models import cnn, gcn, preact, resnet
    for name in ("cnn_spec", "resnet18_spec", "preact_cnn_spec", "preact_resnet18_spec", "gcn_spec"):
        assert not hasattr(W, name)
    assert model_family("cnn", K, (32, 32, 3)).width_spec == cnn.cnn_spec()
    assert model_family("resnet18", K, (16, 16, 3)).width_spec == resnet.resnet18_spec()
    assert model_family("gcn", K, (12,)).width_spec == gcn.gcn_spec()
    assert preact.preact_cnn_spec() != preact.preact_resnet18_spec()