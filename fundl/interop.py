"""Weight converters between PyTorch and fundl (NumPy and JAX; torch is never imported).

Whole models: :func:`torch_mapping` infers a printable :class:`TorchMapping` between a
fundl model and a PyTorch ``state_dict`` (each fundl path, the PyTorch names it comes from,
the transform); :func:`fundl.from_torch` applies it and :func:`fundl.to_torch_state_dict`
inverts it. The converters below do one layer at a time.

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

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from fundl.core import layer_info, layer_name

__all__ = [
    "from_torch",
    "to_torch_state_dict",
    "torch_mapping",
    "TorchMapping",
    "Rule",
    "Transform",
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
        sd["in_proj_bias"] = np.concatenate(
            [np.asarray(params[n]["b"]) for n in ("query", "key", "value")]
        )
    sd["out_proj.weight"] = np.asarray(params["out"]["w"]).T
    if "b" in params["out"]:
        sd["out_proj.bias"] = np.asarray(params["out"]["b"])
    return sd


# --- whole models: a fundl model <-> a PyTorch state_dict -----------------------------------

# A fundl path: ("params" or "state", key, key, ...), e.g. ("params", 0, "w").
Path = tuple[Any, ...]


class Transform(NamedTuple):
    """How arrays move between PyTorch names and fundl paths, both ways.

    Attributes:
        name: what it does, shown when a mapping is printed, e.g. ``"transpose"``.
        forward: PyTorch arrays (one per source name) -> fundl arrays (one per target path).
        backward: fundl arrays -> PyTorch arrays (for :func:`fundl.to_torch_state_dict`).
    """

    name: str
    forward: Callable[..., tuple[np.ndarray, ...]]
    backward: Callable[..., tuple[np.ndarray, ...]]


class Rule(NamedTuple):
    """One line of a :class:`TorchMapping`: fundl ``targets`` <- PyTorch ``sources``.

    Attributes:
        targets: fundl paths, ``("params", 0, "w")``; empty for a PyTorch buffer fundl does
            not use (``num_batches_tracked``), which the export back writes as zeros.
        sources: PyTorch state-dict names, e.g. ``("0.weight",)``.
        transform: a :class:`Transform` from the sources' arrays to the targets'.
    """

    targets: tuple[Path, ...]
    sources: tuple[str, ...]
    transform: Transform


def _show(path: Path) -> str:
    tree, *keys = path
    return tree + "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys)


class TorchMapping(NamedTuple):
    """An explicit, printable map between a fundl model's params/state and a ``state_dict``.

    Built by :func:`torch_mapping`; edit its ``rules`` (a tuple of :class:`Rule`) to
    override a line, and pass it to :func:`fundl.from_torch` or
    :func:`fundl.to_torch_state_dict`. ``str(mapping)`` lists one rule per line.

    Attributes:
        rules: the rules, in the state dict's order.
        torch_shapes: every PyTorch name's ``(shape, dtype)``, for the export back.
    """

    rules: tuple[Rule, ...]
    torch_shapes: Mapping[str, tuple[tuple[int, ...], str]]

    def __str__(self) -> str:
        lines = []
        for rule in self.rules:
            left = ", ".join(_show(t) for t in rule.targets) or "(unused by fundl)"
            lines.append(f"{left} <- {', '.join(rule.sources)}  [{rule.transform.name}]")
        return "\n".join(lines)


def _same(*xs):
    return tuple(np.asarray(x) for x in xs)


def _t(x):
    return (np.asarray(x).T,)


_COPY = Transform("copy", _same, _same)
_TRANSPOSE = Transform("transpose", _t, _t)
_IGNORE = Transform("ignored", lambda x: (), lambda: ())


def _kernel(x):  # (out, in, *window) -> (*window, in, out)
    x = np.asarray(x)
    return (np.transpose(x, (*range(2, x.ndim), 1, 0)),)


def _kernel_back(w):  # (*window, in, out) -> (out, in, *window)
    w = np.asarray(w)
    return (np.transpose(w, (w.ndim - 1, w.ndim - 2, *range(w.ndim - 2))),)


_KERNEL = Transform("OIHW -> HWIO", _kernel, _kernel_back)


def _flattened(spatial: tuple[int, ...], channels: int) -> Transform:
    """A Linear after a flatten: PyTorch flattens ``(C, *spatial)``, fundl ``(*spatial, C)``."""

    def forward(w):  # (out, C * prod(spatial)) -> (prod(spatial) * C, out)
        w = np.asarray(w).reshape(-1, channels, *spatial)
        return (np.moveaxis(w, 1, -1).reshape(w.shape[0], -1).T,)

    def backward(w):
        w = np.asarray(w).T.reshape(-1, *spatial, channels)
        return (np.moveaxis(w, -1, 1).reshape(w.shape[0], -1),)

    dims = ", ".join(map(str, spatial))
    return Transform(
        f"flatten order (C={channels}, {dims}) -> ({dims}, C), transpose", forward, backward
    )


_SPLIT3 = Transform(
    "split in 3 (query, key, value), transpose",
    lambda w: tuple(p.T for p in np.split(np.asarray(w), 3)),
    lambda *ws: (np.concatenate([np.asarray(w).T for w in ws]),),
)
_SPLIT3_BIAS = Transform(
    "split in 3 (query, key, value)",
    lambda b: tuple(np.split(np.asarray(b), 3)),
    lambda *bs: (np.concatenate([np.asarray(b) for b in bs]),),
)
_SUM = Transform(
    "bias_ih + bias_hh",
    lambda a, b: (np.asarray(a) + np.asarray(b),),
    lambda b: (np.asarray(b), np.zeros_like(np.asarray(b))),
)

# fundl layer kind (its name before "(") -> the PyTorch module kind it maps to.
_KINDS = {
    "dense": "linear",
    "conv": "conv",
    "batch_norm": "batch_norm",
    "layer_norm": "norm",
    "group_norm": "norm",
    "rms_norm": "norm",
    "multi_head_attention": "attention",
    "lstm_cell": "lstm",
    "gru_cell": "gru",
    "simple_rnn_cell": "rnn",
}


class _Leaf(NamedTuple):
    """A fundl layer with params: its kind, path into params/state, display path, info."""

    kind: str
    keys: tuple[Any, ...]
    where: str
    name: str
    flatten: tuple[tuple[int, ...], int] | None  # (spatial, channels) of a preceding flatten


class _Group(NamedTuple):
    """A PyTorch module's entries: its kind and ``{short_name: full_name}``."""

    kind: str
    names: dict[str, str]


