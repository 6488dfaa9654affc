"""Width extraction: genuinely narrower pytrees cut out of a full model along its channel units.

A model's channel structure is described by a :class:`WidthSpec`: a list of **units** (one
channel dimension shared by several leaves) and the **bindings** that tie leaf axes to units.
Cutting a unit to the index set ``idx`` (``k`` of its ``C`` channels) takes those indices along
every axis bound to it, so the result is the parameter pytree of the same network at the narrower
width; ``scatter`` writes such a narrow pytree back into the full one.

Spec format
-----------
``WidthSpec(units, binds)``:

* ``units``: tuple of unit names, in model order.
* ``binds``: tuple of :class:`Bind` ``(path, axis, unit, role, blocks)``:

  - ``path``: the leaf's key path in the params dict, e.g. ``("conv1", "kernel")``;
  - ``axis``: the leaf axis that runs over the unit's channels;
  - ``role``: ``"out"`` (the leaf produces the unit: a conv/dense output axis), ``"in"`` (the
    leaf consumes it: the next layer's input axis) or ``"vec"`` (a per-channel vector: bias, BN
    scale/offset, BN statistics);
  - ``blocks``: the axis is a concatenation of equal blocks, each indexed by the unit (NHWC
    flatten before a dense layer: channel ``c`` of the last conv feeds dense rows
    ``p * C + c`` for every spatial position ``p``). The number of blocks is
    ``axis_size // C``.

A unit's size ``C`` is read from its first ``"out"`` binding. Axes not bound to any unit (image
channels, classes, kernel taps) are never cut. Index sets ``idx_per_unit`` map each unit name to
an integer array of distinct indices in ``[0, C)``; their order is kept (the narrow channel ``j``
is full channel ``idx[j]``), so unsorted windows such as FedRolex's rolling one work as is.

Index makers
------------
* :func:`prefix_indices` (HeteroFL): the first ``ceil(rate * C)`` channels of every unit;
* :func:`rolling_indices` (FedRolex): ``roll(arange(C), t mod C)[:k]``, i.e. ``(j - t) mod C``
  for ``j < k``, each unit with its own ``C``; ``t`` may be traced;
* :func:`norm_topk_indices` (FRAMP ``extraction="width"``): the ``k`` output channels with the
  largest L2 norm over the unit's ``"out"`` leaves, ascending, ties to the lower index.

Widths are ``max(1, ceil(rate * C))`` (HeteroFL ``src/models/resnet.py``: ``int(np.ceil(model_rate
* x))``), the same rule as the models' ``width`` argument, so ``gather`` with prefix indices at
rate ``r`` yields exactly the param structure of the model built at ``width=r``.

The specs of the framp_jax models live beside them and are built with :class:`SpecBuilder`:
``models/cnn.py`` ``cnn_spec``, ``models/resnet.py`` ``resnet18_spec``, ``models/preact.py``
``preact_cnn_spec`` / ``preact_resnet18_spec``, ``models/gcn.py`` ``gcn_spec``; a run reaches its
model's through ``models.family.ModelFamily.width_spec``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

ROLES = ("out", "in", "vec")


class Bind(NamedTuple):
    path: tuple
    axis: int
    unit: str
    role: str = "out"
    blocks: bool = False


class WidthSpec(NamedTuple):
    units: tuple
    binds: tuple

    def binds_of(self, unit: str):
        return tuple(b for b in self.binds if b.unit == unit)


# ---------------------------------------------------------------------------------------------
# pytree helpers (params are nested dicts)

def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    """A copy of the nested dict ``tree`` with ``path`` replaced (other leaves shared)."""
    if not path:
        return value
    out = dict(tree)
    out[path[0]] = _set(tree[path[0]], path[1:], value)
    return out


def _leaf_binds(spec: WidthSpec):
    """{path: [Bind, ...]} in spec order."""
    out = {}
    for b in spec.binds:
        if b.role not in ROLES:
            raise ValueError(f"Bind {b}: role must be one of {ROLES}")
        out.setdefault(tuple(b.path), []).append(b)
    return out


def width_of(c: int, rate: float) -> int:
    """Kept channels of a unit of size ``c`` at width ``rate``: ``max(1, ceil(rate * c))``."""
    return max(1, math.ceil(rate * c))


def unit_sizes(params, spec: WidthSpec) -> dict:
    """{unit: C} read from each unit's first "out" binding (static Python ints)."""
    sizes = {}
    for u in spec.units:
        outs = [b for b in spec.binds if b.unit == u and b.role == "out"]
        if not outs:
            raise ValueError(f"unit {u!r} has no 'out' binding")
        b = outs[0]
        sizes[u] = int(_get(params, b.path).shape[b.axis])
    return sizes


