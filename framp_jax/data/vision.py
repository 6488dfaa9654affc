"""Image classification datasets: CIFAR-10/100 from the offline copies, or a user ``.npz``.

``load_vision_dataset(name, data_dir=None)`` returns a :class:`VisionDataset` of uint8 NHWC
images and int32 labels, in the official order. ``name`` is ``"cifar10"``, ``"cifar100"`` or
``"npz:PATH"``.

The CIFAR files are the ones described in ``shared/data/<name>/README.md``: every image is
stored as its own encoded file (JPEG q75 for CIFAR-10, lossless WebP for CIFAR-100),
concatenated, with an offsets array. Loading checks the file's sha256 against the README,
decodes with Pillow, checks the shapes (and, where the README gives them, the sha256 of the
decoded arrays), and caches the decoded arrays as an uncompressed ``.npz`` under
:func:`~framp_jax.data.locate.cache_dir` keyed by the source file's sha256.

When no local copy exists and ``tensorflow_datasets`` is importable, the data come from tfds.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from framp_jax.data.locate import (
    CorruptDatasetError,
    DatasetNotFoundError,
    InvalidDatasetError,
    cache_dir,
    candidate_paths,
    check_data_env,
    not_found_message,
    sha256_file,
)

from framp_jax.rundir import current_umask

__all__ = [
    "VisionDataset",
    "load_vision_dataset",
    "find_vision_file",
    "NORMALIZATION",
    "get_normalization",
    "KNOWN_FILES",
    "CorruptDatasetError",
    "DatasetNotFoundError",
]


class VisionDataset(NamedTuple):
    x_train: np.ndarray  # uint8 [N, H, W, C]
    y_train: np.ndarray  # int32 [N]
    x_test: np.ndarray  # uint8 [M, H, W, C]
    y_test: np.ndarray  # int32 [M]
    num_classes: int
    info: dict[str, Any]


# FIARSE `data/cifar10/data.py` (SPEC §2.1): the same values for both CIFAR datasets.
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)
NORMALIZATION: dict[str, tuple[tuple[float, ...] | float, tuple[float, ...] | float]] = {
    "cifar10": (_CIFAR_MEAN, _CIFAR_STD),
    "cifar100": (_CIFAR_MEAN, _CIFAR_STD),
    "npz": (0.5, 0.5),  # user data: maps [0, 1] to [-1, 1]
}


def get_normalization(name: str, num_channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) as float32 arrays of length ``num_channels``."""
    key = "npz" if name.startswith("npz:") or name not in NORMALIZATION else name
    mean, std = NORMALIZATION[key]
    mean = np.broadcast_to(np.asarray(mean, np.float32), (num_channels,)).copy()
    std = np.broadcast_to(np.asarray(std, np.float32), (num_channels,)).copy()
    return mean, std


_C10_DECODED = {
    "train": "5aaf8a2cf2e577ff4dbb15e4f368840fab5aca1812bcc69682005f8dc661d466",
    "test": "b7018a062865e9348a704e72416eb53c816b43cc8ac42ab43276a2b967508ab6",
}
_C100_DECODED = {
    "train": "4e457917601a66aed021f5fa37957b56c6319557c0a8ed5484de3c390af45430",
    "test": "4cb8e5d9309da489bf6b19cc10cd96c3ae6f8daf225380b605aaee4c0d6aee19",
}
_C10_JPEG_NOTE = ("pixels went through one JPEG round trip at quality 75 (MAE 5.8/255, PSNR about "
                  "30 dB); labels and order are exact")

