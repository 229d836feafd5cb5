"""A LeNet-5-sized CNN's train step (adam) in fundl vs plain JAX (lax.conv) and peers.

    python -m benchmarks --suite cnn          # or: python -m benchmarks.cnn_step [--quick]

LeNet-5 channels-last on MNIST-shaped batches (batch, 28, 28, 1), at batch 8 and 128:
conv 5x5 (6, SAME) -> relu -> avg_pool 2x2 -> conv 5x5 (16, VALID) -> relu -> avg_pool
2x2 -> flatten -> dense 120 -> relu -> dense 84 -> relu -> dense 10. The step (forward,
softmax cross-entropy, grad, optax adam update; params and optimizer state donated) is
written in fundl, by hand in plain JAX (``lax.conv_general_dilated`` and
``lax.reduce_window``), in stax, and in Flax linen, Flax NNX (its documented ``nnx.jit``
step, ``benchmarks.steps.nnx_train_step``), Haiku and Keras 3 (``train_on_batch`` and
``stateless_call``, see ``benchmarks.keras_peer``) when installed. Every implementation starts from
the same weights and their first losses are compared before timing. Target: fundl / plain
JAX <= 1.02 at both sizes. ``--quick`` runs batch 8 only, few rounds (a smoke run).
``--gpu`` (``python -m benchmarks --gpu``) runs batch 1,024 in bfloat16 compute over float32
params, with throughput and MFU notes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import fundl as fl
from benchmarks import keras_peer, peers
from benchmarks.costs import Speed
from benchmarks.report import main
from benchmarks.steps import (
    GpuRun,
    cross_entropy,
    in_dtype,
    make_step,
    measure_run,
    nnx_train_step,
)
from benchmarks.timing import CaseResult

LEARNING_RATE = 1e-3
"""Adam's learning rate in every implementation."""
CONV_SHAPES = [(5, 5, 1, 6), (5, 5, 6, 16)]
DENSE_SHAPES = [(400, 120), (120, 84), (84, 10)]


def _plain_conv(x, w, b, padding):
    y = lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def _plain_avg_pool(x):
    return lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0


def _plain(convs, denses, opt, dtype):
    def plain_loss(params, x, y):
        (w1, b1), (w2, b2), *dense = params
        h = _plain_avg_pool(jax.nn.relu(_plain_conv(x, w1, b1, "SAME")))
        h = _plain_avg_pool(jax.nn.relu(_plain_conv(h, w2, b2, "VALID")))
        h = h.reshape(h.shape[0], -1)
        for w, b in dense[:-1]:
            h = jax.nn.relu(h @ w + b)
        w, b = dense[-1]
        return cross_entropy(h @ w + b, y)

    return make_step(in_dtype(plain_loss, dtype), opt), [*convs, *denses]


def _fundl(convs, denses, opt, dtype):
    model = fl.serial(
        fl.conv(6, (5, 5), dtype=dtype), jax.nn.relu, fl.avg_pool((2, 2)),
        fl.conv(16, (5, 5), padding="VALID", dtype=dtype), jax.nn.relu, fl.avg_pool((2, 2)),
        fl.flatten(),
        fl.dense(120, dtype=dtype), jax.nn.relu,
        fl.dense(84, dtype=dtype), jax.nn.relu,
        fl.dense(10, dtype=dtype),
    )  # fmt: skip
    _, state = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    wb = [{"w": w, "b": b} for w, b in [*convs, *denses]]
    fundl_params = (wb[0], (), (), wb[1], (), (), (), wb[2], (), wb[3], (), wb[4])

    def fundl_loss(params, x, y):
        return cross_entropy(model.apply(params, state, x)[0], y)

    return make_step(fundl_loss, opt), fundl_params


def _stax(stax, convs, denses, opt, dtype):
    _, stax_apply = stax.serial(
        stax.Conv(6, (5, 5), padding="SAME"), stax.Relu, stax.AvgPool((2, 2), (2, 2)),
        stax.Conv(16, (5, 5), padding="VALID"), stax.Relu, stax.AvgPool((2, 2), (2, 2)),
        stax.Flatten,
        stax.Dense(120), stax.Relu,
        stax.Dense(84), stax.Relu,
        stax.Dense(10),
    )  # fmt: skip
    c, d = [tuple(p) for p in convs], [tuple(p) for p in denses]
    stax_params = [c[0], (), (), c[1], (), (), (), d[0], (), d[1], (), d[2]]
    stax_loss = in_dtype(lambda p, x, y: cross_entropy(stax_apply(p, x), y), dtype)
    return make_step(stax_loss, opt), stax_params


