"""GPT-2-small-shaped language model train step: tokens/s and model FLOPs utilisation (MFU).

    python -m benchmarks.gpt2                       # full size: for a machine with a GPU
    python -m benchmarks.gpt2 --tiny                # a CPU-sized smoke run (the tests use it)
    python -m benchmarks.gpt2 --batch 16 --peak-tflops 989 --attention xla

The model: token embedding (vocab 50257, tied with the output head via ``fl.attend``),
learned positions (context 1024), ``repeat(decoder_block(768, 12), 12)``, final layer norm;
bf16 compute over float32 params (``dtype=jnp.bfloat16``), softmax cross-entropy in float32,
adamw; params and optimizer state donated. Attention uses fundl's default kernel for the
backend (cuDNN flash attention on an NVIDIA GPU in bf16). ``--impl plain`` runs the same
model hand-written in plain JAX (the floor; blocks as a Python loop).

Two settings matter on a GPU (their figures are in ``RESULTS.md``): the stack fully
unrolled (``fl.repeat(..., unroll=12)``, the default here on a GPU: XLA then drops the loop
and fuses across blocks) and XLA's Triton GEMMs off
(``XLA_FLAGS=--xla_gpu_enable_triton_gemm=false``, cuBLAS for every matmul), which
``benchmarks/gpu.sh`` sets.

MFU = achieved model FLOP/s / peak FLOP/s, with the model FLOPs per token of the PaLM paper
(appendix B): ``6 N + 12 L d T`` (N params, L blocks, d width, T context; no discount for the
causal mask). The peak is ``--peak-tflops`` or looked up from the device kind
(``benchmarks.costs.PEAK_BF16_TFLOPS``); on CPU no MFU is printed without ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl
from benchmarks.costs import peak_tflops

FULL = {"vocab": 50257, "context": 1024, "width": 768, "heads": 12, "layers": 12, "batch": 8}
TINY = {"vocab": 512, "context": 64, "width": 64, "heads": 4, "layers": 2, "batch": 2}


REMAT = ("none", "full", "dots")
"""Activation checkpointing of the blocks: none, each block recomputed in the backward pass
(``fl.repeat(..., remat=True)``), or recomputed but for its matmuls' outputs
(``fl.remat(block, jax.checkpoint_policies.dots_saveable)``)."""


def make_model(
    vocab, context, width, heads, layers, dtype=jnp.bfloat16, implementation=None, unroll=1,
    remat="none",
):  # fmt: skip
    block = fl.decoder_block(
        width,
        heads,
        dtype=dtype,
        implementation=implementation,
        norm=fl.layer_norm(dtype=dtype),
    )
    if remat == "dots":
        block = fl.remat(block, jax.checkpoint_policies.dots_saveable, prevent_cse=False)
    return fl.serial(
        embed=fl.embedding(vocab, width, table_init=jax.nn.initializers.normal(0.02), dtype=dtype),
        pos=fl.learned_positions(context),
        blocks=fl.repeat(block, layers, unroll=unroll, remat=remat == "full"),
        norm=fl.layer_norm(dtype=dtype),
    )


def plain_init(key, vocab, context, width, layers):
    """Params of the same GPT-2, hand-written in plain JAX (the floor fundl is measured against)."""
    keys = iter(jax.random.split(key, 2 + 4 * layers))

    def normal(shape):
        return 0.02 * jax.random.normal(next(keys), shape, jnp.float32)

    def norm():
        return {"scale": jnp.ones((width,)), "bias": jnp.zeros((width,))}

    blocks = [
        {"ln1": norm(), "qkv": normal((width, 3 * width)), "qkv_b": jnp.zeros((3 * width,)),
         "proj": normal((width, width)), "proj_b": jnp.zeros((width,)), "ln2": norm(),
         "up": normal((width, 4 * width)), "up_b": jnp.zeros((4 * width,)),
         "down": normal((4 * width, width)), "down_b": jnp.zeros((width,))}
        for _ in range(layers)
    ]  # fmt: skip
    return {"wte": normal((vocab, width)), "wpe": normal((context, width)), "blocks": blocks,
            "ln_f": norm()}  # fmt: skip


def plain_apply(params, x, heads, dtype=jnp.bfloat16, implementation=None):
    """The hand-written forward pass: ``(batch, time)`` token ids -> ``(batch, time, width)``.

    The blocks are a Python loop (unrolled), q, k and v one fused projection, attention
    ``jax.nn.dot_product_attention`` (cuDNN on a GPU), layer norm statistics in float32.
    """

    def ln(h, p):
        hf = h.astype(jnp.float32)
        mean = hf.mean(-1, keepdims=True)
        var = jnp.square(hf - mean).mean(-1, keepdims=True)
        return ((hf - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]).astype(dtype)

    def lin(h, w, b):
        return h @ w.astype(dtype) + b.astype(dtype)

    b, t = x.shape
    h = params["wte"].astype(dtype)[x] + params["wpe"][:t].astype(dtype)[None]
    for p in params["blocks"]:
        q, k, v = jnp.split(lin(ln(h, p["ln1"]), p["qkv"], p["qkv_b"]), 3, axis=-1)
        q, k, v = (a.reshape(b, t, heads, -1) for a in (q, k, v))
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
        h = h + lin(o.reshape(b, t, -1), p["proj"], p["proj_b"])
        u = jax.nn.gelu(lin(ln(h, p["ln2"]), p["up"], p["up_b"]))
        h = h + lin(u, p["down"], p["down_b"])
    return ln(h, params["ln_f"])


def flops_per_token(n_params: int, layers: int, width: int, context: int) -> float:
    """PaLM's model FLOPs per token for one train step (forward and backward)."""
    return 6.0 * n_params + 12.0 * layers * width * context


