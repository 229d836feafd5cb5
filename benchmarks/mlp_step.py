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

import jax
import jax.numpy as jnp
import numpy as np
import optax

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
from benchmarks.timing import CaseResult, timed

LEARNING_RATE = 1e-3
"""Adam's learning rate in every implementation."""
SIZES = [(784, 128), (128, 64), (64, 10)]
"""The dense layers' ``(in, out)``."""


def _plain(weights, opt, dtype):
    # plain JAX: a list of (w, b) and a loop of matmuls, written by hand
    def plain_loss(params, x, y):
        h = x.reshape(x.shape[0], -1)
        for w, b in params[:-1]:
            h = jax.nn.relu(h @ w + b)
        w, b = params[-1]
        return cross_entropy(h @ w + b, y)

    return make_step(in_dtype(plain_loss, dtype), opt), [tuple(p) for p in weights]


def _fundl(weights, opt, dtype):
    model = fl.serial(fl.flatten(), fl.dense(128, dtype=dtype), jax.nn.relu,
                      fl.dense(64, dtype=dtype), jax.nn.relu,
                      fl.dense(10, dtype=dtype))  # fmt: skip
    _, state = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))
    fundl_params = ((), {"w": weights[0][0], "b": weights[0][1]}, (),
                    {"w": weights[1][0], "b": weights[1][1]}, (),
                    {"w": weights[2][0], "b": weights[2][1]})  # fmt: skip

    def fundl_loss(params, x, y):
        return cross_entropy(model.apply(params, state, x)[0], y)

    return make_step(fundl_loss, opt), fundl_params


def _stax(stax, weights, opt, dtype):
    _, stax_apply = stax.serial(stax.Flatten, stax.Dense(128), stax.Relu, stax.Dense(64),
                                stax.Relu, stax.Dense(10))  # fmt: skip
    stax_params = [(), tuple(weights[0]), (), tuple(weights[1]), (), tuple(weights[2])]
    stax_loss = in_dtype(lambda p, x, y: cross_entropy(stax_apply(p, x), y), dtype)
    return make_step(stax_loss, opt), stax_params


def _linen(nn, weights, opt, dtype):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(128)(x))
            x = nn.relu(nn.Dense(64)(x))
            return nn.Dense(10)(x)

    linen = MLP()
    lp = {"params": {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(weights)}}
    linen_loss = in_dtype(lambda p, x, y: cross_entropy(linen.apply(p, x), y), dtype)
    return make_step(linen_loss, opt), lp


def _nnx(nnx, weights, opt, dtype):
    """The MLP in Flax NNX, from ``weights``, with its documented step (``dtype``: compute)."""

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
    return nnx_train_step(nnx, model, opt, lambda m, x, y: cross_entropy(m(x), y))


def _haiku(hk, weights, opt, dtype):
    def hk_forward(x):
        return hk.nets.MLP([128, 64, 10])(x.reshape(x.shape[0], -1))

    hk_model = hk.without_apply_rng(hk.transform(hk_forward))
    hp = {f"mlp/~/linear_{i}": {"w": w, "b": b} for i, (w, b) in enumerate(weights)}
    hk_loss = in_dtype(lambda p, x, y: cross_entropy(hk_model.apply(p, x), y), dtype)
    return make_step(hk_loss, opt), hp


def _equinox(eqx, weights, opt, dtype):
    eqx_model = eqx.nn.MLP(784, 10, 128, 2, activation=jax.nn.relu, key=jax.random.key(0))
    eqx_model = eqx.tree_at(
        lambda m: [leaf for layer in m.layers for leaf in (layer.weight, layer.bias)],
        eqx_model,
        [leaf for w, b in weights for leaf in (w.T, b)],
    )
    params, static = eqx.partition(eqx_model, eqx.is_array)

    def eqx_loss(p, x, y):
        m = eqx.combine(p, static)
        return cross_entropy(jax.vmap(m)(x.reshape(x.shape[0], -1)), y)

    return make_step(in_dtype(eqx_loss, dtype), opt), params


def _keras_mlp(keras):
    return keras.Sequential([keras.Input((28, 28)), keras.layers.Flatten(),
                             keras.layers.Dense(128, activation="relu"),
                             keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(10)])  # fmt: skip


