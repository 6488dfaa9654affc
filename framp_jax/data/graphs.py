"""Node-classification graphs: offline ``.npz`` copies and the official OGB raw files.

``load_graph(name)`` returns one whole graph as a :class:`Graph` of numpy arrays. Splitting it
into federated clients (largest connected component, random 40/30/30 node split, METIS) is
:mod:`framp_jax.data.graph_partition`'s job.

Supported names (``-`` and upper case are accepted too, e.g. ``"ogbn-arxiv"``, ``"Cora"``):

============================  ====================================================  ============
name                          file looked for under each data directory             features
============================  ====================================================  ============
``cora``, ``citeseer``        ``<dir>/<name>/<name>.npz``                            uint8 -> f32
``amazon_photo``,             ``<dir>/<name>/<name>.npz``                            uint8 -> f32
``amazon_computers``
``coauthor_cs``,              ``<dir>/<name>/<name>.npz`` (CSR keys ``x_data``,      CSR counts
``coauthor_physics``          ``x_indices``, ``x_indptr``, ``x_shape``)              -> (x>0) f32
``ogbn_arxiv``                ``<dir>/{ogbn_arxiv,ogbn-arxiv,arxiv}/raw/`` or        float32
                              ``<dir>/raw/`` holding ``edge.csv.gz``,
                              ``node-feat.csv.gz``, ``node-label.csv.gz``
============================  ====================================================  ============

Every ``.npz`` is checked against the sha256 written in its folder's README (hard-coded below);
a mismatch raises :class:`ChecksumError` naming the file and both digests. The OGB raw files have
no published digest; their sha256 values are recorded in ``Graph.info`` instead.

Data directories are searched in the project's order (DESIGN.md, "Data"): an explicit
``data_dir``, ``$FRAMP_DATA_DIR``, ``<repo>/../shared/data``, ``~/.cache/framp_jax``. For
ogbn-arxiv, ``download=True`` fetches the official ``arxiv.zip`` into the cache directory.

Notes on content:
- ``edge_index`` is int32 ``[2, E]``, undirected (both directions stored), no self loops, sorted.
- CiteSeer has 15 isolated nodes without a label; their ``y`` is ``-1`` (PyG uses 0). None of
  them is in the largest connected component, so partitions never see them.
- ``info`` holds ``name``, ``file`` and ``sha256`` (for ogbn_arxiv, ``file`` is the raw directory
  and ``sha256`` a dict ``{filename: digest}``), plus ``class_names`` and the standard split
  indices (``train_idx``/``val_idx``/``test_idx``) where the file has them.
"""
from __future__ import annotations

import os
import shutil
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# search order, cache, error types and file digests: the package's one locator
from framp_jax.data.locate import (
    CorruptDatasetError,
    DatasetNotFoundError,
    cache_dir as _cache_dir,
    candidate_dirs,
    sha256_file,
)

__all__ = [
    "Graph",
    "GRAPH_DATASETS",
    "NPZ_SHA256",
    "OGBN_ARXIV_URL",
    "ChecksumError",
    "DatasetNotFoundError",
    "load_graph",
    "find_graph_file",
    "load_ogb_raw",
    "candidate_dirs",
    "sha256_file",
]


class Graph(NamedTuple):
    """One whole graph, numpy arrays on the host."""

    x: np.ndarray  # float32 [n, F]
    y: np.ndarray  # int32 [n]; -1 marks an unlabelled node (CiteSeer's 15 isolated nodes)
    edge_index: np.ndarray  # int32 [2, E], undirected, both directions, no self loops, sorted
    num_classes: int
    info: dict  # name, file, sha256 (+ class_names, standard split indices where present)

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_edges(self) -> int:
        """Directed edge entries (twice the number of undirected edges)."""
        return int(self.edge_index.shape[1])


# sha256 of each offline npz, copied from /work/shared/data/<name>/README.md.
NPZ_SHA256 = {
    "cora": "794a2811090559ccc2cc3a06db4c4a2e0fc61ac2c0780358b1f26564ecaddd2e",
    "citeseer": "b7d76d47a930ea5cfa50dc0dea86e93e6303aac5c64efc204502c2a0bf4fef38",
    "amazon_photo": "17cd7b371e929a19a1828ea023bf27067882287e2b97b8a8cfbdf0f4c659ceb2",
    "amazon_computers": "71da5c6984f791245e46941086d83bb9922ee15f6baca4dec494d5f220c9fc14",
    "coauthor_cs": "5e7eba1eee802ab89f7e5cf332fd6867e37677abb72f75175738fef7c1298d4a",
    "coauthor_physics": "71dfa72eaf86b6c72068b0f9dfbab51aedccf8584cf11d4e8ec539801f6aa285",
}
GRAPH_DATASETS = tuple(NPZ_SHA256) + ("ogbn_arxiv",)
OGBN_ARXIV_URL = "http://snap.stanford.edu/ogb/data/nodeproppred/arxiv.zip"
OGB_RAW_FILES = ("edge.csv.gz", "node-feat.csv.gz", "node-label.csv.gz")