def make_loss(cfg: dict, x, seed=0, impl="fundl", implementation=None, unroll=1, remat="none"):
    """``(params, loss_fn(params, x, y))`` of fundl's model or the hand-written one."""
    if impl == "plain":
        params = plain_init(jax.random.key(seed), cfg["vocab"], cfg["context"], cfg["width"],
                            cfg["layers"])  # fmt: skip
        if implementation is None and jax.default_backend() == "gpu":
            implementation = "cudnn"

        def loss_fn(params, x, y):
            h = plain_apply(params, x, cfg["heads"], implementation=implementation)
            logits = (h @ params["wte"].astype(h.dtype).T).astype(jnp.float32)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return params, loss_fn
    model = make_model(cfg["vocab"], cfg["context"], cfg["width"], cfg["heads"], cfg["layers"],
                       implementation=implementation, unroll=unroll, remat=remat)  # fmt: skip
    params, state = model.init(jax.random.key(seed), x)

    def loss_fn(params, x, y):
        h, _ = model.apply(params, state, x)
        logits = fl.attend(params["embed"], h).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, loss_fn


def make_step(cfg: dict, seed=0, impl="fundl", implementation=None, unroll=1, remat="none"):
    """``(step, params, opt_state, x, y)``: the jitted adamw train step and its first inputs."""
    ids = jax.random.randint(jax.random.key(seed), (cfg["batch"], cfg["context"] + 1), 0,
                             cfg["vocab"])  # fmt: skip
    x, y = ids[:, :-1], ids[:, 1:]
    params, loss_fn = make_loss(cfg, x, seed, impl, implementation, unroll, remat)
    optimizer = optax.adamw(3e-4, weight_decay=0.1)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, optimizer.init(params), x, y


