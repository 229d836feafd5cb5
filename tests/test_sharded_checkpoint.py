"""Tests of sharded checkpoints (orbax-checkpoint): other meshes, fit on a mesh, SIGKILL, two hosts.

The meshes live in subprocesses with 8 forced CPU devices (the test process has one).
"""

from __future__ import annotations

import json
import os
import signal
import socket
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
from fundl.checkpoint import CheckpointError
from fundl.sharded_checkpoint import ShardedCheckpointManager, sharded_steps

ROOT = Path(__file__).resolve().parents[1]
EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}


def _run(script, *args, env=None, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, str(script), *map(str, args)]
    if wait:
        return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _orbax():
    return pytest.importorskip(
        "orbax.checkpoint", reason='sharded checkpoints need pip install "fundl[orbax]"'
    )


def test_missing_orbax_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "orbax", None)  # None in sys.modules: import fails
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"^fundl's sharded checkpoints need orbax-checkpoint "
                                          r"\(.*\)\. Install it with: "
                                          r'pip install "fundl\[orbax\]"$'):  # fmt: skip
        ShardedCheckpointManager(tmp_path)


def test_roundtrip_on_one_device_keeps_dtypes_keys_meta_and_names_mismatches(tmp_path):
    _orbax()
    tree = {
        "w": jnp.arange(6.0).reshape(2, 3),
        "half": jnp.ones((3,), jnp.bfloat16) * 1.5,
        "n": (jnp.asarray(7, jnp.int32), jax.random.key(42)),
    }
    manager = ShardedCheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        manager.save(step, tree, meta={"epoch": step, "history": [{"loss": 1 / 3}]})
    manager.save(3, tree, meta={"epoch": 30})  # the same step again: replaced
    assert manager.steps() == sharded_steps(tmp_path) == [2, 3]
    like = jax.eval_shape(lambda: tree)  # shapes only, no shardings: the default device
    restored, meta = manager.restore(like)
    assert meta == {"epoch": 30}
    assert manager.restore(like, step=2)[1] == {"epoch": 2, "history": [{"loss": 1 / 3}]}
    assert restored["half"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # bitwise

    wrong = {**like, "w": jax.ShapeDtypeStruct((3, 2), jnp.float32), "extra": like["w"]}
    with pytest.raises(CheckpointError) as err:  # every difference in one error
        manager.restore(wrong)
    assert str(err.value) == (
        f"checkpoint {tmp_path / 'ckpt_3'} does not match the model: 1 missing, 0 unexpected, "
        f"1 mismatched:\n  missing ['extra']\n  mismatched ['w']: expected float32[3, 2], got "
        f"float32[2, 3]\nWas it written for another model or configuration?"
    )
    with pytest.raises(CheckpointError, match=r"^no checkpoint of step 1 in .*; it holds \[2, 3\]"):
        manager.restore(like, step=1)


def test_fit_refuses_to_start_afresh_next_to_checkpoints_of_a_mesh(tmp_path):
    (tmp_path / "ckpt_7").mkdir()  # what a run on a mesh leaves
    x = np.zeros((8, 3), np.float32)
    y = np.zeros((8,), np.int32)
    with pytest.raises(ValueError) as err:
        fl.fit(fl.dense(2), optax.softmax_cross_entropy_with_integer_labels, optax.sgd(0.1),
               (x, y), epochs=1, checkpoint_dir=tmp_path, progress=False)  # fmt: skip
    assert str(err.value) == (
        f"fit: {tmp_path} holds checkpoints of a run on a mesh (steps [7]), and this run is "
        f"on one device. Resume it on a mesh, or use a new checkpoint_dir."
    )


_MESHES_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import fundl as fl
from fundl.sharded_checkpoint import ShardedCheckpointManager

directory = sys.argv[1]
assert jax.device_count() == 8, jax.devices()
model = fl.serial(fl.dense(16), jax.nn.relu, fl.dense(8, param_dtype=jnp.bfloat16))
ts = fl.init_train_state(model, optax.adam(1e-2), jax.random.key(0), jnp.zeros((4, 8)))
ts = ts._replace(opt_state=jax.tree.map(lambda v: v + 0.25, ts.opt_state))  # not all zeros


def spec(x, axes):  # 2-D leaves over both mesh axes, vectors over the second, the rest whole
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) or x.ndim == 0:
        return P()
    return P(*axes) if x.ndim == 2 else P(axes[1])


def placed(tree, mesh, axes):
    return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, spec(x, axes))), tree)


def abstract(tree, mesh, axes):
    def one(x):
        sharding = NamedSharding(mesh, spec(x, axes))
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.tree.map(one, tree)


def bits(tree):
    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x).tobytes().hex()
    return jax.tree.leaves(jax.tree.map(one, tree))


mesh24 = jax.make_mesh((2, 4), ("data", "model"))
mesh42 = jax.make_mesh((4, 2), ("data", "model"))
one = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
manager = ShardedCheckpointManager(directory)
source = placed(ts, mesh24, ("data", "model"))
manager.save(10, source, meta={"mesh": [2, 4]})
results = {"bits": bits(ts) == bits(source)}
for name, mesh, axes in [("42", mesh42, ("model", "data")), ("one", one, (None, None))]:
    restored, meta = manager.restore(abstract(ts, mesh, axes))
    w = restored.params[0]["w"]  # (8, 16)
    results[name] = {
        "bitwise": bits(restored) == bits(ts),
        "meta": meta,
        "same_shardings": jax.tree.leaves(jax.tree.map(
            lambda r, a: r.sharding == a.sharding, restored, abstract(ts, mesh, axes))),
        "w_shard": list(w.addressable_shards[0].data.shape),
        "w_devices": len(w.sharding.device_set),
        "key": str(restored.key.dtype),
    }
