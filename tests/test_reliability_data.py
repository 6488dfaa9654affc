"""Issue 30, items 1 and 5: the data a run trained on is part of its identity, and graph runs
refuse test splits that cannot be evaluated.

1. Every checkpoint records the data file and its sha256 (``extra["data"]``; config.json's
   ``_resolved.data`` for checkpoints written before); a ``--resume`` that would load other data
   (another ``data_dir``, another ``$FRAMP_DATA_DIR``, a preferred file that appeared or
   disappeared, a file replaced in place) is refused naming both files, before any data loads,
   and config.json keeps naming the data the checkpoints were trained on. A copy of the same
   file elsewhere (same sha256) is the same data.
5. Graph runs: every client needs test nodes (the image rule), one line before anything trains;
   results.json never holds NaN (it is not JSON).
"""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest

from framp_jax import simulate
from framp_jax.checkpoint import CheckpointManager, CheckpointMismatchError
from framp_jax.data.locate import sha256_file
from framp_jax.errors import CheckpointError, DataError

from conftest import make_tiny_images

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def quiet(*a, **k):
    pass


def run(c, workdir, **kw):
    kw.setdefault("warn", quiet)
    return simulate.run(c, str(workdir), progress=False, log=quiet, **kw)


def no_data_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("data were loaded")
    monkeypatch.setattr(simulate, "build_problem", boom)


def snapshot(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for f in files:
            p = os.path.join(root, f)
            if not p.endswith(".framp-jax.lock") and "orbax-checkpoint-tmp" not in p:
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, workdir)] = fh.read()
    return out


# ---------------------------------------------------------------------------------------------
# 1. data identity on resume