def check_spec(params, spec: WidthSpec) -> dict:
    """Validate that every binding agrees with its unit's size; returns ``unit_sizes``."""
    sizes = unit_sizes(params, spec)
    for b in spec.binds:
        if b.unit not in sizes:
            raise ValueError(f"{b}: unknown unit")
        n = int(_get(params, b.path).shape[b.axis])
        c = sizes[b.unit]
        if (n % c) if b.blocks else (n != c):
            raise ValueError(f"{'/'.join(b.path)} axis {b.axis} has size {n}, which does not "
                             f"match unit {b.unit!r} of size {c}{' (blocks)' if b.blocks else ''}")
    return sizes


def _axis_index(b: Bind, dim: int, c: int, idx):
    """Full-model indices along a bound axis of size ``dim`` for the unit index set ``idx``."""
    idx = jnp.asarray(idx, jnp.int32)
    if not b.blocks:
        return idx
    nb = dim // c
    return (jnp.arange(nb, dtype=jnp.int32)[:, None] * c + idx[None, :]).reshape(-1)


def _leaf_indices(binds, shape, sizes, idx_per_unit):
    """Per-axis full indices (None = axis not cut) for one leaf."""
    per_axis = [None] * len(shape)
    for b in binds:
        ax = b.axis % len(shape)
        if per_axis[ax] is not None:
            raise ValueError(f"{'/'.join(b.path)} axis {ax} is bound twice")
        per_axis[ax] = _axis_index(b, shape[ax], sizes[b.unit], idx_per_unit[b.unit])
    return per_axis


def _open_mesh(per_axis, shape):
    """Broadcastable index arrays (numpy ``ix_`` style) covering every axis."""
    nd = len(shape)
    out = []
    for ax, ix in enumerate(per_axis):
        ix = jnp.arange(shape[ax], dtype=jnp.int32) if ix is None else ix
        out.append(ix.reshape((1,) * ax + (-1,) + (1,) * (nd - ax - 1)))
    return tuple(out)


def gather(params, spec: WidthSpec, idx_per_unit: dict):
    """The narrow pytree: every bound axis restricted to its unit's indices (in that order)."""
    sizes = unit_sizes(params, spec)
    out = params
    for path, binds in _leaf_binds(spec).items():
        x = _get(params, path)
        for ax, ix in enumerate(_leaf_indices(binds, x.shape, sizes, idx_per_unit)):
            if ix is not None:
                x = jnp.take(x, ix, axis=ax)
        out = _set(out, path, x)
    return out


def scatter(full_params, narrow_params, spec: WidthSpec, idx_per_unit: dict):
    """``full_params`` with the narrow values written back at the gathered positions; every
    other entry unchanged. On zeros this is the adjoint of :func:`gather`
    (``<gather(x), y> == <x, scatter(0, y)>``; indices within a unit are distinct)."""
    sizes = unit_sizes(full_params, spec)
    binds_by_path = _leaf_binds(spec)

    def leaf(path, full, narrow):
        key = tuple(getattr(p, "key", p) for p in path)
        binds = binds_by_path.get(key)
        if not binds:
            return narrow.astype(full.dtype)
        per_axis = _leaf_indices(binds, full.shape, sizes, idx_per_unit)
        return full.at[_open_mesh(per_axis, full.shape)].set(narrow.astype(full.dtype))

    return jax.tree_util.tree_map_with_path(leaf, full_params, narrow_params)