print(json.dumps(results))
"""


@pytest.mark.slow  # a subprocess with eight CPU devices: ~6 s
def test_a_checkpoint_of_one_mesh_restores_bitwise_onto_another_and_one_device(tmp_path):
    _orbax()
    script = tmp_path / "meshes.py"
    script.write_text(textwrap.dedent(_MESHES_SCRIPT))
    results = json.loads(_run(script, tmp_path / "ckpt", env=EIGHT).stdout)
    assert results["bits"]
    for name in ("42", "one"):
        assert results[name]["bitwise"], name  # every leaf, bit for bit
        assert results[name]["meta"] == {"mesh": [2, 4]}
        assert all(results[name]["same_shardings"]), name
        assert results[name]["key"] == "key<fry>"
    # (8, 16) over (model=2, data=4) on the (4, 2) mesh: each device holds a (4, 4) shard
    assert results["42"]["w_shard"] == [4, 4] and results["42"]["w_devices"] == 8
    assert results["one"]["w_shard"] == [8, 16] and results["one"]["w_devices"] == 1


_FIT_SCRIPT = """
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
        time.sleep(0.5)


ts, history = fl.fit(
    model, optax.softmax_cross_entropy_with_integer_labels, optax.adam(1e-2), (x, y),
    epochs=8, batch_size=16, seed=0, steps_per_call=3, callbacks=[pause], progress=False,
    checkpoint_dir=ckpt_dir, checkpoint_every=5, keep_checkpoints=2,
    mesh=jax.make_mesh((8,), ("data",)), shard_params=True,
)
assert len(ts.params[0]["w"].sharding.device_set) == 8
leaves = jax.tree_util.tree_leaves((ts.params, ts.opt_state))
np.savez(out, *[np.asarray(v) for v in leaves])
with open(out + ".json", "w") as f:
    json.dump(history, f)
"""


@pytest.mark.slow  # two training subprocesses on eight CPU devices, one killed: ~20 s
def test_fit_on_a_mesh_resumed_after_sigkill_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    _orbax()
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(_FIT_SCRIPT))
    _run(script, tmp_path / "full", tmp_path / "full.npz", 0, env=EIGHT)
    assert sharded_steps(tmp_path / "full") == [55, 56]  # keep 2: the last due one, the end

    ckpt = tmp_path / "killed"
    proc = _run(script, ckpt, tmp_path / "resumed.npz", 1, env=EIGHT, wait=False)
    deadline = time.monotonic() + 240
    while not sharded_steps(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = sharded_steps(ckpt)[-1]
    assert killed_at < 56  # killed mid-run

    _run(script, ckpt, tmp_path / "resumed.npz", 0, env=EIGHT)
    with np.load(tmp_path / "full.npz") as a, np.load(tmp_path / "resumed.npz") as b:
        assert a.files == b.files
        # the same program compiled on the same machine, run from the same state: bitwise
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    full = json.loads((tmp_path / "full.npz.json").read_text())
    assert json.loads((tmp_path / "resumed.npz.json").read_text()) == full
    assert len(full) == 8


_HOSTS_SCRIPT = """
import json, sys
import jax

process_id, port, ckpt_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
import numpy as np, optax
from jax.experimental import multihost_utils
import fundl as fl

rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype(np.float32)
y = np.argmax(x[:, :3], axis=1).astype(np.int32)
model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
ts, history = fl.fit(
    model, optax.softmax_cross_entropy_with_integer_labels, optax.adam(1e-2), (x, y),
    epochs=2, batch_size=16, seed=0, mesh=jax.make_mesh((8,), ("data",)), shard_params=True,
    checkpoint_dir=ckpt_dir, progress=False,
)
params = multihost_utils.process_allgather(ts.params, tiled=True)
with open(out, "w") as f:
    json.dump({"local": jax.local_device_count(),
               "spec": str(ts.params[0]["w"].sharding.spec),
               "params": [np.asarray(v).tolist() for v in jax.tree.leaves(params)]}, f)
"""


@pytest.mark.slow  # two coordinated subprocesses of four CPU devices each: ~10 s
def test_two_processes_each_write_their_own_shards_and_one_device_restores_them(tmp_path):
    _orbax()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "host.py"
    script.write_text(textwrap.dedent(_HOSTS_SCRIPT))
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    ckpt = tmp_path / "ckpt"
    procs = [
        _run(script, i, port, ckpt, tmp_path / f"out{i}.json", env=env, wait=False)
        for i in range(2)
    ]
    try:
        for proc in procs:
            assert proc.wait(timeout=300) == 0
    finally:
        for proc in procs:  # never leave a worker behind, even when the other one failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["local"] for r in results] == [4, 4]
    assert "'data'" in results[0]["spec"]  # FSDP: params split over both processes
    # orbax's OCDBT layout: one data directory per process, each with the shards it wrote
    (step,) = sharded_steps(ckpt)
    arrays = ckpt / f"ckpt_{step}" / "arrays"
    for i in range(2):
        assert any((arrays / f"ocdbt.process_{i}" / "d").iterdir()), i
    # the checkpoint of 2 x 4 devices restores onto this process's one device, bit for bit
    model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
    x = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    like = jax.eval_shape(
        lambda: fl.init_train_state(model, optax.adam(1e-2), jax.random.key(0), x)
    )
    restored, meta = ShardedCheckpointManager(ckpt).restore(like)
    assert meta["finished"] and len(meta["history"]) == 2
    for i in range(2):
        for got, want in zip(jax.tree.leaves(restored.params), results[i]["params"], strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))
