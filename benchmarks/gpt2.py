"""GPT-2-small-shaped language model train step: tokens/s and model FLOPs utilisation (MFU).

    python benchmarks/gpt2.py                       # full size: for a machine with a GPU
    python benchmarks/gpt2.py --tiny                # a CPU-sized smoke run (the tests use it)
    python benchmarks/gpt2.py --batch 16 --peak-tflops 989 --attention xla

The model: token embedding (vocab 50257, tied with the output head via ``fl.attend``),
learned positions (context 1024), ``repeat(decoder_block(768, 12), 12)``, final layer norm;
bf16 compute over float32 params (``dtype=jnp.bfloat16``), softmax cross-entropy in float32,
adamw; params and optimizer state donated. Attention uses fundl's default kernel for the
backend (cuDNN flash attention on an NVIDIA GPU in bf16).

MFU = achieved model FLOP/s / peak FLOP/s, with the model FLOPs per token of the PaLM paper
(appendix B): ``6 N + 12 L d T`` (N params, L blocks, d width, T context; no discount for the
causal mask). The peak is ``--peak-tflops`` or looked up from the device kind (H100 SXM and
H200: 989 dense bf16 TFLOP/s); on CPU no MFU is printed without ``--peak-tflops``.
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

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak per device-kind substring (NVIDIA datasheets, SXM parts)."""

FULL = {"vocab": 50257, "context": 1024, "width": 768, "heads": 12, "layers": 12, "batch": 8}
TINY = {"vocab": 512, "context": 64, "width": 64, "heads": 4, "layers": 2, "batch": 2}


def make_model(vocab, context, width, heads, layers, dtype=jnp.bfloat16, implementation=None):
    return fl.serial(
        embed=fl.embedding(vocab, width, table_init=jax.nn.initializers.normal(0.02), dtype=dtype),
        pos=fl.learned_positions(context),
        blocks=fl.repeat(
            fl.decoder_block(
                width,
                heads,
                dtype=dtype,
                implementation=implementation,
                norm=lambda: fl.layer_norm(dtype=dtype),
            ),
            layers,
        ),
        norm=fl.layer_norm(dtype=dtype),
    )


def flops_per_token(n_params: int, layers: int, width: int, context: int) -> float:
    """PaLM's model FLOPs per token for one train step (forward and backward)."""
    return 6.0 * n_params + 12.0 * layers * width * context


def peak_tflops(device_kind: str) -> float | None:
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in device_kind:
            return peak
    return None


def run_benchmark(
    cfg: dict, steps: int, peak: float | None, seed: int = 0, implementation: str | None = None
) -> dict:
    model = make_model(
        cfg["vocab"],
        cfg["context"],
        cfg["width"],
        cfg["heads"],
        cfg["layers"],
        implementation=implementation,
    )
    batch, t = cfg["batch"], cfg["context"]
    ids = jax.random.randint(jax.random.key(seed), (batch, t + 1), 0, cfg["vocab"])
    x, y = ids[:, :-1], ids[:, 1:]
    params, state = model.init(jax.random.key(seed), x)
    n_params = sum(int(p.size) for p in jax.tree.leaves(params))
    optimizer = optax.adamw(3e-4, weight_decay=0.1)
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        h, _ = model.apply(params, state, x)
        logits = fl.attend(params["embed"], h).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

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
        "attention": implementation or "auto",
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
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON")
    args = parser.parse_args(argv)
    cfg = dict(TINY if args.tiny else FULL)
    if args.batch:
        cfg["batch"] = args.batch
    steps = args.steps or (2 if args.tiny else 20)
    impl = None if args.attention == "auto" else args.attention
    result = run_benchmark(cfg, steps, args.peak_tflops, implementation=impl)
    mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no peak known)"
    print(f"{result['device']} ({result['backend']}, attention {result['attention']}): "
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