class ChecksumError(CorruptDatasetError, ValueError):
    """A data file's sha256 differs from the published one."""


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    aliases = {
        "arxiv": "ogbn_arxiv",
        "photo": "amazon_photo",
        "computers": "amazon_computers",
        "cs": "coauthor_cs",
        "physics": "coauthor_physics",
    }
    key = aliases.get(key, key)
    if key not in GRAPH_DATASETS:
        raise ValueError(f"unknown graph dataset {name!r}; choose one of {', '.join(GRAPH_DATASETS)}")
    return key


def _not_found(name: str, looked: list[Path], how: str) -> DatasetNotFoundError:
    lines = [f"graph dataset {name!r} not found. Looked at:"]
    lines += [f"  - {p}" for p in looked]
    lines.append(
        "Search order: the data_dir argument (--config.data_dir), $FRAMP_DATA_DIR, "
        "<repo>/../shared/data, ~/.cache/framp_jax."
    )
    lines.append(how)
    return DatasetNotFoundError("\n".join(lines))


def _verify(path: Path, expected: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {actual}. "
            "The file is corrupt or a different version; replace it with the published copy."
        )
    return actual


def _edges_undirected(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """Both directions, no self loops, no duplicates, sorted by (row, col); int32 [2, E]."""
    src = np.asarray(src, np.int64).ravel()
    dst = np.asarray(dst, np.int64).ravel()
    keep = src != dst
    src, dst = src[keep], dst[keep]
    key = np.unique(np.concatenate([src * n + dst, dst * n + src]))
    return np.stack([key // n, key % n]).astype(np.int32)


def _load_npz(name: str, path: Path, verify: bool) -> Graph:
    digest = _verify(path, NPZ_SHA256[name]) if verify else sha256_file(path)
    info: dict[str, Any] = {"name": name, "file": str(path), "sha256": digest}
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if "x" in keys:
            x = np.asarray(z["x"], dtype=np.float32)
        else:  # Coauthor: CSR counts -> dense binary float32, as PyG's x[x > 0] = 1
            shape = tuple(int(s) for s in z["x_shape"])
            data, indices, indptr = z["x_data"], z["x_indices"], z["x_indptr"]
            x = np.zeros(shape, dtype=np.float32)
            rows = np.repeat(np.arange(shape[0]), np.diff(indptr))
            pos = data > 0
            x[rows[pos], indices[pos]] = 1.0
        y = np.asarray(z["y"]).astype(np.int32)
        edge_index = np.asarray(z["edge_index"], dtype=np.int32)
        if "class_names" in keys:
            info["class_names"] = [str(c) for c in z["class_names"]]
        for k in ("train_idx", "val_idx", "test_idx"):
            if k in keys:
                info[k] = np.asarray(z[k], dtype=np.int64)
    n = x.shape[0]
    if y.shape != (n,) or edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise ValueError(f"{path}: unexpected shapes x{x.shape} y{y.shape} edge_index{edge_index.shape}")
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise ValueError(f"{path}: edge_index out of range for {n} nodes")
    num_classes = int(y.max()) + 1 if (y >= 0).any() else 0
    return Graph(x=x, y=y, edge_index=edge_index, num_classes=num_classes, info=info)


def _ogb_raw_candidates(base: Path) -> list[Path]:
    return [base / "ogbn_arxiv" / "raw", base / "ogbn-arxiv" / "raw", base / "arxiv" / "raw", base / "raw"]


def _has_raw(d: Path) -> bool:
    return all((d / f).is_file() for f in OGB_RAW_FILES)


def _read_csv(path: Path, dtype) -> np.ndarray:
    try:  # pandas is much faster on the 76 MB feature file, when installed
        import pandas as pd  # type: ignore[import-not-found]

        return pd.read_csv(path, header=None, dtype=dtype).to_numpy()
    except ImportError:
        return np.loadtxt(path, delimiter=",", dtype=dtype, ndmin=2)


def load_ogb_raw(raw_dir: str | os.PathLike, name: str = "ogbn_arxiv") -> Graph:
    """Read the official OGB node-property raw files in ``raw_dir``.

    ``edge.csv.gz``: one ``src,dst`` row per directed edge (made undirected here, self loops
    dropped); ``node-feat.csv.gz``: one row of comma-separated floats per node;
    ``node-label.csv.gz``: one int per row. No header lines (the OGB format).
    """
    raw = Path(raw_dir)
    missing = [f for f in OGB_RAW_FILES if not (raw / f).is_file()]
    if missing:
        raise DatasetNotFoundError(f"{raw} lacks {', '.join(missing)}")
    x = _read_csv(raw / "node-feat.csv.gz", np.float32).astype(np.float32, copy=False)
    y = _read_csv(raw / "node-label.csv.gz", np.int64).reshape(-1).astype(np.int32)
    e = _read_csv(raw / "edge.csv.gz", np.int64)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"{raw}: {n} feature rows but {y.shape[0]} labels")
    if e.size and (e.shape[1] != 2 or e.min() < 0 or e.max() >= n):
        raise ValueError(f"{raw}/edge.csv.gz: rows must be src,dst with ids in [0, {n})")
    edge_index = _edges_undirected(e[:, 0], e[:, 1], n) if e.size else np.zeros((2, 0), np.int32)
    info: dict[str, Any] = {
        "name": name,
        "file": str(raw),
        "sha256": {f: sha256_file(raw / f) for f in OGB_RAW_FILES},
        "directed_edges_in_file": int(e.shape[0]),
    }
    split = raw.parent / "split" / "time"  # official time split, when the zip was unpacked whole
    if all((split / f"{s}.csv.gz").is_file() for s in ("train", "valid", "test")):
        for s, k in (("train", "train_idx"), ("valid", "val_idx"), ("test", "test_idx")):
            info[k] = _read_csv(split / f"{s}.csv.gz", np.int64).reshape(-1)
    num_classes = int(y.max()) + 1 if y.size else 0
    return Graph(x=x, y=y, edge_index=edge_index, num_classes=num_classes, info=info)


def download_ogbn_arxiv(cache_dir: str | os.PathLike | None = None, url: str | None = None) -> Path:
    """Download and unzip the official ``arxiv.zip`` into ``cache_dir``; returns ``.../arxiv/raw``."""
    url = url or OGBN_ARXIV_URL
    cache = Path(cache_dir) if cache_dir is not None else _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    zpath = cache / "arxiv.zip"
    if not zpath.is_file():
        part = zpath.with_suffix(".zip.part")
        print(f"[framp_jax] downloading {url} -> {zpath}")
        with urllib.request.urlopen(url) as r, open(part, "wb") as f:  # noqa: S310 (fixed URL)
            shutil.copyfileobj(r, f)
        part.rename(zpath)
    with zipfile.ZipFile(zpath) as zf:
        for m in zf.namelist():  # refuse paths escaping the cache directory
            if Path(m).is_absolute() or ".." in Path(m).parts:
                raise ValueError(f"{zpath}: unsafe member {m}")
        zf.extractall(cache)
    raw = cache / "arxiv" / "raw"
    if not _has_raw(raw):
        raise DatasetNotFoundError(f"{zpath} unpacked, but {raw} lacks {', '.join(OGB_RAW_FILES)}")
    return raw


def find_graph_file(name: str, data_dir: str | os.PathLike | None = None,
                    looked: list[Path] | None = None) -> Path | None:
    """The file (ogbn_arxiv: the raw directory) :func:`load_graph` loads for ``name``, found
    without reading it, or None; ``looked`` (when given) gets every path looked at."""
    key = _canonical(name)
    looked = [] if looked is None else looked
    for d in candidate_dirs(data_dir):
        for p in ((d / key / f"{key}.npz", d / f"{key}.npz") if key != "ogbn_arxiv"
                  else _ogb_raw_candidates(d)):
            looked.append(p)
            if (p.is_file() if key != "ogbn_arxiv" else _has_raw(p)):
                return p
    return None


def load_graph(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    verify: bool = True,
) -> Graph:
    """Load one graph dataset by name (see the module docstring for the file layout).

    Args:
      name: ``cora``, ``citeseer``, ``amazon_photo``, ``amazon_computers``, ``coauthor_cs``,
        ``coauthor_physics`` or ``ogbn_arxiv``.
      data_dir: searched first; then ``$FRAMP_DATA_DIR``, ``<repo>/../shared/data``,
        ``~/.cache/framp_jax``.
      download: ogbn_arxiv only: when no copy is found, fetch the official zip into the cache.
      verify: check the npz sha256 against the published value (raises :class:`ChecksumError`).
    """
    key = _canonical(name)
    looked: list[Path] = []
    found = find_graph_file(key, data_dir, looked)
    if key != "ogbn_arxiv":
        if found is not None:
            return _load_npz(key, found, verify)
        raise _not_found(
            key,
            looked,
            f"To fix: put {key}.npz (sha256 {NPZ_SHA256[key]}) in <dir>/{key}/ for one of these "
            "directories, or pass data_dir=... / set FRAMP_DATA_DIR. The offline copies and their "
            "conversion steps are described in shared/data/README.md.",
        )
    if found is not None:
        return load_ogb_raw(found, key)
    if download:
        return load_ogb_raw(download_ogbn_arxiv(), key)
    raise _not_found(
        key,
        looked,
        f"To fix: download {OGBN_ARXIV_URL} and unzip it into one of these directories (it "
        f"unpacks to arxiv/raw/{{{','.join(OGB_RAW_FILES)}}}), or call "
        "load_graph('ogbn_arxiv', download=True) on a machine with a network (it fetches the zip "
        f"into {_cache_dir()}).",
    )