@pytest.fixture(scope="module")
def data_dirs(tiny_npz, tmp_path_factory):
    """``a/tiny.npz`` (the tiny data set), ``same/tiny.npz`` (a byte copy of it) and
    ``other/tiny.npz`` (other images of the same shape: a different file)."""
    root = tmp_path_factory.mktemp("data_identity")
    for d in ("a", "same", "other"):
        (root / d).mkdir()
    shutil.copy(tiny_npz, root / "a" / "tiny.npz")
    shutil.copy(tiny_npz, root / "same" / "tiny.npz")
    rng = np.random.default_rng(99)
    xtr, ytr = make_tiny_images(400, rng)
    xte, yte = make_tiny_images(200, rng)
    np.savez(root / "other" / "tiny.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return root


def _cfg(tiny_config, dataset, rounds=3):
    c = tiny_config(rounds=rounds, checkpoint_every=1, eval_every=1)
    c.dataset = f"npz:{dataset}"
    return c


@pytest.fixture(scope="module")
def trained(data_dirs, tiny_config, tmp_path_factory):
    """A 2-round run on ``npz:tiny.npz`` (a relative path) run from ``a/`` (checkpoints at
    rounds 1 and 2)."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    cwd = os.getcwd()
    os.chdir(data_dirs / "a")
    try:
        res = run(_cfg(tiny_config, "tiny.npz", rounds=2), wd)
    finally:
        os.chdir(cwd)
    return str(wd), res


@pytest.fixture
def resumable(trained, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(trained[0], wd)
    return str(wd)


def test_checkpoints_and_config_json_record_the_data(trained, data_dirs):
    wd, _ = trained
    want = {"file": "tiny.npz", "sha256": sha256_file(data_dirs / "a" / "tiny.npz")}
    with CheckpointManager(os.path.join(wd, "checkpoints"), keep=None) as m:
        assert m.all_rounds() == [1, 2]
        for r in m.all_rounds():
            assert m.restore_extra(r)["data"] == want
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert {k: cfg["_resolved"]["data"][k] for k in ("file", "sha256")} == want


def _check_refusal(ei, wd, old, old_sha, new, new_sha, verb="would load"):
    msg = str(ei.value)
    assert isinstance(ei.value, CheckpointError) and "\n" not in msg
    assert msg.startswith(f"cannot resume {wd}: its checkpoint of round 2 was trained on {old} "
                          f"(sha256 {old_sha[:16]}) but this run {verb} {new} (sha256 "
                          f"{new_sha[:16]})"), msg
    assert "nothing was changed" in msg and "--config.data_dir" in msg


def test_resume_from_another_directory_on_other_data_is_refused(resumable, tiny_config,
                                                                data_dirs, monkeypatch):
    """The same relative npz path from another working directory is another file."""
    wd = resumable
    before = snapshot(wd)
    monkeypatch.chdir(data_dirs / "other")
    no_data_load(monkeypatch)  # refused from the file's sha256, before the data load
    with pytest.raises(CheckpointMismatchError) as ei:
        run(_cfg(tiny_config, "tiny.npz"), wd, resume=True)
    _check_refusal(ei, wd, "tiny.npz", sha256_file(data_dirs / "a" / "tiny.npz"), "tiny.npz",
                   sha256_file(data_dirs / "other" / "tiny.npz"))
    assert snapshot(wd) == before  # config.json still names the data of the checkpoints


def test_resume_on_a_file_replaced_in_place_is_refused(tiny_config, data_dirs, tmp_path,
                                                       monkeypatch):
    path = tmp_path / "mine.npz"
    shutil.copy(data_dirs / "a" / "tiny.npz", path)
    wd = tmp_path / "run"
    c = _cfg(tiny_config, path)
    _fake_checkpoint(wd, c, data={"file": str(path), "sha256": sha256_file(path)},
                     resolved_data={"file": str(path), "sha256": sha256_file(path)})
    shutil.copy(data_dirs / "other" / "tiny.npz", path)
    before = snapshot(wd)
    no_data_load(monkeypatch)
    with pytest.raises(CheckpointMismatchError) as ei:
        run(c, wd, resume=True)
    _check_refusal(ei, wd, path, sha256_file(data_dirs / "a" / "tiny.npz"), path,
                   sha256_file(path))
    assert snapshot(wd) == before


@pytest.mark.slow  # a resumed run: ~40 s on 2 busy cores
def test_resume_on_a_copy_of_the_same_file_goes_on(resumable, tiny_config, data_dirs,
                                                   monkeypatch):
    """Another file with the same sha256 is the same data: the run finishes."""
    wd = resumable
    monkeypatch.chdir(data_dirs / "same")
    res = run(_cfg(tiny_config, "tiny.npz"), wd, resume=True)
    assert res["rounds"] == 3
    with CheckpointManager(os.path.join(wd, "checkpoints"), keep=None) as m:
        assert m.restore_extra(3)["data"]["sha256"] == sha256_file(data_dirs / "a" / "tiny.npz")


def test_data_changed_after_the_check_is_refused_after_loading(resumable, tiny_config,
                                                               data_dirs, monkeypatch):
    """Where the file cannot be told before loading (tfds), the loaded data are compared, before
    anything is written."""
    wd = resumable
    monkeypatch.setattr(simulate, "expected_data_identity", lambda c: None)
    monkeypatch.chdir(data_dirs / "other")
    before = snapshot(wd)
    with pytest.raises(CheckpointMismatchError) as ei:
        run(_cfg(tiny_config, "tiny.npz"), wd, resume=True)
    _check_refusal(ei, wd, "tiny.npz", sha256_file(data_dirs / "a" / "tiny.npz"), "tiny.npz",
                   sha256_file(data_dirs / "other" / "tiny.npz"), verb="loaded")
    assert snapshot(wd) == before


@pytest.fixture
def cifar_dirs(tmp_path, monkeypatch):
    """Stand-in CIFAR-10 copies (their bytes only: nothing here loads them): ``lossy/`` holds
    the JPEG copy, ``both/`` the JPEG and the lossless copy."""
    monkeypatch.delenv("FRAMP_DATA_DIR", raising=False)
    monkeypatch.setattr("framp_jax.data.locate._shared_dirs", lambda: [])
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(tmp_path / "cache"))
    for d in ("lossy", "both"):
        (tmp_path / d / "cifar10").mkdir(parents=True)
        (tmp_path / d / "cifar10" / "cifar10_jpeg.npz").write_bytes(b"jpeg copy")
    (tmp_path / "both" / "cifar10" / "cifar10_webp.npz").write_bytes(b"lossless copy")
    return tmp_path


def _cifar_run(tiny_config, cifar_dirs, data_dir):
    """A CIFAR-10 run killed after its round-2 checkpoint, trained on ``data_dir``'s file."""
    c = tiny_config()
    c.dataset, c.data_dir = "cifar10", str(cifar_dirs / data_dir)
    ident = simulate.expected_data_identity(c)
    wd = cifar_dirs / "run"
    _fake_checkpoint(wd, c, data=ident, resolved_data=ident)
    return c, str(wd), ident


@pytest.mark.parametrize("how", ["data_dir", "FRAMP_DATA_DIR", "preferred_file_appears",
                                 "preferred_file_disappears"])
def test_cifar_resume_on_another_copy_is_refused(tiny_config, cifar_dirs, monkeypatch, how):
    """The issue's case: a CIFAR-10 run resumed where another copy is found first."""
    lossless = cifar_dirs / "both" / "cifar10" / "cifar10_webp.npz"
    if how == "data_dir":  # trained on the lossless copy; resumed on a directory with the JPEG
        c, wd, old = _cifar_run(tiny_config, cifar_dirs, "both")
        c.data_dir = str(cifar_dirs / "lossy")
        new = cifar_dirs / "lossy" / "cifar10" / "cifar10_jpeg.npz"
    elif how == "FRAMP_DATA_DIR":
        c, wd, old = _cifar_run(tiny_config, cifar_dirs, "both")
        c.data_dir = ""
        monkeypatch.setenv("FRAMP_DATA_DIR", str(cifar_dirs / "lossy"))
        new = cifar_dirs / "lossy" / "cifar10" / "cifar10_jpeg.npz"
    elif how == "preferred_file_appears":  # trained on the JPEG copy, then the lossless appears
        c, wd, old = _cifar_run(tiny_config, cifar_dirs, "lossy")
        new = cifar_dirs / "lossy" / "cifar10" / "cifar10_webp.npz"
        shutil.copy(lossless, new)
    else:
        c, wd, old = _cifar_run(tiny_config, cifar_dirs, "both")
        os.remove(lossless)
        new = cifar_dirs / "both" / "cifar10" / "cifar10_jpeg.npz"
    before = snapshot(wd)
    no_data_load(monkeypatch)
    with pytest.raises(CheckpointMismatchError) as ei:
        run(c, wd, resume=True)
    _check_refusal(ei, wd, old["file"], old["sha256"], new, sha256_file(new))
    assert snapshot(wd) == before


def _fake_checkpoint(wd, c, data=None, resolved_data=None):
    extra = {"config_hash": simulate.config_hash(c)}
    if data is not None:
        extra["data"] = data
    with CheckpointManager(os.path.join(wd, "checkpoints"), keep=None) as m:
        m.save(2, {"w": np.zeros(2, np.float32)}, extra)
    if resolved_data is not None:
        with open(os.path.join(wd, "config.json"), "w") as f:
            json.dump({**c.to_dict(), "_resolved": {"data": resolved_data}}, f)


def test_checkpoints_without_a_data_record_use_config_json(tiny_config, tmp_path, monkeypatch):
    """Checkpoints written before they recorded their data: config.json's ``_resolved.data``."""
    monkeypatch.delenv("FRAMP_DATA_DIR", raising=False)
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    c = tiny_config()
    c.dataset = f"npz:{a}"
    wd = tmp_path / "run"
    _fake_checkpoint(wd, c, resolved_data={"file": str(b), "sha256": sha256_file(b),
                                           "num_classes": 4})
    with CheckpointManager(wd / "checkpoints", keep=None) as m:
        with pytest.raises(CheckpointMismatchError, match=f"trained on {b} .* would load {a}"):
            simulate.check_checkpoints(c, str(wd), m, resume=True)
    c.dataset = f"npz:{b}"  # (the dataset is hashed; a fresh config hash for the fake ckpt)
    wd2 = tmp_path / "run2"
    _fake_checkpoint(wd2, c, resolved_data={"file": str(b), "sha256": sha256_file(b)})
    with CheckpointManager(wd2 / "checkpoints", keep=None) as m:
        assert simulate.check_checkpoints(c, str(wd2), m, resume=True)[1]["file"] == str(b)


def test_graph_and_vision_file_lookup_match_the_loaders(tmp_path, monkeypatch):
    from framp_jax.data.graphs import find_graph_file
    from framp_jax.data.vision import find_vision_file
    monkeypatch.delenv("FRAMP_DATA_DIR", raising=False)
    monkeypatch.setattr("framp_jax.data.locate._shared_dirs", lambda: [])
    monkeypatch.setenv("FRAMP_CACHE_DIR", str(tmp_path / "cache"))
    assert find_graph_file("cora", tmp_path) is None
    (tmp_path / "cora.npz").write_bytes(b"x")
    assert find_graph_file("cora", tmp_path) == tmp_path / "cora.npz"
    (tmp_path / "cora").mkdir()
    (tmp_path / "cora" / "cora.npz").write_bytes(b"y")  # <dir>/<name>/ comes first
    assert find_graph_file("cora", tmp_path) == tmp_path / "cora" / "cora.npz"
    assert find_vision_file("cifar100", tmp_path) is None
    assert find_vision_file(f"npz:{tmp_path / 'none.npz'}") is None


# ---------------------------------------------------------------------------------------------
# 5. graph clients without test nodes; no NaN in results.json

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")
needs_cora = pytest.mark.skipif(not os.path.isfile(os.path.join(SHARED, "cora", "cora.npz")),
                                reason="shared/data/cora absent")


def _preset(name):
    from conftest import load_script
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return load_script(os.path.join(repo, "experiments", "configs", f"{name}.py")).get_config()


@needs_cora
@pytest.mark.parametrize("overrides, expected", [
    # 12 test nodes for 10 clients: the case (local/1 read 1.0 on one test node)
    (dict(graph_ratio_train=0.99),
     r"^cora cannot be split into num_clients=10 clients with graph_partition=metis and "
     r"graph_ratio_train=0\.99: client\(s\) [0-9, ]+ have no test nodes \(12 test nodes in "
     r"all; each node is train/test/validation with probability "
     r"0\.99/0\.005/0\.005\); every client needs train, validation and test nodes: lower "
     r"config\.num_clients or lower config\.graph_ratio_train$"),
    (dict(graph_partition="bfs", num_clients=2000, clients_per_round=10),
     r"^cora cannot be split into num_clients=2000 clients with graph_partition=bfs and "
     r"graph_ratio_train=0\.4: client\(s\) [0-9, ]+, \.\.\. \(\d+ in all\) have no \w+ nodes"),
    (dict(num_clients=5000, clients_per_round=10),
     r"^cora cannot be split into num_clients=5000 clients: its largest connected component "
     r"has 2485 nodes, fewer than the clients; lower config\.num_clients$"),
])
def test_graph_clients_without_test_nodes_are_one_line(tmp_path, monkeypatch, overrides,
                                                       expected):
    import re
    def no_compile(*a, **k):
        raise AssertionError("got as far as building the algorithm")
    monkeypatch.setattr(simulate, "build_algorithm", no_compile)
    c = _preset("fedavg_cora")
    for k, v in overrides.items():
        setattr(c, k, v)
    with pytest.raises(DataError) as ei:
        run(c, tmp_path / "run")
    msg = str(ei.value)
    assert re.match(expected, msg), msg
    assert isinstance(ei.value, ValueError) and "\n" not in msg
    assert not (tmp_path / "run" / "results.json").exists()


def test_results_json_never_holds_nan(tmp_path):
    """A metric with nothing to average (NaN) is written as null: NaN is not JSON."""
    from framp_jax.rundir import write_json_atomic
    from framp_jax.report import _read_run_json
    res = {"final": {"local": {"1": 0.5, "1/4": float("nan"), "mean": float("inf")}},
           "per_client": {"local": [0.1, float("nan")]}, "n": np.float32("nan")}
    write_json_atomic(tmp_path / "results.json", res)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda s: pytest.fail(f"non-JSON constant {s}"))
    assert back == {"final": {"local": {"1": 0.5, "1/4": None, "mean": None}},
                    "per_client": {"local": [0.1, None]}, "n": None}
    assert _read_run_json(str(tmp_path / "results.json"))["final"]["local"]["1/4"] is None
