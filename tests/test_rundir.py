"""Run-directory writers: TensorBoard events (tensorboardX, read back with TensorBoard's own
reader), metrics.csv, JSON, plots."""

import json
import os

import numpy as np
import pytest

from framp_jax.rundir import (
    EventWriter,
    MetricsCSV,
    plot_budget_accuracy,
    read_metrics_csv,
    write_json_atomic,
)


def read_scalars(logdir):
    """``(accumulator, sorted [(step, tag, value)])`` as TensorBoard itself reads ``logdir``."""
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0})  # 0: keep every event
    acc.Reload()
    return acc, sorted((e.step, t, e.value) for t in acc.Tags()["scalars"] for e in acc.Scalars(t))


def _write_some(w):
    expected = []
    for step in range(5):
        acc = np.float32(0.1 * step + 0.05)
        w.scalar("local/1/4", acc, step)
        expected.append((step, "local/1/4", float(acc)))
        vals = {"union/mean": np.float32(step / 7), "loss": 2.5 - step, "name": "skip me",
                "none": None}
        w.scalars(vals, step)
        expected.append((step, "union/mean", float(np.float32(step / 7))))
        expected.append((step, "loss", float(np.float32(2.5 - step))))
    w.scalar("big_step", 1.0, 2**40)
    expected.append((2**40, "big_step", 1.0))
    return sorted(expected)


def test_event_writer_values_read_back_by_tensorboard(tmp_path):
    with EventWriter(tmp_path) as w:
        expected = _write_some(w)
        w.flush()
        # flush alone (the writer still open, as during a run) puts every record on disk
        acc, got = read_scalars(tmp_path)
        assert got == expected  # values are the stored float32, exactly
        path = w.path
    assert os.listdir(tmp_path) == [os.path.basename(path)]
    assert os.path.basename(path).startswith("events.out.tfevents.")
    assert acc.file_version == 2.0  # the brain.Event:2 header record
    assert read_scalars(tmp_path)[1] == expected  # and after close
    with pytest.raises(ValueError, match="closed"):
        w.scalar("late", 1.0, 6)


def test_event_writer_two_writers_same_dir(tmp_path):
    w1, w2 = EventWriter(tmp_path), EventWriter(tmp_path)
    assert w1.path != w2.path
    w1.scalars({"a": 1.0}, 1)
    w2.scalars({"a": 2.0}, 2)
    w1.close()
    w2.close()
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(w.path) for w in (w1, w2))
    assert read_scalars(tmp_path)[1] == [(1, "a", 1.0), (2, "a", 2.0)]


def test_metrics_csv_widening_header_and_truncate(tmp_path):
    path = tmp_path / "metrics.csv"
    m = MetricsCSV(path)
    m.append({"round": 1, "local/1": 0.5, "loss": 1.25})
    m.append({"round": 2, "local/1": 0.625, "loss": np.float32(1.0)})
    m.append({"round": 3, "local/1": 0.75, "union/1": 0.5, "loss": 0.5})  # new key: rewrite
    m.append({"round": 4, "local/1": 0.875, "loss": 0.25})
    rows = read_metrics_csv(path)
    header = open(path).readline().strip().split(",")
    assert header == ["round", "local/1", "loss", "union/1"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[0] == {"round": 1, "local/1": 0.5, "loss": 1.25}  # missing cells omitted
    assert rows[2]["union/1"] == 0.5 and rows[1]["loss"] == 1.0

    # Resume from a checkpoint at round 2: later rows go, new ones append after.
    m2 = MetricsCSV(path, resume=True)
    assert m2.rows == rows
    assert m2.truncate_after(2) == 2
    m2.append({"round": 3, "local/1": 0.7, "loss": 0.4})
    rows2 = read_metrics_csv(path)
    assert [r["round"] for r in rows2] == [1, 2, 3]
    assert rows2[2] == {"round": 3, "local/1": 0.7, "loss": 0.4}
    assert open(path).readline().strip().split(",") == header  # header kept on resume

    # A fresh (non-resume) writer replaces the old file on its first write.
    m3 = MetricsCSV(path)
    m3.append({"round": 0, "acc": 0.1})
    assert read_metrics_csv(path) == [{"round": 0, "acc": 0.1}]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_metrics_csv_round_is_first_column(tmp_path):
    m = MetricsCSV(tmp_path / "m.csv")
    m.append({"acc": 0.5, "round": 1})
    assert open(tmp_path / "m.csv").readline().strip() == "round,acc"


def test_write_json_atomic(tmp_path):
    import jax.numpy as jnp

    obj = {
        "method": "framp",
        "seed": np.int64(3),
        "final": {"local": {"1/4": np.float32(0.5), "mean": jnp.asarray(0.25)}},
        "arr": np.arange(3),
        "tup": (1, 2),
        "path": tmp_path,
    }
    p = tmp_path / "results.json"
    write_json_atomic(p, obj)
    text = p.read_text()
    assert text.startswith('{\n  "method"')  # indent 2
    back = json.loads(text)
    assert back["seed"] == 3 and back["final"]["local"] == {"1/4": 0.5, "mean": 0.25}
    assert back["arr"] == [0, 1, 2] and back["tup"] == [1, 2] and back["path"] == str(tmp_path)
    write_json_atomic(p, {"x": 1})  # overwrite
    assert json.loads(p.read_text()) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_plot_budget_accuracy(tmp_path):
    rows = []
    for r in range(1, 6):
        row = {"round": r, "local/1": 0.5 + 0.05 * r, "local/1/4": 0.4 + 0.05 * r,
               "local/mean": 0.45 + 0.05 * r, "union/1/64": 0.2 + 0.01 * r}
        if r == 3:
            row["local/1/16"] = float("nan")
            del row["union/1/64"]
        rows.append(row)
    out = plot_budget_accuracy(rows, tmp_path / "plots" / "budget_accuracy.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    # Never fails on empty input or rows without any known key.
    out2 = plot_budget_accuracy([], tmp_path / "empty.png")
    assert os.path.getsize(out2) > 0
    out3 = plot_budget_accuracy([{"round": 1, "other": "x"}], tmp_path / "other.png")
    assert os.path.getsize(out3) > 0
