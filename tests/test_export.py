"""fl.export: one file of StableHLO and weights, loaded by JAX and NumPy alone, any batch size."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl

ROOT = Path(__file__).resolve().parents[1]

SEED_MLP = fl.serial(
    fl.flatten(),
    fl.dense(128),
    jax.nn.relu,
    fl.dense(64),
    jax.nn.relu,
    fl.dense(10),
)  # fmt: skip  (examples/mnist_mlp.py's model)


def _digits(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(size=(batch, 8, 8)).astype(np.float32)


def _mlp_reference(params, x: np.ndarray) -> np.ndarray:
    """The seed MLP in NumPy: flatten, two relu layers, logits."""
    h = x.reshape(len(x), -1)
    for i in (1, 3):
        h = np.maximum(h @ np.asarray(params[i]["w"]) + np.asarray(params[i]["b"]), 0.0)
    return h @ np.asarray(params[5]["w"]) + np.asarray(params[5]["b"])


@pytest.mark.numerics
def test_exported_mlp_matches_numpy_at_any_batch_and_keeps_weights_as_arguments(tmp_path):
    params, state = SEED_MLP.init(jax.random.key(0), _digits(2))
    path = fl.export(SEED_MLP, params, state, _digits(2), tmp_path / "mlp.npz")
    run = fl.load_exported(path)
    for batch in (1, 37):
        x = _digits(batch, seed=batch)
        y = np.asarray(run(x))
        assert y.shape == (batch, 10)
        # XLA's dot and NumPy's sum in different orders over 64 and 128 terms: float32
        # rounding, a few ulps of the largest partial sums.
        np.testing.assert_allclose(y, _mlp_reference(params, x), rtol=1e-5, atol=1e-5)
        # (fundl's own outputs, to 1e-6, for four models: the slow test below)

    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
        program = zf.read("exported.bin")
    leaves = ["params[1]['w']", "params[1]['b']", "params[3]['w']", "params[3]['b']",
              "params[5]['w']", "params[5]['b']"]  # fmt: skip
    assert names == {"manifest.json", "exported.bin", *(f"weights/{n}.npy" for n in leaves)}
    assert manifest["format"] == "fundl-export-1"
    assert manifest["platforms"] == ["cpu", "cuda"]
    assert manifest["inputs"] == ["float32[b,8,8]"]
    assert manifest["outputs"] == ["float32[b,10]"]
    assert manifest["weights"]["params[1]['w']"] == {"shape": [64, 128], "dtype": "float32"}
    # the weights are the program's arguments, not constants in it: 17,802 floats (71 kB)
    # against a program of a few kB
    exported = jax.export.deserialize(bytearray(program))
    assert len(exported.in_avals) == len(leaves) + 1
    assert len(program) < 16_000
    assert not re.search(r"dense<\[", exported.mlir_module())  # no array constants


def test_bfloat16_weights_are_stored_as_bits_and_loaded_back(tmp_path):
    model = fl.serial(fl.dense(3, param_dtype=jnp.bfloat16), fl.batch_norm())
    x = jnp.linspace(-1, 1, 8, dtype=jnp.float32).reshape(2, 4)
    params, state = model.init(jax.random.key(1), x)
    path = fl.export(model, params, state, x, tmp_path / "bf16.npz", platforms=("cpu",))
    with np.load(path) as f:
        assert f["weights/params[0]['w']"].dtype == np.uint16  # NumPy has no bfloat16
    # the same program compiled from the same HLO: bitwise
    np.testing.assert_array_equal(fl.load_exported(path)(x), model.apply(params, state, x)[0])


def _noise_apply(params, state, x, key=None, train=False):
    return x + jax.random.normal(key, x.shape), state


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (fl.function(lambda x: x.reshape(2, -1, 6), name="pairs"),
         "a shape depends on the batch size as a number: Cannot divide evenly"),
        (fl.function(lambda x: x if x.shape[0] > 2 else -x, name="big"),
         "a shape depends on the batch size as a number: Symbolic dimension comparison"),
        (fl.Layer(lambda key, x: ((), ()), _noise_apply), "unexpected PRNG key type"),
    ],
    ids=["reshape", "if", "key"],
)  # fmt: skip
def test_a_model_that_cannot_export_names_the_layer_and_the_fix(tmp_path, layer, reason):
    model = fl.serial(head=fl.dense(6), body=fl.serial(jax.nn.relu, layer))
    x = jnp.zeros((4, 6))
    params, state = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError) as err:
        fl.export(model, params, state, x, tmp_path / "m.npz", platforms=("cpu",))
    message = str(err.value)
    assert message.startswith("export: serial[body].serial[1]")
    assert reason in message
    assert message.endswith(
        "export traces the model with train=False, no key and a symbolic batch size b: make "
        "that layer's inference path need no key, and write its shapes in terms of the "
        "input's (reshape(x.shape[0], -1), not reshape(8, -1); no Python if on x.shape[0])."
    )
    assert not (tmp_path / "m.npz").exists()


def test_keys_in_state_scalar_inputs_and_unnamed_output_types_are_refused(tmp_path):
    model = fl.dense(2)
    params, _ = model.init(jax.random.key(0), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"export: state\['seed'\] is a PRNG key array"):
        fl.export(model, params, {"seed": jax.random.key(0)}, jnp.zeros((1, 3)), tmp_path / "a")
    with pytest.raises(
        ValueError, match=r"every input needs a leading batch axis, e\.g\. x\[None\]"
    ):
        fl.export(model, params, (), jnp.zeros(()), tmp_path / "b")
    packed = fl.serial(model, fl.function(lambda y: fl.BatchNormState(y, y), name="pack"))
    with pytest.raises(ValueError, match=r"export: the outputs of serial cannot be serialized: "
                       r"Cannot serialize PyTreeDef containing an unregistered type .*"
                       r"BatchNormState"):  # fmt: skip
        fl.export(packed, (params, ()), ((), ()), jnp.zeros((1, 3)), tmp_path / "c")


# The four models of the issue, each with an input of digits.
MODELS = {
    "mlp": (SEED_MLP, (8, 8)),
    "cnn": (  # examples/cnn_digits.py's model: conv, batch norm, pooling, dropout
        fl.serial(
            fl.conv(32, (3, 3)), fl.batch_norm(), jax.nn.relu,
            fl.conv(64, (3, 3)), fl.batch_norm(), jax.nn.relu,
            fl.max_pool((2, 2)), fl.dropout(0.25),
            fl.flatten(), fl.dense(128), jax.nn.relu, fl.dropout(0.5), fl.dense(10),
        ),
        (8, 8, 1),
    ),
    "lstm": (fl.serial(fl.rnn(fl.lstm_cell(64), return_sequences=False), fl.dense(10)), (8, 8)),
    "transformer": (
        fl.serial(
            fl.dense(32), fl.sinusoidal_positions(),
            fl.encoder_block(32, 4),
            fl.global_avg_pool(), fl.dense(10),
        ),
        (8, 8),
    ),
}  # fmt: skip


def load_without_fundl_script() -> str:
    """The tutorial's loader (the lines a user pastes) and a loop that times and runs it."""
    page = (ROOT / "docs" / "tutorials" / "taking_out.md").read_text()
    (loader,) = [b for b in re.findall(r"```python\n(.*?)```", page, re.S) if "def load(" in b]
    return loader + (
        "\nimport json, sys, time\n"
        "names, out = sys.argv[1:-1], sys.argv[-1]\n"
        "results, times = {}, {}\n"
        "with np.load(out + '.inputs.npz') as inputs:\n"
        "    for name in names:\n"
        "        start = time.perf_counter()\n"
        "        run = load(f'{out}.{name}.npz')\n"
        "        loaded = time.perf_counter()\n"
        "        for batch in (1, 37):\n"
        "            results[f'{name}-{batch}'] = np.asarray(run(inputs[f'{name}-{batch}']))\n"
        "        times[name] = [loaded - start, time.perf_counter() - loaded]\n"
        "np.savez(out + '.outputs.npz', **results)\n"
        "print(json.dumps({'times': times, 'fundl': 'fundl' in sys.modules}))\n"
    )


