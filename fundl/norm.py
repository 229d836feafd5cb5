"""Normalization layers: ``batch_norm``, ``layer_norm``, ``group_norm`` and ``rms_norm``.

``batch_norm`` keeps running statistics in ``state``. All normalize a channels-last input
and end with a learned per-feature affine map ``y = x_hat * scale + bias``. Statistics are
computed in float32 (float64 for float64 inputs) whatever the compute dtype, so bfloat16
models stay stable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.nn import initializers

from fundl.core import Layer, check_floating, default_float_dtype, named

__all__ = ["BatchNormState", "batch_norm", "layer_norm", "group_norm", "rms_norm"]

Initializer = Callable[..., jax.Array]


class BatchNormState(NamedTuple):
    """The running statistics of :func:`batch_norm`.

    Attributes:
        mean: ``(features,)``, the running mean of each feature (starts at 0).
        var: ``(features,)``, the running (biased) variance of each feature (starts at 1).
    """

    mean: jax.Array
    var: jax.Array


def _describe(base: str, **options: tuple[Any, Any]) -> str:
    """``"batch_norm(momentum=0.9)"``: the name with the options that differ from defaults."""
    shown = [f"{k}={v!r}" for k, (v, default) in options.items() if v != default]
    if "(" not in base:  # "batch_norm" -> "batch_norm(...)"; "group_norm(4" keeps its args
        return f"{base}({', '.join(shown)})"
    return base + "".join(f", {s}" for s in shown) + ")"


def _stat_dtype(x: Any) -> jnp.dtype:
    return jnp.dtype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)


def _row(v: jax.Array, ndim: int) -> jax.Array:
    """Reshapes a ``(features,)`` vector to ``(1, ..., 1, features)`` for explicit broadcast."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _check(name: str, x: Any, min_rank: int, shape: str) -> None:
    if x.ndim < min_rank:
        raise ValueError(f"{name}: input has shape {tuple(x.shape)}, expected {shape}.")
    check_floating(name, x)


def _affine_params(key, features, use_scale, use_bias, scale_init, bias_init, param_dtype):
    pdtype = param_dtype or default_float_dtype()
    skey, bkey = jax.random.split(key)
    params = {}
    if use_scale:
        params["scale"] = scale_init(skey, (features,), pdtype)
    if use_bias:
        params["bias"] = bias_init(bkey, (features,), pdtype)
    return params


def _check_features(name: str, params: dict, x: Any) -> None:
    for p in params.values():
        if p.shape != (x.shape[-1],):
            raise ValueError(
                f"{name}: input has {x.shape[-1]} features, params have shape {p.shape}. Feed "
                f"inputs with {p.shape[0]} features or re-init the params on this input."
            )


def _normalize(x, mean, inv, params, cdtype, use_scale, use_bias):
    """``(x - mean) * (inv * scale) + bias``, computed in ``cdtype``.

    ``mean`` and ``inv`` broadcast against ``x`` and are in the statistics dtype; the
    coefficient ``inv * scale`` is formed there too, then the centring, scaling and shift
    run in the compute dtype.
    """
    sdtype = inv.dtype
    a = inv
    if use_scale:
        a = a * _row(params["scale"].astype(sdtype), a.ndim)
    y = (x.astype(cdtype) - mean.astype(cdtype)) * a.astype(cdtype)
    if use_bias:
        y = y + _row(params["bias"].astype(cdtype), y.ndim)
    return y


