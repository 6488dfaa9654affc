"""Hypernetworks: pure functions from a client descriptor to a full parameter pytree.

A hypernetwork is a ``HyperNet(init, apply)`` pair (optax style): ``init(key, descriptors) ->
phi`` and ``apply(phi, descriptor, client_id=None) -> params`` (one client; vmap it over
clients). Swapping in another hypernetwork is one factory with the signature of
:func:`chunked_hypernet` registered in ``HYPERNETS`` and selected by ``config.framp.hypernet``;
:func:`build_hypernet` passes every factory the same keyword options (a factory ignores the ones
it does not use).

The default (SPEC §1.4) is the chunked HN: a trunk MLP embeds the descriptor (z), a shared
generator maps [z; e_j] for every learnable chunk embedding e_j to a chunk of C raw values u; the
chunks are concatenated, truncated to the number of generated entries and unflattened in
``jax.tree`` leaf order, then mapped entry-wise as theta = a + b * u, with b the standard init
scale of each entry (He std sqrt(2/fan_in) for kernels, 0.01 for biases/offsets, 0.1 for norm
scales) and a = 1 for norm scales, 0 otherwise. W2 is initialised so that u ~ N(0, 1) at step 0
(measured on the training descriptors), so generated models start at standard init scale. With
one chunk (C >= P) it reduces to FedSheafHN's single linear head.

``hypernet="pfedhn"`` (:func:`pfedhn_hypernet`) is pFedHN's ``CNNHyper``: a learnable per-client
embedding row (``nn.Embedding(num_clients, embed_dim)``) → an MLP trunk (Linear, then
``layers`` × [ReLU, Linear], no final activation) → one linear head per generated tensor that
emits the whole tensor. It ignores the descriptor and reads the client id instead, so it cannot
describe a client it never trained: a client outside ``seen_ids`` (a held-out, never-trained
client) is generated from the mean of the trainable clients' embedding rows (the HN's "average
client"); its budget enters only through the top-k mask. Its per-tensor heads hold
``(hidden + 1) · P`` parameters, so it is meant for small targets (the small CNN, the GCN):
:func:`check_pfedhn_size` refuses targets whose HN would exceed ``PFEDHN_MAX_PARAMS`` (ResNet-18
would need ~1.4 B) before any data is loaded.

:func:`hn_optimizer` builds the HN's optax optimizer: ``adam`` and ``sgd`` (global-norm clip,
then the step), or ``sgd_momentum``, pFedHN's ``torch.optim.SGD(lr, momentum, weight_decay)``:
clip → add ``weight_decay · phi`` to the gradient of *every* HN parameter (torch adds it before
the momentum buffer) → momentum trace → ``-lr`` step. ``embed_lr > 0`` gives the per-client
embedding rows (``phi["client_embed"]``) their own learning rate, pFedHN's second param group.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class HyperNet(NamedTuple):
    init: Callable[..., Any]    # init(key, descriptors [n, D]) -> phi
    apply: Callable[..., Any]   # apply(phi, descriptor [D]) -> params pytree


KERNEL_SCALES = ("he", "model")


def entry_scales(template, generated, kernel_scale: str = "he"):
    """Per-entry affine map (a, b) of theta = a + b * u for the generated leaves, as flat
    float32 numpy vectors in leaf order. ``generated`` is a pytree of bools (template's
    structure) naming the leaves the HN emits. Kernels: ``kernel_scale="he"`` (SPEC §1.4)
    b = sqrt(2 / fan_in); ``"model"``: b = the std of the template's own kernel leaf (the
    target network's initial scale; ``template`` must then hold its initial values)."""
    if kernel_scale not in KERNEL_SCALES:
        raise ValueError(f"kernel_scale={kernel_scale!r}: one of {KERNEL_SCALES}")
    a_parts, b_parts = [], []
    flags = jax.tree.leaves(generated)
    for (path, leaf), gen in zip(jax.tree_util.tree_leaves_with_path(template), flags):
        if not gen:
            continue
        name = getattr(path[-1], "key", str(path[-1]))
        n = int(np.prod(leaf.shape))
        if name == "kernel" and kernel_scale == "model":
            a, b = 0.0, float(np.std(np.asarray(leaf, np.float64)))
        elif name == "kernel":
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
                     chunk_dim: int = 64, gen_hidden: int = 256, dropout: float = 0.0,
                     kernel_scale: str = "he", **unused) -> HyperNet:
    """SPEC §1.4's chunked HN for the target ``template`` pytree (shapes only are used).

    ``chunk_size=0`` (or any size >= P) gives one chunk (SPEC §1.4 item 5, the graph default).
    ``generated``: pytree of bools, the leaves to generate (default all); the others are
    returned as zeros and must be filled in by the caller (``generate="backbone"``).
    ``kernel_scale``: the generated kernels' initial scale (:func:`entry_scales`).
    """
    del dropout, unused  # p_hn = 0 by default (SPEC §1.4); kept in the signature for configs
    generated = generated if generated is not None else jax.tree.map(lambda _: True, template)
    leaves, treedef = jax.tree.flatten(template)
    flags = jax.tree.leaves(generated)
    a_vec, b_vec = entry_scales(template, generated, kernel_scale)
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

    def apply(phi, d, client_id=None):
        del client_id  # the chunked HN sees the descriptor only
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