def step_memory(cfg: dict, implementation=None, unroll=1, remat="none") -> dict:
    """XLA's memory account of the compiled train step (compiled, not run), in bytes."""
    step, params, opt_state, x, y = make_step(cfg, 0, "fundl", implementation, unroll, remat)
    m = step.lower(params, opt_state, x, y).compile().memory_analysis()
    return {"remat": remat, "batch": cfg["batch"], "temp_bytes": m.temp_size_in_bytes,
            "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes}  # fmt: skip


def run_benchmark(
    cfg: dict,
    steps: int,
    peak: float | None,
    seed: int = 0,
    implementation: str | None = None,
    impl: str = "fundl",
    unroll: int = 1,
    remat: str = "none",
) -> dict:
    batch, t = cfg["batch"], cfg["context"]
    step, params, opt_state, x, y = make_step(cfg, seed, impl, implementation, unroll, remat)
    n_params = sum(int(p.size) for p in jax.tree.leaves(params))

    t0 = time.perf_counter()
    params, opt_state, loss = jax.block_until_ready(step(params, opt_state, x, y))
    compile_s = time.perf_counter() - t0
    first_loss = float(loss)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = jax.block_until_ready(step(params, opt_state, x, y))
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens_s = batch * t / step_s
    fpt = flops_per_token(n_params, cfg["layers"], cfg["width"], t)
    achieved = fpt * tokens_s / 1e12
    device = jax.devices()[0]
    peak = peak or peak_tflops(device.device_kind)
    return {
        "device": device.device_kind, "backend": jax.default_backend(), **cfg,
        "params": n_params, "compile_s": compile_s, "step_s": step_s, "tokens_per_s": tokens_s,
        "model_tflops": achieved, "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "first_loss": first_loss, "last_loss": float(loss),
        "attention": implementation or "auto", "impl": impl, "unroll": unroll, "remat": remat,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="GPT-2-small train step: tokens/s and MFU")
    parser.add_argument("--tiny", action="store_true", help="a CPU-sized smoke configuration")
    parser.add_argument("--batch", type=int, help="batch size (default 8; tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the chip's peak bf16 TFLOP/s (default: by device kind)")  # fmt: skip
    parser.add_argument(
        "--attention",
        choices=["auto", "explicit", "xla", "cudnn"],
        default="auto",
        help="attention kernel (default: fundl's choice)",
    )
    parser.add_argument(
        "--impl",
        choices=["fundl", "plain"],
        default="fundl",
        help="fundl's layers or the same model hand-written in plain JAX",
    )
    parser.add_argument(
        "--unroll",
        type=int,
        default=None,
        help="blocks per scan iteration of fl.repeat (fundl only; default: all of them on a "
        "GPU, 1 elsewhere)",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        help="vocabulary size (default 50257; 50304 pads it to a multiple of 128, as nanoGPT does)",
    )
    parser.add_argument("--remat", choices=REMAT, default="none",
                        help="activation checkpointing of the blocks (fundl only)")  # fmt: skip
    parser.add_argument("--memory", action="store_true",
                        help="compile only and print XLA's memory account of the step for each "
                        "--remat choice (bytes; temporaries are the activations)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = parser.parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    if args.batch:
        cfg["batch"] = args.batch
    if args.vocab:
        cfg["vocab"] = args.vocab
    steps = args.steps or (2 if args.tiny else 20)
    impl = None if args.attention == "auto" else args.attention
    if args.impl == "plain":
        args.unroll = 0  # blocks as a Python loop: no scan to unroll
    elif args.unroll is None:  # a full unroll is faster on a GPU (see RESULTS.md)
        args.unroll = cfg["layers"] if jax.default_backend() == "gpu" else 1
    if args.memory:
        rows = [step_memory(cfg, impl, args.unroll, remat) for remat in REMAT]
        for row in rows:
            temp, share = row["temp_bytes"], row["temp_bytes"] / rows[0]["temp_bytes"]
            print(f"remat {row['remat']:>4}: batch {row['batch']}, temporaries "
                  f"{temp / 2**20:,.1f} MiB ({share:.3f} of none), arguments "
                  f"{row['argument_bytes'] / 2**20:,.1f} MiB")  # fmt: skip
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return {"memory": rows}
    result = run_benchmark(cfg, steps, args.peak_tflops, implementation=impl, impl=args.impl,
                           unroll=args.unroll, remat=args.remat)  # fmt: skip
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no peak known)"
    stack = f"unroll {result['unroll']}" if result["unroll"] else "blocks in a Python loop"
    print(f"{result['impl']} {result['device']} ({result['backend']}, attention "
          f"{result['attention']}, {stack}): "
          f"{result['params']:,} params, batch "
          f"{cfg['batch']} x {cfg['context']} tokens; step {1e3 * result['step_s']:.1f} ms, "
          f"{result['tokens_per_s']:,.0f} tokens/s, {result['model_tflops']:.2f} model TFLOP/s, "
          f"MFU {mfu}; compile {result['compile_s']:.1f}s; loss {result['first_loss']:.3f} -> "
          f"{result['last_loss']:.3f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
