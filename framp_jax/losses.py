"""Losses: cross-entropy (optionally label-masked) and the prototype-alignment terms."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits, labels, weights=None):
    """Mean CE over the valid samples: labels < 0 (unlabelled/padding nodes) are ignored, and
    ``weights`` in {0,1} (default all ones) can drop more."""
    logp = jax.nn.log_softmax(logits)
    valid = labels >= 0
    nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
    w = valid.astype(logp.dtype) if weights is None else weights * valid
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def label_masked_logits(logits, label_mask):
    """HeteroFL's masked CE: logits of classes absent from the client are set to 0 (not -inf)."""
    return jnp.where(label_mask[None, :] > 0, logits, 0.0)


def proto_align_fedproto(features, labels, protos, proto_valid, weights=None):
    """FedProto form: MSE(z_b, P[y_b]) averaged over batch × dim (SPEC §1.6).

    Samples whose class has no global prototype target themselves (zero loss) but still count in
    the B·d denominator, as in FedProto; with no prototypes at all the term is 0. Labels < 0
    (graph clients' non-train and padding nodes) are left out of both sums.
    """
    valid = (labels >= 0).astype(features.dtype)  # graph clients: -1 marks non-train nodes
    lab = jnp.maximum(labels, 0)
    target = protos[lab]
    w = valid if weights is None else weights * valid
    has = proto_valid[lab].astype(features.dtype) * w
    denom = jnp.maximum(jnp.sum(w), 1.0) * features.shape[-1]
    return jnp.sum(jnp.square(features - target) * has[:, None]) / denom


def proto_align_batch(features, labels, protos, proto_valid, weights=None):
    """Batch-prototype form: Σ_c ||mean_{y_b=c} z_b - P_c||² / (|C_batch| · d) over the classes
    in the batch that have a global prototype."""
    k = protos.shape[0]
    w = jnp.ones(labels.shape, features.dtype) if weights is None else weights
    onehot = jax.nn.one_hot(labels, k, dtype=features.dtype) * w[:, None]
    counts = onehot.sum(0)
    means = (onehot.T @ features) / jnp.maximum(counts, 1.0)[:, None]
    present = (counts > 0) & proto_valid
    sq = jnp.sum(jnp.square(means - protos), axis=-1) * present
    return jnp.sum(sq) / (jnp.maximum(jnp.sum(present), 1) * features.shape[-1])


ALIGN_FNS = {"fedproto": proto_align_fedproto, "batch_proto": proto_align_batch}
