"""The seed model's train step (Flatten-128-64-10 MLP, adam) in fundl vs plain JAX and peers.

    python -m benchmarks --suite mlp          # or: python -m benchmarks.mlp_step

The same step (forward, softmax cross-entropy, grad, optax adam update; params and optimizer
state donated) on MNIST-shaped batches (batch, 28, 28), at batch 8 and 128. Every
implementation starts from the same weights, and their first losses are compared before
timing, so all compute the same thing. Target: fundl / plain JAX <= 1.02 at both sizes.
Peers (stax ships with JAX; Flax linen, Flax NNX, Haiku, Equinox, Keras 3 when installed)
are timed alike, each written as its documentation teaches: Flax NNX with ``nnx.jit``,
``nnx.Optimizer`` and ``nnx.value_and_grad`` (its objects updated in place, its graph walked
on every call), Keras 3 both with ``train_on_batch`` and as ``stateless_call`` in a jitted
step (``benchmarks.keras_peer``), the others as pure functions of their params inside one
``jax.jit``. ``--quick`` runs batch 8
only, few rounds (a smoke run, not a measurement). ``--gpu`` (``python -m benchmarks --gpu``)
runs batch 4,096 in bfloat16 compute over float32 params, with throughput and MFU notes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl
from benchmarks import keras_peer
from benchmarks.harness import (
    BF16_RTOL,
    CaseResult,
    GpuRun,
    Speed,
    StatefulStep,
    in_dtype,
    make_step,
    measure_train_steps,
)

LEARNING_RATE = 1e-3
"""Adam's learning rate in every implementation."""


def _ce(logits, y):
    # float32 cross-entropy whatever the compute dtype (a no-op on float32 logits)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def implementations(
    weights, opt, dtype=None
) -> tuple[dict[str, tuple[Callable, object]], list[str]]:
    """``{name: (step, params)}`` for every implementation available, and skip notes.

    Args:
        weights: ``[(w1, b1), (w2, b2), (w3, b3)]`` shared initial weights.
        opt: the optax optimizer.
        dtype: the compute dtype (``None``: the inputs'); params stay as ``weights``.
    """
    notes = []
    impls = {}

    # plain JAX: a list of (w, b) and a loop of matmuls, written by hand
    def plain_loss(params, x, y):
        h = x.reshape(x.shape[0], -1)
        for w, b in params[:-1]:
            h = jax.nn.relu(h @ w + b)
        w, b = params[-1]
        return _ce(h @ w + b, y)

    impls["plain JAX"] = (make_step(in_dtype(plain_loss, dtype), opt), [tuple(p) for p in weights])

    model = fl.serial(fl.flatten(), fl.dense(128, dtype=dtype), jax.nn.relu,
                      fl.dense(64, dtype=dtype), jax.nn.relu,
                      fl.dense(10, dtype=dtype))  # fmt: skip
    _, state = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))
    fundl_params = ((), {"w": weights[0][0], "b": weights[0][1]}, (),
                    {"w": weights[1][0], "b": weights[1][1]}, (),
                    {"w": weights[2][0], "b": weights[2][1]})  # fmt: skip

    def fundl_loss(params, x, y):
        return _ce(model.apply(params, state, x)[0], y)

    impls["fundl"] = (make_step(fundl_loss, opt), fundl_params)

    from jax.example_libraries import stax

    _, stax_apply = stax.serial(stax.Flatten, stax.Dense(128), stax.Relu, stax.Dense(64),
                                stax.Relu, stax.Dense(10))  # fmt: skip
    stax_params = [(), tuple(weights[0]), (), tuple(weights[1]), (), tuple(weights[2])]
    stax_loss = in_dtype(lambda p, x, y: _ce(stax_apply(p, x), y), dtype)
    impls["stax"] = (make_step(stax_loss, opt), stax_params)

    try:
        import flax.linen as nn

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = x.reshape(x.shape[0], -1)
                x = nn.relu(nn.Dense(128)(x))
                x = nn.relu(nn.Dense(64)(x))
                return nn.Dense(10)(x)

        linen = MLP()
        lp = {
            "params": {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(weights)}
        }
        linen_loss = in_dtype(lambda p, x, y: _ce(linen.apply(p, x), y), dtype)
        impls["flax linen"] = (make_step(linen_loss, opt), lp)
    except ImportError:
        notes.append("flax not installed: flax linen skipped (pip install -e '.[bench]')")

    try:
        impls["flax nnx"] = nnx_step(weights, opt, dtype)
    except ImportError:
        notes.append("flax not installed: flax nnx skipped (pip install -e '.[bench]')")

    try:
        import haiku as hk

        def hk_forward(x):
            return hk.nets.MLP([128, 64, 10])(x.reshape(x.shape[0], -1))

        hk_model = hk.without_apply_rng(hk.transform(hk_forward))
        hp = {f"mlp/~/linear_{i}": {"w": w, "b": b} for i, (w, b) in enumerate(weights)}
        hk_loss = in_dtype(lambda p, x, y: _ce(hk_model.apply(p, x), y), dtype)
        impls["haiku"] = (make_step(hk_loss, opt), hp)
    except ImportError:
        notes.append("dm-haiku not installed: haiku skipped (pip install -e '.[bench]')")

    try:
        import equinox as eqx

        eqx_model = eqx.nn.MLP(784, 10, 128, 2, activation=jax.nn.relu, key=jax.random.key(0))
        eqx_model = eqx.tree_at(
            lambda m: [leaf for layer in m.layers for leaf in (layer.weight, layer.bias)],
            eqx_model,
            [leaf for w, b in weights for leaf in (w.T, b)],
        )
        params, static = eqx.partition(eqx_model, eqx.is_array)

        def eqx_loss(p, x, y):
            m = eqx.combine(p, static)
            return _ce(jax.vmap(m)(x.reshape(x.shape[0], -1)), y)

        impls["equinox"] = (make_step(in_dtype(eqx_loss, dtype), opt), params)
    except ImportError:
        notes.append("equinox not installed: equinox skipped (pip install -e '.[bench]')")

    flat = [a for wb in weights for a in wb]
    keras_peer.add_keras_steps(impls, notes, dtype, _keras_mlp, flat, _ce, opt, LEARNING_RATE)
    return impls, notes


