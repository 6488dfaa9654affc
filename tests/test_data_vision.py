"""Dataset location, CIFAR loading (real offline copy when present) and user npz files."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from framp_jax.data import locate, vision
from framp_jax.data.locate import (
    CorruptDatasetError,
    DatasetNotFoundError,
    candidate_dirs,
    find_file,
    sha256_file,
)
from framp_jax.data.vision import NORMALIZATION, get_normalization, load_vision_dataset

C10_TRAIN_SHA = "5aaf8a2cf2e577ff4dbb15e4f368840fab5aca1812bcc69682005f8dc661d466"
C10_TEST_SHA = "b7018a062865e9348a704e72416eb53c816b43cc8ac42ab43276a2b967508ab6"


def _real_cifar10_jpeg() -> Path | None:
    for d in candidate_dirs():
        p = d / "cifar10" / "cifar10_jpeg.npz"
        if p.is_file():
            return p
    return None


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No shared dirs, no env dirs, cache in tmp, tfds not importable."""
    monkeypatch.setattr(locate, "_shared_dirs", lambda: [])
    monkeypatch.delenv("FRAMP_DATA_DIR", raising=False)
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    return tmp_path


# ------------------------------------------------------------------------------------------
# locate


def test_candidate_dirs_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMP_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(tmp_path / "cache"))
    dirs = candidate_dirs(tmp_path / "flag")
    assert dirs[0] == tmp_path / "flag"
    assert dirs[1] == tmp_path / "env"
    assert dirs[-1] == tmp_path / "cache"
    repo_shared = Path(locate.__file__).resolve().parents[3] / "shared" / "data"
    assert any(d.resolve() == repo_shared.resolve() for d in dirs[2:-1])
    # deduplicated
    assert len({str(d.resolve()) for d in dirs}) == len(dirs)
    assert candidate_dirs(tmp_path / "env")[0] == tmp_path / "env"
    assert len(candidate_dirs(tmp_path / "env")) == len(dirs) - 1
    monkeypatch.delenv("FRAMP_CACHE_DIR")
    assert locate.cache_dir() == Path("~/.cache/framp_jax").expanduser()


def test_find_file_preference_and_not_found(isolated):
    a, b = isolated / "a", isolated / "b"
    (a / "ds").mkdir(parents=True)
    (b / "ds").mkdir(parents=True)
    (b / "ds" / "good.npz").write_bytes(b"x")
    (a / "ds" / "worse.npz").write_bytes(b"y")
    os.environ["FRAMP_DATA_DIR"] = str(b)
    try:
        # the explicit directory wins, even with a less preferred file name
        assert find_file("ds", ["good.npz", "worse.npz"], data_dir=a) == a / "ds" / "worse.npz"
        assert find_file("ds", ["good.npz", "worse.npz"]) == b / "ds" / "good.npz"
        (isolated / "flat.npz").write_bytes(b"z")
        assert find_file("ds", ["flat.npz"], data_dir=isolated) == isolated / "flat.npz"
        with pytest.raises(DatasetNotFoundError) as e:
            find_file("ds", ["nope.npz"], data_dir=a)
    finally:
        del os.environ["FRAMP_DATA_DIR"]
    msg = str(e.value)
    for p in (a / "ds" / "nope.npz", a / "nope.npz", b / "ds" / "nope.npz",
              isolated / "cache" / "ds" / "nope.npz"):
        assert str(p) in msg
    assert "--config.data_dir" in msg and "FRAMP_DATA_DIR" in msg and "tfds" in msg
    assert isinstance(e.value, FileNotFoundError)


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    data = np.random.default_rng(0).bytes(3 * 1024 * 1024 + 17)
    p.write_bytes(data)
    assert sha256_file(p, chunk_size=1 << 20) == hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()  # cached
    time.sleep(0.01)
    p.write_bytes(data[:-1])  # size changes: not served from the cache
    assert sha256_file(p) == hashlib.sha256(data[:-1]).hexdigest()


def test_missing_dataset_lists_every_place(isolated):
    with pytest.raises(DatasetNotFoundError) as e:
        load_vision_dataset("cifar100", data_dir=isolated / "mine")
    msg = str(e.value)
    for d in (isolated / "mine", isolated / "cache"):
        assert str(d / "cifar100" / "cifar100_webp.npz") in msg
        assert str(d / "cifar100_webp.npz") in msg
    assert "tfds" in msg and "not installed" in msg
    assert "--config.data_dir" in msg and "FRAMP_DATA_DIR" in msg


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown vision dataset"):
        load_vision_dataset("mnist3")


