"""The training loop as small parts: pure jitted steps, and ``fit`` that drives them.

Batches are ``(inputs, targets)`` tuples (or ``(inputs, targets, mask)``): the model is
applied to ``inputs`` (one array or one pytree passed as the model's single input), and the
loss is called as ``loss(outputs, targets)``, so optax's losses work as they are:
``optax.softmax_cross_entropy_with_integer_labels`` returns per-example values of shape
``(batch,)``, and the step averages them over the examples whose ``mask`` is true (all of
them when there is no mask). A loss may also return a scalar (already averaged); ``fit``
then needs ``drop_remainder=True`` when the batch size does not divide the data, because a
scalar cannot be re-weighted to ignore padding.

Metrics are plain functions ``metric(outputs, targets) -> values`` in the same shape rules
(per-example values are mask-averaged); a metric whose signature has a ``mask`` keyword (such
as :func:`fundl.accuracy`) receives the mask instead.

Several hosts: the same code runs on a multi-host cluster. Call
``jax.distributed.initialize()`` at the start of every process (on CPU, with
``jax.config.update("jax_cpu_collectives_implementation", "gloo")`` first), build the mesh
over all hosts' devices (``jax.make_mesh((jax.device_count(),), ("data",))``) and pass it as
``fit(..., mesh=mesh)``. Every process runs the same script with the same in-memory data and
seed: the shuffle is derived from the key, so all draw the same batches, and each builds only
its own devices' shards. Give each process its own ``checkpoint_dir`` (e.g. on local disk).
The suite tests two processes on loopback.

The parts, one concern each:

- ``state``: :class:`TrainState` and :func:`init_train_state`;
- ``steps``: the pure step builders (:func:`make_train_step`, :func:`make_eval_step`),
  :func:`evaluate` and the sums of the steps' logs;
- ``data``: the batch sources (in-memory arrays, iterables of batches) and the data checks;
- ``placement``: devices, mesh and shardings;
- ``run``: checkpoints, resuming, and the non-finite loss policy;
- ``callbacks``: :class:`StopTraining`, :func:`early_stopping` and the progress bar;
- ``params``: :func:`freeze` and :func:`graft`;
- ``loop``: :func:`fit`.
"""

from fundl.train.callbacks import StopTraining, early_stopping
from fundl.train.loop import fit
from fundl.train.params import freeze, graft
from fundl.train.run import NonFiniteLossError
from fundl.train.state import TrainState, init_train_state
from fundl.train.steps import evaluate, make_eval_step, make_train_step

__all__ = [
    "TrainState",
    "NonFiniteLossError",
    "init_train_state",
    "make_train_step",
    "make_eval_step",
    "fit",
    "evaluate",
    "early_stopping",
    "freeze",
    "graft",
    "StopTraining",
]