# Known files, by file name. `sha256` None means "unknown yet: record it, do not check".
# `encoding` is the key prefix of the encoded layout, or None for already-decoded arrays.
KNOWN_FILES: dict[str, dict[str, Any]] = {
    "cifar10_webp.npz": dict(
        dataset="cifar10", sha256=None, encoding="webp", labels="y", lossless=True,
        decoded_sha256=None, exact=True, description="CIFAR-10", note="lossless WebP copy"),
    "cifar10_jpeg.npz": dict(
        dataset="cifar10",
        sha256="b10833c0ef92364dc3e645621eb69e4f2e29e1764eb6c4627790507cb9f8037a",
        encoding="jpeg", labels="y", lossless=False, decoded_sha256=_C10_DECODED, exact=False,
        description="CIFAR-10 (JPEG q75 copy)", note=_C10_JPEG_NOTE),
    "cifar10_uint8.npz": dict(
        dataset="cifar10",
        sha256="08a1f201c3a81ba6f5fe8f4894c7ac15866aa02cefbc16456608affe9743ecff",
        encoding=None, labels="y", lossless=True, decoded_sha256=_C10_DECODED, exact=False,
        description="CIFAR-10 (JPEG q75 copy)", note=_C10_JPEG_NOTE),
    "cifar100_webp.npz": dict(
        dataset="cifar100",
        sha256="73a8f435649f5124c3b80815d934a113ec581169af4f4a3139133df03e3520de",
        encoding="webp", labels="y_fine", lossless=True, decoded_sha256=_C100_DECODED, exact=True,
        description="CIFAR-100", note="bit-exact official pixels, labels and order"),
}

# Per dataset: file names in order of preference, class count, split sizes, image shape.
_DATASETS = {
    "cifar10": dict(files=("cifar10_webp.npz", "cifar10_jpeg.npz", "cifar10_uint8.npz"),
                    num_classes=10, n_train=50000, n_test=10000, shape=(32, 32, 3)),
    "cifar100": dict(files=("cifar100_webp.npz",),
                     num_classes=100, n_train=50000, n_test=10000, shape=(32, 32, 3)),
}

_CACHE_KEYS = ("x_train", "y_train", "x_test", "y_test")


# --------------------------------------------------------------------------------------------
# public entry point


def load_vision_dataset(name: str, data_dir: str | os.PathLike | None = None) -> VisionDataset:
    """Load ``cifar10``, ``cifar100`` or ``npz:PATH`` as uint8 NHWC images + int32 labels."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    check_data_env()
    if name.startswith("npz:"):
        return _load_user_npz(name[len("npz:"):], data_dir)
    key = name.lower()
    if key not in _DATASETS:
        raise ValueError(f"unknown vision dataset {name!r}; expected one of "
                         f"{sorted(_DATASETS)} or 'npz:PATH'")
    spec = _DATASETS[key]
    looked = candidate_paths(key, spec["files"], data_dir)
    path = find_vision_file(name, data_dir)
    if path is not None:
        return _load_known_file(key, path, spec)
    return _load_tfds_or_raise(key, spec, looked, data_dir)


def find_vision_file(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The file :func:`load_vision_dataset` would load for ``name`` (``cifar10``, ``cifar100``,
    ``npz:PATH``), found without reading it; None when there is none (tfds, or not found).
    A resumed run compares it with the file its checkpoints were trained on."""
    if name.startswith("npz:"):
        return next((q for q in _user_npz_candidates(name[len("npz:"):], data_dir)
                     if q.is_file()), None)
    key = name.lower()
    if key not in _DATASETS:
        return None
    return next((p for p in candidate_paths(key, _DATASETS[key]["files"], data_dir)
                 if p.is_file()), None)


# --------------------------------------------------------------------------------------------
# the offline CIFAR copies


def _load_known_file(name: str, path: Path, spec: dict) -> VisionDataset:
    meta = KNOWN_FILES[path.name]
    sha = sha256_file(path)
    if meta["sha256"] is not None and sha != meta["sha256"]:
        raise CorruptDatasetError(
            f"{path} is corrupt or not the expected file: its sha256 is\n  {sha}\n"
            f"but the dataset README gives\n  {meta['sha256']}\n"
            f"Re-copy the file (see shared/data/{name}/README.md) or remove it so another copy "
            f"is used.")
    info: dict[str, Any] = dict(
        name=name, file=str(path), sha256=sha, source="shared", exact=meta["exact"],
        note=meta["note"], description=meta["description"], cache=None, cache_hit=False)

    if meta["encoding"] is None:  # already decoded arrays
        arrays = _read_decoded_npz(path, spec)
        _check_arrays(arrays, spec, path)
        _check_decoded_sha(arrays, meta, path, info)
        return _finish(arrays, spec["num_classes"], info)

    cache_path = cache_dir() / "decoded" / f"{path.stem}-{sha}.npz"
    info["cache"] = str(cache_path)
    arrays = _try_load_cache(cache_path, spec)
    if arrays is not None:
        info["cache_hit"] = True
        if path.name == "cifar10_webp.npz":
            _webp_exact_note(path, info)
        return _finish(arrays, spec["num_classes"], info)

    arrays = _decode_encoded_npz(path, meta, spec, info)
    _check_arrays(arrays, spec, path)
    _check_decoded_sha(arrays, meta, path, info)
    _write_cache(cache_path, arrays)
    return _finish(arrays, spec["num_classes"], info)