def test_normalization_values():
    for name in ("cifar10", "cifar100"):
        mean, std = NORMALIZATION[name]
        assert mean == (0.4914, 0.4822, 0.4465) and std == (0.2023, 0.1994, 0.2010)
    m, s = get_normalization("npz:/x.npz", 1)
    assert m.shape == (1,) and m[0] == np.float32(0.5) and s[0] == np.float32(0.5)
    m, s = get_normalization("cifar10")
    np.testing.assert_allclose(m, [0.4914, 0.4822, 0.4465], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# real CIFAR-10 (JPEG q75 copy)


@pytest.fixture(scope="module")
def real_c10(tmp_path_factory):
    src = _real_cifar10_jpeg()
    if src is None:
        pytest.skip("the offline CIFAR-10 copy (cifar10/cifar10_jpeg.npz) is not available")
    root = tmp_path_factory.mktemp("c10")
    (root / "data" / "cifar10").mkdir(parents=True)
    # pin the JPEG file even if a WebP copy appears in shared/ later
    os.symlink(src, root / "data" / "cifar10" / "cifar10_jpeg.npz")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FRAMP_CACHE_DIR", str(root / "cache"))
        t0 = time.perf_counter()
        first = load_vision_dataset("cifar10", data_dir=root / "data")
        t1 = time.perf_counter()
        second = load_vision_dataset("cifar10", data_dir=root / "data")
        t2 = time.perf_counter()
    return dict(src=src, root=root, first=first, second=second, t_decode=t1 - t0,
                t_cached=t2 - t1)


def test_cifar10_real_arrays(real_c10):
    ds = real_c10["first"]
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (10000, 32, 32, 3) and ds.x_test.dtype == np.uint8
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.y_train, minlength=10), np.full(10, 5000))
    np.testing.assert_array_equal(np.bincount(ds.y_test, minlength=10), np.full(10, 1000))
    assert ds.y_train[:5].tolist() == [6, 9, 9, 4, 1]
    assert ds.y_test[:5].tolist() == [3, 8, 8, 0, 6]
    assert hashlib.sha256(ds.x_train.tobytes()).hexdigest() == C10_TRAIN_SHA
    assert hashlib.sha256(ds.x_test.tobytes()).hexdigest() == C10_TEST_SHA
    info = ds.info
    assert info["name"] == "cifar10" and info["source"] == "shared"
    assert info["sha256"] == vision.KNOWN_FILES["cifar10_jpeg.npz"]["sha256"]
    assert info["file"].endswith("cifar10_jpeg.npz")
    assert info["description"] == "CIFAR-10 (JPEG q75 copy)"
    assert info["exact"] is False and info["decoded_verified"] is True
    assert info["cache_hit"] is False


def test_cifar10_real_cache(real_c10):
    first, second = real_c10["first"], real_c10["second"]
    assert second.info["cache_hit"] is True
    cache = Path(second.info["cache"])
    assert cache.is_file() and cache.parent.parent == real_c10["root"] / "cache"
    assert first.info["sha256"] in cache.name
    assert not list(cache.parent.glob("*.tmp"))  # no leftover temp files
    for a, b in zip(first[:4], second[:4]):
        assert a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)
    assert real_c10["t_cached"] < real_c10["t_decode"]
    print(f"decode {real_c10['t_decode']:.2f}s, cached {real_c10['t_cached']:.2f}s")


def test_cifar10_corrupted_copy(real_c10, tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "data" / "cifar10" / "cifar10_jpeg.npz"
    bad.parent.mkdir(parents=True)
    shutil.copyfile(real_c10["src"], bad)
    with open(bad, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptDatasetError) as e:
        load_vision_dataset("cifar10", data_dir=tmp_path / "data")
    msg = str(e.value)
    assert str(bad) in msg
    assert vision.KNOWN_FILES["cifar10_jpeg.npz"]["sha256"] in msg
    assert sha256_file(bad) in msg
    assert "re-copy" in msg.lower()


# ------------------------------------------------------------------------------------------
# synthetic encoded files: decode path, cache recovery, preference order (fast, no real data)


def _webp_npz(path: Path, x_train, y_train, x_test, y_test, **extra):
    from PIL import Image

    def enc(x):
        blobs = []
        for img in x:
            b = io.BytesIO()
            Image.fromarray(img).save(b, format="WEBP", lossless=True, quality=100, exact=True)
            blobs.append(np.frombuffer(b.getvalue(), np.uint8))
        offs = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        return np.concatenate(blobs), offs

    wtr, otr = enc(x_train)
    wte, ote = enc(x_test)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, webp_train=wtr, offsets_train=otr, webp_test=wte, offsets_test=ote,
             y_train=y_train, y_test=y_test, **extra)


@pytest.fixture
def tiny_cifar10(isolated, monkeypatch):
    """A 20/10-image 'cifar10_webp.npz' (shape checks shrunk to match)."""
    spec = dict(vision._DATASETS["cifar10"], n_train=20, n_test=10)
    monkeypatch.setitem(vision._DATASETS, "cifar10", spec)
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                  y_train=rng.integers(0, 10, 20), x_test=rng.integers(0, 256, (10, 32, 32, 3),
                                                                       dtype=np.uint8),
                  y_test=rng.integers(0, 10, 10))
    data = isolated / "data"
    _webp_npz(data / "cifar10" / "cifar10_webp.npz", **arrays,
              test_exact=np.array([True] * 9 + [False]))
    # a decoy JPEG copy that must lose to the preferred WebP file
    (data / "cifar10" / "cifar10_jpeg.npz").write_bytes(b"not even an npz")
    return data, arrays


