"""FedRolex (Alam et al., NeurIPS 2022): HeteroFL with a rolling width window (SPEC §4.2, §4.7).

Round ``t`` (0-based, advanced after every aggregation) trains, for every channel unit of size
``C``, the channels ``roll(arange(C), t mod C)[:k]`` = ``(j − t) mod C`` for ``j < k =
ceil(r·C)`` (``resnet_server.py`` ``ResnetServerRoll.split_model`` with ``overlap=None``): the
window advances one channel per round and every client of the round shares it (only ``k``
differs with the level). Everything else (model, Scaler, BN, masked CE, label-wise output
aggregation, uncovered entries kept) is HeteroFL's, shared through
``heterofl.width_method``.

Options (``c.fedrolex``):

* ``algo``: ``"roll"`` (default), ``"static"`` (= HeteroFL's prefix), ``"random"`` (a fresh
  uniformly random ``k``-subset per round, per unit and per client, ``ResnetServerRandom``). The
  official random variant draws per *layer*, so inside a stage the identity-shortcut blocks add
  channels of different index sets; here one draw per unit keeps the residual stream aligned.
* ``official_count_bug``: ``False`` (default) = the intended plain count-average (HeteroFL's
  ``combine``, ``--weighting avg``). ``True`` reproduces the official ``combine``, whose
  ``self.tmp_counts = tmp_counts_cpy`` inside the key loop aliases the running counts, so BN and
  output-layer entries are weighted by growing, carried-over update counts
  (``heterofl.combine_official_counts``).
* ``weighting``: ``"avg"`` (default, ``--weighting avg``) or ``"width"`` (``--weighting width``
  of the official ``combine``): each client's contribution to an entry of a hidden kernel (every
  conv/dense kernel except the output layer; ResNet's conv1/conv2/shortcut) is weighted by its
  width of that kernel's output dimension, ``ceil(rate · O)`` (the narrow kernel's last axis),
  and the entry becomes ``Σ_i k_i θ_i / Σ_i k_i`` over the clients holding it. Biases, norm
  parameters and the output layer are not width-weighted (plain count-average, or the
  ``official_count_bug`` counts), as in the official code.
* ``eval_bn``: ``"sbn"`` (default, SPEC §5 #18: HeteroFL's server statistics pass) or
  ``"batch"``: batch statistics of each evaluation batch, which is what the official
  ``main_resnet.py`` ``test`` does (its global model has ``track_running_stats=False``).
* LR: ``MultiStepLR`` with ``scheduler.step()`` called *before* each round (``main_resnet.py``),
  so round ``t`` uses ``lr · gamma^{#{m ≤ t + 1}}``.

* ``eval_window``: ``"roll0"`` (default, SPEC §4.2): per-size evaluation extracts the first
  ``k`` channels, i.e. the window at roll 0; ``"last"``: the window of the last completed round
  (``roll = (t_done - 1) mod C``), the channel combination that round's clients of that size
  trained together. (With different unit sizes the roll-0 prefixes of all units were never
  trained together as one submodel; the official code evaluates only the full model.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from framp_jax import width as W
from framp_jax.algorithms.base import Algorithm, Context
from framp_jax.algorithms.heterofl import (WEIGHTINGS, heterofl_defaults, validate_width_opts,
                                           width_method)
from framp_jax.algorithms.registry import Method
from framp_jax.config import ConfigError

ALGOS = ("roll", "random", "static")
EVAL_BN = ("sbn", "batch")
EVAL_WINDOWS = ("roll0", "last")


def fedrolex_defaults():
    f = heterofl_defaults()
    f.algo = "roll"
    f.official_count_bug = False
    f.eval_bn = "sbn"
    f.eval_window = "roll0"
    f.weighting = "avg"
    return f


def validate_options(c, opts) -> None:
    """FedRolex's options (``config.fedrolex`` over :func:`fedrolex_defaults`), checked before
    any data loads."""
    validate_width_opts(c, "fedrolex", opts)
    if opts.algo not in ALGOS:
        raise ConfigError("fedrolex.algo", opts.algo, f"one of {ALGOS}")
    if opts.eval_bn not in EVAL_BN:
        raise ConfigError("fedrolex.eval_bn", opts.eval_bn, f"one of {EVAL_BN}")
    if opts.eval_window not in EVAL_WINDOWS or (opts.eval_window == "last" and opts.algo != "roll"):
        raise ConfigError("fedrolex.eval_window", opts.eval_window,
                          f"one of {EVAL_WINDOWS}; 'last' only with algo='roll'")
    if not isinstance(opts.official_count_bug, bool):
        raise ConfigError("fedrolex.official_count_bug", opts.official_count_bug, "True or False")
    if opts.weighting not in WEIGHTINGS:
        raise ConfigError("fedrolex.weighting", opts.weighting, f"one of {WEIGHTINGS}")


def fedrolex(ctx: Context, opts) -> Algorithm:
    per_client = False
    if opts.algo == "roll":
        index_fn = lambda sizes, r, t, cid: W.rolling_indices(sizes, r, t)
    elif opts.algo == "static":
        index_fn = lambda sizes, r, t, cid: W.prefix_indices(sizes, r)
    else:
        root = jax.random.fold_in(jax.random.key(ctx.seed), 5)
        per_client = True

        def index_fn(sizes, r, t, cid):
            return W.random_indices(sizes, r, jax.random.fold_in(jax.random.fold_in(root, t), cid))
    eval_index_fn = None
    if opts.eval_window == "last":
        eval_index_fn = lambda sizes, r, t_done: W.rolling_indices(sizes, r,
                                                                   jnp.maximum(t_done - 1, 0))
    return width_method(ctx, "fedrolex", opts, index_fn, per_client_index=per_client,
                        lr_offset=1, eval_bn=opts.eval_bn, count_bug=opts.official_count_bug,
                        eval_index_fn=eval_index_fn, weighting=opts.weighting)


METHOD = Method("fedrolex", fedrolex, fedrolex_defaults, validate_options)