def _keras_mlp():
    keras = keras_peer.import_keras()
    return keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(),
                             keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(10)])  # fmt: skip


def nnx_train_step(model, opt: optax.GradientTransformation, loss_of_model: Callable):
    """Flax NNX's documented train step, as a :class:`StatefulStep` for the harness.

    ``nnx.jit`` of ``nnx.value_and_grad`` and ``nnx.Optimizer.update``: the model and the
    optimizer are updated in place (``loss_of_model(model, x, y)`` is the loss).
    """
    from flax import nnx

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_of_model)(model, x, y)
        optimizer.update(model, grads)
        return loss

    def step(model, optimizer, loss, x, y):
        return model, optimizer, train_step(model, optimizer, x, y)

    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
    return StatefulStep(step, (model, optimizer, jnp.zeros(())))


def nnx_step(weights, opt, dtype=None) -> StatefulStep:
    """The MLP in Flax NNX, from ``weights``, with :func:`nnx_train_step` (``dtype``: compute)."""
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            sizes = [w.shape for w, _ in weights]
            self.layers = nnx.List([nnx.Linear(*s, dtype=dtype, rngs=rngs) for s in sizes])

        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            for layer in self.layers[:-1]:
                x = jax.nn.relu(layer(x))
            return self.layers[-1](x)

    model = MLP(nnx.Rngs(0))
    for layer, (w, b) in zip(model.layers, weights, strict=True):
        layer.kernel[...], layer.bias[...] = w, b
    return nnx_train_step(model, opt, lambda m, x, y: _ce(m(x), y))


def run(
    quick: bool = False, batches: tuple[int, ...] = (8, 128), gpu: GpuRun | None = None
) -> list[CaseResult]:
    """Runs the MLP cases; ``quick`` runs the first batch size only, few rounds and steps.

    ``gpu``: batch 4,096 (``quick``: 8) in ``gpu.dtype`` compute, with throughput and MFU.
    """
    if gpu is not None:
        return [gpu_case(quick, gpu)]
    rng = np.random.default_rng(0)
    init = jax.nn.initializers.glorot_uniform()
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = [(784, 128), (128, 64), (64, 10)]
    opt = optax.adam(LEARNING_RATE)
    results = []
    for batch in batches[:1] if quick else batches:
        x = jnp.asarray(rng.standard_normal((batch, 28, 28)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
        weights = [(init(k, s), jnp.zeros(s[1])) for k, s in zip(keys, sizes, strict=True)]
        impls, notes = implementations(weights, opt)
        steps = 2 if quick else 20
        res = measure_train_steps(
            f"mlp train step, batch {batch}", impls, opt, x, y, steps, 3 if quick else 150
        )
        res.notes.extend(notes)
        results.append(res)
    return results


def gpu_case(quick: bool, gpu: GpuRun, batch: int = 4096) -> CaseResult:
    """The MLP step at a GPU's batch size in ``gpu.dtype`` (``quick``: batch 8, few rounds)."""
    batch = 8 if quick else batch
    rng = np.random.default_rng(0)
    init = jax.nn.initializers.glorot_uniform()
    keys = jax.random.split(jax.random.key(0), 3)
    sizes = [(784, 128), (128, 64), (64, 10)]
    opt = optax.adam(LEARNING_RATE)
    x = jnp.asarray(rng.standard_normal((batch, 28, 28)), gpu.dtype)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    weights = [(init(k, s), jnp.zeros(s[1])) for k, s in zip(keys, sizes, strict=True)]
    impls, notes = implementations(weights, opt, gpu.dtype)
    steps = 2 if quick else 20
    res = measure_train_steps(f"mlp train step, batch {batch}, {gpu.dtype.__name__}", impls,
                              opt, x, y, steps, 3 if quick else 30, rtol=BF16_RTOL,
                              speed=Speed(batch, "examples", gpu.peak_tflops))  # fmt: skip
    res.notes.append(f"{gpu.dtype.__name__} compute over float32 params; the seed model's "
                     "widths (784-128-64-10) are tiny: a small step even on a GPU")  # fmt: skip
    res.notes.extend(notes)
    return res


if __name__ == "__main__":
    import argparse

    from benchmarks.harness import format_table

    parser = argparse.ArgumentParser(description="MLP train-step benchmark")
    parser.add_argument("--quick", action="store_true")
    print(format_table(run(parser.parse_args().quick)))