def test_webp_preferred_decoded_and_cached(tiny_cifar10):
    data, arrays = tiny_cifar10
    ds = load_vision_dataset("cifar10", data_dir=data)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(ds, k), arrays[k])
    assert ds.info["file"].endswith("cifar10_webp.npz")
    assert ds.info["sha256"] == sha256_file(data / "cifar10" / "cifar10_webp.npz")
    assert ds.info["exact"] is False and "1 test images" in ds.info["note"]
    assert ds.info["cache_hit"] is False and Path(ds.info["cache"]).is_file()
    again = load_vision_dataset("cifar10", data_dir=data)
    assert again.info["cache_hit"] is True and again.info["exact"] is False
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_broken_cache_is_rebuilt(tiny_cifar10):
    data, arrays = tiny_cifar10
    ds = load_vision_dataset("cifar10", data_dir=data)
    cache = Path(ds.info["cache"])
    cache.write_bytes(cache.read_bytes()[:1000])  # a truncated cache file
    with pytest.warns(RuntimeWarning, match="discarding unreadable decoded cache"):
        again = load_vision_dataset("cifar10", data_dir=data)
    assert again.info["cache_hit"] is False
    np.testing.assert_array_equal(again.x_test, arrays["x_test"])
    third = load_vision_dataset("cifar10", data_dir=data)
    assert third.info["cache_hit"] is True


def test_known_file_with_wrong_hash(isolated):
    bad = isolated / "data" / "cifar100" / "cifar100_webp.npz"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(CorruptDatasetError, match="cifar100_webp.npz"):
        load_vision_dataset("cifar100", data_dir=isolated / "data")


# ------------------------------------------------------------------------------------------
# npz:PATH


def test_npz_roundtrip_nhwc(tmp_path):
    rng = np.random.default_rng(1)
    xtr = rng.integers(0, 256, (12, 8, 6, 3), dtype=np.uint8)
    xte = rng.integers(0, 256, (5, 8, 6, 3), dtype=np.uint8)
    ytr, yte = rng.integers(0, 4, 12).astype(np.int64), np.array([0, 1, 3, 2, 3], np.uint8)
    p = tmp_path / "mine.npz"
    np.savez(p, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load_vision_dataset(f"npz:{p}")
    np.testing.assert_array_equal(ds.x_train, xtr)
    np.testing.assert_array_equal(ds.x_test, xte)
    np.testing.assert_array_equal(ds.y_train, ytr)
    assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
    assert ds.num_classes == 4  # 1 + the largest label; y_test may only use y_train's classes
    assert ds.info["source"] == "npz" and ds.info["sha256"] == sha256_file(p)


def test_npz_nhw_and_relative_to_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "store"
    d.mkdir()
    xtr = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez(d / "gray.npz", x_train=xtr, y_train=np.array([1, 0]),
             x_test=xtr[:1], y_test=np.array([1]))
    ds = load_vision_dataset("npz:gray.npz", data_dir=d)
    assert ds.x_train.shape == (2, 4, 4, 1) and ds.x_test.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(ds.x_train[..., 0], xtr)
    assert ds.num_classes == 2


def _save(p, **kw):
    base = dict(x_train=np.zeros((3, 4, 4, 3), np.uint8), y_train=np.array([0, 1, 2]),
                x_test=np.zeros((2, 4, 4, 3), np.uint8), y_test=np.array([0, 1]))
    base.update(kw)
    base = {k: v for k, v in base.items() if v is not None}
    np.savez(p, **base)
    return f"npz:{p}"


@pytest.mark.parametrize("kw, pattern", [
    (dict(y_test=None), r"missing array\(s\) \['y_test'\]"),
    (dict(y_train=np.array([0.0, 1.0, 2.0])), r"y_train has dtype float64; expected integer"),
    (dict(y_train=np.array([0, 1])), r"y_train has 2 labels but x_train has 3 images"),
    (dict(x_test=np.zeros((2, 4, 4, 3), np.float32)), r"x_test has dtype float32; expected uint8"),
    (dict(y_test=np.array([0, -1])), r"y_test has negative labels"),
    (dict(x_train=np.zeros((3, 4), np.uint8)), r"x_train has shape \(3, 4\); expected NHWC"),
    (dict(x_test=np.zeros((2, 5, 4, 3), np.uint8)), r"must agree"),
    (dict(y_train=np.zeros((3, 1), np.int64)), r"y_train has shape \(3, 1\)"),
])
def test_npz_bad_inputs(tmp_path, kw, pattern):
    name = _save(tmp_path / "bad.npz", **kw)
    with pytest.raises(ValueError, match=pattern):
        load_vision_dataset(name)


def test_npz_missing_file(isolated):
    with pytest.raises(DatasetNotFoundError, match="nothere.npz"):
        load_vision_dataset("npz:nothere.npz", data_dir=isolated)