EMBED_KEY = "client_embed"      # phi's per-client embedding table (pfedhn); embed_lr applies
PFEDHN_MAX_PARAMS = 100_000_000  # largest pfedhn HN (embedding + trunk + heads) we build


def _torch_linear(key, fan_in, fan_out):
    """``torch.nn.Linear``'s default init: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    return {"w": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound, bound)}


def pfedhn_embed_dim(embed_dim: int, num_clients: int) -> int:
    """pFedHN's ``--embed-dim``: -1 = ``int(1 + num_clients / 4)``."""
    return int(1 + num_clients / 4) if embed_dim == -1 else int(embed_dim)


def _leaf_name(path):
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _nested_set(tree: dict, name: tuple, value):
    for k in name[:-1]:
        tree = tree.setdefault(k, {})
    tree[name[-1]] = value


def _nested_get(tree: dict, name: tuple):
    for k in name:
        tree = tree[k]
    return tree


def pfedhn_num_params(template, generated=None, *, num_clients: int, embed_dim: int = -1,
                      hidden: int = 100, layers: int = 3) -> int:
    """Parameters of :func:`pfedhn_hypernet` for ``template`` (shapes only are used)."""
    e = pfedhn_embed_dim(embed_dim, num_clients)
    generated = generated if generated is not None else jax.tree.map(lambda _: True, template)
    p_gen = sum(int(np.prod(l.shape)) for l, g in
                zip(jax.tree.leaves(template), jax.tree.leaves(generated)) if g)
    return num_clients * e + (e + 1) * hidden + layers * (hidden + 1) * hidden + (hidden + 1) * p_gen


