"""Graph loaders (offline npz, OGB raw format) and the disjoint METIS subgraph partition."""
from __future__ import annotations

import gzip
import shutil
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from framp_jax.data import graph_partition as gp
from framp_jax.data import graphs as G

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (SHARED / "cora" / "cora.npz").is_file(), reason="shared/data absent")


@pytest.fixture(scope="module")
def cora():
    if not (SHARED / "cora" / "cora.npz").is_file():
        pytest.skip("shared/data absent")
    return G.load_graph("cora", data_dir=SHARED)


@pytest.fixture(scope="module")
def cora_clients(cora):
    return gp.partition_graph(cora, 10, seed=123)


# --------------------------------------------------------------------------- loaders
@needs_data
def test_cora_shapes_and_checksum(cora):
    assert cora.x.shape == (2708, 1433) and cora.x.dtype == np.float32
    assert cora.y.shape == (2708,) and cora.y.dtype == np.int32
    assert cora.edge_index.shape == (2, 10556) and cora.edge_index.dtype == np.int32
    assert cora.num_classes == 7
    assert set(np.unique(cora.x)) <= {0.0, 1.0}
    assert cora.info["sha256"] == G.NPZ_SHA256["cora"]
    assert cora.info["name"] == "cora" and cora.info["file"].endswith("cora.npz")
    assert len(cora.info["train_idx"]) == 140 and len(cora.info["test_idx"]) == 1000
    # undirected, both directions stored
    e = set(map(tuple, cora.edge_index.T.tolist()))
    assert all((b, a) in e for a, b in e)


@needs_data
def test_coauthor_cs_csr_binarised():
    g = G.load_graph("coauthor_cs", data_dir=SHARED)
    assert g.x.shape == (18333, 6805) and g.x.dtype == np.float32
    assert g.num_classes == 15 and g.edge_index.shape == (2, 163788)
    with np.load(SHARED / "coauthor_cs" / "coauthor_cs.npz") as z:
        nnz = int((z["x_data"] > 0).sum())
        row5 = slice(z["x_indptr"][5], z["x_indptr"][6])
        cols5 = z["x_indices"][row5]
    assert int(g.x.sum()) == nnz  # every positive count became exactly one 1.0
    assert np.array_equal(np.flatnonzero(g.x[5]), np.sort(cols5))
    assert g.info["sha256"] == G.NPZ_SHA256["coauthor_cs"]