def _child_keys(segment: str, node: Any) -> tuple[Any, ...]:
    """The params key a child's segment selects: ``serial[0]`` -> ``(0,)``, ``serial[head]``
    -> ``("head",)``, ``bidirectional.forward`` -> ``("forward",)``, ``residual`` -> ``()``
    (the child's params are the node itself)."""
    if segment.endswith("]"):
        key = segment[segment.rfind("[") + 1 : -1]
        return (int(key),) if isinstance(node, (tuple, list)) else (key,)
    return (segment.rpartition(".")[2],) if "." in segment else ()


def _get(tree: Any, keys: tuple[Any, ...]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _leaves(layer, params, state, keys=(), where="", spec=None) -> Iterator[_Leaf]:
    """The layers with params or state under ``layer``, in order, with their paths.

    ``spec`` (the layer's input, a ``ShapeDtypeStruct``) is followed through ``serial``
    only, to find the shape a ``flatten`` receives: the first dense after it gets it.
    """
    info = layer_info(layer)
    if not info.children:
        if jax.tree_util.tree_leaves((_get(params, keys), _get(state, keys))):
            yield _Leaf(info.name.split("(")[0], keys, where or info.name, info.name, None)
        return
    flat = None
    for segment, child in info.children:
        sub = keys + _child_keys(segment, _get(params, keys))
        path = segment if not where else where + (segment if segment[0] == "[" else "." + segment)
        if layer_name(child) == "flatten" and spec is not None and len(spec.shape) > 2:
            flat = (tuple(spec.shape[1:-1]), spec.shape[-1])
        for leaf in _leaves(
            child, params, state, sub, path, spec if info.name == "serial" else None
        ):
            if flat is not None and leaf.kind == "dense":
                leaf, flat = leaf._replace(flatten=flat), None
            yield leaf
        if info.name == "serial" and spec is not None:
            p, st = _get(params, sub), _get(state, sub)
            spec = jax.eval_shape(lambda p, st, x, c=child: c.apply(p, st, x)[0], p, st, spec)


def _groups(shapes: Mapping[str, tuple[int, ...]]) -> list[_Group]:
    """The state dict's modules in order, each with its kind (``"linear"``, ``"conv"``...)."""
    by_module: dict[str, dict[str, str]] = {}
    for name in shapes:
        module, _, short = name.rpartition(".")
        if module.endswith("out_proj") and module.rpartition(".")[0] in by_module:
            owner = module.rpartition(".")[0]  # nn.MultiheadAttention's out_proj
            if "in_proj_weight" in by_module[owner] or "q_proj_weight" in by_module[owner]:
                module, short = owner, "out_proj." + short
        by_module.setdefault(module, {})[short] = name
    return [_Group(_torch_kind(names, shapes), names) for names in by_module.values()]


def _torch_kind(names: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> str:
    if "in_proj_weight" in names or "q_proj_weight" in names:
        return "attention"
    if "weight_ih_l0" in names:
        gates = shapes[names["weight_ih_l0"]][0] // shapes[names["weight_hh_l0"]][1]
        return {4: "lstm", 3: "gru", 1: "rnn"}.get(gates, "recurrent")
    if "running_mean" in names:
        return "batch_norm"
    rank = len(shapes[names["weight"]]) if "weight" in names else 0
    return {1: "norm", 2: "linear"}.get(rank, "conv" if rank > 2 else "unknown")


def _recurrent_parts(group: _Group) -> list[dict[str, str]]:
    """One ``{weight_ih, weight_hh, bias_ih, bias_hh}`` per layer and direction of an RNN."""
    parts = []
    for layer in range(len(group.names)):
        for sfx in (f"_l{layer}", f"_l{layer}_reverse"):
            if f"weight_ih{sfx}" in group.names:
                parts.append(
                    {
                        w: group.names[f"{w}{sfx}"]
                        for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                        if f"{w}{sfx}" in group.names
                    }
                )
    return parts


def _rules_for(leaf: _Leaf, names: Mapping[str, str]) -> list[Rule]:
    """The rules that fill one fundl layer from one PyTorch module's ``names``."""
    p = ("params", *leaf.keys)

    def one(target, short, transform):
        return [Rule(((*p, target),), (names[short],), transform)] if short in names else []

    if leaf.kind in ("dense", "conv"):
        w_transform = _TRANSPOSE if leaf.kind == "dense" else _KERNEL
        if leaf.flatten is not None:
            w_transform = _flattened(*leaf.flatten)
        return one("w", "weight", w_transform) + one("b", "bias", _COPY)
    if leaf.kind in ("layer_norm", "group_norm", "rms_norm", "batch_norm"):
        rules = one("scale", "weight", _COPY) + one("bias", "bias", _COPY)
        if leaf.kind == "batch_norm":
            s = ("state", *leaf.keys)
            rules += [
                Rule(((*s, "mean"),), (names["running_mean"],), _COPY),
                Rule(((*s, "var"),), (names["running_var"],), _COPY),
            ]
            if "num_batches_tracked" in names:
                rules.append(Rule((), (names["num_batches_tracked"],), _IGNORE))
        return rules
    if leaf.kind == "multi_head_attention":
        qkv = ("query", "key", "value")
        if "in_proj_weight" in names:
            rules = [Rule(tuple((*p, n, "w") for n in qkv), (names["in_proj_weight"],), _SPLIT3)]
        else:  # kdim or vdim differ from embed_dim: three separate projections
            rules = [r for n in qkv for r in one(n, f"{n[0]}_proj_weight", _TRANSPOSE)]
            rules = [r._replace(targets=((*r.targets[0], "w"),)) for r in rules]
        if "in_proj_bias" in names:
            rules.append(
                Rule(tuple((*p, n, "b") for n in qkv), (names["in_proj_bias"],), _SPLIT3_BIAS)
            )
        rules.append(Rule(((*p, "out", "w"),), (names["out_proj.weight"],), _TRANSPOSE))
        if "out_proj.bias" in names:
            rules.append(Rule(((*p, "out", "b"),), (names["out_proj.bias"],), _COPY))
        return rules
    # recurrent cells: names is one layer and direction's {weight_ih, weight_hh, bias_*}
    rules = one("wi", "weight_ih", _TRANSPOSE) + one("wh", "weight_hh", _TRANSPOSE)
    if leaf.kind == "gru_cell":
        return rules + one("bi", "bias_ih", _COPY) + one("bh", "bias_hh", _COPY)
    if "bias_ih" not in names:  # bias=False: fundl's b stays unfilled and is reported
        return rules
    return [*rules, Rule(((*p, "b"),), (names["bias_ih"], names["bias_hh"]), _SUM)]


def _modules(shapes: Mapping[str, tuple[int, ...]]) -> list[_Group]:
    """The PyTorch modules, a stacked or bidirectional RNN split into one per direction."""
    out = []
    for group in _groups(shapes):
        if group.kind in ("lstm", "gru", "rnn"):
            out += [_Group(group.kind, part) for part in _recurrent_parts(group)]
        else:
            out.append(group)
    return out


def _template(model: Any, example_inputs: Any) -> tuple[Any, Any, tuple[Any, ...]]:
    """``(params, state, specs)`` as ``ShapeDtypeStruct`` trees (nothing is allocated)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    specs = tuple(jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in inputs)
    params, state = jax.eval_shape(model.init, jax.random.key(0), *specs)
    return params, state, specs


def _raise(who: str, problems: list[str]) -> None:
    if problems:
        lines = "\n  ".join(problems)
        raise ValueError(
            f"{who}: the PyTorch state dict does not fit the fundl model ({len(problems)} "
            f"problems):\n  {lines}\nFix the PyTorch model, or edit the mapping "
            f"(fl.interop.torch_mapping) and pass it as mapping=."
        )


def torch_mapping(model: Any, state_dict: Mapping[str, Any], example_inputs: Any) -> TorchMapping:
    """Infers the :class:`TorchMapping` between ``model`` and a PyTorch ``state_dict``.

    fundl's layers with params are listed in order by walking the model's layer tree; the
    state dict's entries are grouped by module, in order. The k-th fundl layer of a kind
    takes the k-th PyTorch module of the matching kind: ``dense`` - ``nn.Linear``, ``conv``
    - ``nn.Conv1d/2d/3d``, ``batch_norm`` - ``nn.BatchNorm*``, ``layer_norm`` (and
    ``group_norm``, ``rms_norm``) - ``nn.LayerNorm`` (``GroupNorm``, ``RMSNorm``),
    ``multi_head_attention`` - ``nn.MultiheadAttention``, ``lstm_cell``/``gru_cell``/
    ``simple_rnn_cell`` - one layer and direction of ``nn.LSTM``/``nn.GRU``/``nn.RNN``.
    Matching by kind, not by position, lets modules register in another order than they
    run (``nn.TransformerEncoderLayer`` lists its norms last). The first ``dense`` after a
    ``flatten`` of a ``(batch, *spatial, channels)`` input reorders its weight's columns:
    PyTorch flattens ``(channels, *spatial)``.

    Example:
        >>> import jax, numpy as np, fundl as fl
        >>> model = fl.serial(fl.dense(3), jax.nn.relu, fl.dense(2))
        >>> sd = {"0.weight": np.zeros((3, 4)), "0.bias": np.zeros(3),
        ...       "2.weight": np.zeros((2, 3)), "2.bias": np.zeros(2)}
        >>> print(fl.interop.torch_mapping(model, sd, np.zeros((1, 4), np.float32)))
        params[0].w <- 0.weight  [transpose]
        params[0].b <- 0.bias  [copy]
        params[2].w <- 2.weight  [transpose]
        params[2].b <- 2.bias  [copy]

    Args:
        model: the fundl model.
        state_dict: ``module.state_dict()`` (tensors or arrays), or just its names and
            arrays of the right shapes.
        example_inputs: an input (or tuple of inputs) of the model, ``(batch, ...)``; only
            shapes and dtypes are read.

    Returns:
        The :class:`TorchMapping`.

    Raises:
        ValueError: listing every fundl layer without a PyTorch module to match, every
            PyTorch module left over, and every layer kind with no known counterpart.
    """
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    params, state, specs = _template(model, example_inputs)
    queues: dict[str, list[_Group]] = {}
    for group in _modules(shapes):
        queues.setdefault(group.kind, []).append(group)
    rules, problems = [], []
    for leaf in _leaves(model, params, state, spec=specs[0]):
        kind = _KINDS.get(leaf.kind)
        if kind is None:
            problems.append(f"{leaf.where} ({leaf.name}): no known PyTorch counterpart")
        elif not queues.get(kind):
            problems.append(f"{leaf.where} ({leaf.name}): no PyTorch {kind} module left")
        else:
            rules += _rules_for(leaf, queues[kind].pop(0).names)
    for kind, groups in queues.items():
        for group in groups:
            problems.append(
                f"PyTorch {kind} module {sorted(group.names.values())}: no fundl "
                f"layer left to take it"
            )
    _raise("torch_mapping", problems)
    dtypes = {
        k: str(getattr(v, "dtype", None) or np.asarray(v).dtype) for k, v in state_dict.items()
    }
    torch_shapes = {k: (shapes[k], dtypes[k].removeprefix("torch.")) for k in shapes}
    return TorchMapping(tuple(rules), torch_shapes)


def _keyed(tree: Any) -> dict[Path, Any]:
    """``{path: leaf}`` with paths as :class:`Rule` writes them."""
    out = {}
    for tree_name, sub in (("params", tree[0]), ("state", tree[1])):
        for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
            keys = tuple(getattr(k, "idx", getattr(k, "key", getattr(k, "name", k))) for k in path)
            out[(tree_name, *keys)] = leaf
    return out


def from_torch(
    model: Any,
    state_dict: Mapping[str, Any],
    example_inputs: Any,
    mapping: TorchMapping | None = None,
) -> tuple[Any, Any]:
    """A fundl model's ``(params, state)`` from a whole PyTorch ``state_dict``, in one call.

    The map is ``mapping``, or the one :func:`fundl.interop.torch_mapping` infers (print it
    to see every fundl path, the PyTorch names it comes from, and the transform: transpose,
    ``OIHW -> HWIO`` kernels, ``in_proj_weight`` split into query, key and value, LSTM
    biases summed, a Linear's columns reordered after a flatten). Put the PyTorch module in
    ``eval()`` mode's sense: fundl applies batch norm's running statistics with
    ``train=False``.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, fundl as fl
        >>> model = fl.serial(fl.dense(3), jax.nn.relu, fl.dense(2))
        >>> sd = {"0.weight": np.ones((3, 4)), "0.bias": np.zeros(3),
        ...       "2.weight": np.ones((2, 3)), "2.bias": np.zeros(2)}
        >>> params, state = fl.from_torch(model, sd, jnp.ones((1, 4)))
        >>> jax.tree_util.tree_map(jnp.shape, params)
        ({'b': (3,), 'w': (4, 3)}, (), {'b': (2,), 'w': (3, 2)})

    Args:
        model: the fundl model.
        state_dict: ``module.state_dict()``: PyTorch tensors or NumPy arrays by name.
        example_inputs: an input (or tuple of inputs) of the model; only shapes and dtypes
            are read.
        mapping: a :class:`TorchMapping` to use instead of the inferred one.

    Returns:
        ``(params, state)`` shaped like ``model.init``'s, with its dtypes.

    Raises:
        ValueError: listing, all at once, every PyTorch name the mapping needs and the state
            dict lacks, every name it has and no rule reads, every fundl path no rule fills,
            and every shape mismatch (the fundl path, its shape, the PyTorch name, its shape).
    """
    sd = {k: _np(v) for k, v in state_dict.items()}
    mapping = mapping if mapping is not None else torch_mapping(model, sd, example_inputs)
    params, state, _ = _template(model, example_inputs)
    template = _keyed((params, state))
    filled, problems = {}, []
    for rule in mapping.rules:
        lacking = [n for n in rule.sources if n not in sd]
        if lacking:
            problems.append(f"missing in the state dict: {', '.join(lacking)}")
            continue
        values = rule.transform.forward(*(sd[n] for n in rule.sources))
        for target, value in zip(rule.targets, values, strict=True):
            want = template.get(target)
            if want is None:
                problems.append(f"{_show(target)}: no such path in the fundl model")
            elif tuple(want.shape) != np.shape(value):
                given = ", ".join(f"{n} {sd[n].shape}" for n in rule.sources)
                problems.append(
                    f"shape mismatch: {_show(target)} is {tuple(want.shape)}, "
                    f"{given} gives {np.shape(value)} [{rule.transform.name}]"
                )
            else:
                filled[target] = np.asarray(value, want.dtype)
    read = {n for rule in mapping.rules for n in rule.sources}
    problems += [f"unexpected in the state dict: {n} {sd[n].shape}" for n in sd if n not in read]
    problems += [
        f"not filled: {_show(p)} {tuple(t.shape)}"
        for p, t in template.items()
        if p not in filled and not any(p in r.targets for r in mapping.rules)
    ]
    _raise("from_torch", problems)
    treedef = jax.tree_util.tree_structure((params, state))
    return jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(filled[p]) for p in template])


def to_torch_state_dict(params: Any, state: Any, mapping: TorchMapping) -> dict[str, np.ndarray]:
    """The inverse of :func:`fundl.from_torch`: a PyTorch ``state_dict`` from fundl params.

    Load it with ``module.load_state_dict({k: torch.from_numpy(v) for k, v in
    sd.items()}, strict=True)``. Names fundl does not use (``num_batches_tracked``) are
    written as zeros; a summed LSTM bias goes to ``bias_ih`` with ``bias_hh`` zero.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np, fundl as fl
        >>> model = fl.serial(fl.dense(3), jax.nn.relu, fl.dense(2))
        >>> sd = {"0.weight": np.ones((3, 4)), "0.bias": np.zeros(3),
        ...       "2.weight": np.ones((2, 3)), "2.bias": np.zeros(2)}
        >>> mapping = fl.interop.torch_mapping(model, sd, jnp.ones((1, 4)))
        >>> params, state = fl.from_torch(model, sd, jnp.ones((1, 4)), mapping)
        >>> {k: v.shape for k, v in fl.to_torch_state_dict(params, state, mapping).items()}
        {'0.weight': (3, 4), '0.bias': (3,), '2.weight': (2, 3), '2.bias': (2,)}

    Args:
        params: the model's params.
        state: the model's state.
        mapping: the :class:`TorchMapping` (from :func:`fundl.interop.torch_mapping`).

    Returns:
        ``{name: array}`` in the PyTorch module's order, with its shapes and dtypes.
    """
    values = _keyed((params, state))
    out: dict[str, np.ndarray] = {}
    for rule in mapping.rules:
        if not rule.targets:
            shape, dtype = mapping.torch_shapes[rule.sources[0]]
            arrays = tuple(np.zeros(shape, dtype) for _ in rule.sources)
        else:
            arrays = rule.transform.backward(*(np.asarray(values[t]) for t in rule.targets))
        for name, array in zip(rule.sources, arrays, strict=True):
            dtype = mapping.torch_shapes[name][1]
            out[name] = np.array(array, dtype)  # a writable copy (torch.from_numpy wants one)
    return {k: out[k] for k in mapping.torch_shapes if k in out}