def pfedhn_hypernet(template, generated=None, *, num_clients: int, seen_ids=None,
                    embed_dim: int = -1, hidden: int = 100, layers: int = 3,
                    max_params: int = PFEDHN_MAX_PARAMS, **unused) -> HyperNet:
    """pFedHN's ``CNNHyper`` for the target ``template`` (module docstring).

    phi = {"client_embed": [num_clients, E] ~ N(0, 1) (``nn.Embedding``), "trunk": [Linear(E→H),
    ``layers`` × Linear(H→H)], "heads": the template's nesting with a Linear(H → leaf size) per
    generated leaf}, every Linear with
    torch's default init; a head's bias starts at the leaf's offset ``a`` of :func:`entry_scales`
    (1 for norm scales, else 0) on top. ``apply(phi, descriptor, client_id)``: the descriptor is
    unused; ``client_id`` (an int32 scalar) picks the embedding row, and ids outside
    ``seen_ids`` (default: all) get the mean of the seen rows. Leaves not ``generated`` are
    zeros."""
    del unused
    generated = generated if generated is not None else jax.tree.map(lambda _: True, template)
    n_params = pfedhn_num_params(template, generated, num_clients=num_clients, embed_dim=embed_dim,
                                 hidden=hidden, layers=layers)
    if n_params > max_params:
        from framp_jax.config import ConfigError
        raise ConfigError("framp.hypernet", "pfedhn",
                          f"a target whose pfedhn HN stays within {max_params:,} parameters "
                          f"(this one needs {n_params:,}: one head per tensor); use 'chunked'")
    e_dim = pfedhn_embed_dim(embed_dim, num_clients)
    items = jax.tree_util.tree_leaves_with_path(template)
    flags = jax.tree.leaves(generated)
    treedef = jax.tree.structure(template)
    # offset a of entry_scales: norm scales start at 1, everything else at 0
    offset = {_leaf_name(p): 1.0 if getattr(p[-1], "key", None) == "scale" else 0.0
              for p, _ in items}
    seen = np.zeros((num_clients,), bool)
    seen[np.arange(num_clients) if seen_ids is None else np.asarray(seen_ids, int)] = True
    seen_j = jnp.asarray(seen)
    n_seen = float(max(seen.sum(), 1))

    def init(key, descriptors=None):
        del descriptors  # a learnable embedding per client replaces the descriptor
        ks = jax.random.split(key, 3)
        kt = jax.random.split(ks[1], layers + 1)
        trunk = [_torch_linear(kt[0], e_dim, hidden)]
        trunk += [_torch_linear(kt[i + 1], hidden, hidden) for i in range(layers)]
        heads = {}
        kh = jax.random.split(ks[2], max(len(items), 1))
        for i, ((path, leaf), gen) in enumerate(zip(items, flags)):
            if gen:
                name = _leaf_name(path)
                h = _torch_linear(kh[i], hidden, int(np.prod(leaf.shape)))
                _nested_set(heads, name, {"w": h["w"], "b": h["b"] + offset[name]})
        return {EMBED_KEY: jax.random.normal(ks[0], (num_clients, e_dim), jnp.float32),
                "trunk": trunk, "heads": heads}

    def apply(phi, d, client_id=None):
        del d
        if client_id is None:
            raise ValueError("hypernet='pfedhn' generates from the client id: "
                             "apply(phi, descriptor, client_id)")
        emb = phi[EMBED_KEY]
        cid = jnp.asarray(client_id, jnp.int32)
        mean = jnp.sum(jnp.where(seen_j[:, None], emb, 0.0), 0) / n_seen
        e = jnp.where(seen_j[cid], emb[cid], mean)
        h = e @ phi["trunk"][0]["w"] + phi["trunk"][0]["b"]
        for lyr in phi["trunk"][1:]:
            h = jax.nn.relu(h) @ lyr["w"] + lyr["b"]
        out = []
        for (path, leaf), gen in zip(items, flags):
            if gen:
                hd = _nested_get(phi["heads"], _leaf_name(path))
                out.append((h @ hd["w"] + hd["b"]).reshape(leaf.shape))
            else:
                out.append(jnp.zeros(leaf.shape, jnp.float32))
        return jax.tree.unflatten(treedef, out)

    return HyperNet(init, apply)


HYPERNETS = {"chunked": chunked_hypernet, "pfedhn": pfedhn_hypernet}

# (input features, classes) of the graph datasets (their READMEs in the shared data folder)
GRAPH_DIMS = {"cora": (1433, 7), "citeseer": (3703, 6), "amazon_photo": (745, 8),
              "amazon_computers": (767, 10), "coauthor_cs": (6805, 15),
              "coauthor_physics": (8415, 5), "ogbn_arxiv": (128, 40)}
VISION_DIMS = {"cifar10": (10, (32, 32, 3)), "cifar100": (100, (32, 32, 3))}


def _npz_image_shape(path: str):
    """The image shape of a user ``.npz``'s ``x_train``, read from the array header only."""
    import zipfile
    with zipfile.ZipFile(path) as z, z.open("x_train.npy") as f:
        version = np.lib.format.read_magic(f)
        shape = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                 else np.lib.format.read_array_header_2_0(f))[0]
    return tuple(int(v) for v in shape[1:]) + ((1,) if len(shape) == 3 else ())


