"""Export a model's inference function to one file that JAX and NumPy load without fundl.

``export`` lowers ``model.apply(params, state, x, train=False)`` with ``jax.export`` for
the platforms asked (CPU and CUDA by default), the batch axis symbolic, and writes a zip
(a NumPy ``.npz`` archive) holding:

- ``exported.bin``: the serialized ``jax.export.Exported`` (StableHLO and calling
  convention), a function ``f(weights, x)``;
- ``weights/<path>.npy``: its first argument, a dict of the model's params and state
  leaves keyed by their path (``params['body']['w']``, ``state[1].mean``), so the weights
  stay arrays, not constants baked into the program (bfloat16 and other non-NumPy dtypes as
  unsigned-integer views of their bits);
- ``manifest.json``: what the file holds (platforms, input and output shapes, each
  weight's shape and dtype, versions), for people and tools to read.

``np.load(path)`` opens it; :func:`load_exported` is the ten lines a user pastes into a
program that does not have fundl.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fundl.core import Layer, call_at, layer_name

__all__ = ["export", "load_exported"]

_FORMAT = "fundl-export-1"


def export(
    model: Layer,
    params: Any,
    state: Any,
    example_inputs: Any,
    path: str | os.PathLike[str],
    *,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> Path:
    """Writes ``model``'s inference function, params and state to one file at ``path``.

    The function exported is ``x -> model.apply(params, state, x, train=False)[0]`` (no
    key, batch norm on its running statistics, dropout off), lowered by
    ``jax.export.export`` for every platform in ``platforms`` with the first axis of every
    input symbolic (``jax.export.symbolic_shape("b")``), so one file serves any batch size.
    Params and state are the exported function's first argument, stored beside it as
    arrays. Loading it needs JAX and NumPy only (:func:`load_exported`, or the same lines
    pasted, see the "Taking a model out" tutorial).

    Example:
        >>> import os, tempfile, zipfile, jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
        >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 4)))
        >>> path = fl.export(model, params, state, jnp.zeros((1, 4)),
        ...                  os.path.join(tempfile.mkdtemp(), "mlp.npz"))
        >>> names = sorted(zipfile.ZipFile(path).namelist())
        >>> names[:2], len(names)  # and a .npy per weight
        (['exported.bin', 'manifest.json'], 6)

    Args:
        model: the model.
        params: its params (a pytree of arrays).
        state: its state (a pytree of arrays; ``()`` when it has none).
        example_inputs: an example input, array or ``jax.ShapeDtypeStruct`` (or a pytree of
            them), of shape ``(batch, ...)``; only its shapes and dtypes are read, and its
            batch size is not: the file takes any.
        path: the file to write (written atomically: a temporary file, then a rename).
        platforms: the platforms to lower for, among ``"cpu"``, ``"cuda"``, ``"rocm"``,
            ``"tpu"``; the file runs on any of them.

    Returns:
        The path written.

    Raises:
        ValueError: the model cannot be exported (a layer needs a key in inference, or its
            shapes use the batch size as a number), naming the layer's path and the fix; its
            outputs are of a type the file cannot hold; or a leaf of params or state is a
            PRNG key.
    """
    path = Path(path)
    weights = _weights(params, state)
    treedef = jax.tree_util.tree_structure((params, state))
    names = list(weights)

    def infer(named_weights, x):
        p, s = jax.tree_util.tree_unflatten(treedef, [named_weights[n] for n in names])
        return model.apply(p, s, x, train=False)[0]

    specs = _symbolic_batch(example_inputs)
    weight_specs = {n: jax.ShapeDtypeStruct(np.shape(w), w.dtype) for n, w in weights.items()}
    exported = _lower(model, infer, weight_specs, specs, tuple(platforms))
    try:
        program = exported.serialize()
    except ValueError as err:  # an output of a type jax.export cannot name in the file
        raise ValueError(
            f"export: the outputs of {layer_name(model)} cannot be serialized: {err} Return "
            f"arrays in tuples, lists or dicts (e.g. tuple(outputs)), or register the type in "
            f"both the exporting and the loading program."
        ) from None
    _write(path, program, weights, _manifest(model, exported, weights))
    return path


def load_exported(path: str | os.PathLike[str]) -> Callable[[Any], Any]:
    """Loads a file written by :func:`export` as a function ``x -> outputs``.

    Uses JAX and NumPy only: these are the lines the "Taking a model out" tutorial gives to
    paste into a program without fundl. The function runs on any platform the file was
    exported for, at any batch size; it is jitted, and compiles once per input shape.

    Example:
        >>> import os, tempfile, jax, jax.numpy as jnp, fundl as fl
        >>> model = fl.serial(fl.dense(2))
        >>> params, state = model.init(jax.random.key(0), jnp.zeros((1, 3)))
        >>> path = os.path.join(tempfile.mkdtemp(), "m.npz")
        >>> run = fl.load_exported(fl.export(model, params, state, jnp.zeros((1, 3)), path))
        >>> run(jnp.ones((7, 3))).shape
        (7, 2)

    Args:
        path: a file written by :func:`export`.

    Returns:
        A function of one input shaped like the example input given to :func:`export`
        (any batch size), returning the model's outputs.
    """
    with np.load(path, allow_pickle=False) as f:
        exported = jax.export.deserialize(bytearray(f["exported.bin"]))
        (specs, _), _ = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
        weights = {name: f[f"weights/{name}"].view(s.dtype) for name, s in specs.items()}
    weights = jax.device_put(weights)
    call = jax.jit(exported.call)
    return lambda x: call(weights, x)


def _weights(params: Any, state: Any) -> dict[str, np.ndarray]:
    """``{"params['w']": array, "state[1].mean": array, ...}``: the leaves by their path."""
    leaves = jax.tree_util.tree_flatten_with_path({"params": params, "state": state})[0]
    weights = {}
    for p, x in leaves:
        name = _name(p)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            raise ValueError(
                f"export: {name} is a PRNG key array; export stores plain arrays. Keep keys "
                f"out of params and state (pass them to apply as key=)."
            )
        weights[name] = np.asarray(x)
    return weights


def _name(path: tuple[Any, ...]) -> str:
    """``params['body']['w']`` for the key path ``(DictKey('params'), DictKey('body'), ...)``."""
    return f"{path[0].key}{jax.tree_util.keystr(path[1:])}"


def _symbolic_batch(example_inputs: Any) -> Any:
    """``example_inputs`` as ``jax.ShapeDtypeStruct``s whose first axis is the symbol ``b``."""
    (batch,) = jax.export.symbolic_shape("b")

    def spec(x):
        if not np.shape(x):
            raise ValueError(
                f"export: example_inputs has a scalar leaf (dtype {x.dtype}); every input "
                f"needs a leading batch axis, e.g. x[None]."
            )
        return jax.ShapeDtypeStruct((batch, *np.shape(x)[1:]), x.dtype)

    return jax.tree_util.tree_map(spec, example_inputs)


def _lower(
    model: Layer,
    infer: Callable[..., Any],
    weight_specs: Any,
    specs: Any,
    platforms: tuple[str, ...],
) -> jax.export.Exported:
    """``jax.export.export`` of ``infer``; a failure becomes a ``ValueError`` with the fix."""
    fix = (
        "export traces the model with train=False, no key and a symbolic batch size b: make "
        "that layer's inference path need no key, and write its shapes in terms of the "
        "input's (reshape(x.shape[0], -1), not reshape(8, -1); no Python if on x.shape[0])."
    )
    try:
        return jax.export.export(jax.jit(infer), platforms=platforms)(weight_specs, specs)
    except (ValueError, TypeError) as err:  # a fundl layer's error names its path
        raise ValueError(f"export: {err}\n{fix}") from err
    except jax.errors.InconclusiveDimensionOperation as err:
        where = _path(err) or layer_name(model)
        raise ValueError(
            f"export: {where}: a shape depends on the batch size as a number: "
            f"{str(err).splitlines()[0]}\n{fix}"
        ) from err


def _path(err: BaseException) -> str:
    """The model path of the layer that raised ``err``, read from its traceback.

    Combinators call their children through :func:`fundl.core.call_at`; its frames on the
    traceback name the segments (``serial[2]``, ``rnn``), joined as ``with_path`` does.
    """
    segments = []
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is call_at.__code__ and tb.tb_frame.f_locals["segment"]:
            segments.append(tb.tb_frame.f_locals["segment"])
        tb = tb.tb_next
    return "".join(segments[:1]) + "".join(
        s if s.startswith("[") else "." + s for s in segments[1:]
    )


def _manifest(model: Layer, exported: jax.export.Exported, weights: dict[str, Any]) -> dict:
    """What the file holds, as JSON: readable with ``unzip -p model.npz manifest.json``."""
    (_, x_avals), _ = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)
    return {
        "format": _FORMAT,
        "model": layer_name(model),
        "platforms": list(exported.platforms),
        "inputs": [str(a) for a in jax.tree_util.tree_leaves(x_avals)],
        "outputs": [str(a) for a in exported.out_avals],
        "weights": {n: {"shape": list(w.shape), "dtype": w.dtype.name} for n, w in weights.items()},
        "jax_version": jax.__version__,
        "load": "see fundl.load_exported: np.load, jax.export.deserialize, exported.call",
    }


def _write(path: Path, exported: bytes, weights: dict[str, np.ndarray], manifest: dict) -> None:
    """Writes the zip atomically: to a temporary file beside ``path``, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
            zf.writestr("exported.bin", bytes(exported))
            for name, w in weights.items():
                if w.dtype.kind not in "biufc":  # bfloat16, float8...: store the raw bits
                    w = w.view(np.dtype(f"u{w.dtype.itemsize}"))
                with zf.open(f"weights/{name}.npy", "w") as member:
                    np.lib.format.write_array(member, w, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
