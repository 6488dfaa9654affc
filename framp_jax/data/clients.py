"""Per-client data as padded, stacked host arrays (DESIGN.md: "Client data are padded, stacked").

``stack_clients`` gathers each client's samples into ``x[n_clients, n_max, ...]`` (uint8 images
stay uint8) and ``y[n_clients, n_max]`` (int32), zero-padded beyond ``count[i]``. The arrays are
numpy; move them to the device once per run with ``jax.device_put``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["ClientArrays", "stack_clients", "label_counts", "summary", "validation_split"]


class ClientArrays(NamedTuple):
    x: np.ndarray  # [n_clients, n_max, *sample_shape], dtype of the source (uint8 images)
    y: np.ndarray  # int32 [n_clients, n_max]
    count: np.ndarray  # int32 [n_clients]: valid rows of each client


def _index_array(ix, client: int, n_total: int) -> np.ndarray:
    a = np.asarray(ix)
    if a.ndim != 1:
        raise ValueError(f"client {client}: index list must be 1-D, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"client {client}: indices must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n_total):
        raise ValueError(f"client {client}: indices must be in [0, {n_total}), got range "
                         f"[{int(a.min())}, {int(a.max())}]")
    return a


def stack_clients(x: np.ndarray, y: np.ndarray, index_lists: Sequence,
                  n_max: int | None = None) -> ClientArrays:
    """Gather and zero-pad each client's samples into stacked arrays.

    Args:
      x: [N, ...] samples (e.g. uint8 [N, H, W, C]).
      y: [N] integer labels.
      index_lists: one index array per client.
      n_max: padded length; defaults to the largest client. Must be >= every client's count.

    Raises ValueError naming the client if a client has no samples or more than ``n_max``.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)} labels")
    if len(index_lists) == 0:
        raise ValueError("index_lists is empty: no clients")
    idx = [_index_array(ix, i, len(x)) for i, ix in enumerate(index_lists)]
    counts = np.array([len(a) for a in idx], np.int64)
    for i, cnt in enumerate(counts):
        if cnt == 0:
            raise ValueError(f"client {i} has no samples; every client needs at least one "
                             f"(check the partition)")
    if n_max is None:
        n_max = int(counts.max())
    elif n_max < counts.max():
        i = int(counts.argmax())
        raise ValueError(f"n_max={n_max} is smaller than client {i}'s {int(counts[i])} samples")
    n = len(idx)
    xs = np.zeros((n, n_max, *x.shape[1:]), x.dtype)
    ys = np.zeros((n, n_max), np.int32)
    for i, a in enumerate(idx):
        xs[i, : len(a)] = x[a]
        ys[i, : len(a)] = y[a]
    return ClientArrays(xs, ys, counts.astype(np.int32))


def validation_split(y: np.ndarray, index_lists: Sequence, frac: float, seed: int):
    """Each client's training indices cut into (train, validation), stratified by label: of the
    ``n_ik`` samples of class k held by client i, ``floor(frac * n_ik + 1/2)`` go to
    validation, chosen by a permutation seeded with ``SeedSequence([seed, 8, i])`` (a stream
    of its own, apart from the partition's). ``frac=0`` leaves every index in train. Order
    within each part follows the client's index list. Returns two lists of int64 arrays.

    A class a client holds once stays in train for frac < 1/2, so a client never loses a class
    it holds a single sample of; every client keeps at least one training sample.
    """
    y = np.asarray(y)
    train, val = [], []
    for i, ix in enumerate(index_lists):
        a = _index_array(ix, i, len(y))
        if frac <= 0 or a.size == 0:
            train.append(a)
            val.append(a[:0])
            continue
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 8, i]))
        is_val = np.zeros(a.size, bool)
        lab = y[a]
        for k in np.unique(lab):
            pos = np.flatnonzero(lab == k)
            take = int(np.floor(frac * pos.size + 0.5))
            if take:
                is_val[rng.permutation(pos)[:take]] = True
        if is_val.all():  # keep one training sample (only possible for frac >= 1/2)
            is_val[0] = False
        train.append(a[~is_val])
        val.append(a[is_val])
    return train, val


def label_counts(y: np.ndarray, index_lists: Sequence, num_classes: int) -> np.ndarray:
    """int64 [n_clients, num_classes]: how many samples of each class every client holds."""
    y = np.asarray(y)
    out = np.zeros((len(index_lists), num_classes), np.int64)
    for i, ix in enumerate(index_lists):
        lab = y[_index_array(ix, i, len(y))]
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"client {i} has labels outside [0, {num_classes})")
        out[i] = np.bincount(lab, minlength=num_classes)
    return out


def _fmt_budget(b) -> str:
    if b is None:
        return "-"
    if isinstance(b, str):
        return b
    b = float(b)
    if 0 < b < 1 and abs(1 / b - round(1 / b)) < 1e-6:
        return f"1/{round(1 / b)}"
    return f"{b:g}"


def summary(train_counts: np.ndarray, test_counts: np.ndarray, budgets=None,
            top: int = 3) -> str:
    """A printable table, one line per client, plus totals.

    Columns: client id, budget, n_train, n_test, number of classes present in train, and the
    ``top`` largest train classes as ``class:percent``.
    """
    tr = np.asarray(train_counts)
    te = np.asarray(test_counts)
    if tr.ndim != 2 or te.shape != tr.shape:
        raise ValueError(f"train/test count matrices must both be [n_clients, K]; got "
                         f"{tr.shape} and {te.shape}")
    n, K = tr.shape
    if budgets is not None and len(budgets) != n:
        raise ValueError(f"budgets has {len(budgets)} entries for {n} clients")
    n_tr, n_te = tr.sum(1), te.sum(1)
    n_cls = (tr > 0).sum(1)
    w = max(3, len(str(n - 1)))
    lines = [f"{'id':>{w}} {'budget':>6} {'n_train':>7} {'n_test':>6} {'#cls':>4}  top classes"]
    for i in range(n):
        order = np.argsort(-tr[i], kind="stable")[:top]
        tops = " ".join(f"{k}:{100 * tr[i, k] / max(n_tr[i], 1):.0f}%" for k in order
                        if tr[i, k] > 0)
        b = _fmt_budget(None if budgets is None else budgets[i])
        lines.append(f"{i:>{w}} {b:>6} {n_tr[i]:>7} {n_te[i]:>6} {n_cls[i]:>4}  {tops}")
    lines.append(
        f"total: {n} clients, {K} classes, train {int(n_tr.sum())} (per client min "
        f"{int(n_tr.min())}, max {int(n_tr.max())}), test {int(n_te.sum())} (min "
        f"{int(n_te.min())}, max {int(n_te.max())}), classes per client mean "
        f"{n_cls.mean():.1f}")
    if budgets is not None:
        vals, cnt = np.unique([_fmt_budget(b) for b in budgets], return_counts=True)
        lines.append("budgets: " + ", ".join(f"{v} x{c}" for v, c in zip(vals, cnt)))
    return "\n".join(lines)