@pytest.mark.slow  # 4 exports, 8 compiles in a fresh JAX process: 72 s on 2 busy cores
@pytest.mark.numerics
def test_four_models_reload_in_a_process_without_fundl(tmp_path):
    out = str(tmp_path / "m")
    inputs, wanted, sizes = {}, {}, {}
    for i, (name, (model, shape)) in enumerate(MODELS.items()):
        x = np.random.default_rng(i).normal(size=(37, *shape)).astype(np.float32)
        params, state = model.init(jax.random.key(i), x)
        if name == "cnn":  # running statistics that are not the initial zeros and ones
            _, state = model.apply(params, state, x, key=jax.random.key(9), train=True)
        fl.export(model, params, state, x[:1], f"{out}.{name}.npz")
        with zipfile.ZipFile(f"{out}.{name}.npz") as zf:
            program = zf.getinfo("exported.bin").file_size
        sizes[name] = (os.path.getsize(f"{out}.{name}.npz"), program)
        apply = jax.jit(model.apply)
        for batch in (1, 37):
            inputs[f"{name}-{batch}"] = x[:batch]
            wanted[f"{name}-{batch}"] = np.asarray(apply(params, state, x[:batch])[0])
    np.savez(out + ".inputs.npz", **inputs)
    script = tmp_path / "load.py"
    script.write_text(load_without_fundl_script())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(script), *MODELS, out],
        env={**env, "JAX_PLATFORMS": "cpu"}, cwd=tmp_path, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["fundl"] is False
    with np.load(out + ".outputs.npz") as got:
        for name in MODELS:
            diffs = []
            for batch in (1, 37):
                key = f"{name}-{batch}"
                assert got[key].shape == wanted[key].shape
                # the exported program, once its batch is known, is the HLO jit compiles in
                # process, on the same CPU: equal to 1e-6
                np.testing.assert_allclose(got[key], wanted[key], rtol=1e-6, atol=1e-6)
                diffs.append(float(np.max(np.abs(got[key] - wanted[key]))))
            load_s, run_s = report["times"][name]
            size, program = sizes[name]
            print(f"export {name:12s} file {size / 1e3:6.1f} kB (program {program / 1e3:5.1f} kB)"
                  f"  load {load_s * 1e3:5.1f} ms  first calls (batch 1, 37) {run_s:5.2f} s"
                  f"  max |diff| {max(diffs):.1e}")  # fmt: skip
