"""Convert attention weights between PyTorch's ``nn.MultiheadAttention`` and fundl (NumPy only).

PyTorch packs the three input projections into ``in_proj_weight`` of shape ``(3E, E)``
(rows: query, key, value) and computes ``x @ W.T + b``; fundl keeps one ``dense`` per
projection with ``w`` of shape ``(in, out)``. Heads split the projected width the same way
in both (head ``h`` owns features ``[h*D, (h+1)*D)``), so the conversion is a split and a
transpose. Works on anything ``np.asarray`` accepts (torch tensors via ``.detach().numpy()``
or a ``state_dict()``'s values), and never imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["from_torch_multihead_attention", "to_torch_multihead_attention"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def from_torch_multihead_attention(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """fundl params for ``fl.multi_head_attention`` from an ``nn.MultiheadAttention``'s weights.

    Build the fundl layer with the same ``num_heads`` and ``use_bias`` (PyTorch's ``bias``);
    ``batch_first=True`` in PyTorch matches fundl's ``(batch, time, features)`` layout.
    ``add_bias_kv`` and ``add_zero_attn`` have no fundl counterpart and are refused.

    Example:
        >>> import numpy as np
        >>> from fundl.interop_attention import from_torch_multihead_attention
        >>> sd = {"in_proj_weight": np.zeros((12, 4)), "in_proj_bias": np.zeros(12),
        ...       "out_proj.weight": np.zeros((4, 4)), "out_proj.bias": np.zeros(4)}
        >>> params = from_torch_multihead_attention(sd)
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
                f"from_torch_multihead_attention: the module uses add_bias_kv ({extra}), "
                f"which fl.multi_head_attention does not have."
            )
    if "in_proj_weight" in sd:
        weights = np.split(sd["in_proj_weight"], 3, axis=0)  # 3 x (E, E)
    elif {"q_proj_weight", "k_proj_weight", "v_proj_weight"} <= set(sd):
        weights = [sd["q_proj_weight"], sd["k_proj_weight"], sd["v_proj_weight"]]
    else:
        raise ValueError(
            f"from_torch_multihead_attention: expected in_proj_weight or q/k/v_proj_weight "
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


def to_torch_multihead_attention(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
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
            "to_torch_multihead_attention: key/value widths differ from the query's "
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
