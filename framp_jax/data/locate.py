"""Where datasets live on disk, and how to tell the user when they do not.

Lookup order (DESIGN.md, "Data" contract):

1. the explicit ``data_dir`` argument (the ``--config.data_dir`` flag);
2. ``$FRAMP_DATA_DIR`` (several directories may be joined with ``os.pathsep``);
3. ``../shared/data`` next to the repository (resolved from this file, and from the
   current working directory);
4. the user cache, ``~/.cache/framp_jax`` (``$FRAMP_CACHE_DIR`` overrides it);
5. a real download where one exists (tfds for CIFAR; handled by the dataset loaders).

A file is looked for as ``<dir>/<dataset>/<filename>`` and then ``<dir>/<filename>``, for
every directory in that order and, inside one directory, for every file name in the
caller's order of preference. The first hit wins, so an explicit ``data_dir`` always
beats the shared copy.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from framp_jax.errors import DataError

__all__ = [
    "DataError",
    "DatasetNotFoundError",
    "CorruptDatasetError",
    "InvalidDatasetError",
    "check_data_env",
    "cache_dir",
    "candidate_dirs",
    "candidate_paths",
    "find_file",
    "sha256_file",
    "not_found_message",
]

_HOW_TO_FIX = (
    "to fix this, pass the directory holding the data with --config.data_dir=DIR "
    "(data_dir=DIR in Python), or set the environment variable FRAMP_DATA_DIR=DIR, or install "
    "the download extra (pip install 'framp_jax[tfds]') so the dataset can be fetched with "
    "tensorflow-datasets (CIFAR only; needs network access and TensorFlow)"
)


class DatasetNotFoundError(DataError, FileNotFoundError):
    """No copy of a dataset was found in any of the places looked at."""


class CorruptDatasetError(DataError, RuntimeError):
    """A dataset file exists but its content is not what it should be."""


class InvalidDatasetError(DataError, ValueError):
    """A dataset (e.g. a user's ``.npz``) is readable but not usable as it is."""


def check_data_env() -> None:
    """Raises :class:`DataError` when ``$FRAMP_DATA_DIR`` names a directory that does not exist:
    an explicitly set data location must not be skipped silently for another copy."""
    env = os.environ.get("FRAMP_DATA_DIR")
    if not env:
        return
    for p in env.split(os.pathsep):
        if p and not Path(p).expanduser().is_dir():
            raise DataError(f"FRAMP_DATA_DIR={env} names {p}, which is not an existing "
                            "directory; point it at the directory holding the data, or unset it "
                            "to use the default search path")


def cache_dir() -> Path:
    """The user cache directory: ``$FRAMP_CACHE_DIR`` or ``~/.cache/framp_jax``.

    It is not created here; writers create what they need.
    """
    env = os.environ.get("FRAMP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/framp_jax").expanduser()


def _shared_dirs() -> list[Path]:
    """``shared/data`` next to the repository (from this file and from the cwd)."""
    out = []
    try:
        # .../<root>/<repo>/framp_jax/data/locate.py -> parents[3] == <root>
        out.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    except IndexError:  # pragma: no cover - installed at a very shallow path
        pass
    out.append(Path.cwd().parent / "shared" / "data")
    return out


def _dedupe(paths: Iterable[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        try:
            key = str(p.resolve())
        except OSError:  # pragma: no cover - unresolvable path
            key = str(p.absolute())
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def candidate_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for datasets, in order of preference (deduplicated)."""
    dirs: list[Path] = []
    if data_dir not in (None, ""):
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get("FRAMP_DATA_DIR")
    if env:
        dirs.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    dirs.extend(_shared_dirs())
    dirs.append(cache_dir())
    return _dedupe(dirs)


def candidate_paths(dataset: str, filenames: Sequence[str] | str,
                    data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every path :func:`find_file` looks at, in order."""
    if isinstance(filenames, str):
        filenames = [filenames]
    paths = []
    for d in candidate_dirs(data_dir):
        for name in filenames:
            paths.append(d / dataset / name)
            paths.append(d / name)
    return _dedupe(paths)


def not_found_message(dataset: str, looked_at: Sequence[Path], extra: str = "") -> str:
    """One line: the dataset, every path looked at, ``extra`` and how to fix it."""
    parts = [f"dataset {dataset!r} was not found; looked at: "
             + ", ".join(str(p) for p in looked_at)]
    if extra:
        parts.append(extra.rstrip("."))
    parts.append(_HOW_TO_FIX)
    return "; ".join(parts)


def find_file(dataset: str, filenames: Sequence[str] | str,
              data_dir: str | os.PathLike | None = None) -> Path:
    """The first existing ``<dir>/<dataset>/<filename>`` or ``<dir>/<filename>``.

    Raises :class:`DatasetNotFoundError` listing every path looked at.
    """
    looked = candidate_paths(dataset, filenames, data_dir)
    for p in looked:
        if p.is_file():
            return p
    raise DatasetNotFoundError(not_found_message(dataset, looked))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks; cached per (path, mtime, size) in-process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    hit = _SHA_CACHE.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            h.update(block)
    digest = h.hexdigest()
    _SHA_CACHE[key] = digest
    return digest
