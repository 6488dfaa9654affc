"""Orbax checkpoint wrapper: bit-exact round trip, retention, corruption and config checks."""

import glob
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from framp_jax.checkpoint import CheckpointManager, CorruptCheckpointError

# After a failed read, orbax's pending tensorstore futures may complete on a closed event loop
# ("Event loop is closed"): harmless noise, surfaced by pytest as an unraisable exception.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class ServerState(NamedTuple):
    params: dict
    opt: tuple
    key: jax.Array
    round: np.ndarray


def _state(seed=0):
    rng = np.random.RandomState(seed)
    params = {
        "conv": {"kernel": jnp.asarray(rng.randn(3, 3, 2, 4).astype(np.float32)),
                 "bias": jnp.asarray(rng.randn(4).astype(np.float32))},
        "dense": {"kernel": rng.randn(64, 64).astype(np.float32)},  # numpy leaf
    }
    counts = jnp.asarray(rng.randint(-5, 5, size=(7,)).astype(np.int32))
    opt = ({"count": jnp.asarray(seed, jnp.int32), "mu": jax.tree.map(jnp.zeros_like, params)},
           counts)
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(42), seed))
    return ServerState(params, opt, key, np.asarray(seed, np.int32))


def _assert_bit_exact(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


def test_roundtrip_bit_exact(tmp_path):
    st = _state(3)
    extra = {"seed": 7, "config_hash": "abc123", "history": [{"round": 3, "acc": 0.5}],
             "np": np.float32(0.25)}
    with CheckpointManager(tmp_path / "ckpt", keep=3) as m:
        m.save(3, st, extra)
        assert m.latest_round() == 3
    # A fresh manager (as after a restart) sees it.
    m = CheckpointManager(tmp_path / "ckpt", keep=3)
    target = _state(0)
    restored, ex = m.restore(target=target, expected_config_hash="abc123")
    _assert_bit_exact(restored, st)
    assert isinstance(restored, ServerState)
    assert restored.key.dtype == np.uint32
    assert isinstance(restored.params["dense"]["kernel"], np.ndarray)
    assert isinstance(restored.params["conv"]["kernel"], jax.Array)
    assert ex == {"seed": 7, "config_hash": "abc123", "history": [{"round": 3, "acc": 0.5}],
                  "np": 0.25, "round": 3}
    # Keys round trip into a usable PRNG key.
    np.testing.assert_array_equal(
        jax.random.key_data(jax.random.split(jax.random.wrap_key_data(restored.key))),
        jax.random.key_data(jax.random.split(jax.random.wrap_key_data(st.key))),
    )
    # Without a target: same values, as saved.
    raw, _ = m.restore(3)
    np.testing.assert_array_equal(np.asarray(raw["key"]), np.asarray(st.key))
    np.testing.assert_array_equal(np.asarray(raw["opt"][1]), np.asarray(st.opt[1]))
    m.close()


def test_typed_keys_and_scalars(tmp_path):
    st = {"key": jax.random.key(5), "step": np.int32(4), "lr": 0.5}
    m = CheckpointManager(tmp_path, keep=1)
    m.save(1, st)
    target = {"key": jax.random.key(0), "step": np.int32(0), "lr": 0.0}
    out, ex = m.restore(target=target)
    assert jax.dtypes.issubdtype(out["key"].dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(st["key"]))
    assert out["step"] == 4 and isinstance(out["step"], np.int32)
    assert out["lr"] == 0.5 and isinstance(out["lr"], float)
    assert ex == {"round": 1}
    m.close()


def test_keep_and_latest_round(tmp_path):
    m = CheckpointManager(tmp_path, keep=2)
    assert m.latest_round() is None
    with pytest.raises(FileNotFoundError):
        m.restore()
    for r in (1, 2, 5, 9):
        m.save(r, _state(r), {"config_hash": "h"})
    assert m.latest_round() == 9
    assert m.all_rounds() == [5, 9]
    out, ex = m.restore(5, target=_state(0))
    _assert_bit_exact(out, _state(5))
    assert ex["round"] == 5
    with pytest.raises(FileNotFoundError, match="round 1"):
        m.restore(1, target=_state(0))
    # Resuming from round 5 and saving round 6 drops the later (stale) round 9.
    m.save(6, _state(6))
    assert m.all_rounds() == [5, 6] and m.latest_round() == 6
    m.close()
    assert not glob.glob(str(tmp_path / "*tmp*"))


def _corrupt_cases():
    def delete_arrays(step_dir):
        files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
        assert files
        for f in files:
            os.remove(f)

    def truncate_arrays(step_dir):
        for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)

    def flip_byte(step_dir):
        files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
        f = max(files, key=os.path.getsize)
        buf = bytearray(open(f, "rb").read())
        buf[int(len(buf) * 0.7)] ^= 0x10
        open(f, "wb").write(bytes(buf))

    def delete_extra(step_dir):
        import shutil

        shutil.rmtree(os.path.join(step_dir, "extra"))

    def truncate_metadata(step_dir):
        with open(os.path.join(step_dir, "state", "_METADATA"), "r+b") as fh:
            fh.truncate(10)

    return [delete_arrays, truncate_arrays, flip_byte, delete_extra, truncate_metadata]


@pytest.mark.parametrize("damage", _corrupt_cases(), ids=lambda f: f.__name__)
def test_corrupt_checkpoint_raises(tmp_path, damage):
    m = CheckpointManager(tmp_path, keep=3)
    m.save(1, _state(1))
    m.save(2, _state(2))
    m.close()
    step_dir = os.path.join(tmp_path, "2")
    damage(step_dir)
    m = CheckpointManager(tmp_path, keep=3)
    with pytest.raises(CorruptCheckpointError) as ei:
        m.restore(target=_state(0))
    err = ei.value
    assert err.round == 2 and err.directory == os.path.abspath(step_dir)
    msg = str(err)
    assert "round 2" in msg and step_dir in msg and "--resume" in msg
    # The previous step is still fine once the user deletes the broken one.
    out, _ = m.restore(1, target=_state(0))
    _assert_bit_exact(out, _state(1))
    m.close()


def test_config_hash_mismatch(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(4, _state(4), {"config_hash": "aaaa"})
    with pytest.raises(ValueError, match="different config"):
        m.restore(target=_state(0), expected_config_hash="bbbb")
    out, ex = m.restore(target=_state(0), expected_config_hash="aaaa")
    assert ex["config_hash"] == "aaaa"
    m.close()


def test_target_structure_mismatch_is_value_error(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(1, {"w": np.ones((3, 4), np.float32)})
    with pytest.raises(ValueError, match="shapes"):
        m.restore(target={"w": np.ones((3, 5), np.float32)})
    with pytest.raises(ValueError, match="structure"):
        m.restore(target={"w": np.ones((3, 4), np.float32), "b": np.zeros(2, np.float32)})
    with pytest.raises(TypeError, match="extra"):
        m.save(2, {"w": np.ones(2), "name": "not an array"})
    m.close()


def test_async_save_then_wait(tmp_path):
    m = CheckpointManager(tmp_path, keep=2, async_save=True)
    m.save(1, _state(1), {"k": 1})
    m.wait()
    assert m.latest_round() == 1
    m.close()
    out, _ = CheckpointManager(tmp_path).restore(target=_state(0))
    _assert_bit_exact(out, _state(1))