def _finish(arrays: dict, num_classes: int, info: dict) -> VisionDataset:
    return VisionDataset(
        x_train=arrays["x_train"], y_train=arrays["y_train"].astype(np.int32, copy=False),
        x_test=arrays["x_test"], y_test=arrays["y_test"].astype(np.int32, copy=False),
        num_classes=int(num_classes), info=info)


# what a damaged zip member or archive raises while numpy reads it
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


def _recopy_hint(path: Path) -> str:
    meta = KNOWN_FILES.get(path.name)
    where = f" (see shared/data/{meta['dataset']}/README.md)" if meta else ""
    return f"re-copy the file{where}, or delete it so another copy is used"


def _open_known_npz(path: Path):
    """``np.load`` of one of the KNOWN_FILES; CorruptDatasetError naming the file otherwise."""
    if not zipfile.is_zipfile(path):
        raise CorruptDatasetError(f"{path} is corrupt: it is not a readable npz (zip) archive "
                                  f"(truncated or overwritten?); {_recopy_hint(path)}")
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as e:
        raise CorruptDatasetError(f"{path} is corrupt: numpy cannot open it as an npz archive "
                                  f"({type(e).__name__}: {e}); {_recopy_hint(path)}") from e


def _npz_get(d, key: str, path: Path) -> np.ndarray:
    if key not in d.files:
        raise CorruptDatasetError(f"{path} has no array {key!r} (it has {sorted(d.files)}); "
                                  f"{_recopy_hint(path)}")
    try:
        return d[key]
    except _READ_ERRORS as e:
        raise CorruptDatasetError(f"{path} is corrupt: array {key!r} cannot be read "
                                  f"({type(e).__name__}: {e}); {_recopy_hint(path)}") from e


def _read_decoded_npz(path: Path, spec: dict) -> dict:
    with _open_known_npz(path) as d:
        return {k: _npz_get(d, k, path) for k in _CACHE_KEYS}


def _decode_one(blob: bytes):
    from PIL import Image  # local import: pillow is only needed when decoding

    im = Image.open(io.BytesIO(blob))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def _decode_split(buf: np.ndarray, offsets: np.ndarray, shape: tuple, path: Path,
                  split: str) -> np.ndarray:
    n = len(offsets) - 1
    offs = offsets.astype(np.int64).tolist()
    if n < 0 or offs[0] != 0 or offs[-1] != buf.size or np.any(np.diff(offsets) <= 0):
        raise CorruptDatasetError(f"{path}: offsets_{split} do not describe the byte buffer "
                                  f"(first {offs[:1]}, last {offs[-1:]}, buffer {buf.size} "
                                  f"bytes); re-copy the file.")
    blob = buf.tobytes()
    out = np.empty((n, *shape), np.uint8)

    # A plain loop: with 32x32 images the per-image cost is mostly Python/Pillow overhead under
    # the GIL, and a ThreadPoolExecutor measured no faster (2 cores, Pillow 13).
    for i in range(n):
        try:
            out[i] = _decode_one(blob[offs[i]:offs[i + 1]])
        except Exception as e:  # noqa: BLE001 - re-raised with the image index
            raise CorruptDatasetError(f"{path}: {split} image {i} does not decode to a "
                                      f"{shape} RGB image ({e}); re-copy the file.") from e
    return out


def _decode_encoded_npz(path: Path, meta: dict, spec: dict, info: dict) -> dict:
    enc, lab = meta["encoding"], meta["labels"]
    with _open_known_npz(path) as d:
        arrays = {}
        for split in ("train", "test"):
            buf = _npz_get(d, f"{enc}_{split}", path)
            off = _npz_get(d, f"offsets_{split}", path)
            arrays[f"x_{split}"] = _decode_split(buf, off, spec["shape"], path, split)
            arrays[f"y_{split}"] = _npz_get(d, f"{lab}_{split}", path)
        if "test_exact" in d.files:
            _set_exact_from_mask(_npz_get(d, "test_exact", path), info)
    return arrays


