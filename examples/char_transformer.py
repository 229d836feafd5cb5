"""A character-level GPT: a small decoder-only transformer trained on Python's own help text.

The text is the help topics that ship with every Python install (``pydoc_data.topics``,
about 0.46 MB of English); the last 10% is held out. The model is the usual pre-norm
decoder stack: token embedding, ``repeat(decoder_block)`` (causal attention with rotary
positions, GELU MLP, layer norm), a final layer norm, and logits from the embedding table
(tied weights, ``fl.attend``). Training is a plain jitted optax step; afterwards the same
params drive a ``decode=True`` copy of the model that samples one character at a time from a
KV cache (``fl.init_cache``).

    python examples/char_transformer.py [--minutes 9] [--steps 1200] [--width 96] ...

Reports held-out bits per character (the cross-entropy in base 2).
"""

import argparse
import math
import pydoc_data.topics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl


def load_text() -> str:
    topics = pydoc_data.topics.topics
    return "".join(topics[k] for k in sorted(topics))


def make_model(vocab, width, heads, layers, dropout=0.0, decode=False):
    return fl.serial(
        embed=fl.embedding(vocab, width, table_init=jax.nn.initializers.normal(0.02)),
        blocks=fl.repeat(
            fl.decoder_block(width, heads, dropout_rate=dropout, rope_base=10000.0, decode=decode),
            layers,
        ),
        norm=fl.layer_norm(),
    )


def main(
    minutes: float = 9.0,
    steps: int = 1200,
    width: int = 96,
    heads: int = 4,
    layers: int = 3,
    context: int = 64,
    batch_size: int = 32,
    lr: float = 3e-3,
    eval_every: int = 100,
    eval_batches: int = 20,
    sample_chars: int = 200,
    seed: int = 0,
) -> dict:
    text = load_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.array([lookup[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    print(f"{len(data):,} characters, vocabulary {len(chars)}, held out {len(held_out):,}")

    model = make_model(len(chars), width, heads, layers)
    ids0 = jnp.zeros((1, context), jnp.int32)
    params, state = model.init(jax.random.key(seed), ids0)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    print(f"model: {layers} blocks, width {width}, {heads} heads, {n_params:,} params")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps,
                                                  lr / 10)  # fmt: skip
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, 0.1))
    opt_state = optimizer.init(params)

    def loss_fn(params, x, y):
        h, _ = model.apply(params, state, x)
        logits = fl.attend(params["embed"], h)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    eval_loss = jax.jit(loss_fn)
    rng = np.random.default_rng(seed)

    def batch(source, starts):
        idx = starts[:, None] + np.arange(context + 1)[None, :]
        seqs = source[idx]
        return seqs[:, :-1], seqs[:, 1:]

    eval_starts = np.linspace(0, len(held_out) - context - 2, eval_batches * batch_size)
    eval_starts = eval_starts.astype(np.int64).reshape(eval_batches, batch_size)

    def held_out_bits():
        losses = [eval_loss(params, *batch(held_out, s)) for s in eval_starts]
        return float(np.mean([float(v) for v in losses])) / math.log(2)

    t0 = time.perf_counter()
    losses, step = [], 0
    for step in range(1, steps + 1):
        x, y = batch(train, rng.integers(0, len(train) - context - 1, batch_size))
        params, opt_state, loss = train_step(params, opt_state, x, y)
        losses.append(float(loss))
        if step % eval_every == 0 or step == steps:
            elapsed = time.perf_counter() - t0
            print(f"step {step:5d}  train {np.mean(losses[-eval_every:]) / math.log(2):.3f} "
                  f"bits/char  {elapsed:6.1f}s")  # fmt: skip
        if time.perf_counter() - t0 > 60 * minutes:
            break
    train_s = time.perf_counter() - t0
    bits = held_out_bits()
    print(f"held-out: {bits:.3f} bits/char after {step} steps, {train_s:.0f}s of training")

    # Sampling: the same params in a decode=True model, one character per call, KV cache.
    # The model has only seen `context` positions: when the cache is full, start a new one
    # from the last context // 2 characters (one prefill call), and go on.
    decoder = make_model(len(chars), width, heads, layers, decode=True)

    @jax.jit
    def next_logits(params, cache, ids):
        h, cache = decoder.apply(params, cache, ids)
        return fl.attend(params["embed"], h[:, -1]), cache

    def prefill(text):
        cache = fl.init_cache(decoder, batch=1, max_len=context)
        return next_logits(params, cache, jnp.array([[lookup[c] for c in text]]))

    prompt = "The import statement"
    logits, cache = prefill(prompt)
    key, out, filled = jax.random.key(seed + 1), [], len(prompt)
    for _ in range(sample_chars):
        key, sub = jax.random.split(key)
        token = jax.random.categorical(sub, logits / 0.8)  # temperature 0.8
        out.append(chars[int(token[0])])
        if filled == context:
            logits, cache = prefill((prompt + "".join(out))[-(context // 2) :])
            filled = context // 2
        else:
            logits, cache = next_logits(params, cache, token[:, None].astype(jnp.int32))
            filled += 1
    sample = prompt + "".join(out)
    print("sample:\n" + sample)
    return {"held_out_bits": bits, "train_losses": losses, "steps": step, "sample": sample,
            "train_seconds": train_s}  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=9.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=1200, help="at most this many steps")
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sample-chars", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    main(a.minutes, a.steps, a.width, a.heads, a.layers, a.context, a.batch_size, a.lr,
         sample_chars=a.sample_chars, seed=a.seed)  # fmt: skip
