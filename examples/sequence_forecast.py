"""Forecasting a noisy periodic signal with a GRU, then running it free for 50 steps.

The signal is ``sin(2 pi t / 25) + 0.5 sin(2 pi t / 9)`` plus Gaussian noise (std 0.1). A
GRU reads windows of 64 values and predicts, at every step, the next value (a dense layer
on each step's output). On the held-out end of the signal the script reports the error of
one-step forecasts against two baselines (repeat the last value; the noise floor), then
warms the GRU up on a window, keeps its final carry (``return_carry=True``) and forecasts
50 steps ahead by feeding its own predictions back through the cell, one step at a time.
With matplotlib installed it saves ``sequence_forecast.png`` (truth against forecasts).

    python examples/sequence_forecast.py [--epochs 30] [--plot sequence_forecast.png]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fundl as fl

WINDOW, HORIZON, NOISE = 64, 50, 0.1

cell = fl.gru_cell(32)
encoder = fl.rnn(cell, return_carry=True)  # (batch, time, 1) -> ((batch, time, 32), h)
head = fl.dense(1)  # (batch, time, 32) -> (batch, time, 1)
optimizer = optax.adam(3e-3)


def signal(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(clean, noisy)`` signals of length ``n``, float32."""
    t = np.arange(n, dtype=np.float32)
    clean = np.sin(2 * np.pi * t / 25) + 0.5 * np.sin(2 * np.pi * t / 9)
    noisy = clean + NOISE * np.random.default_rng(seed).standard_normal(n)
    return clean.astype(np.float32), noisy.astype(np.float32)


def windows(series: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``(n, WINDOW, 1)`` and targets (the next values) ``(n, WINDOW, 1)``."""
    starts = range(0, len(series) - WINDOW - 1, stride)
    x = np.stack([series[s : s + WINDOW] for s in starts])[..., None]
    y = np.stack([series[s + 1 : s + WINDOW + 1] for s in starts])[..., None]
    return x, y


def predict(params, x):
    (hs, h), _ = encoder.apply(params["encoder"], (), x)
    return head.apply(params["head"], (), hs)[0], h


def loss_fn(params, x, y):
    return jnp.mean(jnp.square(predict(params, x)[0] - y))


@jax.jit
def train_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def free_run(params, h, first):
    """Feeds each forecast back as the next input, from carry ``h`` and forecast ``first``.

    ``h`` ``(batch, 32)`` is the carry after the warm-up window and ``first`` ``(batch, 1)``
    the forecast of the step after it; returns ``(batch, HORIZON, 1)`` forecasts.
    """

    def step(carry, _):
        h, x_t = carry
        (h, y_t), _ = cell.apply(params["encoder"], (), h, x_t)  # y_t: (batch, 32)
        x_next = head.apply(params["head"], (), y_t)[0]  # (batch, 1)
        return (h, x_next), x_t

    _, xs = jax.lax.scan(step, (h, first), None, length=HORIZON)
    return jnp.swapaxes(xs, 0, 1)


def main(epochs: int = 30, batch_size: int = 32, seed: int = 0, plot: str | None = None):
    clean, noisy = signal(3000, seed)
    split = 2400
    x_train, y_train = windows(noisy[:split], stride=4)
    x_test, y_test = windows(noisy[split:], stride=WINDOW)
    key_enc, key_head = jax.random.split(jax.random.key(seed))
    enc_params, _ = encoder.init(key_enc, x_train[:1])
    head_params, _ = head.init(key_head, jnp.zeros((1, WINDOW, 32)))
    params = {"encoder": enc_params, "head": head_params}
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    steps = len(x_train) // batch_size
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(x_train))
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
        if epoch % 5 == 0 or epoch == epochs:
            print(f"epoch {epoch:2d}  train mse {float(loss):.4f}")

    # One-step forecasts on held-out windows, after a warm-up of 8 steps.
    pred, _ = jax.jit(predict)(params, x_test)
    mse = float(np.mean((np.asarray(pred) - y_test)[:, 8:] ** 2))
    naive = float(np.mean((x_test - y_test)[:, 8:] ** 2))
    print(f"held-out one-step mse: GRU {mse:.4f}, repeat-last-value {naive:.4f}, "
          f"noise floor {NOISE**2:.4f}")  # fmt: skip

    # Free-running forecast: warm up on one window, then predict HORIZON steps.
    start = split + 100
    warm = noisy[start : start + WINDOW][None, :, None]
    pred, h = predict(params, warm)  # h: the carry after the window
    forecast = np.asarray(free_run(params, h, pred[:, -1]))[0, :, 0]
    truth = clean[start + WINDOW : start + WINDOW + HORIZON]
    free_mse = float(np.mean((forecast - truth) ** 2))
    print(f"{HORIZON}-step free-running forecast mse against the clean signal: {free_mse:.4f} "
          f"(signal variance {float(np.var(truth)):.3f})")  # fmt: skip
    if plot:
        save_plot(plot, noisy[start : start + WINDOW + HORIZON], truth, forecast)
    return mse, naive, free_mse


def save_plot(path, history, truth, forecast):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    t = np.arange(len(history))
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(t, history, color="0.7", label="noisy signal")
    ax.plot(t[WINDOW:], truth, color="k", label="clean signal")
    ax.plot(t[WINDOW:], forecast, color="C1", label=f"GRU, {HORIZON} steps free-running")
    ax.axvline(WINDOW - 0.5, color="0.5", linestyle=":")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="sequence_forecast.png")
    args = parser.parse_args()
    main(args.epochs, args.batch_size, args.seed, args.plot)