def batch_norm(
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    scale_init: Initializer = initializers.ones,
    bias_init: Initializer = initializers.zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""Batch normalization (Ioffe and Szegedy, 2015) with running statistics in ``state``.

    Normalizes each feature (the last axis) over all the other axes: the batch and, for
    images, the spatial axes. For ``x`` of shape ``(batch, ..., features)``:

    .. math::

        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \cdot \text{scale} + \text{bias}

    In training mode (``train=True``), :math:`\mu, \sigma^2` are the mean and (biased)
    variance of this batch, and the returned state is updated as
    :math:`m \leftarrow \text{momentum} \cdot m + (1 - \text{momentum}) \cdot \mu` (the
    same for the variance). In inference mode (``train=False``) the running statistics in
    ``state`` are used and returned unchanged, so the layer is an affine map of its input.
    The update is an ordinary output of a pure function, hence exact under ``jit``.

    ``momentum`` is the weight of the old running value, as in Keras and Flax (PyTorch's
    ``momentum=0.1`` is ``momentum=0.9`` here).

    State: :class:`BatchNormState` ``(mean: (features,), var: (features,))``, starting at
    0 and 1. Params: ``{"scale": (features,), "bias": (features,)}`` (each optional).

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> bn = fl.batch_norm(momentum=0.9)
        >>> params, state = bn.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> x = jnp.array([[0.0, 1.0, 2.0], [2.0, 3.0, 6.0]])
        >>> y, state = bn.apply(params, state, x, train=True)
        >>> state.mean
        Array([0.1, 0.2, 0.4], dtype=float32)

    Args:
        momentum: the decay of the running statistics, in ``[0, 1)``.
        epsilon: added to the variance for stability, ``> 0``.
        use_scale: learn the per-feature ``scale`` (else 1).
        use_bias: learn the per-feature ``bias`` (else 0).
        scale_init: initializer for ``scale`` (default ones).
        bias_init: initializer for ``bias`` (default zeros).
        dtype: the compute dtype of the output (``None``: the input's); statistics are
            computed in float32 or float64.
        param_dtype: the storage dtype of params and state (``None``: float32, or float64
            under ``jax_enable_x64``).

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, ..., features)`` to the same shape.
    """
    name = _describe("batch_norm", momentum=(momentum, 0.99), epsilon=(epsilon, 1e-5))
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{name}: momentum must be in [0, 1), got {momentum!r}.")
    if not epsilon > 0.0:
        raise ValueError(f"{name}: epsilon must be > 0, got {epsilon!r}.")
    shape = "(batch, ..., features) with rank >= 2"

    def init(key, x):
        _check(name, x, 2, shape)
        features = x.shape[-1]
        params = _affine_params(
            key, features, use_scale, use_bias, scale_init, bias_init, param_dtype
        )
        sdtype = param_dtype or default_float_dtype()
        state = BatchNormState(jnp.zeros((features,), sdtype), jnp.ones((features,), sdtype))
        return params, state

    def apply(params, state, x, key=None, train=False):
        del key
        _check(name, x, 2, shape)
        _check_features(name, params, x)
        if not isinstance(state, BatchNormState):
            state = BatchNormState(*state)  # e.g. a tuple restored from a checkpoint
        if state.mean.shape != (x.shape[-1],):
            raise ValueError(
                f"{name}: input has {x.shape[-1]} features, the running mean has shape "
                f"{state.mean.shape}. Re-init the state on this input."
            )
        sdtype = _stat_dtype(x)
        if train:
            axes = tuple(range(x.ndim - 1))
            xs = x.astype(sdtype)
            mean = jnp.mean(xs, axis=axes)
            var = jnp.mean(jnp.square(xs - _row(mean, x.ndim)), axis=axes)  # two-pass
            rdtype = state.mean.dtype
            state = BatchNormState(
                momentum * state.mean + (1.0 - momentum) * mean.astype(rdtype),
                momentum * state.var + (1.0 - momentum) * var.astype(rdtype),
            )
        else:
            mean, var = state.mean.astype(sdtype), state.var.astype(sdtype)
        inv = jax.lax.rsqrt(var + epsilon)
        y = _normalize(
            x, _row(mean, x.ndim), _row(inv, x.ndim), params, dtype or x.dtype, use_scale, use_bias
        )
        return y, state

    return named(Layer(init, apply), name)


def layer_norm(
    epsilon: float = 1e-5,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    scale_init: Initializer = initializers.ones,
    bias_init: Initializer = initializers.zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""Layer normalization (Ba et al., 2016): normalizes each example over its features.

    For ``x`` of shape ``(..., features)``, with :math:`\mu, \sigma^2` the mean and variance
    over the last axis: :math:`y = (x - \mu) / \sqrt{\sigma^2 + \epsilon} \cdot
    \text{scale} + \text{bias}`. Same in training and inference; no state.

    Example:
        >>> import jax, jax.numpy as jnp, fundl as fl
        >>> ln = fl.layer_norm()
        >>> params, state = ln.init(jax.random.key(0), jnp.zeros((1, 4)))
        >>> y, _ = ln.apply(params, state, jnp.array([[1.0, 2.0, 3.0, 4.0]]))
        >>> bool(jnp.abs(y.mean()) < 1e-6)
        True

    Args:
        epsilon: added to the variance, ``> 0``.
        use_scale: learn ``scale: (features,)``.
        use_bias: learn ``bias: (features,)``.
        scale_init: initializer for ``scale`` (default ones).
        bias_init: initializer for ``bias`` (default zeros).
        dtype: the compute dtype of the output (``None``: the input's).
        param_dtype: the storage dtype of the params (``None``: the default float dtype).

    Returns:
        A :class:`~fundl.Layer` mapping ``(..., features)`` to the same shape.
    """
    name = _describe("layer_norm", epsilon=(epsilon, 1e-5))
    if not epsilon > 0.0:
        raise ValueError(f"{name}: epsilon must be > 0, got {epsilon!r}.")

    def init(key, x):
        _check(name, x, 1, "(..., features)")
        params = _affine_params(
            key, x.shape[-1], use_scale, use_bias, scale_init, bias_init, param_dtype
        )
        return params, ()

    def apply(params, state, x, key=None, train=False):
        del key, train
        _check(name, x, 1, "(..., features)")
        _check_features(name, params, x)
        xs = x.astype(_stat_dtype(x))
        mean = jnp.mean(xs, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True)
        inv = jax.lax.rsqrt(var + epsilon)
        y = _normalize(x, mean, inv, params, dtype or x.dtype, use_scale, use_bias)
        return y, state

    return named(Layer(init, apply), name)


def group_norm(
    num_groups: int,
    epsilon: float = 1e-5,
    *,
    use_scale: bool = True,
    use_bias: bool = True,
    scale_init: Initializer = initializers.ones,
    bias_init: Initializer = initializers.zeros,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""Group normalization (Wu and He, 2018): per example, over space and channel groups.

    The ``features`` channels of ``x: (batch, *spatial, features)`` are split into
    ``num_groups`` consecutive groups; each example is normalized over its spatial axes
    and the channels of a group, then scaled and shifted per channel. ``num_groups=1`` is
    layer normalization over all non-batch axes; ``num_groups=features`` is instance
    normalization. No state; the same in training and inference.

    Args:
        num_groups: the number of channel groups; must divide ``features``.
        epsilon: added to the variance, ``> 0``.
        use_scale: learn ``scale: (features,)``.
        use_bias: learn ``bias: (features,)``.
        scale_init: initializer for ``scale`` (default ones).
        bias_init: initializer for ``bias`` (default zeros).
        dtype: the compute dtype of the output (``None``: the input's).
        param_dtype: the storage dtype of the params.

    Returns:
        A :class:`~fundl.Layer` mapping ``(batch, *spatial, features)`` to the same shape.
    """
    name = _describe(f"group_norm({num_groups!r}", epsilon=(epsilon, 1e-5))
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"{name}: num_groups must be a positive int, got {num_groups!r}.")
    if not epsilon > 0.0:
        raise ValueError(f"{name}: epsilon must be > 0, got {epsilon!r}.")
    shape = "(batch, *spatial, features) with rank >= 2"

    def check(x):
        _check(name, x, 2, shape)
        if x.shape[-1] % num_groups:
            raise ValueError(
                f"{name}: input has {x.shape[-1]} features (channels), not divisible by "
                f"num_groups={num_groups}. Use a number of groups that divides {x.shape[-1]}."
            )

    def init(key, x):
        check(x)
        params = _affine_params(
            key, x.shape[-1], use_scale, use_bias, scale_init, bias_init, param_dtype
        )
        return params, ()

    def apply(params, state, x, key=None, train=False):
        del key, train
        check(x)
        _check_features(name, params, x)
        features = x.shape[-1]
        grouped = x.astype(_stat_dtype(x)).reshape(
            (*x.shape[:-1], num_groups, features // num_groups)
        )  # (batch, *spatial, groups, features / groups)
        axes = (*range(1, x.ndim - 1), x.ndim)  # spatial axes and the channels in a group
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
        normalized = ((grouped - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
        zero = jnp.zeros((1,) * x.ndim, normalized.dtype)
        one = jnp.ones((1,) * x.ndim, normalized.dtype)
        y = _normalize(normalized, zero, one, params, dtype or x.dtype, use_scale, use_bias)
        return y, state

    return named(Layer(init, apply), name)


def rms_norm(
    epsilon: float = 1e-6,
    *,
    use_scale: bool = True,
    scale_init: Initializer = initializers.ones,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype | None = None,
) -> Layer:
    r"""Root-mean-square normalization (Zhang and Sennrich, 2019), as in T5 and Llama.

    For ``x`` of shape ``(..., features)``: :math:`y = x / \sqrt{\text{mean}(x^2) +
    \epsilon} \cdot \text{scale}`, the mean over the last axis. No centring, no bias, no
    state.

    Args:
        epsilon: added to the mean square, ``> 0``.
        use_scale: learn ``scale: (features,)``.
        scale_init: initializer for ``scale`` (default ones).
        dtype: the compute dtype of the output (``None``: the input's).
        param_dtype: the storage dtype of the params.

    Returns:
        A :class:`~fundl.Layer` mapping ``(..., features)`` to the same shape.
    """
    name = _describe("rms_norm", epsilon=(epsilon, 1e-6))
    if not epsilon > 0.0:
        raise ValueError(f"{name}: epsilon must be > 0, got {epsilon!r}.")

    def init(key, x):
        _check(name, x, 1, "(..., features)")
        params = _affine_params(
            key, x.shape[-1], use_scale, False, scale_init, initializers.zeros, param_dtype
        )
        return params, ()

    def apply(params, state, x, key=None, train=False):
        del key, train
        _check(name, x, 1, "(..., features)")
        _check_features(name, params, x)
        xs = x.astype(_stat_dtype(x))
        inv = jax.lax.rsqrt(jnp.mean(jnp.square(xs), axis=-1, keepdims=True) + epsilon)
        zero = jnp.zeros((1,) * x.ndim, inv.dtype)
        return _normalize(x, zero, inv, params, dtype or x.dtype, use_scale, False), state

    return named(Layer(init, apply), name)