def _set_exact_from_mask(mask: np.ndarray, info: dict) -> None:
    n_bad = int(mask.size - np.count_nonzero(mask))
    info["exact"] = n_bad == 0
    if n_bad:
        info["note"] = f"lossless WebP copy; {n_bad} test images are not bit-exact (test_exact)"


def _webp_exact_note(path: Path, info: dict) -> None:
    with _open_known_npz(path) as d:
        if "test_exact" in d.files:
            _set_exact_from_mask(_npz_get(d, "test_exact", path), info)


def _check_arrays(arrays: dict, spec: dict, path: Path) -> None:
    for split, n in (("train", spec["n_train"]), ("test", spec["n_test"])):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        want = (n, *spec["shape"])
        if x.shape != want or x.dtype != np.uint8:
            raise CorruptDatasetError(f"{path}: x_{split} is {x.dtype}{x.shape}, expected "
                                      f"uint8{want}; re-copy the file.")
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise CorruptDatasetError(f"{path}: y_{split} is {y.dtype}{y.shape}, expected "
                                      f"integer ({n},); re-copy the file.")
        if n and (y.min() < 0 or y.max() >= spec["num_classes"]):
            raise CorruptDatasetError(f"{path}: y_{split} has labels outside "
                                      f"[0, {spec['num_classes']}); re-copy the file.")


def _check_decoded_sha(arrays: dict, meta: dict, path: Path, info: dict) -> None:
    want = meta.get("decoded_sha256")
    if not want:
        info["decoded_verified"] = None
        return
    bad = []
    for split in ("train", "test"):
        got = hashlib.sha256(np.ascontiguousarray(arrays[f"x_{split}"]).tobytes()).hexdigest()
        if got != want[split]:
            bad.append(f"{split}: got {got}, expected {want[split]}")
    info["decoded_verified"] = not bad
    if not bad:
        return
    msg = f"{path}: decoded pixels differ from the README's sha256 ({'; '.join(bad)})."
    if meta["lossless"]:
        raise CorruptDatasetError(msg + " Re-copy the file.")
    # JPEG decoders may differ in the last bit between library versions: warn, keep going.
    warnings.warn(msg + " This can come from a different JPEG decoder (Pillow/libjpeg "
                  "version); results may differ slightly from the reference.", RuntimeWarning,
                  stacklevel=3)


def _try_load_cache(cache_path: Path, spec: dict) -> dict | None:
    if not cache_path.is_file():
        return None
    try:
        with np.load(cache_path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in _CACHE_KEYS}
        _check_arrays(arrays, spec, cache_path)
        return arrays
    except Exception as e:  # noqa: BLE001 - any unreadable cache is discarded and rebuilt
        warnings.warn(f"discarding unreadable decoded cache {cache_path} ({e}); re-decoding",
                      RuntimeWarning, stacklevel=3)
        try:
            cache_path.unlink()
        except OSError:
            pass
        return None


