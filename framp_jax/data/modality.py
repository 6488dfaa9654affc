"""The modality contract: everything the shared client update, the prototype pass and the
evaluation need to know about a kind of data. Algorithms and ``client.local_train`` call these
methods and never ask which modality they have.

Two implementations: :class:`framp_jax.data.image_modality.ImageModality` (uint8 image arrays,
shuffled augmented mini-batches, batched evaluation) and
:class:`framp_jax.data.graph_modality.GraphModality` (padded subgraph clients, full-batch
steps, whole-graph evaluation). A new modality implements this protocol and builds its
:class:`~framp_jax.algorithms.base.FedData` in :mod:`framp_jax.problem`.

Conventions: ``x``/``y``/``count`` are one client's data (``x`` any pytree with the samples on
its leading axis or a whole graph; ``y`` int labels, ``< 0`` = not a training label; ``count``
the real samples); ``local`` is a :class:`framp_jax.client.LocalConfig`. Everything is pure and
vmappable over clients.
"""
from __future__ import annotations

from typing import Any, Protocol


class Modality(Protocol):
    name: str

    def input_shape(self, x) -> tuple:
        """The model's static input shape, from the stacked ``FedData.train_x``."""

    def epoch_perms(self, key, count, x, local) -> Any:
        """Shuffles of the training-data key ``key`` precomputed for a whole local run, or None
        (``train_batch`` then draws them per step; the batches are the same)."""

    def train_batch(self, key, x, y, count, step, local, perms=None) -> tuple:
        """``(inputs, labels)`` of local step ``step``, ready for ``model.apply``."""

    def last_epoch_steps(self, count, local):
        """How many of the last local steps make the client's last local epoch (traced)."""

    def head(self, x, y, count, n: int) -> tuple:
        """The client's first ``n`` samples (``0`` = all), where the modality has samples."""

    def prepare(self, x, key=None):
        """Model inputs from raw samples (normalised; augmented as in training when ``key``)."""

    def class_prototypes(self, apply_fn, params, x, y, count, num_classes: int,
                         batch: int = 100) -> tuple:
        """Eval-mode per-class mean features ``[K, F]`` and class counts ``[K]`` over the
        client's training data (labels < 0 left out)."""

    def local_accuracy(self, apply_fn, params_stack, x, y, count, batch: int, logits_fn=None,
                       label_counts=None, shared_params=False):
        """Accuracy of model i on client i's test data ``[N]`` (NaN without test data);
        ``logits_fn(logits, label_counts_row)`` transforms logits per client; ``shared_params``:
        one model for every client."""

    def union_accuracy(self, apply_fn, params_stack, x, y, batch: int, model_chunk=None):
        """Accuracy of every model of the stack on the union test data ``[M]``."""

    def union_class_correct(self, apply_fn, params_stack, x, y, batch: int, num_classes: int,
                            model_chunk=None):
        """Correct predictions of every model of the stack on the union test data per true
        class, int32 ``[M, num_classes]`` (labels < 0 are not union samples); its row sums over
        the union samples are ``union_accuracy``."""
