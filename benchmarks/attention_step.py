"""Causal self-attention train step: fundl vs hand-written attention and the peers' layers.

    python -m benchmarks --suite attention      # or: python -m benchmarks.attention_step

One causal self-attention layer (batch 8, 256 positions, width 256, 8 heads; then the shapes
of :data:`SWEEP` against the two fastest peers): forward,
mean-squared error, grad, adam update; params and optimizer state donated. Baseline: the
same computation hand-written with ``jax.nn.dot_product_attention`` (its XLA path); also
hand-written explicit softmax, fundl (its default kernel for this backend and dtype), and
Flax linen's, Flax NNX's, Equinox's and Keras 3's (through ``stateless_call``) attention
layers when installed. All start from the
same weights and their first losses are compared before timing. Target: fundl <= 1.0x
the fastest implementation of the run.

The compile time of deep stacks and a whole decoder block's train step are in
``benchmarks.transformer_step`` (``--suite transformer``). ``--gpu`` (``python -m benchmarks
--gpu``) runs batch 32, 1,024 positions, width 1,024, 16 heads in bfloat16 compute over
float32 params, adds ``jax.nn.dot_product_attention`` with cuDNN on a GPU, and notes the
throughput (tokens/s) and MFU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl
from benchmarks import peers
from benchmarks.costs import Speed
from benchmarks.report import main, note_vs_fastest
from benchmarks.steps import GpuRun, in_dtype, make_step, measure_run, mse
from benchmarks.timing import CaseResult

BATCH, TIME, WIDTH, HEADS = 8, 256, 256, 8
SWEEP = ((32, 128, 256, 4), (4, 512, 512, 8), (64, 64, 256, 8), (16, 128, 512, 8))
"""More ``(batch, positions, width, heads)``: short sequences (head widths 32 and 64, where
per-head matmuls are small), a long one and a wide one, raced against the two fastest peers."""
SWEEP_NAMES = ("jax.nn.dot_product_attention", "fundl", "flax linen", "equinox")
"""The implementations each sweep shape runs (the main shape runs them all)."""
GPU_SIZES = (32, 1024, 1024, 16)
"""``--gpu``: batch, positions, width, heads."""


def _causal(t):
    return jnp.tril(jnp.ones((t, t), bool))


def _project(p, x):
    return x @ p["w"] + p["b"]


def _hand_written(attention, heads):
    """A loss over fundl-layout params with the attention core given."""

    def loss(params, x, target):
        b, t, _ = x.shape
        q, k, v = (_project(params[n], x).reshape(b, t, heads, -1)
                   for n in ("query", "key", "value"))  # fmt: skip
        out = attention(q, k, v).reshape(b, t, -1)
        return mse(_project(params["out"], out), target)

    return loss


def _fused(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def _explicit(q, k, v):
    t, d = q.shape[1], q.shape[-1]
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d).astype(np.float32)
    logits = jnp.where(_causal(t)[None, None], logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # float32 softmax, then v's dtype
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _heads_in(p, heads):
    """A ``{"w": (width, width), "b": (width,)}`` projection as per-head kernel and bias."""
    width = p["w"].shape[0]
    return {"kernel": p["w"].reshape(width, heads, -1), "bias": p["b"].reshape(heads, -1)}


def _heads_out(p, heads):
    """The output projection's ``(width, width)`` kernel as ``(heads, head width, width)``."""
    width = p["w"].shape[1]
    return p["w"].reshape(heads, -1, width)


def _linen(nn, weights, x, heads, dtype):
    batch, time_, width = x.shape
    linen = nn.MultiHeadDotProductAttention(num_heads=heads, qkv_features=width,
                                            out_features=width, deterministic=True)  # fmt: skip
    lp = {"params": {n: _heads_in(weights[n], heads) for n in ("query", "key", "value")}}
    lp["params"]["out"] = {"kernel": _heads_out(weights["out"], heads),
                           "bias": weights["out"]["b"]}  # fmt: skip
    mask = nn.make_causal_mask(jnp.ones((batch, time_)))
    return in_dtype(lambda p, x, y: mse(linen.apply(p, x, mask=mask), y), dtype), lp


def _nnx(nnx, weights, x, heads, dtype):
    batch, time_, width = x.shape
    model = nnx.MultiHeadAttention(heads, width, width, width, decode=False,
                                   rngs=nnx.Rngs(0))  # fmt: skip
    for n in ("query", "key", "value"):
        sub = getattr(model, n)
        sub.kernel[...], sub.bias[...] = _heads_in(weights[n], heads).values()
    model.out.kernel[...] = _heads_out(weights["out"], heads)
    model.out.bias[...] = weights["out"]["b"]
    graphdef, nstate = nnx.split(model)
    mask = nnx.make_causal_mask(jnp.ones((batch, time_)))

    def nnx_loss(p, x, y):
        return mse(nnx.merge(graphdef, p)(x, mask=mask, decode=False), y)

    return in_dtype(nnx_loss, dtype), nstate


def _equinox(eqx, weights, x, heads, dtype):
    mha = eqx.nn.MultiheadAttention(heads, x.shape[-1], use_query_bias=True, use_key_bias=True,
                                    use_value_bias=True, use_output_bias=True,
                                    key=jax.random.key(0))  # fmt: skip
    names = {"query_proj": "query", "key_proj": "key", "value_proj": "value",
             "output_proj": "out"}  # fmt: skip
    for eqx_name, name in names.items():
        mha = eqx.tree_at(lambda m, e=eqx_name: (getattr(m, e).weight, getattr(m, e).bias),
                          mha, (weights[name]["w"].T, weights[name]["b"]))  # fmt: skip
    params, static = eqx.partition(mha, eqx.is_array)
    causal = _causal(x.shape[1])

    def eqx_loss(p, x, y):
        m = eqx.combine(p, static)
        return mse(jax.vmap(lambda s: m(s, s, s, mask=causal))(x), y)

    return in_dtype(eqx_loss, dtype), params


