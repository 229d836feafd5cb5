"""A pre-norm decoder block's train step (fundl vs plain JAX), and deep stacks' compile time.

    python -m benchmarks --suite transformer    # or: python -m benchmarks.transformer_step

1. One ``fl.decoder_block(width, heads)`` (GPT-2's pre-norm block: layer norm, causal
   self-attention, residual; layer norm, dense 4x width, gelu, dense, residual) trained on a
   mean-squared error with adam, params and optimizer state donated; batch 8, 128 positions,
   width 256, 8 heads on the CPU. Baseline: the same block hand-written in plain JAX over the
   same params (layer norm with float32 statistics, explicit causal softmax attention as a
   user writes it by hand, ``jax.nn.gelu``). Both start from the same weights and their
   first losses are compared before timing. No peer block is wired in: the attention suite
   compares the attention layers of the peers.
2. Compile time (trace + XLA compile) of a train step through ``repeat(decoder_block, n)``
   for n = 1, 24 and 2 and through 24 blocks unrolled by ``serial`` (width 128, 4 heads).
   Target: repeat(24) / repeat(1) <= 2. (XLA removes a loop of one trip, so repeat(1) is
   straight-line code and cheaper to compile than any real loop; repeat(24) / repeat(2) shows
   the growth with depth.)

``--quick`` shrinks both to tiny sizes, and the stacks to depth 2 (a smoke run, not a
measurement). The GPT-2-small
language model's throughput and MFU on a GPU are ``benchmarks/gpt2.py``'s. ``--gpu``
(``python -m benchmarks --gpu``) runs the block at batch 16, 1,024 positions, width 1,024, 16
heads in bfloat16 compute over float32 params (fundl's block with ``dtype`` and bfloat16
layer norms, as ``gpt2.py``; the hand-written one casts its params, layer norm statistics and
softmax in float32) with throughput and MFU notes, and skips the compile-time case.
"""

from __future__ import annotations

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl
from benchmarks.costs import Speed, compiled_memory_bytes, memory_high_water
from benchmarks.report import main
from benchmarks.steps import GpuRun, in_dtype, make_step, measure_run, mse
from benchmarks.timing import CaseResult, summary, timed, with_peak_memory, with_ratios

BLOCK = {"batch": 8, "time": 128, "width": 256, "heads": 8}
BLOCK_QUICK = {"batch": 2, "time": 16, "width": 32, "heads": 2}
BLOCK_GPU = {"batch": 16, "time": 1024, "width": 1024, "heads": 16}


def _layer_norm(p, x, eps=1e-5):
    xf = x.astype(jnp.float32)  # float32 statistics (a no-op on float32 inputs)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    scale, bias = p["scale"].astype(jnp.float32), p["bias"].astype(jnp.float32)
    return ((xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias).astype(x.dtype)


def plain_block(params, x, heads: int, attention: str = "explicit"):
    """The pre-norm decoder block by hand, over ``fl.decoder_block``'s params.

    Args:
        params: ``{"attn": {"norm", "attn": {"query", "key", "value", "out"}}, "mlp": {"norm",
            "up", "down"}}``, dense params ``{"w": (in, out), "b": (out,)}``.
        x: ``(batch, time, width)``.
        heads: the number of attention heads.
        attention: ``"explicit"`` (softmax by hand), or ``jax.nn.dot_product_attention``'s
            ``implementation`` (``"xla"``, ``"cudnn"``).

    Returns:
        ``(batch, time, width)``.
    """
    b, t, width = x.shape
    d = width // heads
    a = params["attn"]
    h = _layer_norm(a["norm"], x)
    q, k, v = ((h @ a["attn"][n]["w"] + a["attn"][n]["b"]).reshape(b, t, heads, d)
               for n in ("query", "key", "value"))  # fmt: skip
    if attention != "explicit":
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=attention)
        out = out.reshape(b, t, width)
    else:
        logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / np.float32(np.sqrt(d))
        causal = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # float32 softmax, then v's
        out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, width)
    x = x + out @ a["attn"]["out"]["w"] + a["attn"]["out"]["b"]
    m = params["mlp"]
    h = jax.nn.gelu(_layer_norm(m["norm"], x) @ m["up"]["w"] + m["up"]["b"])
    return x + h @ m["down"]["w"] + m["down"]["b"]


