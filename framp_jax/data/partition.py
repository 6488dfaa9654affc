"""Split a labelled train/test set across federated clients (SPEC §2.2).

``partition_vision(y_train, y_test, num_clients, method=...)`` returns a :class:`Partition` of
per-client index arrays (sorted ascending, int64) into the train and test sets.

Methods
-------
``balanced_dirichlet`` (default; FIARSE ``BalancedDirichlet``)
    Each client draws a class prior p_i ~ Dir(alpha * 1_K) and receives exactly
    m = floor(N / n) samples (the last ``N - n*m`` are dropped). Until all are full: pick a
    client uniformly among those with room, draw a class from p_i and pop the next unused index
    of that class (ascending within the class). FIARSE redraws when the class is exhausted; we
    draw from p_i renormalised over the classes that still have samples, which is the same
    distribution and cannot loop forever (a client with no prior mass left on any available
    class draws uniformly among them). ``test_prior="matched"`` splits the test set with the
    same p_i; ``"fiarse_independent"`` draws fresh priors for it, as FIARSE's separate call does.
``dirichlet`` (FIARSE ``Dirichlet`` / NIID-bench)
    For each class, q ~ Dir(alpha * 1_n) over clients; the class's (shuffled) indices are cut
    by q. As in FIARSE, a client already holding >= N/n samples gets no share of later classes
    (``balance=True``). Redrawn (bounded) until every client has >= ``min_size`` train samples.
    The test set is cut with the same per-class proportions.
``shards`` (HeteroFL/FedRolex "non-iid-n")
    Client i holds ``classes_per_client`` classes: positions i*c .. i*c+c-1 (mod K) of a seeded
    permutation of the classes (round robin, so every class is used when n*c >= K). Each class's
    shuffled samples are split evenly among its holders; the test set likewise.
``iid``
    A seeded shuffle, split evenly: exactly floor(N / n) per client (remainder dropped).

Random streams: ``np.random.SeedSequence(seed)`` is split into independent streams for the train
priors, the train assignment, the test assignment and independent test priors, so the train
partition does not depend on ``test_prior``.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import numpy as np

__all__ = ["Partition", "partition_vision", "METHODS", "TEST_PRIORS"]

METHODS = ("balanced_dirichlet", "dirichlet", "shards", "iid")
TEST_PRIORS = ("matched", "fiarse_independent")


class Partition(NamedTuple):
    train: list  # list[np.ndarray[int64]], one per client
    test: list  # list[np.ndarray[int64]]
    priors: np.ndarray | None  # [num_clients, K] class priors of the train split (dirichlet: q^T)
    test_priors: np.ndarray | None = None  # [num_clients, K] priors used for the test split


# --------------------------------------------------------------------------------------------
# validation


def _labels(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D label array, got shape {y.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.size and y.min() < 0:
        raise ValueError(f"{name} has negative labels (min {int(y.min())})")
    return y


def _check_int(value, name: str, low: int, high: int | None = None, what: str = "") -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value} is not allowed: it must be {rng}{what}")
    return value


def partition_vision(y_train, y_test, num_clients: int, method: str = "balanced_dirichlet",
                     alpha: float = 0.3, seed: int = 0, test_prior: str = "matched",
                     classes_per_client: int = 2, num_classes: int | None = None, *,
                     min_size: int = 1, balance: bool = True, max_tries: int = 1000) -> Partition:
    """Partition train and test labels across ``num_clients`` clients.

    Args:
      y_train, y_test: 1-D integer labels.
      num_clients: n >= 1, at most the number of train samples and of test samples.
      method: one of ``METHODS``.
      alpha: Dirichlet concentration (> 0) for ``balanced_dirichlet`` and ``dirichlet``.
      seed: integer seed; the same seed gives the same partition.
      test_prior: ``"matched"`` or ``"fiarse_independent"`` (``balanced_dirichlet`` only;
        ``dirichlet`` and ``shards`` always match the train split's per-class proportions).
      classes_per_client: classes per client for ``shards`` (1..K).
      num_classes: K; defaults to 1 + the largest label.
      min_size, balance, max_tries: ``dirichlet`` only (see the module docstring).
    """
    y_train = _labels(y_train, "y_train")
    y_test = _labels(y_test, "y_test")
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed: {list(METHODS)}")
    if test_prior not in TEST_PRIORS:
        raise ValueError(f"test_prior={test_prior!r} is unknown; allowed: {list(TEST_PRIORS)}")
    if len(y_train) == 0:
        raise ValueError("y_train is empty: nothing to partition")
    n = _check_int(num_clients, "num_clients", 1, len(y_train),
                   f" (there are {len(y_train)} train samples)")
    if len(y_test) and n > len(y_test):
        raise ValueError(f"num_clients={n} is not allowed: it must be <= the number of test "
                         f"samples ({len(y_test)})")
    seed = _check_int(seed, "seed", 0)
    observed = int(max(y_train.max(), y_test.max() if y_test.size else -1)) + 1
    if num_classes is None:
        K = observed
    else:
        K = _check_int(num_classes, "num_classes", 1)
        if K < observed:
            raise ValueError(f"num_classes={K} is too small: labels go up to {observed - 1}")
    if method in ("balanced_dirichlet", "dirichlet"):
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a positive number, got {alpha!r}") from None
        if not (np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha={alpha} is not allowed: it must be a finite number > 0")
    if method == "shards":
        classes_per_client = _check_int(classes_per_client, "classes_per_client", 1, K,
                                        f" (the number of classes K={K})")

    ss = np.random.SeedSequence(seed)
    prior_ss, train_ss, test_ss, test_prior_ss = ss.spawn(4)
    if method == "balanced_dirichlet":
        priors = _dirichlet_rows(np.random.default_rng(prior_ss), alpha, n, K)
        train = _balanced_assign(y_train, priors, len(y_train) // n,
                                 np.random.default_rng(train_ss), K)
        if test_prior == "matched":
            test_priors = priors
        else:
            test_priors = _dirichlet_rows(np.random.default_rng(test_prior_ss), alpha, n, K)
        test = _balanced_assign(y_test, test_priors, len(y_test) // n,
                                np.random.default_rng(test_ss), K)
        return Partition(train, test, priors, test_priors)
    if method == "dirichlet":
        min_size = _check_int(min_size, "min_size", 0, len(y_train) // n,
                              f" (floor(N/n) = {len(y_train) // n})")
        max_tries = _check_int(max_tries, "max_tries", 1)
        return _dirichlet(y_train, y_test, n, K, alpha, min_size, bool(balance), max_tries,
                          train_ss, test_ss)
    if method == "shards":
        return _shards(y_train, y_test, n, K, classes_per_client, prior_ss, train_ss, test_ss)
    # iid
    return Partition(_iid(len(y_train), n, np.random.default_rng(train_ss)),
                     _iid(len(y_test), n, np.random.default_rng(test_ss)), None, None)


# --------------------------------------------------------------------------------------------
# balanced Dirichlet (FIARSE)


def _dirichlet_rows(rng: np.random.Generator, alpha: float, n: int, K: int) -> np.ndarray:
    p = rng.dirichlet(np.full(K, alpha), size=n)
    bad = ~(np.isfinite(p).all(axis=1) & (p.sum(axis=1) > 0))
    for i in np.flatnonzero(bad):  # extremely small alpha can underflow: use a one-hot draw
        p[i] = 0.0
        p[i, rng.integers(K)] = 1.0
    return p


def _cdf_rows(priors: np.ndarray, avail: np.ndarray) -> list[list[float]]:
    """Per-client CDFs over available classes; exactly 1.0 from the last positive class on."""
    p = priors * avail
    s = p.sum(axis=1, keepdims=True)
    empty = s[:, 0] <= 0
    if empty.any():  # no prior mass left on an available class: uniform over them
        p[empty] = avail.astype(float)
        s[empty] = avail.sum()
    cdf = np.cumsum(p / s, axis=1)
    last = (p > 0)[:, ::-1].argmax(axis=1)
    last = p.shape[1] - 1 - last
    cols = np.arange(p.shape[1])
    cdf[cols[None, :] >= last[:, None]] = 1.0
    return cdf.tolist()


def _balanced_assign(y: np.ndarray, priors: np.ndarray, m: int, rng: np.random.Generator,
                     K: int) -> list[np.ndarray]:
    n = priors.shape[0]
    by_class = [np.flatnonzero(y == k).tolist() for k in range(K)]  # ascending within class
    remaining = [len(ix) for ix in by_class]
    ptr = [0] * K
    avail = np.array([r > 0 for r in remaining])
    total = n * m
    if total == 0:
        return [np.zeros(0, np.int64) for _ in range(n)]
    cdfs = _cdf_rows(priors, avail)
    room = [m] * n
    open_clients = list(range(n))
    out: list[list[int]] = [[] for _ in range(n)]
    u = rng.random((total, 2)).tolist()
    last_k = K - 1
    bisect_right = bisect.bisect_right
    for u1, u2 in u:
        j = int(u1 * len(open_clients))  # a client with room, uniformly
        c = open_clients[j]
        k = bisect_right(cdfs[c], u2)  # FIARSE: argmax(u <= cdf) over the available classes
        if k > last_k:
            k = last_k
        out[c].append(by_class[k][ptr[k]])
        ptr[k] += 1
        room[c] -= 1
        if room[c] == 0:  # swap-remove the full client
            open_clients[j] = open_clients[-1]
            open_clients.pop()
        remaining[k] -= 1
        if remaining[k] == 0:  # at most K times: renormalise every prior over what is left
            avail[k] = False
            if avail.any():
                cdfs = _cdf_rows(priors, avail)
    return [np.sort(np.asarray(ix, np.int64)) for ix in out]


# --------------------------------------------------------------------------------------------
# classic Dirichlet over clients (FIARSE `Dirichlet`, NIID-bench)


def _dirichlet(y_train, y_test, n, K, alpha, min_size, balance, max_tries, train_ss, test_ss):
    rng = np.random.default_rng(train_ss)
    test_rng = np.random.default_rng(test_ss)
    N = len(y_train)
    tr_by_class = [np.flatnonzero(y_train == k) for k in range(K)]
    te_by_class = [np.flatnonzero(y_test == k) for k in range(K)]
    best_smallest = -1
    for _ in range(max_tries):
        sizes = np.zeros(n, np.int64)
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        q_used = np.zeros((K, n))
        for k in range(K):
            idx = rng.permutation(tr_by_class[k])
            q = rng.dirichlet(np.full(n, alpha))
            if balance:
                q = q * (sizes < N / n)
            s = q.sum()
            q = q / s if s > 0 and np.isfinite(s) else np.full(n, 1.0 / n)
            q_used[k] = q
            cuts = (np.cumsum(q) * len(idx)).astype(np.int64)[:-1]
            for i, piece in enumerate(np.split(idx, cuts)):
                parts[i].append(piece)
                sizes[i] += len(piece)
        smallest = int(sizes.min())
        best_smallest = max(best_smallest, smallest)
        if smallest >= min_size:
            break
    else:
        raise ValueError(
            f"method='dirichlet' could not give every client at least min_size={min_size} train "
            f"samples in max_tries={max_tries} draws (alpha={alpha}, num_clients={n}, "
            f"largest smallest client seen: {best_smallest}); use a larger alpha, fewer "
            f"clients, a larger max_tries, or method='balanced_dirichlet'")
    train = [np.sort(np.concatenate(p)) for p in parts]
    test_parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for k in range(K):
        idx = test_rng.permutation(te_by_class[k])
        cuts = (np.cumsum(q_used[k]) * len(idx)).astype(np.int64)[:-1]
        for i, piece in enumerate(np.split(idx, cuts)):
            test_parts[i].append(piece)
    test = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in test_parts]
    priors = q_used.T.copy()  # [n, K]: client i's share of class k
    return Partition(train, [t.astype(np.int64) for t in test], priors, priors)


# --------------------------------------------------------------------------------------------
# shards ("non-iid-n") and iid


def _shards(y_train, y_test, n, K, c, prior_ss, train_ss, test_ss) -> Partition:
    perm = np.random.default_rng(prior_ss).permutation(K)
    held = np.array([[perm[(i * c + j) % K] for j in range(c)] for i in range(n)], np.int64)
    holders = [np.flatnonzero((held == k).any(axis=1)) for k in range(K)]

    def deal(y, rng):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for k in range(K):
            if len(holders[k]) == 0:
                continue
            idx = rng.permutation(np.flatnonzero(y == k))
            for i, piece in zip(holders[k], np.array_split(idx, len(holders[k]))):
                parts[i].append(piece)
        return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, np.int64)
                for p in parts]

    train = deal(y_train, np.random.default_rng(train_ss))
    test = deal(y_test, np.random.default_rng(test_ss))
    priors = np.zeros((n, K))
    np.put_along_axis(priors, held, 1.0 / c, axis=1)
    return Partition(train, test, priors, priors)


def _iid(N: int, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    m = N // n
    perm = rng.permutation(N)[: n * m]
    return [np.sort(perm[i * m:(i + 1) * m]).astype(np.int64) for i in range(n)]
