"""Config validation (every error names its field) and the ``framp-jax train`` command line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from framp_jax import config as C
from framp_jax.simulate import config_hash


def test_tiny_config_is_valid(tiny_config):
    C.validate(tiny_config())


@pytest.mark.parametrize("field,value", [
    ("method", "fedprox"),
    ("dataset", "mnist"),
    ("dataset", "npz:/nonexistent/file.npz"),
    ("model", "vgg"),
    ("model", "gcn"),                 # a graph model on image data
    ("conv_impl", "cudnn"),
    ("budget_levels", (1.0, 0.0)),
    ("budget_levels", (1.5, 0.25)),
    ("budget_levels", ()),
    ("alpha", 0.0),
    ("alpha", -1.0),
    ("clients_per_round", 9),         # more participants than the 8 clients
    ("clients_per_round", 0),
    ("num_clients", 0),
    ("rounds", 0),
    ("lr", 0.0),
    ("momentum", 1.0),
    ("partition", "pathological"),
    ("test_prior", "uniform"),
    ("heldout_frac", 1.0),
    ("union_subset", -1),
    ("mesh_clients", -1),
    ("data_dir", "/nonexistent/framp_jax/data"),
    ("budget_dist", (1, 1, 1)),       # one share per level is needed
    ("budget_dist", (1, -1, 1, 1)),
    ("budget_dist", (0, 0, 0, 0)),
])
def test_validation_error_names_the_field(tiny_config, field, value):
    c = tiny_config()
    setattr(c, field, value)
    with pytest.raises(C.ConfigError) as e:
        C.validate(c)
    assert e.value.field == field
    assert f"config.{field}=" in str(e.value)


def test_heldout_clients_reduce_the_trainable_pool(tiny_config):
    c = tiny_config(heldout_frac=0.5, clients_per_round=4)  # 1 of 2 clients per level held out
    C.validate(c)
    c.clients_per_round = 5
    with pytest.raises(C.ConfigError, match="clients_per_round"):
        C.validate(c)


def test_assign_budgets_contiguous_with_remainder_first():
    c = C.base_config()
    c.num_clients = 10
    np.testing.assert_array_equal(C.assign_budgets(c),
                                  [1, 1, 1, .25, .25, .25, .0625, .0625, .015625, .015625])
    c.budget_dist = (2, 1, 1, 0)
    # floor(10 * (.5, .25, .25, 0)) = (5, 2, 2, 0); the one left over goes to the first level
    np.testing.assert_array_equal(C.assign_budgets(c), [1] * 6 + [.25] * 2 + [.0625] * 2)


def test_config_hash_ignores_run_length_fields_only(tiny_config):
    a = tiny_config()
    b = tiny_config(rounds=50, checkpoint_every=7, eval_every=3, union_subset=20)
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(tiny_config(lr=0.2))
    assert config_hash(a) != config_hash(tiny_config(seed=1))


# ---------------------------------------------------------------------------------------------
# CLI (subprocesses)


def _write_config_file(path, c):
    """A get_config() file reproducing ``c`` as overrides of base_config()."""
    base = C.base_config().to_dict()
    diff = {k: v for k, v in c.to_dict().items() if base.get(k) != v}
    path.write_text(
        "import json\nfrom framp_jax.config import base_config\n\n\n"
        "def get_config():\n    c = base_config()\n"
        f"    for k, v in json.loads({json.dumps(json.dumps(diff))}).items():\n"
        "        setattr(c, k, v)\n    return c\n")
    return str(path)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "framp_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


@pytest.fixture(scope="module")
def config_file(tiny_config, tmp_path_factory):
    return _write_config_file(tmp_path_factory.mktemp("cli") / "tiny_cfg.py", tiny_config())


def test_cli_train_writes_results(config_file, tmp_path):
    wd = tmp_path / "run"
    r = _cli("train", "--config", config_file, "--workdir", str(wd), "--config.rounds=2",
             "--noprogress")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((wd / "results.json").read_text())
    assert res["rounds"] == 2 and res["method"] == "fedavg" and res["compiles"] == 1
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["rounds"] == 2 and cfg["num_clients"] == 8  # the override and the file's values
    assert "results:" in r.stdout and "compiled 1x" in r.stdout


@pytest.mark.parametrize("override,field", [("--config.alpha=-1", "alpha"),
                                            ("--config.method=nope", "method"),
                                            ("--config.budget_levels=(1.0,0.0,0.5,0.25)",
                                             "budget_levels")])
def test_cli_bad_value_exits_nonzero_naming_the_field(config_file, tmp_path, override, field):
    r = _cli("train", "--config", config_file, "--workdir", str(tmp_path / "run"), override)
    assert r.returncode != 0
    assert f"config.{field}=" in r.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_cli_unknown_key_fails(config_file, tmp_path):
    r = _cli("train", "--config", config_file, "--workdir", str(tmp_path / "run"),
             "--config.nonexistent_key=1")
    assert r.returncode != 0
    assert "nonexistent_key" in r.stderr


def test_cli_usage_errors(config_file, tmp_path):
    r = _cli("train", "--config", config_file)  # no --workdir
    assert r.returncode != 0 and "--workdir" in r.stderr
    r = _cli("fly", "--config", config_file, "--workdir", str(tmp_path / "run"))
    assert r.returncode != 0 and "train" in r.stderr
