"""The model family of a run: every network an algorithm needs, built from one description.

A :class:`ModelFamily` holds, for one model name, number of classes and input shape, the
constructors of the run's network at any width rate (``make``), of ScaleFL's early-exit levels
(``make_exits``) and of HeteroFL's pre-activation sBN backbone (``make_preact``), together with
the channel structure (:class:`framp_jax.width.WidthSpec`) of their params. Algorithms take their
networks from the family instead of rebuilding them from run-level config fields.

Each model module exports ``family(num_classes, input_shape, **options) -> ModelFamily``
(``models/cnn.py``, ``models/resnet.py``, ``models/gcn.py``); :func:`model_family` dispatches on
the model name. Every ``make*`` is cached on its arguments (one model object per width, or per
(width, exits)), and builds exactly the model the engine built before families existed, compute
dtype wrapping included (``models.layers.with_compute_dtype``: the image models' main,
pre-activation and exit models; the GCN computes in float32 only).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple

from framp_jax.width import WidthSpec

MODULES = {"cnn": "framp_jax.models.cnn", "resnet18": "framp_jax.models.resnet",
           "gcn": "framp_jax.models.gcn"}
CONV_IMPLS = ("auto", "xla", "im2col")


class ModelFamily(NamedTuple):
    name: str                 # "cnn" | "resnet18" | "gcn"
    make: Callable            # make(width: float = 1.0) -> Model: the run's network at width rate r
    width_spec: WidthSpec     # channel units of make(r)'s params (framp_jax.width machinery)
    feature_units: tuple      # the unit(s) feeding the classifier (FRAMP width extraction)
    make_exits: Callable      # make_exits(width: float, exits: int) -> ExitModel (ScaleFL)
    max_exits: int            # exits of the full-depth early-exit model
    make_preact: Callable | None  # make_preact(width) -> SBNModel (HeteroFL); None for the GCN
    preact_spec: WidthSpec | None  # channel units of make_preact(r)'s params
    input_shape: tuple        # image (H, W, C), or (in_dim,) for the GCN


def per_width(build: Callable) -> Callable:
    """``make(width=1.0)``: ``build(float(width))``, cached per width (``make()``, ``make(1)``
    and ``make(1.0)`` return the same object)."""
    cached = functools.lru_cache(maxsize=None)(build)

    def make(width: float = 1.0):
        return cached(float(width))

    return make


def per_width_exits(build: Callable) -> Callable:
    """``make_exits(width, exits)``: ``build(float(width), exits)``, cached per (width, exits)
    (``exits`` is passed as given: the exit models validate it)."""
    cached = functools.lru_cache(maxsize=None)(build)

    def make_exits(width: float, exits: int):
        return cached(float(width), exits)

    return make_exits


def image_family(name: str, input_shape: tuple, compute_dtype: str, *, make: Callable,
                 make_exits: Callable, make_preact: Callable, **fields) -> ModelFamily:
    """The :class:`ModelFamily` of an image model from its plain constructors ``make(r)``,
    ``make_exits(w, h)`` and ``make_preact(r)``: each result computing in ``compute_dtype``
    (``with_compute_dtype``, as the engine, HeteroFL and ScaleFL wrap them) and cached;
    ``fields``: the remaining ModelFamily fields (width_spec, feature_units, max_exits,
    preact_spec)."""
    from framp_jax.models.layers import with_compute_dtype

    def wrapped(build):
        return lambda *args: with_compute_dtype(build(*args), compute_dtype)

    return ModelFamily(name=name, make=per_width(wrapped(make)),
                       make_exits=per_width_exits(wrapped(make_exits)),
                       make_preact=per_width(wrapped(make_preact)), input_shape=input_shape,
                       **fields)


def model_family(name: str, num_classes: int, input_shape, *, conv_impl: str = "auto",
                 compute_dtype: str = "float32", gcn_hidden: int = 128,
                 dropout: float = 0.5) -> ModelFamily:
    """The :class:`ModelFamily` of model ``name`` for ``num_classes`` classes and inputs of
    ``input_shape`` (an image's (H, W, C), or (in_dim,) for the GCN). ``conv_impl`` and
    ``compute_dtype`` are the image models'; ``gcn_hidden`` and ``dropout`` the GCN's (which
    takes ``compute_dtype="float32"`` only). Raises ValueError for an unknown name or option."""
    if name not in MODULES:
        raise ValueError(f"model={name!r}: allowed {tuple(MODULES)}")
    from framp_jax.models.layers import COMPUTE_DTYPES
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype={compute_dtype!r}: allowed {COMPUTE_DTYPES}")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}: allowed {CONV_IMPLS}")
    family = importlib.import_module(MODULES[name]).family
    if name == "gcn":
        return family(num_classes, input_shape, hidden=gcn_hidden, dropout=dropout,
                      compute_dtype=compute_dtype)
    return family(num_classes, input_shape, conv_impl=conv_impl, compute_dtype=compute_dtype)
