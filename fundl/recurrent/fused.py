r"""The fused backward pass of :func:`fundl.rnn` (its default for the built-in cells).

JAX's autodiff of ``lax.scan`` accumulates the params' gradients step by step inside the
backward loop. Here a ``jax.custom_vjp`` runs the backward loop on the carry only, stacking
the cotangents of the step's projections, and computes the params' gradients after it, one
matmul over every step (:math:`\sum_t h_{t-1}^\top \delta z_t` for :math:`W_h`, as cuDNN
does). It needs a cell's step in parts, :class:`~fundl.recurrent.cells.StepParts`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fundl.recurrent.cells import Carry, StepParts

try:  # the tracer types of forward-mode autodiff and of vmap (private to JAX)
    from jax._src.interpreters.ad import JVPTracer, LinearizeTracer
    from jax._src.interpreters.batching import BatchTracer
except ImportError:  # pragma: no cover - a JAX that moved them: never fuse by default
    JVPTracer = LinearizeTracer = BatchTracer = None

__all__ = ["fused_scan", "under_forward_mode"]

Masked = Callable[[Carry, Carry, Any, Any], tuple[Carry, Any]]
"""``masked(carry, new_carry, y, m) -> (new_carry, y)``: a step's result, checked against
the carry, with the carry kept and ``y`` zero where ``m`` (``(batch,)``) is False."""


def under_forward_mode(tree: Any) -> bool:
    """Whether forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``) traces a leaf of ``tree``.

    Follows each leaf's tracers inward through ``vmap`` and reverse-mode linearization, the
    transformations that keep their inner values (a ``jit`` or ``checkpoint`` trace hides
    what is outside it). True when JAX's tracer types cannot be imported, to stay correct.
    """
    if JVPTracer is None:  # pragma: no cover
        return True
    for leaf in jax.tree_util.tree_leaves(tree):
        while isinstance(leaf, jax.core.Tracer):
            if isinstance(leaf, JVPTracer):
                return True
            if isinstance(leaf, LinearizeTracer):
                leaf = leaf.primal
            elif isinstance(leaf, BatchTracer):
                leaf = leaf.val
            else:
                break
    return False


def _residual(parts: StepParts, masked: Masked) -> tuple[Callable, Callable, Callable]:
    """How a step's merge input is saved for the backward loop: ``(combine, merge, split)``.

    ``u = combine(xp, zr)`` is what the forward loop saves, ``merge(c, u, m)`` the masked
    merge of it, and ``split(du) -> (dxp, dzr)`` the cotangents of the projections. When the
    merge reads ``xp + zr`` only (``parts.merge_of_sum``) the sum alone is saved.
    """
    if parts.merge_of_sum is not None:

        def combine(xp, zr):
            return xp + zr.astype(xp.dtype)

        def merge(c, u, m):
            return masked(c, *parts.merge_of_sum(c, u), m)

        def split(du):
            return du, du

        return combine, merge, split

    def pair(xp, zr):
        return xp, zr

    def merge_pair(c, u, m):
        return masked(c, *parts.merge(c, *u), m)

    def same(du):
        return du

    return pair, merge_pair, same


def fused_scan(
    parts: StepParts, masked: Masked, hoisted: bool, reverse: bool, unroll: int | bool
) -> Callable:
    """``scan(params, carry, xs, masks) -> (carry, ys)`` with the params' gradients fused.

    Args:
        parts: the cell's step in parts.
        masked: checks a step's result and applies the padding mask (see :data:`Masked`).
        hoisted: ``xs`` is already projected, ``(T, B, G)``; else ``(T, B, in)``.
        reverse: scan from the last step to the first.
        unroll: ``jax.lax.scan``'s ``unroll``.

    Returns:
        A ``jax.custom_vjp`` function of ``params``, ``carry`` (leaves ``(B, H)``), ``xs``
        and ``masks`` (``(T, B)`` booleans or ``None``), returning the final carry and the
        outputs ``ys`` ``(T, B, H)``. Reverse-mode differentiable only.
    """
    combine, merge, split = _residual(parts, masked)

    def forward(params, carry, xs, masks):
        def body(c, inputs):
            x_t, m = inputs
            xp = x_t if hoisted else parts.project(params, x_t)
            u = combine(xp, parts.recur(params, c, xp.dtype))
            new_c, y = merge(c, u, m)
            return new_c, (y, (c, u))

        return jax.lax.scan(body, carry, (xs, masks), reverse=reverse, unroll=unroll)

    @jax.custom_vjp
    def scan(params, carry, xs, masks):
        carry, (ys, _) = forward(params, carry, xs, masks)
        return carry, ys

    def fwd(params, carry, xs, masks):
        carry, (ys, saved) = forward(params, carry, xs, masks)
        return (carry, ys), (params, xs, masks, saved)

    def bwd(res, cts):
        params, xs, masks, (cs, us) = res
        d_carry, d_ys = cts

        def body(dc, inputs):
            c, u, m, dy = inputs
            _, merge_vjp = jax.vjp(lambda c, u: merge(c, u, m), c, u)
            dc_merge, du = merge_vjp((dc, dy))
            dzr = split(du)[1]
            _, recur_vjp = jax.vjp(lambda c: parts.recur(params, c, dzr.dtype), c)
            (dc_recur,) = recur_vjp(dzr)
            return jax.tree_util.tree_map(jnp.add, dc_merge, dc_recur), du

        d_carry, dus = jax.lax.scan(
            body, d_carry, (cs, us, masks, d_ys), reverse=not reverse, unroll=unroll
        )
        d_params, d_xs = _params_grads(parts, hoisted, params, xs, cs, split(dus))
        return d_params, d_carry, d_xs, None

    scan.defvjp(fwd, bwd)
    return scan


def _params_grads(parts: StepParts, hoisted: bool, params, xs, cs, dus) -> tuple[Any, Any]:
    """The params' and inputs' gradients over all steps at once: ``(d_params, d_xs)``.

    One matmul each, over the steps and the batch flattened to one axis (a 2-D matmul,
    which XLA runs fastest). ``cs`` are the carries before each step, leaves ``(T, B, H)``;
    ``dus`` the projections' cotangents ``(dxps, dzrs)``, ``(T, B, G)``.
    """
    dxps, dzrs = dus
    cs, dzrs = _flat(cs), _flat(dzrs)
    _, recur_vjp = jax.vjp(lambda p: parts.recur(p, cs, dzrs.dtype), params)
    (d_params,) = recur_vjp(dzrs)
    if hoisted:
        return d_params, dxps
    _, project_vjp = jax.vjp(parts.project, params, _flat(xs))
    d_project, d_xs = project_vjp(_flat(dxps))
    d_params = jax.tree_util.tree_map(jnp.add, d_params, d_project)
    return d_params, d_xs.reshape(xs.shape)


def _flat(tree: Any) -> Any:
    """Each leaf ``(T, B, ...)`` as ``(T * B, ...)``."""
    return jax.tree_util.tree_map(lambda a: a.reshape((-1, *a.shape[2:])), tree)
