"""Sharded init and training on forced CPU devices, each configuration in its own process.

The test process has one device; ``--xla_force_host_platform_device_count`` must be set
before JAX starts, so each script runs in a subprocess and prints its results as JSON.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

# A small GPT-like decoder: the model, data and layouts every script shares.
_COMMON = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import fundl as fl

VOCAB, WIDTH, HEADS, SEQ, LAYERS, STEPS = 32, 16, 4, 8, 2, 20


def gpt(vocab=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS):
    return fl.serial(
        embed=fl.embedding(vocab, width),
        blocks=fl.repeat(fl.decoder_block(width, heads), times=layers),
        norm=fl.layer_norm(),
        head=fl.dense(vocab),
    )


def tensor_parallel():
    return fl.tensor_parallel_rules("model") + (("head/*", P("model")), ("norm/*", P()))


def data(n=16, vocab=VOCAB):
    tokens = np.random.default_rng(0).integers(0, vocab, size=(n, SEQ + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def train(mesh=None, rules=None):
    # 20 epochs of one 16-example batch: 20 steps, one loss each
    _, history = fl.fit(gpt(), optax.softmax_cross_entropy_with_integer_labels,
                        optax.adam(1e-2), data(), epochs=STEPS, batch_size=16, seed=0,
                        mesh=mesh, rules=rules, progress=False)
    return [h["loss"] for h in history]
"""

_EIGHT_DEVICES = """
assert jax.device_count() == 8, jax.devices()
results = {}

# Sharded init: a wider model, FSDP over 8 devices
big = gpt(vocab=512, width=128, heads=4, layers=2)
tokens = jax.ShapeDtypeStruct((8, SEQ), jnp.int32)
full = jax.eval_shape(big.init, jax.random.key(0), tokens)  # (params, state)
shapes = full[0]
mesh8 = jax.make_mesh((8,), ("data",))
rules = fl.fsdp_rules(shapes, mesh8)
params, _ = fl.init_sharded(big.init, jax.random.key(0), tokens, mesh=mesh8, rules=rules)
leaves = jax.tree_util.tree_leaves(params)
results["model_bytes"] = sum(x.nbytes for x in leaves)
results["shard_fractions"] = [
    [s.data.nbytes / x.nbytes for s in x.addressable_shards]
    for x in leaves if "data" in x.sharding.spec
]
results["unsplit_bytes"] = sum(x.nbytes for x in leaves if "data" not in x.sharding.spec)
sharded = fl.shard_params(shapes, mesh8, rules)
out = fl.shard_like(full, shapes, sharded)
key = jax.random.key(0)
init = fl.sharding.jit_init(big.init, (tokens,), out, jax.random.key_impl(key))
memory = init.lower(jax.random.key_data(key)).compile().memory_analysis()
results["init_memory"] = {"temp": memory.temp_size_in_bytes,
                          "output": memory.output_size_in_bytes}

# Training: one device, (data, model) meshes with tensor parallel rules, FSDP over 8
results["one"] = train()
for shape in [(2, 4), (4, 2)]:
    results[str(shape)] = train(jax.make_mesh(shape, ("data", "model")), tensor_parallel())
shapes = jax.eval_shape(gpt().init, jax.random.key(0), jnp.zeros((16, SEQ), jnp.int32))[0]
results["fsdp"] = train(mesh8, fl.fsdp_rules(shapes, mesh8))
print(json.dumps(results))
"""


def _script(tmp_path, body):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(_COMMON) + textwrap.dedent(body))
    return script


def _python(script, *args, devices=8, wait=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}  # fmt: skip
    cmd = [sys.executable, str(script), *map(str, args)]
    if wait:
        return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow  # one subprocess with eight CPU devices: a sharded init and four trainings
@pytest.mark.numerics
def test_sharded_init_and_training_on_eight_devices_match_one_device(tmp_path):
    results = json.loads(_python(_script(tmp_path, _EIGHT_DEVICES)).stdout)
    # each device holds 1/8 of every param FSDP split, and the rest is small
    assert len(results["shard_fractions"]) == 21  # every param of the wider model
    for fractions in results["shard_fractions"]:
        assert fractions == [1 / 8] * 8
    assert results["unsplit_bytes"] < results["model_bytes"] / 100
    # no buffer of the whole model on any device: each keeps an eighth of it (its shards)
    # and computes them through temporaries of about that size (the random bits), never
    # the whole (measured: temp + output = 0.25x the model)
    memory, model = results["init_memory"], results["model_bytes"]
    assert memory["output"] <= model / 8 + 1024, (memory, model)
    assert memory["temp"] + memory["output"] < model / 3, (memory, model)
    # The trainings init on their shards (fit with rules), the one-device run eagerly:
    # equal losses from the first step show the same init. Tensor parallel and FSDP steps
    # sum partial matmuls and gradients in another order than one device: equal to
    # float32 rounding over 20 steps.
    assert len(results["one"]) == 20
    for layout in ("(2, 4)", "(4, 2)", "fsdp"):
        np.testing.assert_allclose(results[layout], results["one"], rtol=1e-5, err_msg=layout)


_TWO_HOSTS = """
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
mesh = jax.make_mesh((2, 4), ("data", "model"))
losses = train(mesh, tensor_parallel())
with open(out, "w") as f:
    json.dump({"devices": jax.device_count(), "local": jax.local_device_count(),
               "losses": losses}, f)
"""


@pytest.mark.slow  # two coordinated subprocesses with four CPU devices each
@pytest.mark.numerics
def test_two_processes_of_four_devices_train_a_2d_mesh_like_one_device(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = _script(tmp_path, _TWO_HOSTS)
    procs = [
        _python(script, i, port, tmp_path / f"out{i}.json", devices=4, wait=False) for i in range(2)
    ]
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc in procs:  # never leave a worker behind, even when the other one failed
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    single = json.loads(_python(_script(tmp_path, "print(json.dumps(train()))"), devices=1).stdout)
    for i in range(2):
        result = json.loads((tmp_path / f"out{i}.json").read_text())
        assert (result["devices"], result["local"]) == (8, 4)
        # 8 devices sum partial matmuls and gradients in another order: float32 rounding only
        np.testing.assert_allclose(result["losses"], single, rtol=1e-5)
