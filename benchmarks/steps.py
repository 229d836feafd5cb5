"""Train steps to time: the shared step builders and :func:`measure_train_steps`.

A step is ``step(params, opt_state, loss, x, y) -> (params, opt_state, loss)``, jitted and
donating its params and optimizer state (:func:`make_step`), or a :class:`StatefulStep` for
the libraries whose idiomatic step updates objects in place. :func:`measure_train_steps`
checks that a case's steps compute one loss, then times them (:mod:`benchmarks.timing`) with
XLA's memory and FLOPs accounts (:mod:`benchmarks.costs`).

This module imports no benchmark.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.costs import (
    Speed,
    compiled_flops,
    compiled_memory_bytes,
    memory_high_water,
    speed_note,
    speeds,
    xla_memory_bytes,
)
from benchmarks.timing import CaseResult, measure, with_peak_memory

BF16_RTOL = 3e-2
"""How far the first losses of a bfloat16 case may differ (``measure_train_steps``'s ``rtol``).

bfloat16 keeps 8 significant bits (relative rounding 2**-8 = 0.4%), and the implementations
round in different orders (fused or not, other matmul shapes); a different model gives a loss
off by far more than 3%.
"""


@dataclass(frozen=True)
class GpuRun:
    """The settings of a run at realistic sizes in a low-precision dtype (``--gpu``).

    ``dtype`` is the compute dtype (params stay float32: fundl's layers get ``dtype=``, the
    hand-written and peer steps cast their params inside the loss, :func:`in_dtype`);
    ``peak_tflops`` the chip's peak dense TFLOP/s in that dtype (``None``: unknown, no MFU).
    """

    peak_tflops: float | None = None
    dtype: Any = jnp.bfloat16


def mse(y: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error in ``target``'s dtype (float32 targets: a float32 loss)."""
    return jnp.mean(jnp.square(y.astype(target.dtype) - target))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``(batch, classes)`` logits and integer labels, in float32.

    A no-op cast on float32 logits.
    """
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def cast_params(tree, dtype):
    """``tree`` with its floating leaves cast to ``dtype`` (``None``: ``tree`` unchanged)."""
    if dtype is None:
        return tree

    def cast(a):
        return a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a

    return jax.tree_util.tree_map(cast, tree)


def in_dtype(loss: Callable, dtype) -> Callable:
    """``loss(params, x, y)`` computing in ``dtype``: params and ``x`` cast on entry.

    The mixed-precision setup a user writes by hand around a pure function of its params
    (plain JAX, stax, Flax linen, Haiku, Equinox); the float32 params get float32 grads.
    ``dtype=None`` returns ``loss`` itself.
    """
    if dtype is None:
        return loss
    return lambda p, x, y: loss(cast_params(p, dtype), cast_params(x, dtype), y)


def make_step(loss_of_params: Callable, opt: optax.GradientTransformation):
    """A jitted, donating train step around ``loss_of_params(params, x, y)``."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, loss, x, y):
        loss, grads = jax.value_and_grad(loss_of_params)(params, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class StatefulStep(NamedTuple):
    """A train step that keeps its own state, for :func:`measure_train_steps`.

    For peers whose idiomatic step updates objects in place (Flax NNX's ``nnx.jit`` with an
    ``nnx.Optimizer``): ``step(*carry, x, y)`` returns the next carry, the loss last.
    """

    step: Callable
    carry: tuple


def nnx_train_step(nnx, model, opt: optax.GradientTransformation, loss_of_model: Callable):
    """Flax NNX's documented train step, as a :class:`StatefulStep`.

    ``nnx.jit`` of ``nnx.value_and_grad`` and ``nnx.Optimizer.update``: the model and the
    optimizer are updated in place (``loss_of_model(model, x, y)`` is the loss).

    Args:
        nnx: the ``flax.nnx`` module.
        model: an ``nnx.Module``.
        opt: the optax optimizer.
        loss_of_model: ``loss(model, x, y)``.
    """

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_of_model)(model, x, y)
        optimizer.update(model, grads)
        return loss

    def step(model, optimizer, loss, x, y):
        return model, optimizer, train_step(model, optimizer, x, y)

    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
    return StatefulStep(step, (model, optimizer, jnp.zeros(())))


def chained(step: Callable, carry: tuple, x, y, steps: int) -> Callable[[], None]:
    """A ``run()`` doing ``steps`` train steps, each fed the previous one's outputs."""
    box = [carry]

    def run() -> None:
        c = box[0]
        for _ in range(steps):
            c = step(*c, x, y)
        box[0] = jax.block_until_ready(c)

    return run


def _costs(step: Callable, carry: tuple, x, y, flops: bool) -> tuple[int | None, float | None]:
    """``(XLA memory bytes, XLA FLOPs or None)`` of ``step`` compiled for these arguments."""
    if not flops:
        return xla_memory_bytes(step, *carry, x, y), None
    try:  # one compilation for both accounts
        compiled = step.lower(*carry, x, y).compile()
    except Exception:  # no .lower (Flax NNX's nnx.jit step)
        return None, None
    return compiled_memory_bytes(compiled), compiled_flops(compiled)


def _start(impl, opt: optax.GradientTransformation) -> tuple[Callable, tuple]:
    """``(step, carry)`` of an implementation; a pair gets its own copy of its params."""
    if isinstance(impl, StatefulStep):
        return impl
    step, params = impl
    params = jax.tree_util.tree_map(jnp.array, params)  # own copy: steps donate it
    return step, (params, opt.init(params), jnp.zeros(()))


def measure_train_steps(
    case: str,
    impls: dict[str, tuple[Callable, object] | StatefulStep],
    opt: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    steps: int,
    rounds: int,
    *,
    rtol: float = 1e-4,
    speed: Speed | None = None,
) -> CaseResult:
    """Times train steps made by :func:`make_step`, after checking they compute one loss.

    Each implementation gets its own copy of its params (the steps donate them); its first
    call (trace, compile and one step) is timed as the compile time, and its first loss must
    equal the baseline's (the first entry) to ``rtol``. Each one's memory is XLA's account
    of its compiled step; with ``speed``, the case also gets each one's throughput and MFU
    (:func:`benchmarks.costs.speeds`) and a note of them.

    Args:
        case: the case's name.
        impls: ordered ``{name: (step, initial params)}``, or a :class:`StatefulStep`.
        opt: the optax optimizer the steps use.
        x: the input batch.
        y: the targets (e.g. integer labels, shape ``(batch,)``).
        steps: train steps per timed ``run()``.
        rounds: interleaved rounds.
        rtol: the relative tolerance of the first losses' agreement.
        speed: the work per step, for throughput and MFU (``None``: neither).
    """
    before, _ = memory_high_water()
    runs, first_losses, compile_s, memory, flops = {}, {}, {}, {}, {}
    for name, impl in impls.items():
        step, carry = _start(impl, opt)
        t0 = time.perf_counter()
        carry = jax.block_until_ready(step(*carry, x, y))
        compile_s[name] = time.perf_counter() - t0
        first_losses[name] = float(carry[-1])
        memory[name], flops[name] = _costs(step, carry, x, y, speed is not None)
        runs[name] = chained(step, carry, x, y, steps)
    base_name, base = next(iter(first_losses.items()))
    for name, loss in first_losses.items():
        if not np.isclose(loss, base, rtol=rtol):
            raise RuntimeError(f"{name} computes a different loss: {loss} vs {base_name} {base}")
    res = measure(case, runs, rounds=rounds, unit=f"{steps} steps")
    # the compile time is the first call above (trace, compile and one step)
    timings = [dataclasses.replace(t, compile_s=compile_s[t.name], memory_bytes=memory[t.name])
               for t in res.timings]  # fmt: skip
    res = dataclasses.replace(res, timings=timings)
    if speed is not None:
        speed_of = speeds({t.name: t.median_s for t in timings}, flops, speed, steps)
        res = dataclasses.replace(res, speed=speed_of, notes=[*res.notes, speed_note(speed_of)])
    return with_peak_memory(res, before)


def measure_run(
    gpu: GpuRun | None, case: str, impls: dict, opt, x, y, steps: int, rounds: int, speed: Speed
) -> CaseResult:
    """:func:`measure_train_steps` in float32 (``gpu=None``), or as ``gpu`` says.

    With ``gpu``: the case named with its dtype, first losses to :data:`BF16_RTOL`, and
    throughput and MFU of ``speed`` against ``gpu.peak_tflops``.
    """
    if gpu is None:
        return measure_train_steps(case, impls, opt, x, y, steps, rounds)
    return measure_train_steps(
        f"{case}, {jnp.dtype(gpu.dtype).name}", impls, opt, x, y, steps, rounds,
        rtol=BF16_RTOL, speed=dataclasses.replace(speed, peak_tflops=gpu.peak_tflops),
    )  # fmt: skip