def _keras(keras, weights, x, heads):
    mha = keras.layers.MultiHeadAttention(heads, x.shape[-1] // heads)
    mha.build(x.shape, x.shape)
    kp = [a for n in ("query", "key", "value") for a in _heads_in(weights[n], heads).values()]
    kp += [_heads_out(weights["out"], heads), weights["out"]["b"]]
    mha.set_weights([np.asarray(a) for a in kp])
    fixed = [v.value for v in mha.non_trainable_variables]

    def keras_loss(p, x, y):
        out, _ = mha.stateless_call(p, fixed, x, x, use_causal_mask=True)
        return mse(out, y)

    return keras_loss, [v.value for v in mha.trainable_variables]


def implementations(weights, x, heads, dtype=None):
    """``{name: (loss(params, x, target), params)}`` for every implementation available.

    Args:
        weights: fundl-layout params of a ``multi_head_attention(heads)``.
        x: the input, ``(batch, time, width)``.
        heads: the number of heads.
        dtype: the compute dtype (``None``: the input's); params stay as ``weights``.
    """
    impls = {}
    impls["jax.nn.dot_product_attention"] = (in_dtype(_hand_written(_fused, heads), dtype),
                                             weights)  # fmt: skip
    if dtype is not None and jax.default_backend() == "gpu":
        impls["jax.nn.dot_product_attention (cudnn)"] = (
            in_dtype(_hand_written(_cudnn, heads), dtype), weights)  # fmt: skip
    impls["explicit softmax"] = (in_dtype(_hand_written(_explicit, heads), dtype), weights)
    layer = fl.multi_head_attention(heads, is_causal=True, dtype=dtype)
    _, state = layer.init(jax.random.key(0), x)
    impls["fundl"] = (lambda p, x, y: mse(layer.apply(p, state, x)[0], y), weights)
    makers = {
        "flax linen": ("flax linen", lambda nn: _linen(nn, weights, x, heads, dtype)),
        "flax nnx": ("flax nnx", lambda nnx: _nnx(nnx, weights, x, heads, dtype)),
        "equinox": ("equinox", lambda eqx: _equinox(eqx, weights, x, heads, dtype)),
        "keras 3 stateless_call": ("keras 3", lambda keras: _keras(keras, weights, x, heads)),
    }
    peer_impls, notes = peers.build(makers, dtype)
    return impls | peer_impls, notes


def attention_case(
    quick: bool, gpu: GpuRun | None = None, sizes: tuple | None = None, names=None
) -> CaseResult:
    """The train-step case; ``quick`` shrinks it to (2, 64, 64), 4 heads (a smoke run).

    ``gpu``: :data:`GPU_SIZES` (unless ``quick``) in ``gpu.dtype``, with throughput and MFU.
    ``sizes``: ``(batch, positions, width, heads)`` instead; ``names``: run only these
    implementations.
    """
    batch, time_, width, heads = sizes or (
        (2, 64, 64, 4) if quick else GPU_SIZES if gpu else (BATCH, TIME, WIDTH, HEADS)
    )
    dtype = gpu.dtype if gpu else None
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, time_, width)), dtype or jnp.float32)
    target = jnp.asarray(rng.standard_normal((batch, time_, width)), jnp.float32)
    layer = fl.multi_head_attention(heads, is_causal=True)
    weights, _ = layer.init(jax.random.key(0), x)
    weights = jax.tree.map(lambda w: w + 0.01, weights)  # non-zero biases
    opt = optax.adam(1e-3)
    impls, notes = implementations(weights, x, heads, dtype)
    impls = {name: (make_step(loss, opt), params) for name, (loss, params) in impls.items()
             if names is None or name in names}  # fmt: skip
    steps = 1 if quick else 3
    case = (f"causal self-attention train step, batch {batch}, {time_} positions, width "
            f"{width}, {heads} heads")  # fmt: skip
    rounds = 2 if quick else 5 if gpu else 15 if names is None else 9
    speed = Speed(batch * time_, "tokens")
    res = measure_run(gpu, case, impls, opt, x, target, steps, rounds, speed)
    kernel_dtype = jnp.dtype(dtype or jnp.float32)
    kernel = fl.attention_kernels._choose(None, kernel_dtype, width // heads, has_mask=False,
                                          dropout=False)  # fmt: skip
    res.notes.append(f"{note_vs_fastest(res)}; fundl's kernel on {jax.default_backend()} "
                     f"{kernel_dtype.name}: {kernel}")  # fmt: skip
    res.notes.extend(notes)
    return res


def run(quick: bool = False, gpu: GpuRun | None = None) -> list[CaseResult]:
    """The attention train-step case and the shape sweep (CPU runs; not ``quick``).

    The deep-stack compile case is in the transformer suite.
    """
    sweep = () if quick or gpu else SWEEP
    return [attention_case(quick, gpu)] + [
        attention_case(quick, sizes=sizes, names=SWEEP_NAMES) for sizes in sweep
    ]


if __name__ == "__main__":
    import argparse

    main(run, argparse.ArgumentParser(description="attention benchmarks"))
