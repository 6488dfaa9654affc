"""experiments/kept_fractions.py: the per-leaf kept fraction per budget level, by hand."""
import pathlib

import numpy as np

from conftest import load_script

_PATH = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "kept_fractions.py"


def test_kept_table_by_hand():
    kt = load_script(_PATH).kept_table
    # 4 clients: budgets 1, 1/4, 1, 1/4; leaf "a" 4 entries, leaf "b" 2 entries, "c" not prunable
    a = np.array([[1, 2, 3, 4], [0, 0, 5, 0], [1, 0, 3, 4], [0, 0, 0, 0]], np.float32)
    b = np.array([[1, 1], [0, 0], [1, 1], [2, 0]], np.float32)
    c = np.zeros((4, 3), np.float32)
    names, levels, kept = kt({"a": a, "b": b, "c": c}, {"a": True, "b": True, "c": False},
                             [1.0, 0.25, 1.0, 0.25])
    assert names == ["['a']", "['b']"] and levels == [1.0, 0.25]
    # a: budget 1 -> (4/4 + 3/4) / 2; budget 1/4 -> (1/4 + 0) / 2
    # b: budget 1 -> (1 + 1) / 2; budget 1/4 -> (0 + 1/2) / 2
    np.testing.assert_allclose(kept, [[0.875, 0.125], [1.0, 0.25]])
