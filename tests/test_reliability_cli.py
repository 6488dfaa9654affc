"""Issue 30, items 2, 4, 6 and 9: the command line's own failures are one line.

A typo in a flag or a config field (with ml_collections' did-you-mean), a missing or broken
``--config`` file, a sweep file with a syntax error or whose ``get_sweep()`` raises, and a wrong
usage each print one line ``framp-jax: ...`` and exit with status 2 (the traceback only under
``--debug``); Ctrl-C prints where the run stopped and how to continue, without a traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from framp_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORA = os.path.join(REPO, "experiments", "configs", "fedavg_cora.py")
FRAMP_CORA = os.path.join(REPO, "experiments", "configs", "framp_cora.py")


def _cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "framp_jax.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, **(env or {})))


def _one_line(r, expected):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == f"framp-jax: {expected}", r.stderr[-3000:]


@pytest.mark.parametrize("args, expected", [
    (["--config", CORA, "--config.roundz=3"],
     "--config.roundz=3: the config has no field 'roundz'; did you mean 'rounds'?"),
    (["--config", FRAMP_CORA, "--config.framp.lamm=1"],
     "--config.framp.lamm=1: config.framp has no field 'lamm'; did you mean 'lam'?"),
    (["--config", CORA, "--config.heterofl.no_such_option=1"],
     "--config.heterofl.no_such_option=1: the config has no field 'heterofl'"),
    (["--config", CORA, "--config.rounds=abc"],
     "flag --config.rounds=abc: invalid literal for int() with base 10: 'abc'"),
    (["--config", CORA, "--no_such_flag"],
     "Unknown command line flag 'no_such_flag'; see framp-jax --helpshort"),
])
def test_flag_and_field_typos_are_one_line(tmp_path, args, expected):
    _one_line(_cli("train", "--workdir", str(tmp_path / "w"), *args), expected)
    assert not (tmp_path / "w").exists()


def test_usage_errors_exit_2_in_one_line(tmp_path):
    _one_line(_cli("bogus"), "usage: framp-jax {train,sweep,report,select} --config FILE "
                             "--workdir DIR [--config.KEY=VALUE ...] [--resume]; got ['bogus']")
    _one_line(_cli("train", "--config", CORA),
              "usage: framp-jax train --config FILE --workdir DIR [--config.KEY=VALUE ...] "
              "[--resume]: both --config and --workdir are needed")


def test_debug_shows_the_traceback_of_a_typo(tmp_path):
    r = _cli("train", "--workdir", str(tmp_path / "w"), "--config", CORA, "--config.roundz=3",
             "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr
    assert "did you mean 'rounds'?" in r.stderr


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_config_file_errors_are_one_line(tmp_path):
    """Checked in-process (:func:`cli._check_config_file`, what the flag parser calls first)."""
    cases = [
        (str(tmp_path / "nope.py"), f"--config {tmp_path / 'nope.py'}: no such file (give a "
                                     "get_config() file, e.g. "
                                     "experiments/configs/fedavg_cifar10_cpu.py)"),
        (_write(tmp_path / "syntax.py", "def get_config(:\n"),
         f"--config {tmp_path / 'syntax.py'} has a syntax error at line 1: invalid syntax"),
        (_write(tmp_path / "noget.py", "x = 1\n"),
         f"--config {tmp_path / 'noget.py'} defines no get_config() (a config file is a Python "
         "file whose get_config() returns an ml_collections.ConfigDict)"),
        (_write(tmp_path / "raises.py", "def get_config():\n    raise ValueError('boom')\n"),
         f"--config {tmp_path / 'raises.py'}: get_config() raised ValueError: boom"),
        (_write(tmp_path / "imports.py", "import no_such_module_x\n"),
         f"--config {tmp_path / 'imports.py'} cannot be loaded: ModuleNotFoundError: No module "
         "named 'no_such_module_x'"),
    ]
    for value, expected in cases:
        with pytest.raises(cli.CommandLineError) as ei:
            cli._check_config_file(value)
        assert str(ei.value) == expected
        assert cli.expected_failure_message(ei.value) == expected
    cli._check_config_file(CORA)  # a good one passes
    cli._check_config_file(_write(tmp_path / "arg.py", "def get_config(a):\n    return a\n")
                           + ":x")  # FILE:ARG, as ml_collections takes it


def test_missing_config_file_from_the_command_line(tmp_path):
    _one_line(_cli("train", "--config", str(tmp_path / "nope.py"), "--workdir",
                   str(tmp_path / "w")),
              f"--config {tmp_path / 'nope.py'}: no such file (give a get_config() file, e.g. "
              "experiments/configs/fedavg_cifar10_cpu.py)")


def test_sweep_file_errors_are_one_line(tmp_path):
    from framp_jax.sweep import SweepError, load_sweep
    syntax = _write(tmp_path / "syntax.py", "def get_sweep(:\n")
    raises = _write(tmp_path / "raises.py", "def get_sweep():\n    raise ValueError('no runs')\n")
    with pytest.raises(SweepError, match=r"^sweep file .*syntax\.py has a syntax error at line "
                                         r"1: invalid syntax$"):
        load_sweep(syntax)
    with pytest.raises(SweepError, match=r"^sweep file .*raises\.py: get_sweep\(\) raised "
                                         r"ValueError: no runs$"):
        load_sweep(raises)
    _one_line(_cli("sweep", "--sweep", syntax, "--workdir", str(tmp_path / "w")),
              f"sweep file {syntax} has a syntax error at line 1: invalid syntax")