def coverage(full_params, spec: WidthSpec, idx_per_unit: dict, dtype=jnp.float32):
    """{0,1} pytree of the full shape: 1 where a gathered entry lives."""
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, dtype), full_params)
    ones = jax.tree.map(lambda a: jnp.ones(a.shape, dtype),
                        jax.eval_shape(lambda p: gather(p, spec, idx_per_unit), full_params))
    return scatter(zeros, ones, spec, idx_per_unit)


# ---------------------------------------------------------------------------------------------
# index makers

def prefix_indices(sizes: dict, rate: float) -> dict:
    """HeteroFL (``src/fed.py`` ``split_model``): the first ``ceil(rate * C)`` channels."""
    return {u: jnp.arange(width_of(c, rate), dtype=jnp.int32) for u, c in sizes.items()}


def rolling_indices(sizes: dict, rate: float, t) -> dict:
    """FedRolex (``resnet_server.py`` ``ResnetServerRoll.split_model``, ``overlap=None``): per
    unit with its own ``C``, ``torch.roll(arange(C), t % C)[:k]`` = ``(j - t) mod C`` for
    ``j < k = ceil(rate * C)``. ``t`` (the round) may be a traced integer."""
    t = jnp.asarray(t, jnp.int32)
    return {u: jnp.mod(jnp.arange(width_of(c, rate), dtype=jnp.int32) - t, c)
            for u, c in sizes.items()}


def random_indices(sizes: dict, rate: float, key) -> dict:
    """A uniformly random ``ceil(rate * C)``-subset of every unit (FedRolex ``--algo random``)."""
    keys = jax.random.split(key, len(sizes))
    return {u: jax.random.permutation(k, c)[:width_of(c, rate)].astype(jnp.int32)
            for k, (u, c) in zip(keys, sizes.items())}


def unit_norms(params, spec: WidthSpec) -> dict:
    """{unit: [C]} L2 norm of each channel over all of the unit's ``"out"`` leaves (every other
    axis summed; blocked out-axes add their blocks)."""
    sizes = unit_sizes(params, spec)
    out = {}
    for u, c in sizes.items():
        sq = jnp.zeros((c,), jnp.float32)
        for b in spec.binds:
            if b.unit != u or b.role != "out":
                continue
            x = jnp.moveaxis(_get(params, b.path).astype(jnp.float32), b.axis, 0)
            s = jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=1)
            sq = sq + (s.reshape(-1, c).sum(0) if b.blocks else s)
        out[u] = jnp.sqrt(sq)
    return out


def norm_topk_indices(params, spec: WidthSpec, rate: float) -> dict:
    """The ``ceil(rate * C)`` output channels of largest L2 norm per unit (FRAMP
    ``extraction="width"`` on the generated weights), as ascending indices; ties go to the lower
    index."""
    out = {}
    for u, n in unit_norms(params, spec).items():
        k = width_of(n.shape[0], rate)
        top = jnp.argsort(-n, stable=True)[:k]
        out[u] = jnp.sort(top).astype(jnp.int32)
    return out


# ---------------------------------------------------------------------------------------------
# building specs (the specs themselves live beside their models: ``models/cnn.py``,
# ``models/resnet.py``, ``models/preact.py``, ``models/gcn.py``)

class SpecBuilder:
    """Accumulates units and bindings in model order; ``build()`` -> :class:`WidthSpec`."""

    def __init__(self):
        self.units, self.binds = [], []

    def unit(self, name):
        self.units.append(name)
        return name

    def out(self, path, axis, unit):
        self.binds.append(Bind(tuple(path), axis, unit, "out"))

    def inp(self, path, axis, unit, blocks=False):
        self.binds.append(Bind(tuple(path), axis, unit, "in", blocks))

    def vec(self, path, unit, names):
        for n in names:
            self.binds.append(Bind(tuple(path) + (n,), 0, unit, "vec"))

    def build(self):
        return WidthSpec(tuple(self.units), tuple(self.binds))


BN_KEYS = ("scale", "offset")
