"""fundl's own layer cases: one hypothesis strategy per public layer, for the registry.

Each ``*_cases()`` strategy draws a :class:`fundl.testing.LayerCase`: a layer with drawn
options, inputs it accepts, and the output shapes its documentation promises. Sizes stay
tiny: ``check_layer`` checks gradients in float64 by finite differences, and each drawn
shape compiles the layer anew.
"""

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from hypothesis import strategies as st

import fundl as fl
from fundl.core import Layer
from fundl.testing import LayerCase
from fundl.testing.strategies import batch_sizes, feature_sizes, normal_arrays

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "elu": jax.nn.elu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jax.nn.tanh,
    "softmax": jax.nn.softmax,
    "log_softmax": jax.nn.log_softmax,
}


def activations() -> st.SearchStrategy[Callable[[jax.Array], jax.Array]]:
    """The activations of the guide's list, from ``jax.nn``."""
    return st.sampled_from(list(_ACTIVATIONS.values()))


@st.composite
def _leading(draw: st.DrawFn) -> tuple[int, ...]:
    """A batch shape: ``(batch,)`` or ``(batch, time)``."""
    batch = draw(batch_sizes())
    return draw(st.sampled_from([(batch,), (batch, draw(st.integers(1, 3)))]))


@st.composite
def dense_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.dense`` with drawn sizes and ``use_bias``, on ``(batch, in)`` or ``(batch, t, in)``."""
    lead, n_in, n_out = draw(_leading()), draw(feature_sizes()), draw(feature_sizes())
    layer = fl.dense(n_out, use_bias=draw(st.booleans()))
    x = draw(normal_arrays((*lead, n_in)))
    return LayerCase(layer, (x,), (*lead, n_out))


@st.composite
def flatten_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.flatten`` on inputs of rank 1 to 4."""
    shape = (draw(batch_sizes()), *draw(st.lists(st.integers(1, 4), max_size=3)))
    x = draw(normal_arrays(shape))
    return LayerCase(fl.flatten(), (x,), (shape[0], int(np.prod(shape[1:], dtype=int))))


