"""Hypernetworks: pure functions from a client descriptor to a full parameter pytree.

A hypernetwork is a ``HyperNet(init, apply)`` pair (optax style): ``init(key, descriptors) ->
phi`` and ``apply(phi, descriptor) -> params`` (one client; vmap it over clients). Swapping in
another hypernetwork is one factory with the signature of :func:`chunked_hypernet` registered in
``HYPERNETS`` and selected by ``config.framp.hypernet``.

The default (SPEC §1.4) is the chunked HN: a trunk MLP embeds the descriptor (z), a shared
generator maps [z; e_j] for every learnable chunk embedding e_j to a chunk of C raw values u; the
chunks are concatenated, truncated to the number of generated entries and unflattened in
``jax.tree`` leaf order, then mapped entry-wise as theta = a + b * u, with b the standard init
scale of each entry (He std sqrt(2/fan_in) for kernels, 0.01 for biases/offsets, 0.1 for norm
scales) and a = 1 for norm scales, 0 otherwise. W2 is initialised so that u ~ N(0, 1) at step 0
(measured on the training descriptors), so generated models start at standard init scale. With
one chunk (C >= P) it reduces to FedSheafHN's single linear head.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class HyperNet(NamedTuple):
    init: Callable[..., Any]    # init(key, descriptors [n, D]) -> phi
    apply: Callable[..., Any]   # apply(phi, descriptor [D]) -> params pytree


def entry_scales(template, generated):
    """Per-entry affine map (a, b) of theta = a + b * u for the generated leaves, as flat
    float32 numpy vectors in leaf order. ``generated`` is a pytree of bools (template's
    structure) naming the leaves the HN emits."""
    a_parts, b_parts = [], []
    flags = jax.tree.leaves(generated)
    for (path, leaf), gen in zip(jax.tree_util.tree_leaves_with_path(template), flags):
        if not gen:
            continue
        name = getattr(path[-1], "key", str(path[-1]))
        n = int(np.prod(leaf.shape))
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            a, b = 0.0, math.sqrt(2.0 / max(fan_in, 1))
        elif name == "scale":
            a, b = 1.0, 0.1
        else:  # biases, norm offsets
            a, b = 0.0, 0.01
        a_parts.append(np.full(n, a, np.float32))
        b_parts.append(np.full(n, b, np.float32))
    return np.concatenate(a_parts), np.concatenate(b_parts)


def _dense_init(key, fan_in, fan_out):
    return {"w": jax.random.normal(key, (fan_in, fan_out), jnp.float32) * math.sqrt(2.0 / fan_in),
            "b": jnp.zeros((fan_out,), jnp.float32)}


def chunked_hypernet(template, generated=None, *, hidden: int = 128, chunk_size: int = 16384,
                     chunk_dim: int = 64, gen_hidden: int = 256, dropout: float = 0.0) -> HyperNet:
    """SPEC §1.4's chunked HN for the target ``template`` pytree (shapes only are used).

    ``chunk_size=0`` (or any size >= P) gives one chunk (SPEC §1.4 item 5, the graph default).
    ``generated``: pytree of bools, the leaves to generate (default all); the others are
    returned as zeros and must be filled in by the caller (``generate="backbone"``).
    """
    del dropout  # p_hn = 0 by default (SPEC §1.4); kept in the signature for configs
    generated = generated if generated is not None else jax.tree.map(lambda _: True, template)
    leaves, treedef = jax.tree.flatten(template)
    flags = jax.tree.leaves(generated)
    a_vec, b_vec = entry_scales(template, generated)
    p_gen = int(a_vec.size)
    if chunk_size < 0:
        raise ValueError(f"chunk_size={chunk_size}: an integer >= 1, or 0 for one chunk")
    chunk = p_gen if chunk_size == 0 else min(chunk_size, p_gen)
    n_chunks = -(-p_gen // chunk)
    shapes = [l.shape for l in leaves]

    def trunk(phi, d):
        h = jax.nn.relu(d @ phi["trunk1"]["w"] + phi["trunk1"]["b"])
        h = jax.nn.relu(h @ phi["trunk2"]["w"] + phi["trunk2"]["b"])
        return h @ phi["trunk3"]["w"] + phi["trunk3"]["b"]

    def hidden_units(phi, z):
        zc = jnp.concatenate([jnp.broadcast_to(z, (n_chunks, z.shape[-1])), phi["chunk_emb"]], -1)
        return jax.nn.relu(zc @ phi["gen1"]["w"] + phi["gen1"]["b"])

    def init(key, descriptors):
        descriptors = jnp.asarray(descriptors, jnp.float32)
        d_dim = descriptors.shape[-1]
        ks = jax.random.split(key, 6)
        phi = {"trunk1": _dense_init(ks[0], d_dim, hidden),
               "trunk2": _dense_init(ks[1], hidden, hidden),
               "trunk3": _dense_init(ks[2], hidden, hidden),
               "chunk_emb": jax.random.normal(ks[3], (n_chunks, chunk_dim), jnp.float32),
               "gen1": _dense_init(ks[4], hidden + chunk_dim, gen_hidden)}
        # W2 scaled so that u ~ N(0, 1) at step 0 on the given descriptors
        h = jax.vmap(lambda d: hidden_units(phi, trunk(phi, d)))(descriptors)
        ms = float(jnp.mean(jnp.square(h))) * gen_hidden
        w2 = jax.random.normal(ks[5], (gen_hidden, chunk), jnp.float32) / math.sqrt(max(ms, 1e-12))
        phi["gen2"] = {"w": w2, "b": jnp.zeros((chunk,), jnp.float32)}
        return phi

    a_j, b_j = jnp.asarray(a_vec), jnp.asarray(b_vec)

    def apply(phi, d):
        z = trunk(phi, jnp.asarray(d, jnp.float32))
        u = (hidden_units(phi, z) @ phi["gen2"]["w"] + phi["gen2"]["b"]).reshape(-1)[:p_gen]
        theta = a_j + b_j * u
        out, off = [], 0
        for shape, gen in zip(shapes, flags):
            n = int(np.prod(shape))
            if gen:
                out.append(theta[off:off + n].reshape(shape))
                off += n
            else:
                out.append(jnp.zeros(shape, jnp.float32))
        return jax.tree.unflatten(treedef, out)

    return HyperNet(init, apply)


HYPERNETS = {"chunked": chunked_hypernet}
