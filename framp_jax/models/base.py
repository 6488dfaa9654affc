"""The model contract every target network follows.

A model is a configured closure, as in jraph's models: pure functions over a params pytree
(a nested dict of arrays); no hidden state. ``apply`` returns the logits *and* the features fed
to the final classifier (the representation the prototype-alignment loss works on).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

Params = Any  # nested dict of jnp arrays


class Model(NamedTuple):
    name: str
    # init(key) -> params
    init: Callable[..., Params]
    # apply(params, inputs, *, train: bool = False, rng: key | None = None) -> (logits, features)
    apply: Callable[..., tuple]
    # prunable(params) -> pytree of python bools with params' structure: True for the leaves a
    # budget mask may zero (conv/linear kernels and the classifier bias), False otherwise
    # (normalisation scale/offset, GCN conv biases).
    prunable: Callable[[Params], Any]
    feature_dim: int
    num_classes: int