@st.composite
def reshape_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.reshape`` between two factorisations of the same example size."""
    a, b = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    batch = draw(batch_sizes())
    target = draw(st.sampled_from([(b, a), (a * b,), (-1, a)]))
    x = draw(normal_arrays((batch, a, b)))
    out = tuple(a * b // a if d == -1 else d for d in target)
    return LayerCase(fl.reshape(target), (x,), (batch, *out))


@st.composite
def function_cases(draw: st.DrawFn) -> LayerCase:
    """A ``jax.nn`` activation wrapped as a layer."""
    shape = (draw(batch_sizes()), draw(feature_sizes()))
    layer = fl.function(draw(activations()))
    return LayerCase(layer, (draw(normal_arrays(shape)),), shape)


@st.composite
def serial_cases(draw: st.DrawFn) -> LayerCase:
    """An MLP: ``serial`` of dense layers and activations, positional or named."""
    batch, n_in = draw(batch_sizes()), draw(feature_sizes())
    widths = draw(st.lists(feature_sizes(), min_size=1, max_size=3))
    layers: list[Any] = []
    for w in widths:
        layers += [fl.dense(w), draw(activations())]
    layers = layers[:-1]
    if draw(st.booleans()):
        layer = fl.serial(**{f"l{i}": lay for i, lay in enumerate(layers)})
    else:
        layer = fl.serial(*layers)
    return LayerCase(layer, (draw(normal_arrays((batch, n_in))),), (batch, widths[-1]))


@st.composite
def parallel_cases(draw: st.DrawFn) -> LayerCase:
    """``parallel`` of dense layers, one input each."""
    batch, n = draw(batch_sizes()), draw(st.integers(1, 3))
    sizes = [(draw(feature_sizes()), draw(feature_sizes())) for _ in range(n)]
    layer = fl.parallel(*(fl.dense(o) for _, o in sizes))
    inputs = tuple(draw(normal_arrays((batch, i))) for i, _ in sizes)
    return LayerCase(layer, inputs, tuple((batch, o) for _, o in sizes))


@st.composite
def branch_cases(draw: st.DrawFn) -> LayerCase:
    """``branch`` of dense layers merged by ``fan_in_concat`` or ``fan_in_sum``."""
    batch, n_in, n = draw(batch_sizes()), draw(feature_sizes()), draw(st.integers(1, 3))
    x = draw(normal_arrays((batch, n_in)))
    if draw(st.booleans()):
        outs = [draw(feature_sizes()) for _ in range(n)]
        layer = fl.serial(fl.branch(*(fl.dense(o) for o in outs)), fl.fan_in_concat())
        return LayerCase(layer, (x,), (batch, sum(outs)))
    out = draw(feature_sizes())
    layer = fl.serial(fl.branch(*(fl.dense(out) for _ in range(n))), fl.fan_in_sum())
    return LayerCase(layer, (x,), (batch, out))


@st.composite
def remat_cases(draw: st.DrawFn) -> LayerCase:
    """``remat`` of a two-layer MLP, with no policy or ``dots_saveable``."""
    batch, n_in, out = draw(batch_sizes()), draw(feature_sizes()), draw(feature_sizes())
    body = fl.serial(fl.dense(out), draw(activations()), fl.dense(out))
    policy = draw(st.sampled_from([None, jax.checkpoint_policies.dots_saveable]))
    x = draw(normal_arrays((batch, n_in)))
    return LayerCase(fl.remat(body, policy), (x,), (batch, out))


@st.composite
def with_policy_cases(draw: st.DrawFn) -> LayerCase:
    """``with_policy`` around dense -> layer_norm -> dense with the norm kept: the policy's
    casts and keep paths (float32 compute: the contract's gradient checks need it)."""
    batch, n_in, out = draw(batch_sizes()), draw(feature_sizes()), draw(feature_sizes())
    body = fl.serial(fl.dense(out), fl.layer_norm(), fl.dense(out))
    layer = fl.with_policy(body, fl.Policy(keep=("*norm*",)))
    return LayerCase(layer, (draw(normal_arrays((batch, n_in))),), (batch, out))


@st.composite
def residual_cases(draw: st.DrawFn) -> LayerCase:
    """``residual`` around a two-layer MLP that preserves the width."""
    batch, width, hidden = draw(batch_sizes()), draw(feature_sizes()), draw(feature_sizes())
    branch = fl.serial(fl.dense(hidden), draw(activations()), fl.dense(width))
    x = draw(normal_arrays((batch, width)))
    return LayerCase(fl.residual(branch), (x,), (batch, width))


@st.composite
def shared_cases(draw: st.DrawFn) -> LayerCase:
    """``shared`` applying one square dense layer 1 to 3 times."""
    batch, width, times = draw(batch_sizes()), draw(feature_sizes()), draw(st.integers(1, 3))
    layer = fl.shared(fl.serial(fl.dense(width), jax.nn.tanh), times)
    return LayerCase(layer, (draw(normal_arrays((batch, width))),), (batch, width))


# --- attention and transformers -------------------------------------------------------------


@st.composite
def embedding_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.embedding`` on integer ids of shape ``(batch,)`` or ``(batch, time)``."""
    vocab, features, lead = draw(st.integers(1, 10)), draw(feature_sizes()), draw(_leading())
    ids = draw(st.integers(0, 2**32 - 1).map(
        lambda s: np.random.default_rng(s).integers(0, vocab, lead).astype(np.int32)))  # fmt: skip
    return LayerCase(fl.embedding(vocab, features), (ids,), (*lead, features))


def _sequences(draw: st.DrawFn, max_time: int = 4) -> tuple[int, int, int]:
    return draw(batch_sizes(3)), draw(st.integers(1, max_time)), draw(feature_sizes(6))


@st.composite
def sinusoidal_positions_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.sinusoidal_positions`` on ``(batch, time, features)``."""
    shape = _sequences(draw)
    return LayerCase(fl.sinusoidal_positions(), (draw(normal_arrays(shape)),), shape)


@st.composite
def learned_positions_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.learned_positions(max_len)`` on ``(batch, time, features)``, time <= max_len."""
    shape = _sequences(draw)
    max_len = draw(st.integers(shape[1], 6))
    return LayerCase(fl.learned_positions(max_len), (draw(normal_arrays(shape)),), shape)


@st.composite
def attention_masks(draw: st.DrawFn, batch: int, heads: int, q_len: int, kv_len: int) -> Any:
    """``None`` or a boolean mask of one of the accepted layouts, some rows fully masked.

    Layouts: key padding ``(batch, 1, kv_len)``, full ``(batch, q_len, kv_len)``, shared
    ``(q_len, kv_len)`` and per-head ``(batch, heads, q_len, kv_len)``.

    Args:
        batch: the batch size.
        heads: the number of query heads.
        q_len: the query length.
        kv_len: the key/value length.
    """
    kind = draw(st.sampled_from(["none", "padding", "full", "shared", "per_head"]))
    shape = {
        "none": None,
        "padding": (batch, 1, kv_len),
        "full": (batch, q_len, kv_len),
        "shared": (q_len, kv_len),
        "per_head": (batch, heads, q_len, kv_len),
    }[kind]
    if shape is None:
        return None
    p_keep = draw(st.sampled_from([0.5, 0.8, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).random(shape) < p_keep


@st.composite
def multi_head_attention_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.multi_head_attention`` over drawn heads, head dims, kv heads, lengths and masks.

    Self- or cross-attention; grouped-query heads; causal or not; RoPE (self-attention, even
    head dims); every mask layout of :func:`attention_masks`.
    """
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 2))
    head_features = draw(st.integers(1, 3))
    batch, q_len = draw(batch_sizes(2)), draw(st.integers(1, 4))
    cross = draw(st.booleans())
    kv_len = draw(st.integers(1, 4)) if cross else q_len
    d_q = heads * head_features if draw(st.booleans()) else draw(feature_sizes(5))
    explicit_dim = d_q % heads != 0 or draw(st.booleans())
    rope = not cross and draw(st.booleans())
    if rope:
        head_features = 2 * head_features
    out = draw(st.one_of(st.none(), feature_sizes(4)))
    layer = fl.multi_head_attention(
        heads,
        head_features if (explicit_dim or rope) else None,
        num_kv_heads=kv_heads,
        out_features=out,
        use_bias=draw(st.booleans()),
        is_causal=draw(st.booleans()),
        rope_base=10000.0 if rope else None,
        # jax.nn.dot_product_attention's XLA kernel runs its softmax in float32 even on
        # float64 inputs, so float64 finite differences check the explicit kernel only;
        # tests/test_attention.py checks both kernels' numbers against NumPy.
        implementation="explicit",
    )
    q = draw(normal_arrays((batch, q_len, d_q)))
    kv = draw(normal_arrays((batch, kv_len, draw(feature_sizes(5))))) if cross else None
    mask = draw(attention_masks(batch, heads, q_len, kv_len))
    inputs = (q,) if kv is None and mask is None else (q, kv) if mask is None else (q, kv, mask)
    return LayerCase(layer, inputs, (batch, q_len, out or d_q))