def implementations(weights, opt, dtype=None) -> tuple[dict, list[str]]:
    """``{name: (step, params)}`` for every implementation available, and skip notes.

    Args:
        weights: ``[(w1, b1), (w2, b2), (w3, b3)]`` shared initial weights.
        opt: the optax optimizer.
        dtype: the compute dtype (``None``: the inputs'); params stay as ``weights``.
    """
    impls = {"plain JAX": _plain(weights, opt, dtype), "fundl": _fundl(weights, opt, dtype)}
    makers = {
        "stax": ("stax", lambda stax: _stax(stax, weights, opt, dtype)),
        "flax linen": ("flax linen", lambda nn: _linen(nn, weights, opt, dtype)),
        "flax nnx": ("flax nnx", lambda nnx: _nnx(nnx, weights, opt, dtype)),
        "haiku": ("haiku", lambda hk: _haiku(hk, weights, opt, dtype)),
        "equinox": ("equinox", lambda eqx: _equinox(eqx, weights, opt, dtype)),
    }
    flat = [a for wb in weights for a in wb]
    makers |= keras_peer.makers(_keras_mlp, flat, cross_entropy, opt, LEARNING_RATE)
    peer_impls, notes = peers.build(makers, dtype)
    return impls | peer_impls, notes


def case(batch: int, quick: bool, rng, gpu: GpuRun | None = None) -> CaseResult:
    """The MLP step at ``batch`` (``gpu``: in ``gpu.dtype``, with throughput and MFU)."""
    dtype = gpu.dtype if gpu else None
    init = jax.nn.initializers.glorot_uniform()
    keys = jax.random.split(jax.random.key(0), 3)
    opt = optax.adam(LEARNING_RATE)
    x = jnp.asarray(rng.standard_normal((batch, 28, 28)), dtype or jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    weights = [(init(k, s), jnp.zeros(s[1])) for k, s in zip(keys, SIZES, strict=True)]
    impls, notes = implementations(weights, opt, dtype)
    name, steps = f"mlp train step, batch {batch}", 2 if quick else 20
    rounds = 3 if quick else 30 if gpu else 150
    res = measure_run(gpu, name, impls, opt, x, y, steps, rounds, Speed(batch, "examples"))
    if gpu is None and batch == 8:
        res.notes.append(flatten_note(impls, opt, quick))
    if gpu is not None:
        res.notes.append(
            f"{jnp.dtype(dtype).name} compute over float32 params; the seed "
            "model's widths (784-128-64-10) are tiny: a small step even on a GPU"
        )
    res.notes.extend(notes)
    return res


def flatten_note(impls: dict, opt, quick: bool) -> str:
    """A note: what ``jax.jit`` spends flattening each step's params and optimizer state.

    Every call of a jitted step flattens its arguments (in C++) to find the compiled
    program; a dict node costs more than a tuple (its keys are sorted and compared). The
    best of 20 rounds of 2,000 flattens (2 of 20 in a quick run), one process: a difference
    between two steps that compile to the same XLA program is this.
    """
    times = {}
    for name in ("plain JAX", "fundl", "stax", "haiku"):
        if name not in impls:
            continue
        tree = (impls[name][1], opt.init(impls[name][1]))
        times[name] = (
            min(
                timed(lambda tree=tree: [jax.tree_util.tree_flatten(tree) for _ in range(2000)])[1]
                for _ in range(2 if quick else 20)
            )
            / 2000
        )
    spent = ", ".join(f"{name} {s * 1e6:.1f} us" for name, s in times.items())
    return f"per call, jit flattens the params and adam state: {spent}"


def run(
    quick: bool = False, batches: tuple[int, ...] = (8, 128), gpu: GpuRun | None = None
) -> list[CaseResult]:
    """Runs the MLP cases; ``quick`` runs the first batch size only, few rounds and steps.

    ``gpu``: batch 4,096 (``quick``: 8) in ``gpu.dtype`` compute, with throughput and MFU.
    """
    rng = np.random.default_rng(0)
    sizes = [8 if quick else 4096] if gpu else batches[:1] if quick else batches
    return [case(batch, quick, rng, gpu) for batch in sizes]


if __name__ == "__main__":
    import argparse

    main(run, argparse.ArgumentParser(description="MLP train-step benchmark"))
