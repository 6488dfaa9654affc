"""The method registry: every federated method framp_jax can run, with the options it owns.

A method is a :class:`Method`: its ``factory(ctx, opts) -> Algorithm`` (``ctx`` a
:class:`~framp_jax.algorithms.base.Context`, ``opts`` its resolved options), its ``defaults()``
(the options a config may set under ``config.<name>``) and ``validate(config, opts)`` (raises
:class:`~framp_jax.config.ConfigError` naming the field, the value and what is allowed; reads
the config only, never data). ``config.validate`` resolves and validates the chosen method's
options before anything loads or compiles.

Adding a method: write ``framp_jax/algorithms/NAME.py`` defining ``METHOD = Method(...)`` and
add one line ``"framp_jax.algorithms.NAME:METHOD"`` to :data:`_ENTRIES` (or call
:func:`register` from your own code).
"""
from __future__ import annotations

import importlib
from typing import Callable, NamedTuple

import ml_collections as mlc

# one line per method, in the order listings and sweeps use
_ENTRIES = (
    "framp_jax.algorithms.fedavg:FEDAVG",
    "framp_jax.algorithms.fedavg:LOCAL",
    "framp_jax.algorithms.framp:METHOD",
    "framp_jax.algorithms.heterofl:METHOD",
    "framp_jax.algorithms.fedrolex:METHOD",
    "framp_jax.algorithms.fiarse:METHOD",
    "framp_jax.algorithms.scalefl:METHOD",
)


class Method(NamedTuple):
    name: str
    factory: Callable                      # factory(ctx, opts) -> Algorithm
    defaults: Callable | None = None       # () -> ml_collections.ConfigDict (config.<name>)
    validate: Callable | None = None       # validate(config, opts): raise ConfigError


class _Registry(dict):
    """``{name: Method}``, filled from :data:`_ENTRIES` on first use."""

    def _load(self):
        if not getattr(self, "_loaded", False):
            self._loaded = True
            for entry in _ENTRIES:
                module, attr = entry.split(":")
                m = getattr(importlib.import_module(module), attr)
                dict.setdefault(self, m.name, m)
        return self

    def __getitem__(self, k):
        return dict.__getitem__(self._load(), k)

    def __contains__(self, k):
        return dict.__contains__(self._load(), k)

    def __iter__(self):
        return dict.__iter__(self._load())

    def __len__(self):
        return dict.__len__(self._load())

    def keys(self):
        return dict.keys(self._load())

    def values(self):
        return dict.values(self._load())

    def items(self):
        return dict.items(self._load())

    def get(self, k, default=None):
        return dict.get(self._load(), k, default)


METHODS: dict = _Registry()


def register(method: Method) -> Method:
    """Add (or replace) a method at run time, e.g. from research code or a test."""
    METHODS._load()
    dict.__setitem__(METHODS, method.name, method)
    return method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register` (no error if it is not there)."""
    METHODS._load()
    dict.pop(METHODS, name, None)


def names() -> tuple:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    from framp_jax.config import ConfigError
    if name not in METHODS:
        raise ConfigError("method", name, f"one of {names()}")
    return METHODS[name]


def method_options(c, method: Method):
    """``config.<name>`` over the method's defaults (None for a method without options). A key
    the method does not know is a ConfigError naming it."""
    if method.defaults is None:
        return None
    from framp_jax.config import ConfigError
    opts = method.defaults()
    given = c.get(method.name) if hasattr(c, "get") else None
    if given is None:
        return opts
    unknown = sorted(set(given.keys()) - set(opts.keys()))
    if unknown:
        raise ConfigError(f"{method.name}.{unknown[0]}", given[unknown[0]],
                          f"a known {method.name} option: {sorted(opts.keys())}")
    return mlc.ConfigDict(dict(opts.to_dict(), **given.to_dict()))


def resolve(c):
    """``(method, opts)`` of the config's method, its options validated."""
    method = get_method(c.method)
    opts = method_options(c, method)
    if method.validate is not None:
        method.validate(c, opts)
    return method, opts