def _block_case(draw: st.DrawFn, make: Callable[..., Layer], **extra: Any) -> LayerCase:
    heads = draw(st.integers(1, 2))
    width = heads * draw(st.integers(1, 3)) * (2 if extra.get("rope_base") else 1)  # RoPE: even
    batch, time = draw(batch_sizes(2)), draw(st.integers(1, 4))
    mlp_features = draw(feature_sizes(6))
    layer = make(width, heads, mlp_features=mlp_features, norm=fl.layer_norm(), **extra)
    x = draw(normal_arrays((batch, time, width)))
    mask = draw(st.one_of(st.none(), st.just((batch, 1, time))))
    if mask is None:
        return LayerCase(layer, (x,), (batch, time, width))
    keep = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(mask) < 0.7
    return LayerCase(layer, (x, keep), (batch, time, width))


@st.composite
def encoder_block_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.encoder_block`` with drawn width, heads, MLP size and key-padding masks."""
    return _block_case(draw, fl.encoder_block)


@st.composite
def decoder_block_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.decoder_block`` with drawn width, heads, MLP size, RoPE and padding masks."""
    return _block_case(draw, fl.decoder_block, rope_base=draw(st.sampled_from([None, 100.0])))


@st.composite
def repeat_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.repeat`` of a width-preserving MLP (remat or not) or a decoder block, 1 to 3 copies."""
    n = draw(st.integers(1, 3))
    if draw(st.booleans()):
        batch, width = draw(batch_sizes()), draw(feature_sizes())
        layer = fl.repeat(fl.serial(fl.dense(width), jax.nn.tanh), n, remat=draw(st.booleans()))
        return LayerCase(layer, (draw(normal_arrays((batch, width))),), (batch, width))
    case = _block_case(draw, fl.decoder_block)
    return case._replace(layer=fl.repeat(case.layer, n))


# --- convolution and pooling: 3-D cases are drawn less often than 1-D and 2-D ones -----------


def _spatial_rank() -> st.SearchStrategy[int]:
    return st.sampled_from([1, 1, 2, 2, 3])


@st.composite
def _window_config(draw: st.DrawFn, n: int, max_kernel: int = 3) -> dict[str, Any]:
    kernel = tuple(draw(st.integers(1, max_kernel)) for _ in range(n))
    strides = tuple(draw(st.integers(1, 2)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    spans = tuple(d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True))
    return {"kernel": kernel, "strides": strides, "dilation": dilation, "spans": spans}


@st.composite
def conv_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.conv`` in 1-D to 3-D: drawn kernels, strides, dilations, groups and paddings.

    Paddings are "SAME", "VALID", "CAUSAL" (1-D) and explicit pairs; inputs are at least
    as long as the dilated kernel.
    """
    n = draw(_spatial_rank())
    cfg = draw(_window_config(n))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    n_in, n_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    modes = ["SAME", "VALID", "explicit"] + (["CAUSAL"] if n == 1 else [])
    mode = draw(st.sampled_from(modes))
    pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(n))
    padding = pads if mode == "explicit" else mode
    sizes = tuple(draw(st.integers(k, k + (3 if n < 3 else 1))) for k in cfg["spans"])
    out = []
    for size, k, s, (lo, hi) in zip(sizes, cfg["spans"], cfg["strides"], pads, strict=True):
        if mode in ("SAME", "CAUSAL"):
            out.append(-(-size // s))
        elif mode == "VALID":
            out.append((size - k) // s + 1)
        else:
            out.append((size + lo + hi - k) // s + 1)
    layer = fl.conv(
        n_out,
        cfg["kernel"],
        strides=cfg["strides"],
        padding=padding,
        dilation=cfg["dilation"],
        groups=groups,
        use_bias=draw(st.booleans()),
    )
    batch = draw(st.integers(1, 2))
    x = draw(normal_arrays((batch, *sizes, n_in)))
    return LayerCase(layer, (x,), (batch, *out, n_out))


@st.composite
def conv_transpose_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.conv_transpose`` in 1-D to 3-D: drawn kernels, strides, dilations, groups, paddings."""
    n = draw(_spatial_rank())
    cfg = draw(_window_config(n))
    groups = draw(st.sampled_from([1, 1, 2]))
    n_in, n_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    modes = ["SAME", "VALID", "explicit"] + (["CAUSAL"] if n == 1 else [])
    mode = draw(st.sampled_from(modes))
    pads = tuple(
        (draw(st.integers(0, (k - 1) // 2)), draw(st.integers(0, (k - 1) // 2)))
        for k in cfg["spans"]
    )
    padding = pads if mode == "explicit" else mode
    sizes = tuple(draw(st.integers(1, 3 if n < 3 else 2)) for _ in range(n))
    out = []
    for size, k, s, (lo, hi) in zip(sizes, cfg["spans"], cfg["strides"], pads, strict=True):
        if mode in ("SAME", "CAUSAL"):
            out.append(size * s)
        elif mode == "VALID":
            out.append((size - 1) * s + k)
        else:
            out.append((size - 1) * s + k - lo - hi)
    layer = fl.conv_transpose(
        n_out,
        cfg["kernel"],
        strides=cfg["strides"],
        padding=padding,
        dilation=cfg["dilation"],
        groups=groups,
    )
    batch = draw(st.integers(1, 2))
    x = draw(normal_arrays((batch, *sizes, n_in)))
    return LayerCase(layer, (x,), (batch, *out, n_out))


@st.composite
def pool_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.max_pool`` or ``fl.avg_pool`` in 1-D to 3-D: drawn windows, strides, paddings.

    Strides may be ``None`` (the window); explicit pads stay smaller than the window.
    """
    n = draw(_spatial_rank())
    window = tuple(draw(st.integers(1, 3)) for _ in range(n))
    strides = draw(st.one_of(st.none(), st.tuples(*(st.integers(1, 3) for _ in range(n)))))
    steps = window if strides is None else strides
    mode = draw(st.sampled_from(["SAME", "VALID", "explicit"]))
    pads = tuple((draw(st.integers(0, w - 1)), draw(st.integers(0, w - 1))) for w in window)
    padding = pads if mode == "explicit" else mode
    sizes = tuple(draw(st.integers(w, w + (3 if n < 3 else 1))) for w in window)
    out = []
    for size, w, s, (lo, hi) in zip(sizes, window, steps, pads, strict=True):
        if mode == "SAME":
            out.append(-(-size // s))
        elif mode == "VALID":
            out.append((size - w) // s + 1)
        else:
            out.append((size + lo + hi - w) // s + 1)
    pool = draw(st.sampled_from([fl.max_pool, fl.avg_pool]))
    batch, features = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    x = draw(normal_arrays((batch, *sizes, features)))
    return LayerCase(pool(window, strides, padding), (x,), (batch, *out, features))


@st.composite
def global_pool_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.global_avg_pool`` or ``fl.global_max_pool``, with or without ``keepdims``."""
    n = draw(_spatial_rank())
    sizes = tuple(draw(st.integers(1, 3)) for _ in range(n))
    batch, features = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    keepdims = draw(st.booleans())
    pool = draw(st.sampled_from([fl.global_avg_pool, fl.global_max_pool]))
    x = draw(normal_arrays((batch, *sizes, features)))
    out = (batch, *((1,) * n if keepdims else ()), features)
    return LayerCase(pool(keepdims=keepdims), (x,), out)


@st.composite
def _norm_input(draw: st.DrawFn) -> np.ndarray:
    """``(batch, *spatial, features)`` with 0 to 2 spatial axes and 1 to 6 features."""
    spatial = draw(st.lists(st.integers(1, 3), max_size=2))
    shape = (draw(st.integers(1, 3)), *spatial, draw(st.integers(1, 6)))
    return draw(normal_arrays(shape))


@st.composite
def batch_norm_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.batch_norm`` in training (batch statistics, state update) or inference mode.

    Momentum and the scale/bias options are drawn too.
    """
    x = draw(_norm_input())
    layer = fl.batch_norm(
        momentum=draw(st.sampled_from([0.0, 0.9, 0.99])),
        use_scale=draw(st.booleans()),
        use_bias=draw(st.booleans()),
    )
    return LayerCase(layer, (x,), x.shape, train=draw(st.booleans()))


@st.composite
def layer_norm_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.layer_norm`` with drawn scale/bias options."""
    x = draw(_norm_input())
    layer = fl.layer_norm(use_scale=draw(st.booleans()), use_bias=draw(st.booleans()))
    return LayerCase(layer, (x,), x.shape)


@st.composite
def group_norm_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.group_norm`` with a drawn number of groups dividing the features."""
    x = draw(_norm_input())
    features = x.shape[-1]
    groups = draw(st.sampled_from([g for g in range(1, features + 1) if features % g == 0]))
    return LayerCase(fl.group_norm(groups, use_bias=draw(st.booleans())), (x,), x.shape)


@st.composite
def rms_norm_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.rms_norm`` with or without ``scale``."""
    x = draw(_norm_input())
    return LayerCase(fl.rms_norm(use_scale=draw(st.booleans())), (x,), x.shape)


@st.composite
def dropout_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.dropout`` in training (a fixed key: deterministic) or inference mode.

    Rates include the edge cases 0 and 1.
    """
    x = draw(_norm_input())
    rate = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    return LayerCase(fl.dropout(rate), (x,), x.shape, train=draw(st.booleans()))


# --- recurrent layers -----------------------------------------------------------------------


def _carry_shapes(kind: str, batch: int, features: int) -> Any:
    return ((batch, features), (batch, features)) if kind == "lstm" else (batch, features)


def _make_cell(kind: str, features: int, relu: bool = False) -> fl.Cell:
    if kind == "lstm":
        return fl.lstm_cell(features)
    if kind == "gru":
        return fl.gru_cell(features)
    return fl.simple_rnn_cell(features, activation=jax.nn.relu if relu else jax.nn.tanh)


@st.composite
def cells(draw: st.DrawFn, max_features: int = 4) -> tuple[str, int, fl.Cell]:
    """``(kind, features, cell)``: an LSTM, GRU or simple (tanh or relu) cell of a tiny size.

    Args:
        max_features: the largest state size drawn.
    """
    kind = draw(st.sampled_from(["lstm", "gru", "simple"]))
    features = draw(st.integers(1, max_features))
    return kind, features, _make_cell(kind, features, relu=draw(st.booleans()))


def _cell_case(draw: st.DrawFn, kind: str) -> LayerCase:
    batch, n_in, features = draw(batch_sizes(3)), draw(feature_sizes(3)), draw(feature_sizes(4))
    cell = _make_cell(kind, features, relu=draw(st.booleans()))
    x = draw(normal_arrays((batch, n_in)))
    if kind == "lstm":
        carry: Any = (
            draw(normal_arrays((batch, features))),
            draw(normal_arrays((batch, features))),
        )
    else:
        carry = draw(normal_arrays((batch, features)))
    out = (_carry_shapes(kind, batch, features), (batch, features))
    return LayerCase(cell.layer, (carry, x), out)


@st.composite
def simple_rnn_cell_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.simple_rnn_cell`` (tanh or relu) on one step: inputs ``(h, x_t)``."""
    return _cell_case(draw, "simple")


@st.composite
def lstm_cell_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.lstm_cell`` on one step: inputs ``((h, c), x_t)``."""
    return _cell_case(draw, "lstm")


@st.composite
def gru_cell_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.gru_cell`` on one step: inputs ``(h, x_t)``."""
    return _cell_case(draw, "gru")


def _lengths(draw: st.DrawFn, batch: int, time: int) -> np.ndarray:
    return np.asarray([draw(st.integers(0, time)) for _ in range(batch)], np.int32)


@st.composite
def rnn_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.rnn`` over every cell kind and option, with or without ``lengths``.

    Draws ``return_sequences``, ``return_carry``, ``reverse``, ``unroll``, ``hoist`` and
    ``fused_backward`` (``True`` cases are differentiable in reverse mode only); inputs are
    ``(x,)`` or ``(x, lengths)`` with ``x`` of shape ``(batch, time, in)``.
    """
    kind, features, cell = draw(cells())
    batch, time, n_in = draw(batch_sizes(3)), draw(st.integers(1, 4)), draw(feature_sizes(3))
    seqs, with_carry = draw(st.booleans()), draw(st.booleans())
    fused = draw(st.sampled_from([None, True, False]))
    layer = fl.rnn(
        cell,
        return_sequences=seqs,
        return_carry=with_carry,
        reverse=draw(st.booleans()),
        unroll=draw(st.sampled_from([1, 2])),
        hoist=draw(st.sampled_from([None, True, False])),
        fused_backward=fused,
    )
    x = draw(normal_arrays((batch, time, n_in)))
    inputs: tuple[Any, ...] = (x, _lengths(draw, batch, time)) if draw(st.booleans()) else (x,)
    out: Any = (batch, time, features) if seqs else (batch, features)
    if with_carry:
        out = (out, _carry_shapes(kind, batch, features))
    # fused_backward=True is reverse mode only; None falls back to the plain scan under jvp
    return LayerCase(layer, inputs, out, grad_modes=("rev",) if fused else ("fwd", "rev"))


@st.composite
def bidirectional_cases(draw: st.DrawFn) -> LayerCase:
    """``fl.bidirectional`` of two drawn cells, merged by concat or sum, maybe with lengths."""
    _, h1, fwd = draw(cells())
    merge = draw(st.sampled_from(["concat", "sum"]))
    kind2 = draw(st.sampled_from(["lstm", "gru", "simple"]))
    h2 = h1 if merge == "sum" else draw(feature_sizes(4))
    seqs = draw(st.booleans())
    layer = fl.bidirectional(
        fl.rnn(fwd, return_sequences=seqs),
        fl.rnn(_make_cell(kind2, h2), return_sequences=seqs, reverse=True),
        merge=merge,
    )
    batch, time, n_in = draw(batch_sizes(3)), draw(st.integers(1, 4)), draw(feature_sizes(3))
    x = draw(normal_arrays((batch, time, n_in)))
    inputs: tuple[Any, ...] = (x, _lengths(draw, batch, time)) if draw(st.booleans()) else (x,)
    width = h1 + h2 if merge == "concat" else h1
    return LayerCase(layer, inputs, (batch, time, width) if seqs else (batch, width))


@st.composite
def stacked_rnn_cases(draw: st.DrawFn) -> LayerCase:
    """Two ``fl.rnn`` layers and a dense head in ``fl.serial``: a sequence classifier."""
    _, _, c1 = draw(cells())
    _, _, c2 = draw(cells())
    batch, time, n_in = draw(batch_sizes(3)), draw(st.integers(1, 4)), draw(feature_sizes(3))
    n_out = draw(feature_sizes(3))
    layer = fl.serial(fl.rnn(c1), jax.nn.tanh, fl.rnn(c2, return_sequences=False), fl.dense(n_out))
    x = draw(normal_arrays((batch, time, n_in)))
    return LayerCase(layer, (x,), (batch, n_out))