@needs_data
def test_corrupt_copy_raises(tmp_path):
    dst = tmp_path / "cora" / "cora.npz"
    dst.parent.mkdir()
    data = bytearray((SHARED / "cora" / "cora.npz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    with pytest.raises(G.ChecksumError) as ei:
        G.load_graph("cora", data_dir=tmp_path)
    msg = str(ei.value)
    assert str(dst) in msg and G.NPZ_SHA256["cora"] in msg and G.sha256_file(dst) in msg


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown graph dataset"):
        G.load_graph("pubmed_xl")


# --------------------------------------------------------------------------- OGB raw format
def _write_ogb_fixture(raw: Path, seed: int = 0):
    """A 7-node graph in the official OGB raw format (no headers, gzip csv)."""
    rng = np.random.default_rng(seed)
    n, f = 7, 128
    x = rng.standard_normal((n, f)).astype(np.float32)
    y = np.array([3, 0, 39, 7, 7, 1, 0], np.int64)
    # directed rows, with a reciprocal pair (1,2)/(2,1), a duplicate (0,1) and a self loop (4,4)
    edges = np.array([[0, 1], [1, 2], [2, 1], [0, 1], [3, 0], [4, 4], [5, 6], [6, 3]], np.int64)
    raw.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw / "node-feat.csv.gz", "wt") as fh:
        for row in x:
            fh.write(",".join(repr(float(v)) for v in row) + "\n")
    with gzip.open(raw / "node-label.csv.gz", "wt") as fh:
        fh.write("".join(f"{v}\n" for v in y))
    with gzip.open(raw / "edge.csv.gz", "wt") as fh:
        fh.write("".join(f"{a},{b}\n" for a, b in edges))
    und = {(int(a), int(b)) for a, b in edges if a != b}
    und |= {(b, a) for a, b in und}
    return x, y, und


def _check_fixture(g, x, y, und):
    assert np.array_equal(g.x, x) and g.x.dtype == np.float32
    assert np.array_equal(g.y, y.astype(np.int32)) and g.y.dtype == np.int32
    assert g.edge_index.dtype == np.int32 and g.edge_index.shape == (2, len(und))
    assert set(map(tuple, g.edge_index.T.tolist())) == und
    keys = g.edge_index[0].astype(np.int64) * 7 + g.edge_index[1]
    assert np.all(np.diff(keys) > 0)  # sorted, no duplicates
    assert g.num_classes == 40


@pytest.mark.parametrize("layout", ["ogbn_arxiv/raw", "arxiv/raw", "ogbn-arxiv/raw"])
def test_ogb_raw_fixture(tmp_path, layout):
    x, y, und = _write_ogb_fixture(tmp_path / layout)
    g = G.load_graph("ogbn-arxiv", data_dir=tmp_path)
    _check_fixture(g, x, y, und)
    assert g.info["file"] == str(tmp_path / layout)
    assert set(g.info["sha256"]) == set(G.OGB_RAW_FILES)


def test_ogb_raw_dataset_folder_as_data_dir(tmp_path):
    x, y, und = _write_ogb_fixture(tmp_path / "ogbn_arxiv" / "raw")
    _check_fixture(G.load_graph("ogbn_arxiv", data_dir=tmp_path / "ogbn_arxiv"), x, y, und)


def test_ogb_download_from_zip(tmp_path, monkeypatch):
    src = tmp_path / "src"
    x, y, und = _write_ogb_fixture(src / "arxiv" / "raw")
    zpath = tmp_path / "arxiv.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted((src / "arxiv").rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    cache = tmp_path / "cache"
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(G, "OGBN_ARXIV_URL", zpath.as_uri())
    monkeypatch.setattr(G, "_cache_dir", lambda: cache)
    monkeypatch.setattr(G, "candidate_dirs", lambda d=None: [tmp_path / "empty"])
    g = G.load_graph("ogbn_arxiv", download=True)
    _check_fixture(g, x, y, und)
    assert (cache / "arxiv" / "raw" / "edge.csv.gz").is_file()


def test_missing_dataset_lists_every_place(tmp_path, monkeypatch):
    explicit, env, cache = tmp_path / "explicit", tmp_path / "env", tmp_path / "cache"
    monkeypatch.setenv("FRAMP_DATA_DIR", str(env))
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(G.DatasetNotFoundError) as ei:
        G.load_graph("ogbn_arxiv", data_dir=explicit)
    msg = str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    for d in G.candidate_dirs(explicit):
        assert str(d / "ogbn_arxiv" / "raw") in msg and str(d / "arxiv" / "raw") in msg
    assert str(explicit) in msg and str(env) in msg
    assert G.OGBN_ARXIV_URL in msg and "download=True" in msg


# --------------------------------------------------------------------------- partition
@needs_data
def test_partition_covers_lcc_once_and_keeps_intra_edges(cora, cora_clients):
    lcc = gp.largest_connected_component(cora.edge_index, cora.num_nodes)
    assert lcc.shape[0] == 2485  # Cora's standard LCC
    gids = np.concatenate([c.global_ids for c in cora_clients])
    assert gids.shape[0] == lcc.shape[0] and np.array_equal(np.sort(gids), lcc)
    owner = np.full(cora.num_nodes, -1)
    for c in cora_clients:
        owner[c.global_ids] = c.client_id
    orig = cora.edge_index
    for c in cora_clients:
        assert c.num_nodes > 0 and c.x.shape == (c.num_nodes, 1433)
        glob = c.global_ids[c.edge_index]  # back to original ids
        got = set(map(tuple, glob.T.tolist()))
        inside = (owner[orig[0]] == c.client_id) & (owner[orig[1]] == c.client_id)
        want = set(map(tuple, orig[:, inside].T.tolist()))
        assert got == want and len(got) == c.num_edges  # exactly the intra-client edges
        assert np.array_equal(c.y, cora.y[c.global_ids])
        # Cora is row-normalised (FED-PUB's NormalizeFeatures) under normalize_features="auto"
        raw = cora.x[c.global_ids]
        s = raw.sum(1, keepdims=True)
        np.testing.assert_allclose(c.x, raw / np.where(s == 0, 1, s), rtol=1e-6)
    # 40 / 30 / 30 node split over the LCC (train, then test, then val as in FedSheafHN)
    tr = sum(int(c.train_mask.sum()) for c in cora_clients)
    te = sum(int(c.test_mask.sum()) for c in cora_clients)
    va = sum(int(c.val_mask.sum()) for c in cora_clients)
    assert (tr, te, va) == (round(2485 * 0.4), round(2485 * 0.3), 2485 - round(2485 * 0.4) - round(2485 * 0.3))
    for c in cora_clients:
        assert not np.any(c.train_mask & c.test_mask) and not np.any(c.train_mask & c.val_mask)
        assert np.all(c.train_mask | c.val_mask | c.test_mask)
    assert "nodes/client" in gp.summary(cora_clients, "cora")


@needs_data
def test_partition_deterministic(cora, cora_clients):
    again = gp.partition_graph(cora, 10, seed=123)
    for a, b in zip(cora_clients, again):
        for f in ("x", "y", "edge_index", "train_mask", "val_mask", "test_mask", "global_ids"):
            assert np.array_equal(getattr(a, f), getattr(b, f))
    other = gp.partition_graph(cora, 10, seed=7)
    assert any(not np.array_equal(a.train_mask, b.train_mask) for a, b in zip(cora_clients, other))
    assert all(np.array_equal(a.global_ids, b.global_ids) for a, b in zip(cora_clients, other))  # METIS fixed


@needs_data
def test_bfs_fallback_when_pymetis_missing(cora, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pymetis", None)  # import pymetis -> ImportError
    with pytest.warns(RuntimeWarning, match="pymetis"):
        clients = gp.partition_graph(cora, 7, seed=1)
    assert "fallback" in capsys.readouterr().out
    sizes = [c.num_nodes for c in clients]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 2485
    gids = np.sort(np.concatenate([c.global_ids for c in clients]))
    assert np.array_equal(gids, gp.largest_connected_component(cora.edge_index, cora.num_nodes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = gp.partition_graph(cora, 7, seed=1, method="bfs")
    assert all(np.array_equal(a.global_ids, b.global_ids) for a, b in zip(clients, again))


def test_partition_small_synthetic_lcc_and_labels():
    # two components (0-1-2-3-4-5 path + 6-7) and an isolated unlabelled node 8
    ed = np.array([[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [6, 7]]).T
    ei = np.concatenate([ed, ed[::-1]], 1).astype(np.int32)
    x = np.arange(9 * 3, dtype=np.float32).reshape(9, 3)
    y = np.array([0, 1, -1, 1, 0, 1, 0, 1, -1], np.int32)
    g = G.Graph(x, y, ei, 2, {"name": "toy"})
    clients = gp.partition_graph(g, 2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([c.global_ids for c in clients])), np.arange(6))
    for c in clients:
        lab = c.y >= 0
        assert not np.any((c.train_mask | c.val_mask | c.test_mask) & ~lab)
        np.testing.assert_array_equal(c.x, x[c.global_ids])  # "toy" is not row-normalised


@needs_data
def test_pad_clients(cora_clients):
    p = gp.pad_clients(cora_clients)
    C = len(cora_clients)
    n_pad = max(c.num_nodes for c in cora_clients) + 1
    e_pad = max(c.num_edges for c in cora_clients)
    g = p.graphs
    assert g.nodes.shape == (C, n_pad, 1433) and g.senders.shape == (C, e_pad)
    assert g.n_node.shape == (C, 2) and np.all(g.n_node.sum(1) == n_pad) and np.all(g.n_edge.sum(1) == e_pad)
    for i, c in enumerate(cora_clients):
        k, e = c.num_nodes, c.num_edges
        assert p.node_mask[i].sum() == k and p.node_mask[i, :k].all()
        assert np.array_equal(g.senders[i, :e], c.edge_index[0])
        assert np.all(g.senders[i, e:] == n_pad - 1) and np.all(g.receivers[i, e:] == n_pad - 1)
        assert np.array_equal(p.train_mask[i, :k], c.train_mask) and not p.train_mask[i, k:].any()
        assert np.array_equal(p.labels[i, :k], c.y) and np.all(p.global_ids[i, k:] == -1)
        assert not g.nodes[i, k:].any()
    one = gp.take_client(p, 3)
    assert one.graphs.nodes.shape == (n_pad, 1433) and one.num_classes == 7
    with pytest.raises(ValueError):
        gp.pad_clients(cora_clients, n_pad=n_pad - 1)
    bigger = gp.pad_clients(cora_clients, n_pad=n_pad + 5, e_pad=e_pad + 3)
    assert bigger.graphs.nodes.shape[1] == n_pad + 5 and bigger.graphs.senders.shape[1] == e_pad + 3
