"""Tests of checkpoints (atomic npz + JSON, no pickle), resume after SIGKILL, data parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fundl as fl
from fundl.checkpoint import (
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
xent = optax.softmax_cross_entropy_with_integer_labels


def _tree():
    return {
        "w": jnp.arange(6.0).reshape(2, 3),
        "half": jnp.ones((3,), jnp.bfloat16) * 1.5,
        "n": (jnp.asarray(7, jnp.int32), jax.random.key(42)),
    }


def test_roundtrip_keeps_values_dtypes_keys_and_meta(tmp_path):
    tree = _tree()
    save_checkpoint(tmp_path / "c.npz", tree, meta={"epoch": 3, "history": [{"loss": 0.5}]})
    back, meta = load_checkpoint(tmp_path / "c.npz", tree)
    assert meta == {"epoch": 3, "history": [{"loss": 0.5}]}
    assert back["half"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back["half"], np.float32), [1.5, 1.5, 1.5])
    np.testing.assert_array_equal(back["w"], np.arange(6.0).reshape(2, 3))
    assert int(back["n"][0]) == 7
    np.testing.assert_array_equal(
        jax.random.key_data(back["n"][1]), jax.random.key_data(jax.random.key(42))
    )
    # no pickle anywhere: the file loads with allow_pickle=False and holds only plain arrays
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:
        assert all(data[name].dtype != object for name in data.files)


def test_mismatched_tree_names_the_paths(tmp_path):
    save_checkpoint(tmp_path / "c.npz", _tree())
    other = {**_tree(), "w": jnp.zeros((3, 3))}
    with pytest.raises(
        CheckpointError,
        match=r"does not match the model: 0 missing, 0 unexpected, 1 mismatched:\n"
        r"  mismatched \['w'\]: expected float32\[3, 3\], got float32\[2, 3\]\n",
    ):
        load_checkpoint(tmp_path / "c.npz", other)
    with pytest.raises(CheckpointError, match=r"1 missing.*\n  missing \['extra'\]\n"):
        load_checkpoint(tmp_path / "c.npz", {**_tree(), "extra": jnp.zeros(1)})


def test_truncated_and_corrupted_files_give_clear_errors(tmp_path):
    tree = {"w": jnp.arange(2000.0)}
    path = save_checkpoint(tmp_path / "c.npz", tree)
    data = path.read_bytes()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t.npz is truncated or corrupted"):
        load_checkpoint(tmp_path / "t.npz", tree)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF  # inside leaf_0's 8000 bytes: the zip CRC-32 catches it
    (tmp_path / "f.npz").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=r"f.npz is truncated or corrupted"):
        load_checkpoint(tmp_path / "f.npz", tree)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        load_checkpoint(tmp_path / "none.npz", tree)


def test_manager_keeps_the_newest_and_ignores_temporary_files(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in range(1, 6):
        manager.save(step, {"s": jnp.asarray(step)})
    (tmp_path / ".tmp-abc.npz").write_bytes(b"partial write")
    assert manager.steps() == [4, 5]
    tree, _ = manager.restore({"s": jnp.asarray(0)})
    assert int(tree["s"]) == 5


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 4)).astype(np.float32)
    return x, np.argmax(x[:, :3], axis=1).astype(np.int32)


def test_fit_refuses_a_checkpoint_of_another_model_and_leaves_it_untouched(tmp_path):
    x, y = _data()
    small = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
    fl.fit(small, xent, optax.adam(1e-2), (x, y), epochs=1, progress=False,
           checkpoint_dir=tmp_path)  # fmt: skip
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    wide = fl.serial(fl.dense(9), jax.nn.relu, fl.dense(3))
    with pytest.raises(CheckpointError, match=r"\[0\]\['b'\]: expected float32\[9\], got "
                       r"float32\[8\]"):  # fmt: skip
        fl.fit(wide, xent, optax.adam(1e-2), (x, y), epochs=2, progress=False,
               checkpoint_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"written by a run with another key/seed"):
        fl.fit(small, xent, optax.adam(1e-2), (x, y), epochs=2, seed=5, progress=False,
               checkpoint_dir=tmp_path)  # fmt: skip
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


_SCRIPT = """
import json, sys, time
import jax, numpy as np, optax
import fundl as fl

ckpt_dir, out, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
rng = np.random.default_rng(0)
x = rng.normal(size=(100, 4)).astype(np.float32)
y = np.argmax(x[:, :3], axis=1).astype(np.int32)
model = fl.serial(fl.dense(16), jax.nn.relu, fl.dense(3))

def pause(epoch, logs, ts):
    if slow:
        time.sleep(0.25)

ts, history = fl.fit(
    model, optax.softmax_cross_entropy_with_integer_labels, optax.adam(1e-2), (x, y),
    epochs=10, batch_size=16, seed=0, eval_data=(x[:30], y[:30]),
    metrics={"accuracy": fl.accuracy}, steps_per_call=3, callbacks=[pause],
    checkpoint_dir=ckpt_dir, checkpoint_every=5, keep_checkpoints=2, progress=False,
)
leaves = jax.tree_util.tree_leaves((ts.params, ts.opt_state))
np.savez(out, *[np.asarray(v) for v in leaves])
with open(out + ".json", "w") as f:
    json.dump(history, f)