def target_shapes(c):
    """The FRAMP target model's parameter shapes from the config alone (no data is loaded), or
    None if they cannot be known yet. A user ``npz:`` data set's class count is taken as 1
    (a lower bound; the exact size is checked again when the model is built)."""
    import zipfile
    ds = str(c.dataset)
    try:
        if c.model == "gcn":
            if ds not in GRAPH_DIMS:
                return None
            from framp_jax.models.gcn import make_gcn
            in_dim, k = GRAPH_DIMS[ds]
            model = make_gcn(in_dim, k, hidden=int(c.gcn_hidden))
        else:
            if ds.startswith("npz:"):
                k, shape = 1, _npz_image_shape(ds[4:])
            elif ds in VISION_DIMS:
                k, shape = VISION_DIMS[ds]
            else:
                return None
            if c.model == "cnn":
                from framp_jax.models.cnn import make_cnn
                model = make_cnn(k, shape)
            else:
                from framp_jax.models.resnet import make_resnet18
                model = make_resnet18(k, shape)
        return jax.eval_shape(model.init, jax.random.key(0))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None  # an unreadable or unusual data set fails later with its own error


def check_pfedhn_size(c) -> None:
    """ConfigError if ``hypernet="pfedhn"`` would exceed ``PFEDHN_MAX_PARAMS`` for the config's
    target model (config.validate calls it, before any data loads)."""
    fc = c.framp
    shapes = target_shapes(c)
    if shapes is None:
        return
    generated = {k: jax.tree.map(lambda _: not (fc.generate == "backbone" and k == "classifier"), v)
                 for k, v in shapes.items()}
    n = pfedhn_num_params(shapes, generated, num_clients=int(c.num_clients),
                          embed_dim=int(fc.embed_dim), hidden=int(fc.hn_hidden),
                          layers=int(fc.hn_layers))
    if n > PFEDHN_MAX_PARAMS:
        from framp_jax.config import ConfigError
        raise ConfigError("framp.hypernet", "pfedhn",
                          f"a target whose pfedhn HN stays within {PFEDHN_MAX_PARAMS:,} parameters "
                          f"(model={c.model!r} on {str(c.dataset)!r} needs {n:,}: one linear head "
                          f"per tensor); use hypernet='chunked'")


def build_hypernet(fc, template, generated, num_clients: int, seen_ids) -> HyperNet:
    """``HYPERNETS[fc.hypernet]`` with the FRAMP config's options (``fc`` = ``config.framp``)."""
    return HYPERNETS[fc.hypernet](
        template, generated, hidden=fc.hn_hidden, chunk_size=fc.chunk_size,
        chunk_dim=fc.chunk_dim, gen_hidden=fc.gen_hidden, num_clients=num_clients,
        seen_ids=seen_ids, embed_dim=fc.get("embed_dim", -1), layers=fc.get("hn_layers", 3),
        kernel_scale=fc.get("gen_init", "he"))


# ---------------------------------------------------------------------------------------------
# the HN optimizer

HN_OPTIMIZERS = ("adam", "sgd", "sgd_momentum")


def _embed_labels(phi):
    return {k: jax.tree.map(lambda _: "embed" if k == EMBED_KEY else "rest", v)
            for k, v in phi.items()}


def hn_optimizer(kind: str, lr: float, clip: float, *, momentum: float = 0.9,
                 weight_decay: float = 1e-3, embed_lr: float = 0.0) -> optax.GradientTransformation:
    """The HN's optimizer (module docstring). ``momentum`` and ``weight_decay`` are used by
    ``sgd_momentum`` only; ``embed_lr > 0`` = the learning rate of ``phi["client_embed"]`` (the
    rest keeps ``lr``); 0 = one learning rate for all."""
    if kind not in HN_OPTIMIZERS:
        raise ValueError(f"hn_optimizer={kind!r}: one of {HN_OPTIMIZERS}")

    def step(rate):
        if kind == "adam":
            return optax.adam(rate)
        if kind == "sgd":
            return optax.sgd(rate)
        return optax.scale(-rate)  # after the momentum trace, as torch's p -= lr * buf

    lr_step = (optax.multi_transform({"embed": step(embed_lr), "rest": step(lr)}, _embed_labels)
               if embed_lr and embed_lr > 0 else step(lr))
    if kind == "sgd_momentum":
        return optax.chain(optax.clip_by_global_norm(clip), optax.add_decayed_weights(weight_decay),
                           optax.trace(decay=momentum), lr_step)
    return optax.chain(optax.clip_by_global_norm(clip), lr_step)