def _linen(nn, convs, denses, opt, dtype):
    class LeNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.avg_pool(nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x)), (2, 2), (2, 2))
            x = nn.avg_pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x)), (2, 2), (2, 2))
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(120)(x))
            x = nn.relu(nn.Dense(84)(x))
            return nn.Dense(10)(x)

    linen = LeNet()
    lp = {"params": {f"Conv_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(convs)}}
    lp["params"].update({f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(denses)})
    linen_loss = in_dtype(lambda p, x, y: cross_entropy(linen.apply(p, x), y), dtype)
    return make_step(linen_loss, opt), lp


def _nnx(nnx, convs, denses, opt, dtype):
    class LeNet(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 6, (5, 5), padding="SAME", dtype=dtype, rngs=rngs)
            self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", dtype=dtype, rngs=rngs)
            self.dense = nnx.List([nnx.Linear(*w.shape, dtype=dtype, rngs=rngs) for w, _ in denses])

        def __call__(self, x):
            x = nnx.avg_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
            x = nnx.avg_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
            x = x.reshape(x.shape[0], -1)
            for layer in self.dense[:-1]:
                x = nnx.relu(layer(x))
            return self.dense[-1](x)

    model = LeNet(nnx.Rngs(0))
    for layer, (w, b) in zip([model.conv1, model.conv2, *model.dense], [*convs, *denses],
                             strict=True):  # fmt: skip
        layer.kernel[...], layer.bias[...] = w, b
    return nnx_train_step(nnx, model, opt, lambda m, x, y: cross_entropy(m(x), y))


def _haiku(hk, convs, denses, opt, dtype):
    def pool(x):
        return hk.avg_pool(x, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def hk_forward(x):
        x = pool(jax.nn.relu(hk.Conv2D(6, 5, padding="SAME")(x)))
        x = pool(jax.nn.relu(hk.Conv2D(16, 5, padding="VALID")(x)))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(hk.Linear(120)(x))
        x = jax.nn.relu(hk.Linear(84)(x))
        return hk.Linear(10)(x)

    hk_model = hk.without_apply_rng(hk.transform(hk_forward))
    names = ["conv2_d", "conv2_d_1", "linear", "linear_1", "linear_2"]
    hp = {n: {"w": w, "b": b} for n, (w, b) in zip(names, [*convs, *denses], strict=True)}
    hk_loss = in_dtype(lambda p, x, y: cross_entropy(hk_model.apply(p, x), y), dtype)
    return make_step(hk_loss, opt), hp


def _keras_lenet(keras):
    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(6, 5, padding="same", activation="relu"), layers.AveragePooling2D(2),
        layers.Conv2D(16, 5, padding="valid", activation="relu"), layers.AveragePooling2D(2),
        layers.Flatten(),
        layers.Dense(120, activation="relu"),
        layers.Dense(84, activation="relu"),
        layers.Dense(10),
    ])  # fmt: skip


def implementations(convs, denses, dtype=None) -> tuple[dict, list[str]]:
    """``{name: (step, params)}`` for every implementation available, and skip notes.

    Args:
        convs: ``[(w, b), (w, b)]`` shared initial conv weights (HWIO kernels).
        denses: ``[(w, b)] * 3`` shared initial dense weights.
        dtype: the compute dtype (``None``: the inputs'); params stay as given.
    """
    opt = optax.adam(LEARNING_RATE)
    impls = {"plain JAX": _plain(convs, denses, opt, dtype),
             "fundl": _fundl(convs, denses, opt, dtype)}  # fmt: skip
    makers = {
        "stax": ("stax", lambda stax: _stax(stax, convs, denses, opt, dtype)),
        "flax linen": ("flax linen", lambda nn: _linen(nn, convs, denses, opt, dtype)),
        "flax nnx": ("flax nnx", lambda nnx: _nnx(nnx, convs, denses, opt, dtype)),
        "haiku": ("haiku", lambda hk: _haiku(hk, convs, denses, opt, dtype)),
    }
    flat = [a for wb in [*convs, *denses] for a in wb]
    makers |= keras_peer.makers(_keras_lenet, flat, cross_entropy, opt, LEARNING_RATE)
    peer_impls, notes = peers.build(makers, dtype)
    return impls | peer_impls, notes


def case(batch: int, quick: bool, rng, gpu: GpuRun | None = None) -> CaseResult:
    """LeNet's step at ``batch`` (``gpu``: in ``gpu.dtype``, with throughput and MFU)."""
    dtype = gpu.dtype if gpu else None
    init = jax.nn.initializers.glorot_uniform()
    keys = jax.random.split(jax.random.key(0), 5)
    opt = optax.adam(LEARNING_RATE)
    x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)), dtype or jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    convs = [(init(k, s), jnp.zeros(s[-1])) for k, s in zip(keys[:2], CONV_SHAPES, strict=True)]
    denses = [(init(k, s), jnp.zeros(s[1])) for k, s in zip(keys[2:], DENSE_SHAPES, strict=True)]
    impls, notes = implementations(convs, denses, dtype)
    name, steps = f"lenet train step, batch {batch}", 2 if quick else 10
    rounds = 3 if quick else 20 if gpu else 30
    res = measure_run(gpu, name, impls, opt, x, y, steps, rounds, Speed(batch, "examples"))
    if gpu is not None:
        res.notes.append(f"{jnp.dtype(dtype).name} compute over float32 params")
    res.notes.extend(notes)
    return res


def run(
    quick: bool = False, batches: tuple[int, ...] = (8, 128), gpu: GpuRun | None = None
) -> list[CaseResult]:
    """Runs the CNN cases; ``quick`` runs the first batch size only, few rounds and steps.

    ``gpu``: batch 1,024 (``quick``: 8) in ``gpu.dtype`` compute, with throughput and MFU.
    """
    rng = np.random.default_rng(0)
    sizes = [8 if quick else 1024] if gpu else batches[:1] if quick else batches
    return [case(batch, quick, rng, gpu) for batch in sizes]


if __name__ == "__main__":
    import argparse

    main(run, argparse.ArgumentParser(description="LeNet train-step benchmark"))