def _write_cache(cache_path: Path, arrays: dict) -> None:
    """Uncompressed npz, written to a temp file then renamed (never a half file)."""
    tmp = None
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cache_path.name + ".", suffix=".tmp",
                                   dir=cache_path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())  # as open() would, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{k: arrays[k] for k in _CACHE_KEYS})
        os.replace(tmp, cache_path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write the decoded cache {cache_path} ({e}); the data will "
                      f"be decoded again next time", RuntimeWarning, stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------------------------
# user npz


def _user_npz_candidates(path_str: str, data_dir) -> list[Path]:
    """Where ``npz:PATH`` is looked for: PATH itself, then (a relative PATH that is not a file)
    under every data directory, in order."""
    p = Path(path_str).expanduser()
    looked = [p]
    if not p.is_file() and not p.is_absolute():
        from framp_jax.data.locate import candidate_dirs

        looked += [d / p for d in candidate_dirs(data_dir)]
    return looked


def _load_user_npz(path_str: str, data_dir) -> VisionDataset:
    if not path_str:
        raise InvalidDatasetError("dataset 'npz:PATH' needs a path after 'npz:'")
    looked = _user_npz_candidates(path_str, data_dir)
    found = next((q for q in looked if q.is_file()), None)
    if found is None:
        raise DatasetNotFoundError(not_found_message(f"npz:{path_str}", looked))
    how = ("save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    if not zipfile.is_zipfile(found):
        with open(found, "rb") as f:
            head = f.read(6)
        what = ("a single .npy array" if head == b"\x93NUMPY" else
                "empty" if not head else "truncated or of another format")
        raise InvalidDatasetError(f"{found} is not an npz archive (a zip of .npy arrays as "
                                  f"np.savez writes; this file is {what}); {how}")
    try:
        d = np.load(found, allow_pickle=False)
    except _READ_ERRORS as e:
        raise InvalidDatasetError(f"{found} is a damaged npz archive ({type(e).__name__}: "
                                  f"{e}); {how}") from e
    with d:
        missing = [k for k in _CACHE_KEYS if k not in d.files]
        if missing:
            raise InvalidDatasetError(f"{found}: missing array(s) {missing}; an image npz needs "
                                      f"{list(_CACHE_KEYS)} (it has {sorted(d.files)})")
        arrays = {}
        for k in _CACHE_KEYS:
            try:
                arrays[k] = d[k]
            except ValueError as e:
                if "pickle" not in str(e):
                    raise InvalidDatasetError(f"{found}: array {k!r} cannot be read ({e}); "
                                              f"{how}") from e
                raise InvalidDatasetError(f"{found}: array {k!r} needs pickles to load (an "
                                          f"object array?); store plain numeric arrays") from e
            except _READ_ERRORS as e:
                raise InvalidDatasetError(f"{found} is a damaged npz archive: array {k!r} "
                                          f"cannot be read ({type(e).__name__}: {e}); "
                                          f"{how}") from e

    for split in ("train", "test"):
        kx, ky = f"x_{split}", f"y_{split}"
        x, y = arrays[kx], arrays[ky]
        if x.dtype != np.uint8:
            raise InvalidDatasetError(f"{found}: {kx} has dtype {x.dtype}; expected uint8 pixels "
                                      f"in [0, 255] ({_to_uint8_hint(x)})")
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise InvalidDatasetError(f"{found}: {kx} has shape {x.shape}; expected NHWC (rank "
                                      f"4) or NHW (rank 3)")
        if x.shape[1] in (1, 3, 4) and x.shape[3] > 4:
            raise InvalidDatasetError(
                f"{found}: {kx} has shape {x.shape}, channels first (NCHW, {x.shape[1]} "
                f"channels of {x.shape[2]}x{x.shape[3]}); store images channels last (NHWC): "
                f"np.transpose({kx}, (0, 2, 3, 1))")
        if not np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
            raise InvalidDatasetError(f"{found}: {ky} has dtype {y.dtype}; expected integer "
                                      f"class labels")
        if y.ndim != 1:
            raise InvalidDatasetError(f"{found}: {ky} has shape {y.shape}; expected a 1-D label "
                                      f"vector")
        if len(y) != len(x):
            raise InvalidDatasetError(f"{found}: {ky} has {len(y)} labels but {kx} has {len(x)} "
                                      f"images")
        if len(y) == 0:
            raise InvalidDatasetError(f"{found}: the {split} set is empty ({kx} and {ky} have 0 "
                                      f"samples); every client needs {split} samples")
        if y.min() < 0:
            raise InvalidDatasetError(f"{found}: {ky} has negative labels (min {int(y.min())}); "
                                      f"labels must be 0..num_classes-1")
        if y.max() > np.iinfo(np.int32).max:
            raise InvalidDatasetError(f"{found}: {ky} has labels too large for int32")
        arrays[kx], arrays[ky] = x, y
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise InvalidDatasetError(f"{found}: x_train images are {arrays['x_train'].shape[1:]} "
                                  f"but x_test images are {arrays['x_test'].shape[1:]}; they "
                                  f"must agree")
    num_classes = _check_user_labels(found, arrays["y_train"], arrays["y_test"])
    info = dict(name=f"npz:{path_str}", file=str(found), sha256=sha256_file(found),
                source="npz", exact=True, note="user-provided npz", description=found.name,
                cache=None, cache_hit=False)
    return _finish(arrays, num_classes, info)


def _to_uint8_hint(x: np.ndarray) -> str:
    """How to turn these pixels into uint8 in [0, 255], from their dtype and range."""
    if x.size == 0 or not (np.issubdtype(x.dtype, np.integer) or
                           np.issubdtype(x.dtype, np.floating)) or x.dtype == np.bool_:
        return "e.g. x.astype(np.uint8) from values in [0, 255]"
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "they hold NaN or infinite values"
    if lo < 0 or hi > 255:
        return f"its values span [{lo:g}, {hi:g}]: rescale them to [0, 255] first"
    if np.issubdtype(x.dtype, np.integer):
        return f"its values are in [{lo:g}, {hi:g}]: x.astype(np.uint8)"
    if hi <= 1:
        return f"its values are in [{lo:g}, {hi:g}]: (x * 255).round().astype(np.uint8)"
    return f"its values are in [{lo:g}, {hi:g}]: x.round().astype(np.uint8)"


def _ranges(values) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"`` (at most 8 runs shown)."""
    v = sorted(int(x) for x in values)
    runs, start = [], v[0]
    for a, b in zip(v, v[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(runs[:8]) + (", ..." if len(runs) > 8 else "")


def _check_user_labels(found: Path, y_train: np.ndarray, y_test: np.ndarray) -> int:
    """K = 1 + the largest train label; every class 0..K-1 must occur in y_train and y_test may
    use only those classes (a stray label such as 255 would otherwise add hundreds of empty
    classes)."""
    k = int(y_train.max()) + 1
    present = np.unique(y_train)
    if len(present) != k:
        missing = np.setdiff1d(np.arange(k), present)
        raise InvalidDatasetError(
            f"{found}: y_train labels must be 0..K-1 with every class present (K = 1 + the "
            f"largest label = {k}), but {len(missing)} of them never occur ({_ranges(missing)}); "
            f"relabel the classes to 0..{len(present) - 1}")
    extra = np.setdiff1d(np.unique(y_test), present)
    if len(extra):
        raise InvalidDatasetError(
            f"{found}: y_test has labels that y_train never uses ({_ranges(extra)}); labels "
            f"must be in [0, {k}) as in y_train")
    return k


# --------------------------------------------------------------------------------------------
# tensorflow-datasets fallback


def _load_tfds_or_raise(name: str, spec: dict, looked: list[Path], data_dir) -> VisionDataset:
    try:
        import tensorflow_datasets as tfds  # type: ignore
    except ImportError:
        raise DatasetNotFoundError(not_found_message(
            name, looked, extra="No download was tried: the `tfds` extra (tensorflow-datasets) "
            "is not installed.")) from None
    tfds_dir = str(Path(data_dir).expanduser() if data_dir else cache_dir() / "tfds")
    try:
        try:
            source = tfds.data_source(name, data_dir=tfds_dir, download=False)
        except Exception:  # noqa: BLE001 - not prepared yet: download (needs tensorflow)
            tfds.builder(name, data_dir=tfds_dir).download_and_prepare()
            source = tfds.data_source(name, data_dir=tfds_dir, download=False)
        arrays = {}
        for split in ("train", "test"):
            x, y = _read_tfds_split(source[split])
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    except Exception as e:  # noqa: BLE001
        raise DatasetNotFoundError(not_found_message(
            name, looked, extra=f"The tfds fallback (data_dir={tfds_dir}) failed: "
            f"{type(e).__name__}: {e}. Preparing CIFAR with tfds needs network access, "
            f"TensorFlow and importlib_resources.")) from e
    _check_arrays(arrays, spec, Path(tfds_dir))
    info = dict(name=name, file=tfds_dir, sha256=None, source="tfds", exact=True,
                note="tensorflow-datasets copy of the official data",
                description={"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name],
                cache=None, cache_hit=False)
    return _finish(arrays, spec["num_classes"], info)


def _read_tfds_split(ds) -> tuple[np.ndarray, np.ndarray]:
    n = len(ds)
    xs, ys, ids = [], np.empty(n, np.int64), []
    for i in range(n):
        ex = ds[i]
        xs.append(np.asarray(ex["image"], np.uint8))
        ys[i] = int(ex["label"])
        ids.append(ex.get("id"))
    x = np.stack(xs)
    # tfds shuffles; `id` is e.g. b"train_16399" holding the official index.
    try:
        idx = np.array([int((v.decode() if isinstance(v, bytes) else str(v)).rsplit("_", 1)[-1])
                        for v in ids])
        if np.array_equal(np.sort(idx), np.arange(n)):
            order = np.argsort(idx)
            x, ys = x[order], ys[order]
    except (ValueError, AttributeError, TypeError):
        pass  # no usable id: keep tfds's order
    return x, ys
