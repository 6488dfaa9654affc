"""Client partitions (SPEC §2.2) and padded client arrays."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from framp_jax.data.clients import ClientArrays, label_counts, stack_clients, summary
from framp_jax.data.partition import Partition, partition_vision


def _cifar_like(K=10, per_train=5000, per_test=1000, seed=123):
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(K), per_train))
    y_test = rng.permutation(np.repeat(np.arange(K), per_test))
    return y_train, y_test


Y_TRAIN, Y_TEST = _cifar_like()


def _check_disjoint(parts, N):
    allidx = np.concatenate(parts)
    assert allidx.dtype == np.int64
    assert len(np.unique(allidx)) == len(allidx), "an index is used twice"
    assert allidx.min() >= 0 and allidx.max() < N
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted, unique
    return allidx


def _dists(y, parts, K):
    c = label_counts(y, parts, K).astype(float)
    return c / np.maximum(c.sum(1, keepdims=True), 1)


# ------------------------------------------------------------------------------------------
# balanced Dirichlet


def test_balanced_sizes_disjoint_coverage():
    t0 = time.perf_counter()
    p = partition_vision(Y_TRAIN, Y_TEST, 100, alpha=0.3, seed=0)
    elapsed = time.perf_counter() - t0
    assert isinstance(p, Partition) and len(p.train) == 100 and len(p.test) == 100
    assert all(len(ix) == 500 for ix in p.train) and all(len(ix) == 100 for ix in p.test)
    assert len(_check_disjoint(p.train, 50000)) == 50000  # full coverage (N divisible by n)
    assert len(_check_disjoint(p.test, 10000)) == 10000
    assert p.priors.shape == (100, 10)
    np.testing.assert_allclose(p.priors.sum(1), 1.0)
    assert p.test_priors is p.priors  # matched by default
    assert elapsed < 2.0, f"partitioning 50k/100 clients took {elapsed:.2f}s"


def test_balanced_drops_remainder_and_takes_class_prefixes():
    # N = 50000, n = 7: m = 7142, 6 samples dropped; within a class the used indices are the
    # smallest ones (FIARSE pops class indices in ascending order).
    p = partition_vision(Y_TRAIN, Y_TEST, 7, alpha=0.5, seed=3)
    assert all(len(ix) == 50000 // 7 for ix in p.train)
    assert all(len(ix) == 10000 // 7 for ix in p.test)
    used = _check_disjoint(p.train, 50000)
    assert len(used) == 7 * (50000 // 7)
    for k in range(10):
        cls = np.flatnonzero(Y_TRAIN == k)
        got = np.sort(used[Y_TRAIN[used] == k])
        np.testing.assert_array_equal(got, cls[: len(got)])


def test_balanced_exhaustion_terminates():
    # Class 0 is huge, the others tiny; tiny alpha makes priors one-hot-like, so most clients
    # want a class that runs out. FIARSE's redraw loop could spin forever here.
    y = np.concatenate([np.zeros(970, int), np.repeat(np.arange(1, 4), 10)])
    p = partition_vision(y, y, 10, alpha=0.01, seed=1)
    assert all(len(ix) == 100 for ix in p.train)
    assert len(_check_disjoint(p.train, 1000)) == 1000


def test_deterministic_and_seed_dependent():
    for method in ("balanced_dirichlet", "dirichlet", "shards", "iid"):
        a = partition_vision(Y_TRAIN, Y_TEST, 20, method=method, seed=5)
        b = partition_vision(Y_TRAIN, Y_TEST, 20, method=method, seed=5)
        c = partition_vision(Y_TRAIN, Y_TEST, 20, method=method, seed=6)
        for x, y in zip(a.train + a.test, b.train + b.test):
            np.testing.assert_array_equal(x, y)
        assert any(len(x) != len(y) or not np.array_equal(x, y) for x, y in zip(a.train, c.train))


def test_train_split_does_not_depend_on_test_prior():
    a = partition_vision(Y_TRAIN, Y_TEST, 50, seed=2, test_prior="matched")
    b = partition_vision(Y_TRAIN, Y_TEST, 50, seed=2, test_prior="fiarse_independent")
    for x, y in zip(a.train, b.train):
        np.testing.assert_array_equal(x, y)
    assert not np.allclose(a.test_priors, b.test_priors)


def _max_class_fraction(p):
    return _dists(Y_TRAIN, p.train, 10).max(1).mean()


def test_alpha_controls_label_skew():
    skewed = _max_class_fraction(partition_vision(Y_TRAIN, Y_TEST, 100, alpha=0.05, seed=0))
    flat = _max_class_fraction(partition_vision(Y_TRAIN, Y_TEST, 100, alpha=100.0, seed=0))
    assert skewed > 0.6, skewed
    assert flat < 0.25, flat
    d_skewed = _max_class_fraction(
        partition_vision(Y_TRAIN, Y_TEST, 100, method="dirichlet", alpha=0.05, seed=0))
    d_flat = _max_class_fraction(
        partition_vision(Y_TRAIN, Y_TEST, 100, method="dirichlet", alpha=100.0, seed=0))
    assert d_skewed > 0.5 and d_flat < 0.25, (d_skewed, d_flat)


def _mean_train_test_corr(p):
    tr, te = _dists(Y_TRAIN, p.train, 10), _dists(Y_TEST, p.test, 10)
    return np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(tr, te)])


def test_matched_vs_independent_test_priors():
    matched = _mean_train_test_corr(partition_vision(Y_TRAIN, Y_TEST, 100, alpha=0.3, seed=0))
    indep = _mean_train_test_corr(partition_vision(Y_TRAIN, Y_TEST, 100, alpha=0.3, seed=0,
                                                   test_prior="fiarse_independent"))
    assert matched > 0.8, matched
    assert abs(indep) < 0.3, indep
    # the union of the local test sets is the whole test set (100 x 100)
    p = partition_vision(Y_TRAIN, Y_TEST, 100, test_prior="fiarse_independent")
    assert len(_check_disjoint(p.test, 10000)) == 10000


# ------------------------------------------------------------------------------------------
# other methods


def test_dirichlet_no_empty_client_and_matched_test():
    p = partition_vision(Y_TRAIN, Y_TEST, 100, method="dirichlet", alpha=0.1, seed=0)
    assert min(len(ix) for ix in p.train) >= 1
    assert len(_check_disjoint(p.train, 50000)) == 50000
    assert len(_check_disjoint(p.test, 10000)) == 10000
    assert _mean_train_test_corr(p) > 0.8
    p = partition_vision(Y_TRAIN, Y_TEST, 20, method="dirichlet", alpha=0.5, min_size=10)
    assert min(len(ix) for ix in p.train) >= 10


def test_dirichlet_gives_up_with_clear_error():
    y = np.repeat(np.arange(2), 6)
    with pytest.raises(ValueError, match="min_size=4.*max_tries=3"):
        partition_vision(y, y, 3, method="dirichlet", alpha=0.001, min_size=4, max_tries=3)


@pytest.mark.parametrize("c", [1, 2, 3])
def test_shards_classes_per_client(c):
    p = partition_vision(Y_TRAIN, Y_TEST, 100, method="shards", classes_per_client=c, seed=0)
    tr = label_counts(Y_TRAIN, p.train, 10)
    te = label_counts(Y_TEST, p.test, 10)
    assert np.all((tr > 0).sum(1) == c)
    np.testing.assert_array_equal(tr > 0, te > 0)  # the same classes in test
    assert len(_check_disjoint(p.train, 50000)) == 50000  # every class used, all samples dealt
    assert len(_check_disjoint(p.test, 10000)) == 10000
    sizes = [len(ix) for ix in p.train]
    assert max(sizes) - min(sizes) <= c  # even split of each class among its holders


def test_iid_even():
    p = partition_vision(Y_TRAIN, Y_TEST, 30, method="iid", seed=0)
    assert all(len(ix) == 50000 // 30 for ix in p.train)
    assert all(len(ix) == 10000 // 30 for ix in p.test)
    _check_disjoint(p.train, 50000)
    assert _max_class_fraction(p) < 0.2
    assert p.priors is None


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), K=st.integers(1, 8), alpha=st.floats(0.01, 50),
       seed=st.integers(0, 2**31), method=st.sampled_from(["balanced_dirichlet", "iid"]),
       data=st.data())
def test_balanced_property(n, K, alpha, seed, method, data):
    N = data.draw(st.integers(max(n, K), 400))
    y = np.random.default_rng(seed).integers(0, K, N)
    p = partition_vision(y, y, n, method=method, alpha=alpha, seed=seed, num_classes=K)
    assert all(len(ix) == N // n for ix in p.train + p.test)
    _check_disjoint(p.train, N)
    _check_disjoint(p.test, N)


@pytest.mark.parametrize("kw, pattern", [
    (dict(alpha=0.0), r"alpha=0.0 .*> 0"),
    (dict(alpha=-1.0, method="dirichlet"), r"alpha=-1.0"),
    (dict(num_clients=0), r"num_clients=0 .*\[1, 50000\]"),
    (dict(num_clients=50001), r"num_clients=50001"),
    (dict(num_clients=10001), r"num_clients=10001 .*test samples"),
    (dict(num_clients=2.5), r"num_clients must be an integer"),
    (dict(method="pathological"), r"method='pathological' is unknown; allowed"),
    (dict(test_prior="same"), r"test_prior='same' is unknown; allowed"),
    (dict(method="shards", classes_per_client=11), r"classes_per_client=11 .*\[1, 10\]"),
    (dict(num_classes=5), r"num_classes=5 is too small"),
])
def test_argument_validation(kw, pattern):
    args = dict(num_clients=10)
    args.update(kw)
    with pytest.raises(ValueError, match=pattern):
        partition_vision(Y_TRAIN, Y_TEST, **args)


def test_label_validation():
    with pytest.raises(ValueError, match="y_train must hold integer"):
        partition_vision(np.array([0.0, 1.0]), np.array([0, 1]), 1)
    with pytest.raises(ValueError, match="y_test has negative"):
        partition_vision(np.array([0, 1]), np.array([0, -1]), 1)


# ------------------------------------------------------------------------------------------
# client arrays


def test_stack_clients_and_label_counts():
    x = np.arange(6 * 2 * 2 * 1, dtype=np.uint8).reshape(6, 2, 2, 1)
    y = np.array([3, 1, 0, 1, 2, 3])
    idx = [np.array([4, 0]), np.array([1]), np.array([2, 3, 5])]
    ca = stack_clients(x, y, idx)
    assert isinstance(ca, ClientArrays)
    assert ca.x.shape == (3, 3, 2, 2, 1) and ca.x.dtype == np.uint8
    assert ca.y.shape == (3, 3) and ca.y.dtype == np.int32
    assert ca.count.dtype == np.int32 and ca.count.tolist() == [2, 1, 3]
    np.testing.assert_array_equal(ca.x[0, :2], x[[4, 0]])
    np.testing.assert_array_equal(ca.x[1, 0], x[1])
    assert not ca.x[0, 2].any() and not ca.x[1, 1:].any()  # zero padding
    assert ca.y.tolist() == [[2, 3, 0], [1, 0, 0], [0, 1, 3]]
    assert stack_clients(x, y, idx, n_max=5).x.shape == (3, 5, 2, 2, 1)
    with pytest.raises(ValueError, match="n_max=2 is smaller than client 2"):
        stack_clients(x, y, idx, n_max=2)
    counts = label_counts(y, idx, 4)
    np.testing.assert_array_equal(counts, [[0, 0, 1, 1], [0, 1, 0, 0], [1, 1, 0, 1]])


def test_stack_clients_empty_client_error():
    x = np.zeros((4, 2), np.uint8)
    y = np.zeros(4, int)
    with pytest.raises(ValueError, match="client 1 has no samples"):
        stack_clients(x, y, [np.array([0, 1]), np.array([], np.int64), np.array([2])])
    with pytest.raises(ValueError, match=r"client 0: indices must be in \[0, 4\)"):
        stack_clients(x, y, [np.array([0, 4])])


def test_summary_table():
    p = partition_vision(Y_TRAIN, Y_TEST, 100, alpha=0.3, seed=0)
    tr, te = label_counts(Y_TRAIN, p.train, 10), label_counts(Y_TEST, p.test, 10)
    budgets = [1.0, 0.25, 1 / 16, 1 / 64] * 25
    text = summary(tr, te, budgets)
    lines = text.splitlines()
    assert len(lines) == 1 + 100 + 2
    assert lines[2].split()[:4] == ["1", "1/4", "500", "100"]
    assert "total: 100 clients" in text and "train 50000" in text and "test 10000" in text
    assert "1/64 x25" in text
    assert max(len(line) for line in lines[1:101]) < 80
    assert len(summary(tr[:3], te[:3]).splitlines()) == 1 + 3 + 1