def block_case(quick: bool, gpu: GpuRun | None = None) -> CaseResult:
    """The decoder block's train step, fundl vs plain JAX (``gpu``: in ``gpu.dtype``)."""
    sizes = BLOCK_QUICK if quick else BLOCK_GPU if gpu else BLOCK
    batch, t, width, heads = sizes["batch"], sizes["time"], sizes["width"], sizes["heads"]
    dtype = gpu.dtype if gpu else None
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, t, width)), dtype or jnp.float32)
    target = jnp.asarray(rng.standard_normal((batch, t, width)), jnp.float32)
    if dtype is None:
        block = fl.decoder_block(width, heads)
    else:  # as benchmarks/gpt2.py: bfloat16 layer norms too
        block = fl.decoder_block(width, heads, dtype=dtype,
                                 norm=fl.layer_norm(dtype=dtype))  # fmt: skip
    weights, state = block.init(jax.random.key(0), x)
    weights = jax.tree.map(lambda w: w + 0.01, weights)  # non-zero biases
    opt = optax.adam(1e-3)

    def plain_loss(p, x, y):
        return mse(plain_block(p, x, heads), y)

    def fundl_loss(p, x, y):
        return mse(block.apply(p, state, x)[0], y)

    impls = {"plain JAX": (make_step(in_dtype(plain_loss, dtype), opt), weights),
             "fundl": (make_step(fundl_loss, opt), weights)}  # fmt: skip
    if gpu is not None:
        kernel = "cudnn" if jax.default_backend() == "gpu" else "xla"  # as gpt2.py --impl plain

        def fused_loss(p, x, y):
            return mse(plain_block(p, x, heads, kernel), y)

        impls[f"plain JAX, jax.nn.dot_product_attention ({kernel})"] = (
            make_step(in_dtype(fused_loss, dtype), opt), weights)  # fmt: skip
    case = f"decoder block train step, batch {batch}, {t} positions, width {width}, {heads} heads"
    steps, rounds = (1, 2) if quick else (3, 5) if gpu else (5, 30)
    speed = Speed(batch * t, "tokens")
    res = measure_run(gpu, case, impls, opt, x, target, steps, rounds, speed)
    kernel_dtype = jnp.dtype(dtype or jnp.float32)
    kernel = fl.attention_kernels._choose(None, kernel_dtype, width // heads, has_mask=False,
                                          dropout=False)  # fmt: skip
    backend = jax.default_backend()
    res.notes.append(f"fundl / plain JAX = {res.timings[1].ratio:.3f}; fundl's attention "
                     f"kernel on {backend} {kernel_dtype.name}: {kernel}")  # fmt: skip
    res.notes.append("no peer block wired in (the attention suite compares peers' attention)")
    if gpu is not None:
        res.notes.append("plain JAX: attention by an explicit softmax (the baseline: XLA counts "
                         "its FLOPs) and by jax.nn.dot_product_attention (cuDNN on a GPU, a "
                         "custom call XLA counts no FLOPs in)")  # fmt: skip
        res.notes.append("compile-time case skipped under --gpu (run the suite without --gpu)")
    return res


def _compile_step(model, state, opt, args):
    """A new train step through ``model`` (no cache hit), lowered and compiled for ``args``."""

    def loss(p, x, y):
        return mse(model.apply(p, state, x)[0], y)

    return make_step(loss, opt).lower(*args).compile()


def compile_case(quick: bool) -> CaseResult:
    """Compile time of a train step through ``repeat(block, n)`` and an unrolled stack."""
    before, _ = memory_high_water()
    depth = 2 if quick else 24  # quick: repeat(block, 2) doubles as the 2-copy row
    width, heads, batch, t = (32, 2, 1, 8) if quick else (128, 4, 2, 64)
    x = jnp.zeros((batch, t, width))
    opt = optax.adam(1e-3)
    block = fl.decoder_block(width, heads)
    models = {
        "repeat(block, 1)": fl.repeat(block, 1),
        f"repeat(block, {depth})": fl.repeat(block, depth),
        f"serial of {depth} blocks (unrolled)": fl.serial(*[block] * depth),
        "repeat(block, 2)": fl.repeat(block, 2),
    }  # quick (depth 2): three entries
    timings = []
    for name, model in models.items():
        params, state = model.init(jax.random.key(0), x)
        args = (params, opt.init(params), jnp.zeros(()), x, x)
        runs = [timed(lambda: _compile_step(model, state, opt, args))  # noqa: B023 (called now)
                for _ in range(1 if quick else 3)]  # fmt: skip
        samples = [wall for _, wall, _ in runs]
        timing = summary(name, statistics.median(samples), samples, [cpu for *_, cpu in runs])
        memory = compiled_memory_bytes(runs[-1][0])
        timings.append(dataclasses.replace(timing, memory_bytes=memory))
    timings = with_ratios(timings)
    res = CaseResult(f"compile time of a train step, decoder blocks width {width}", "compile",
                     timings)  # fmt: skip
    res.notes.append(f"repeat({depth}) / repeat(1) = {timings[1].ratio:.2f} (target <= 2); "
                     f"unrolled / repeat(1) = {timings[2].ratio:.2f}")  # fmt: skip
    if depth > 2:
        per_two = timings[1].median_s / timings[3].median_s
        res.notes.append(f"repeat({depth}) / repeat(2) = {per_two:.2f}: XLA drops a loop of "
                         "one trip, so repeat(1) compiles as straight-line code; from 2 copies "
                         "on, the compile time does not grow with depth")  # fmt: skip
    return with_peak_memory(res, before)


def run(quick: bool = False, gpu: GpuRun | None = None) -> list[CaseResult]:
    """The decoder block's train step and the deep-stack compile-time case (not with ``gpu``)."""
    if gpu is not None:
        return [block_case(quick, gpu)]
    return [block_case(quick), compile_case(quick)]


if __name__ == "__main__":
    import argparse

    main(run, argparse.ArgumentParser(description=__doc__.splitlines()[0]))
