"""The common case in one call: what a model's train step and inference cost.

:func:`train_step_cost` times ``fl.make_train_step``'s step on an example batch (examples
per second, FLOPs per example, XLA's memory account, compile time), optionally against
other steps; :func:`inference_cost` does the same for the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from fundl.bench.costs import peak_tflops as device_peak
from fundl.bench.measure import carry_first, compare_calls
from fundl.bench.results import Comparison
from fundl.core import Layer
from fundl.train import init_train_state, make_train_step
from fundl.train.data import n_examples


def _peak(peak_tflops: float | None) -> float | None:
    return peak_tflops if peak_tflops is not None else device_peak()


def train_step_cost(
    model: Layer,
    loss: Callable[[Any, Any], jax.Array],
    optimizer: optax.GradientTransformation,
    example_batch: tuple,
    *,
    against: Mapping[str, tuple[Callable, Any]] | None = None,
    key: jax.Array | None = None,
    rounds: int = 20,
    peak_tflops: float | None = None,
) -> Comparison:
    """The cost of ``model``'s train step: speed, FLOPs, memory and compile time.

    Builds the step with :func:`fundl.make_train_step` and its train state with
    :func:`fundl.init_train_state`, then times it with :func:`fundl.bench.compare` (each call
    fed the previous call's train state), with the steps in ``against`` in the same rounds.

    Args:
        model: the model.
        loss: ``loss(outputs, targets)``, as :func:`fundl.make_train_step` takes it.
        optimizer: an optax optimizer.
        example_batch: ``(inputs, targets)`` of one batch, shapes ``(batch, ...)``; every
            timed step runs on it.
        against: other steps to time in the same rounds, ``{name: (step, state)}`` with
            ``step(state, batch) -> (state, ...)``: e.g. a hand-written step over your own
            ``(params, opt_state)``. fundl's step is ``"fundl"``, the baseline.
        key: the init key (default ``jax.random.key(0)``).
        rounds: interleaved rounds.
        peak_tflops: the chip's peak TFLOP/s for MFU (``None``: by device kind, bfloat16).

    Returns:
        A :class:`fundl.bench.Comparison` in ``"train step"`` units; each timing's
        ``items_per_s`` is examples per second, ``costs.flops / batch`` the FLOPs per example.

    Example:
        >>> import jax, jax.numpy as jnp, optax, fundl as fl
        >>> x, y = jnp.ones((8, 4)), jnp.zeros((8, 2))
        >>> res = fl.bench.train_step_cost(fl.dense(2), lambda out, t: (out - t) ** 2,
        ...                                optax.sgd(0.1), (x, y), rounds=3)
        >>> res["fundl"].items_per_s > 0 and res["fundl"].recompiles
        0
    """
    key = jax.random.key(0) if key is None else key
    inputs = example_batch[0]
    ts = init_train_state(model, optimizer, key, inputs)
    steps = {"fundl": (make_train_step(model, loss, optimizer), ts), **(against or {})}
    n = n_examples(inputs)
    calls = {name: (step, (state, example_batch)) for name, (step, state) in steps.items()}
    return compare_calls(calls, rounds=rounds, unit="train step", next_args=carry_first,
                         items=n, peak=_peak(peak_tflops),
                         case=f"train step, batch {n}")  # fmt: skip


def inference_cost(
    model: Layer,
    example_inputs: Any,
    *,
    params: Any = None,
    state: Any = None,
    against: Mapping[str, Callable[[Any], Any]] | None = None,
    key: jax.Array | None = None,
    rounds: int = 20,
    peak_tflops: float | None = None,
) -> Comparison:
    """The cost of ``model``'s forward pass (``train=False``): speed, FLOPs, memory, compile.

    Args:
        model: the model.
        example_inputs: one batch of inputs, shape ``(batch, ...)``.
        params: the params (``None``: ``model.init(key, example_inputs)``'s).
        state: the model state (``None``: from the same init).
        against: other forward passes to time in the same rounds, ``{name: fn}`` with
            ``fn(inputs)`` (jitted, closing over its own params). fundl's is ``"fundl"``,
            the baseline.
        key: the init key (default ``jax.random.key(0)``).
        rounds: interleaved rounds.
        peak_tflops: the chip's peak TFLOP/s for MFU (``None``: by device kind, bfloat16).

    Returns:
        A :class:`fundl.bench.Comparison` in ``"forward pass"`` units (see
        :func:`train_step_cost`).

    Example:
        >>> import jax.numpy as jnp, fundl as fl
        >>> res = fl.bench.inference_cost(fl.dense(2), jnp.ones((8, 4)), rounds=3)
        >>> res["fundl"].costs.flops >= 2 * 8 * 4 * 2
        True
    """
    if params is None or state is None:
        key = jax.random.key(0) if key is None else key
        p, s = model.init(key, example_inputs)
        params = p if params is None else params
        state = s if state is None else state

    @jax.jit
    def forward(params, state, inputs):
        return model.apply(params, state, inputs)[0]

    calls = {"fundl": (forward, (params, state, example_inputs))}
    calls |= {name: (fn, (example_inputs,)) for name, fn in (against or {}).items()}
    n = n_examples(example_inputs)
    return compare_calls(calls, rounds=rounds, unit="forward pass", items=n,
                         peak=_peak(peak_tflops), case=f"forward pass, batch {n}")  # fmt: skip