"""


def _run(script, *args, env=None, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, str(script), *map(str, args)]
    if wait:
        return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow  # two training subprocesses, one killed mid-run: ~12 s
def test_resume_after_sigkill_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_SCRIPT))
    _run(script, tmp_path / "full", tmp_path / "full.npz", 0)

    ckpt = tmp_path / "killed"
    proc = _run(script, ckpt, tmp_path / "resumed.npz", 1, wait=False)
    manager = CheckpointManager(ckpt)
    deadline = time.monotonic() + 120
    while manager.latest() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = manager.latest()
    assert killed_at is not None
    assert killed_at < 70  # 7 steps per epoch, 10 epochs: killed mid-run

    _run(script, ckpt, tmp_path / "resumed.npz", 0)
    with np.load(tmp_path / "full.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert a.files == b.files
        # the same program compiled on the same machine, run from the same state: bitwise
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    full = json.loads((tmp_path / "full.npz.json").read_text())
    resumed = json.loads((tmp_path / "resumed.npz.json").read_text())
    assert full == resumed
    assert len(full) == 10


_MESH_SCRIPT = """
import json
import jax, numpy as np, optax
import fundl as fl

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
x = rng.normal(size=(90, 4)).astype(np.float32)
y = np.argmax(x[:, :3], axis=1).astype(np.int32)
model = fl.serial(fl.dense(16), jax.nn.relu, fl.dense(3))
results = {}
mesh4 = jax.make_mesh((4,), ("data",))
for name, mesh, fsdp in [("one", None, False), ("four", mesh4, False), ("fsdp", mesh4, True)]:
    for k in (1, 3):
        ts, history = fl.fit(
            model, optax.softmax_cross_entropy_with_integer_labels, optax.adam(1e-2), (x, y),
            epochs=3, batch_size=16, seed=0, eval_data=(x[:30], y[:30]),
            metrics={"accuracy": fl.accuracy}, steps_per_call=k, mesh=mesh, progress=False,
            shard_params=fsdp,
        )
        results[f"{name}-{k}"] = {
            "history": history,
            "params": [np.asarray(v).tolist() for v in jax.tree_util.tree_leaves(ts.params)],
            "sharding": str(ts.params[0]["w"].sharding),
            "spec": str(ts.params[0]["w"].sharding.spec) if mesh else "",
            "mu_spec": str(ts.opt_state[0].mu[0]["w"].sharding.spec) if mesh else "",
            "devices": len(ts.params[0]["w"].sharding.device_set),
        }
print(json.dumps(results))
"""


@pytest.mark.slow  # a subprocess with four CPU devices: ~9 s
def test_data_parallel_on_four_cpu_devices_matches_one_device(tmp_path):
    script = tmp_path / "mesh.py"
    script.write_text(textwrap.dedent(_MESH_SCRIPT))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    results = json.loads(_run(script, env=env).stdout)
    assert "NamedSharding" in results["four-1"]["sharding"]
    assert results["four-1"]["devices"] == 4  # params replicated on all four devices
    assert results["four-1"]["spec"] == "P()"
    # FSDP: w (4, 16) is split along its first axis, and so is adam's first moment of it
    assert results["fsdp-1"]["spec"] == results["fsdp-1"]["mu_spec"] == "P('data',)"
    for k, variant in [(1, "four"), (3, "four"), (1, "fsdp"), (3, "fsdp")]:
        one, four = results[f"one-{k}"], results[f"{variant}-{k}"]
        # The 4-device step sums per-device partial gradients, a different float32 summation
        # order than one device: equal to float32 rounding, not bitwise.
        for a, b in zip(one["history"], four["history"], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
        for a, b in zip(one["params"], four["params"], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_a_finished_run_resumed_with_more_epochs_equals_one_long_run(tmp_path):
    x, y = _data()

    def run(epochs, directory=None):
        model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
        return fl.fit(model, xent, optax.adam(1e-2), (x, y), epochs=epochs, batch_size=16,
                      progress=False, checkpoint_dir=directory)  # fmt: skip

    run(2, tmp_path)
    resumed, h_resumed = run(4, tmp_path)
    again, h_again = run(4, tmp_path)  # finished: returned from the checkpoint, no training
    straight, h_straight = run(4)
    # one process, one compiled step, the same states: bitwise
    assert h_resumed == h_straight == h_again
    for a, b, c in zip(*(jax.tree_util.tree_leaves(t.params) for t in (resumed, again, straight)),
                       strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, c)


_HOST_SCRIPT = """
import json, sys
import jax

process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import numpy as np, optax
import fundl as fl

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype(np.float32)
y = np.argmax(x[:, :3], axis=1).astype(np.int32)
model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
mesh = jax.make_mesh((jax.device_count(),), ("data",))
ts, history = fl.fit(
    model, optax.softmax_cross_entropy_with_integer_labels, optax.adam(1e-2), (x, y),
    epochs=2, batch_size=16, seed=0, mesh=mesh, progress=False,
)
with open(out, "w") as f:
    json.dump({"devices": jax.device_count(), "local": jax.local_device_count(),
               "history": history}, f)
"""


@pytest.mark.slow  # two coordinated subprocesses: ~6 s
def test_two_processes_on_loopback_match_one_device(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(_HOST_SCRIPT))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    procs = [
        _run(script, i, port, tmp_path / f"out{i}.json", env=env, wait=False) for i in range(2)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=300) == 0
    finally:
        for proc in procs:  # never leave a worker behind, even when the other one failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1).astype(np.int32)
    model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
    _, single = fl.fit(model, xent, optax.adam(1e-2), (x, y), epochs=2, batch_size=16, seed=0,
                       progress=False)  # fmt: skip
    for i in range(2):
        result = json.loads((tmp_path / f"out{i}.json").read_text())
        assert (result["devices"], result["local"]) == (4, 2)
        # 4 devices sum partial gradients in another order than one: float32 rounding only.
        for a, b in zip(single, result["history"], strict=True):
            np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
