"""Weight converters between PyTorch and fundl (NumPy only; torch is never imported).

Recurrent layers:

PyTorch stores ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` weights gate-major and transposed:
``weight_ih_l{k}`` is ``(G * H, in)``, ``weight_hh_l{k}`` is ``(G * H, H)``, with two biases
``bias_ih_l{k}`` and ``bias_hh_l{k}`` of shape ``(G * H,)`` (``_reverse`` is appended for the
backward direction of a bidirectional layer). fundl's cells use the same gate order, so
converting is a transpose, plus summing the two biases for the LSTM and the simple RNN,
whose formulas only see their sum. Pass NumPy arrays, e.g. ``{k: v.detach().numpy() for k,
v in module.state_dict().items()}``.

Example:
    >>> import numpy as np, fundl as fl
    >>> H, n_in = 4, 3
    >>> sd = {"weight_ih_l0": np.ones((4 * H, n_in)), "weight_hh_l0": np.ones((4 * H, H)),
    ...       "bias_ih_l0": np.ones(4 * H), "bias_hh_l0": np.ones(4 * H)}
    >>> params = fl.interop.lstm_from_torch(sd)
    >>> {k: v.shape for k, v in params.items()}
    {'wi': (3, 16), 'wh': (4, 16), 'b': (16,)}
    >>> sorted(fl.interop.lstm_to_torch(params))
    ['bias_hh_l0', 'bias_ih_l0', 'weight_hh_l0', 'weight_ih_l0']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "lstm_from_torch",
    "lstm_to_torch",
    "gru_from_torch",
    "gru_to_torch",
    "simple_rnn_from_torch",
    "simple_rnn_to_torch",
    "mha_from_torch",
    "mha_to_torch",
]


def _suffix(layer: int, reverse: bool) -> str:
    return f"_l{layer}" + ("_reverse" if reverse else "")


def _read(who: str, state_dict: Mapping[str, Any], sfx: str, gates: int) -> dict[str, np.ndarray]:
    names = [f"{w}{sfx}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    missing = [n for n in names[:2] if n not in state_dict]
    if missing:
        raise ValueError(
            f"{who}: the state dict has no {missing}; it has {sorted(state_dict)}. Check the "
            f"layer index and reverse= (bidirectional layers add '_reverse')."
        )
    w_ih, w_hh = np.asarray(state_dict[names[0]]), np.asarray(state_dict[names[1]])
    hidden = w_hh.shape[1] if w_hh.ndim == 2 else -1
    if w_hh.shape != (gates * hidden, hidden) or w_ih.ndim != 2 or w_ih.shape[0] != gates * hidden:
        raise ValueError(
            f"{who}: expected {names[0]} of shape ({gates}*H, in) and {names[1]} of shape "
            f"({gates}*H, H); got {w_ih.shape} and {w_hh.shape}. Is this the right kind of "
            f"layer (LSTM: 4 gates, GRU: 3, RNN: 1)? proj_size is not supported."
        )
    zeros = np.zeros((gates * hidden,), w_ih.dtype)
    b_ih = np.array(state_dict.get(names[2], zeros))
    b_hh = np.array(state_dict.get(names[3], zeros))
    return {"wi": w_ih.T.copy(), "wh": w_hh.T.copy(), "bi": b_ih, "bh": b_hh}


def _write(params: Mapping[str, Any], sfx: str, b_ih: Any, b_hh: Any) -> dict[str, np.ndarray]:
    return {
        f"weight_ih{sfx}": np.array(params["wi"]).T.copy(),
        f"weight_hh{sfx}": np.array(params["wh"]).T.copy(),
        f"bias_ih{sfx}": np.array(b_ih),
        f"bias_hh{sfx}": np.array(b_hh),
    }


def lstm_from_torch(
    state_dict: Mapping[str, Any], layer: int = 0, reverse: bool = False
) -> dict[str, np.ndarray]:
    """``nn.LSTM`` weights of one layer and direction -> :func:`fundl.lstm_cell` params.

    Args:
        state_dict: arrays by PyTorch name, ``weight_ih_l0`` ``(4H, in)``, ``weight_hh_l0``
            ``(4H, H)``, ``bias_ih_l0`` and ``bias_hh_l0`` ``(4H,)`` (biases optional).
        layer: which stacked layer, the ``k`` of ``_l{k}``.
        reverse: read the backward direction (``_reverse``) of a bidirectional LSTM.

    Returns:
        ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}`` with ``b = bias_ih + bias_hh``.
    """
    p = _read("lstm_from_torch", state_dict, _suffix(layer, reverse), 4)
    return {"wi": p["wi"], "wh": p["wh"], "b": p["bi"] + p["bh"]}


def lstm_to_torch(
    params: Mapping[str, Any], layer: int = 0, reverse: bool = False
) -> dict[str, np.ndarray]:
    """:func:`fundl.lstm_cell` params -> ``nn.LSTM`` state-dict arrays for one layer.

    The bias goes to ``bias_ih``; ``bias_hh`` is zeros (PyTorch only uses their sum).

    Args:
        params: ``{"wi": (in, 4H), "wh": (H, 4H), "b": (4H,)}``.
        layer: the ``k`` of the ``_l{k}`` names.
        reverse: write the names of the backward direction (``_reverse``).

    Returns:
        ``{"weight_ih_l0": (4H, in), "weight_hh_l0": (4H, H), "bias_ih_l0": (4H,),
        "bias_hh_l0": (4H,)}`` as NumPy arrays (for ``load_state_dict``, wrap each with
        ``torch.from_numpy``).
    """
    b = np.asarray(params["b"])
    return _write(params, _suffix(layer, reverse), b, np.zeros_like(b))


def gru_from_torch(
    state_dict: Mapping[str, Any], layer: int = 0, reverse: bool = False
) -> dict[str, np.ndarray]:
    """``nn.GRU`` weights of one layer and direction -> :func:`fundl.gru_cell` params.

    Args:
        state_dict: arrays by PyTorch name, ``weight_ih_l0`` ``(3H, in)``, ``weight_hh_l0``
            ``(3H, H)``, ``bias_ih_l0`` and ``bias_hh_l0`` ``(3H,)`` (biases optional).
        layer: which stacked layer, the ``k`` of ``_l{k}``.
        reverse: read the backward direction (``_reverse``) of a bidirectional GRU.

    Returns:
        ``{"wi": (in, 3H), "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``.
    """
    return _read("gru_from_torch", state_dict, _suffix(layer, reverse), 3)


def gru_to_torch(
    params: Mapping[str, Any], layer: int = 0, reverse: bool = False
) -> dict[str, np.ndarray]:
    """:func:`fundl.gru_cell` params -> ``nn.GRU`` state-dict arrays for one layer.

    Args:
        params: ``{"wi": (in, 3H), "wh": (H, 3H), "bi": (3H,), "bh": (3H,)}``.
        layer: the ``k`` of the ``_l{k}`` names.
        reverse: write the names of the backward direction (``_reverse``).

    Returns:
        ``weight_ih`` ``(3H, in)``, ``weight_hh`` ``(3H, H)``, ``bias_ih`` and ``bias_hh``
        ``(3H,)``, as writable NumPy copies.
    """
    return _write(params, _suffix(layer, reverse), params["bi"], params["bh"])


def simple_rnn_from_torch(
    state_dict: Mapping[str, Any], layer: int = 0, reverse: bool = False
) -> dict[str, np.ndarray]:
    """``nn.RNN`` weights of one layer and direction -> :func:`fundl.simple_rnn_cell` params.

    Use the same ``nonlinearity`` (``activation=jax.nn.relu`` for ``"relu"``).

    Args:
        state_dict: arrays by PyTorch name, ``weight_ih_l0`` ``(H, in)``, ``weight_hh_l0``
            ``(H, H)``, ``bias_ih_l0`` and ``bias_hh_l0`` ``(H,)`` (biases optional).
        layer: which stacked layer.
        reverse: read the backward direction of a bidirectional RNN.

    Returns:
        ``{"wi": (in, H), "wh": (H, H), "b": (H,)}`` with ``b = bias_ih + bias_hh``.
    """
    p = _read("simple_rnn_from_torch", state_dict, _suffix(layer, reverse), 1)
    return {"wi": p["wi"], "wh": p["wh"], "b": p["bi"] + p["bh"]}


def simple_rnn_to_torch(
    params: Mapping[str, Any], layer: int = 0, reverse: bool = False
) -> dict[str, np.ndarray]:
    """:func:`fundl.simple_rnn_cell` params -> ``nn.RNN`` state-dict arrays for one layer.

    Args:
        params: ``{"wi": (in, H), "wh": (H, H), "b": (H,)}``.
        layer: the ``k`` of the ``_l{k}`` names.
        reverse: write the names of the backward direction.

    Returns:
        ``weight_ih`` ``(H, in)``, ``weight_hh`` ``(H, H)``, ``bias_ih`` (the bias) and
        ``bias_hh`` (zeros), as NumPy arrays.
    """
    b = np.asarray(params["b"])
    return _write(params, _suffix(layer, reverse), b, np.zeros_like(b))


# --- attention: nn.MultiheadAttention <-> fl.multi_head_attention --------------------------


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def mha_from_torch(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """fundl params for ``fl.multi_head_attention`` from an ``nn.MultiheadAttention``'s weights.

    Build the fundl layer with the same ``num_heads`` and ``use_bias`` (PyTorch's ``bias``);
    ``batch_first=True`` in PyTorch matches fundl's ``(batch, time, features)`` layout.
    ``add_bias_kv`` and ``add_zero_attn`` have no fundl counterpart and are refused.

    Example:
        >>> import numpy as np
        >>> from fundl.interop import mha_from_torch
        >>> sd = {"in_proj_weight": np.zeros((12, 4)), "in_proj_bias": np.zeros(12),
        ...       "out_proj.weight": np.zeros((4, 4)), "out_proj.bias": np.zeros(4)}
        >>> params = mha_from_torch(sd)
        >>> {name: p["w"].shape for name, p in params.items()}
        {'query': (4, 4), 'key': (4, 4), 'value': (4, 4), 'out': (4, 4)}

    Args:
        state_dict: ``module.state_dict()``: ``in_proj_weight (3E, E)`` (or
            ``q_proj_weight (E, E)``, ``k_proj_weight (E, kdim)``, ``v_proj_weight (E,
            vdim)`` when ``kdim``/``vdim`` differ from ``E``), ``in_proj_bias (3E,)``,
            ``out_proj.weight (E, E)``, ``out_proj.bias (E,)``; tensors or arrays.

    Returns:
        ``{"query": {"w", "b"}, "key": ..., "value": ..., "out": ...}`` as NumPy arrays
        (``w`` of shape ``(in, out)``); no ``"b"`` entries when the module has no biases.
    """
    sd = {k: _np(v) for k, v in state_dict.items()}
    for extra in ("bias_k", "bias_v"):
        if extra in sd:
            raise ValueError(
                f"mha_from_torch: the module uses add_bias_kv ({extra}), "
                f"which fl.multi_head_attention does not have."
            )
    if "in_proj_weight" in sd:
        weights = np.split(sd["in_proj_weight"], 3, axis=0)  # 3 x (E, E)
    elif {"q_proj_weight", "k_proj_weight", "v_proj_weight"} <= set(sd):
        weights = [sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]]
    else:
        raise ValueError(
            f"mha_from_torch: expected in_proj_weight or q/k/v_proj_weight "
            f"and out_proj.weight, got keys {sorted(sd)}. Pass module.state_dict()."
        )
    biases = np.split(sd["in_proj_bias"], 3) if "in_proj_bias" in sd else [None] * 3
    params: dict[str, dict[str, Any]] = {}
    for name, w, b in zip(("query", "key", "value"), weights, biases, strict=True):
        params[name] = {"w": w.T.copy()} if b is None else {"w": w.T.copy(), "b": b.copy()}
    params["out"] = {"w": sd["out_proj.weight"].T.copy()}
    if "out_proj.bias" in sd:
        params["out"]["b"] = sd["out_proj.bias"].copy()
    return params


def mha_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The inverse: an ``nn.MultiheadAttention`` ``state_dict`` (NumPy) from fundl params.

    Only standard attention maps (``num_kv_heads == num_heads``, query/key/value of width
    ``E``); load it with ``module.load_state_dict({k: torch.from_numpy(v) ...})``.

    Args:
        params: the params of ``fl.multi_head_attention``.

    Returns:
        ``{"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}`` (or
        ``q/k/v_proj_weight`` when the key/value input width differs from the query's).
    """
    ws = [np.asarray(params[n]["w"]).T for n in ("query", "key", "value")]
    if len({w.shape[0] for w in ws}) != 1:
        raise ValueError(
            "mha_to_torch: key/value widths differ from the query's "
            f"({[w.shape[0] for w in ws]}): grouped-query attention has no nn.MultiheadAttention "
            "counterpart."
        )
    sd: dict[str, np.ndarray] = {}
    if len({w.shape for w in ws}) == 1:
        sd["in_proj_weight"] = np.concatenate(ws, axis=0)
    else:
        sd.update(q_proj_weight=ws[0], k_proj_weight=ws[1], v_proj_weight=ws[2])
    if "b" in params["query"]:
        sd["in_proj_bias"] = np.concatenate([np.asarray(params[n]["b"])
                                             for n in ("query", "key", "value")])  # fmt: skip
    sd["out_proj.weight"] = np.asarray(params["out"]["w"]).T
    if "b" in params["out"]:
        sd["out_proj.bias"] = np.asarray(params["out"]["b"])
    return sd
