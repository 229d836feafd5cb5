"""Start-up costs, each in fresh processes: re-runs with the compilation cache, and first steps.

    python -m benchmarks --suite startup      # or: python -m benchmarks.startup [--quick]

Every sample is a new Python process (``sys.executable -c``), so nothing is warm but what a
user's second run has: the disk cache of compiled programs (:mod:`fundl.compilation_cache`),
Python's bytecode cache and the operating system's file cache. Three cases, implementations
interleaved round by round:

- ``examples/mnist_mlp.py`` from the process's start to the end of its first epoch (a
  callback added to ``fl.fit`` by the driver stamps the time and ends the process): cache off,
  first run (an empty cache directory) and second run (the directory the first one wrote);
  and, for the floor under them, a process that only imports jax. Target: second run / first
  run <= 1/3.
- ``fit``'s total on the digits (the ``fit`` suite's ``fl.fit K=45``: 20 epochs, batch 32,
  from building the model to the end of the last epoch) with the cache off and warm, against
  Keras 3's ``model.fit`` in its own fresh process (Keras keeps no compiled programs between
  processes). Target: warm fit / Keras <= 1/3.
- Time to first step: from before the first import to the first finished train step of the
  seed MLP (784-128-64-10, adam, batch 8), fundl (``init_train_state`` and
  ``make_train_step``) against the same written in plain JAX and optax. The notes split the
  time into imports (jax, optax, fundl) and JAX's tracing, lowering and compiling (its
  monitoring events, summed over every program the process compiled), with fundl's cache off
  (both run as a first run does); and fundl's second run with ``fl.cache_compilations()``
  called after its import.

``--quick`` (a smoke run, not a measurement): one round, 2 epochs for ``fit``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import peers
from benchmarks.report import main
from benchmarks.timing import CaseResult, summary, with_ratios

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "mnist_mlp.py"

_STAMP = """
import os, sys, time  # loaded with the interpreter already
def stamp(**values):
    import json
    print("@result " + json.dumps(values), flush=True)
"""
"""Every child's first lines: ``stamp(**values)`` reports its figures to :func:`child`."""

_EXAMPLE_DRIVER = """
import runpy
import fundl as fl
_fit = fl.fit
def fit(*args, callbacks=(), **kwargs):
    start = time.time()
    def first_epoch(epoch, logs, train_state):
        stamp(fit=start, end=time.time())
        os._exit(0)
    return _fit(*args, callbacks=(*callbacks, first_epoch), **kwargs)
fl.fit = fit
sys.argv = [{path!r}]
runpy.run_path({path!r}, run_name="__main__")
"""

_IMPORT_JAX = """
import jax
stamp(fit=time.time(), end=time.time())
"""

_FIT_DRIVER = """
import fundl as fl
from benchmarks import fit_bench, peers
(x, y), _ = fl.datasets.digits_split()
cpu0 = time.process_time()
if {keras!r}:
    t0, stamps = fit_bench.run_keras(peers.find("keras 3")[0], x, y, {epochs})
else:
    t0, stamps = fit_bench.run_fit(x, y, {epochs}, -(-len(x) // fit_bench.BATCH))
stamp(total=stamps[-1] - t0, first=stamps[0] - t0, cpu=time.process_time() - cpu0)
"""

_LABELS = {"jax": "import jax", "optax": "import optax", "lib": "import fundl",
           "jaxpr_trace_duration": "tracing", "jaxpr_to_mlir_module_duration": "lowering",
           "backend_compile_duration": "compiling (or loading)",
           "cache_retrieval_time_sec": "of which reading the cache"}  # fmt: skip
"""The parts of the time to first step, by their key in a child's figures."""

_COMPILE_EVENTS = """
import jax
from collections import Counter
spent = Counter()
def _listen(event, duration, **kwargs):
    spent[event.rsplit("/", 1)[-1]] += duration
jax.monitoring.register_event_duration_secs_listener(_listen)
"""

_FIRST_STEP_FUNDL = """
import numpy as np
import optax
t_optax = time.perf_counter()
import fundl as fl
t_lib = time.perf_counter()
model = fl.serial(fl.flatten(), fl.dense(128), jax.nn.relu, fl.dense(64), jax.nn.relu,
                  fl.dense(10))
x, y = np.zeros((8, 28, 28), np.float32), np.zeros(8, np.int32)
opt = optax.adam(1e-3)
ts = fl.init_train_state(model, opt, jax.random.key(0), x)
step = fl.make_train_step(model, optax.softmax_cross_entropy_with_integer_labels, opt)
ts, logs = step(ts, (x, y))
jax.block_until_ready(logs)
"""

_FIRST_STEP_PLAIN = """
import functools
import jax.numpy as jnp
import numpy as np
import optax
t_optax = t_lib = time.perf_counter()
sizes = [(784, 128), (128, 64), (64, 10)]
keys = jax.random.split(jax.random.key(0), len(sizes))
init = jax.nn.initializers.glorot_uniform()
params = [(init(k, s), jnp.zeros(s[1])) for k, s in zip(keys, sizes)]
opt = optax.adam(1e-3)
opt_state = opt.init(params)

def loss_fn(params, x, y):
    h = x.reshape(x.shape[0], -1)
    for w, b in params[:-1]:
        h = jax.nn.relu(h @ w + b)
    w, b = params[-1]
    return optax.softmax_cross_entropy_with_integer_labels(h @ w + b, y).mean()

@functools.partial(jax.jit, donate_argnums=(0, 1))
def step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

x, y = np.zeros((8, 28, 28), np.float32), np.zeros(8, np.int32)
params, opt_state, loss = step(params, opt_state, x, y)
jax.block_until_ready(loss)
"""

_FIRST_STEP = """
t0, cpu0 = time.perf_counter(), time.process_time()
import jax
t_jax = time.perf_counter()
{events}
{body}
t_end = time.perf_counter()
stamp(total=t_end - t0, cpu=time.process_time() - cpu0, jax=t_jax - t0,
      optax=t_optax - t_jax, lib=t_lib - t_optax, **dict(spent))
"""


def child(code: str, cache: str | os.PathLike[str] | None) -> tuple[dict, float, float]:
    """Runs ``code`` in a fresh interpreter: ``(its stamped values, the time.time() of its
    spawn, its CPU time in seconds)``.

    ``cache``: the value of ``FUNDL_COMPILATION_CACHE`` (``"0"``: off; a directory).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
           os.environ.get("PYTHONPATH")])), "FUNDL_COMPILATION_CACHE": str(cache)}  # fmt: skip
    # Python's default: modules' bytecode cached in __pycache__, as a user's second run has
    # it (pip writes it at install; without it importing fundl takes 0.1 s, not 0.02 s)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    cpu_before, start = _children_cpu(), time.time()
    proc = subprocess.run([sys.executable, "-c", _STAMP + code], cwd=ROOT, env=env, text=True,
                          capture_output=True, check=False, timeout=600)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@result ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"startup child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("@result ")), start, _children_cpu() - cpu_before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def example_case(rounds: int) -> CaseResult:
    """``examples/mnist_mlp.py`` to the end of its first epoch: cache off, first, second run."""
    code = _EXAMPLE_DRIVER.format(path=str(EXAMPLE))
    names = ("first run", "second run", "cache off", "import jax only")
    samples: dict[str, list[float]] = {name: [] for name in names}
    in_fit: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            runs = (("first run", code, cache), ("second run", code, cache),
                    ("cache off", code, "0"), ("import jax only", _IMPORT_JAX, "0"))  # fmt: skip
            for name, source, where in runs:
                result, start, cpu_s = child(source, where)
                samples[name].append(result["end"] - start)
                cpu[name].append(cpu_s)
                in_fit[name].append(result["end"] - result["fit"])
    timings = with_ratios([summary(n, statistics.median(in_fit[n]), s, cpu[n])
                           for n, s in samples.items()])  # fmt: skip
    first, second = (statistics.median(samples[n]) for n in ("first run", "second run"))
    cpu_first, cpu_second = (statistics.median(cpu[n]) for n in ("first run", "second run"))
    fit_first, fit_second = (statistics.median(in_fit[n]) for n in ("first run", "second run"))
    notes = [f"second run / first run = {second / first:.2f} (target <= 1/3); in CPU time "
             f"{cpu_second / cpu_first:.2f}; median of {rounds} round(s), each a fresh cache "
             "directory",
             f"inside fl.fit (its call to the end of epoch 1): first run {fit_first:.2f}s, "
             f"second run {fit_second:.2f}s, ratio {fit_second / fit_first:.2f} (the compile "
             "column)"]  # fmt: skip
    return CaseResult("examples/mnist_mlp.py, process start to the end of epoch 1",
                      "run", timings, notes)  # fmt: skip


def fit_case(rounds: int, epochs: int) -> CaseResult:
    """``fit``'s total (K=45, cache off and warm) against Keras 3's, fresh processes."""
    keras, missing = peers.find("keras 3")
    impls = {"fl.fit K=45, cache off": (False, "0"), "fl.fit K=45, warm cache": (False, None)}
    if keras is not None:
        impls = {"Keras 3 fit": (True, "0"), **impls}
    samples: dict[str, list[float]] = {n: [] for n in impls}
    first: dict[str, list[float]] = {n: [] for n in impls}
    cpu: dict[str, list[float]] = {n: [] for n in impls}
    with tempfile.TemporaryDirectory() as cache:
        child(_FIT_DRIVER.format(keras=False, epochs=epochs), cache)  # fills the cache
        for _ in range(rounds):
            for name, (is_keras, where) in impls.items():
                result = child(_FIT_DRIVER.format(keras=is_keras, epochs=epochs), where or cache)[0]
                samples[name].append(result["total"])
                first[name].append(result["first"])
                cpu[name].append(result["cpu"])
    timings = with_ratios([summary(n, statistics.median(first[n]), s, cpu[n])
                           for n, s in samples.items()])  # fmt: skip
    t = {n: statistics.median(s) for n, s in samples.items()}
    if keras is not None:
        ratio = t["fl.fit K=45, warm cache"] / t["Keras 3 fit"]
        c = {n: statistics.median(s) for n, s in cpu.items()}
        cpu_ratio = c["fl.fit K=45, warm cache"] / c["Keras 3 fit"]
        notes = [f"fl.fit K=45 warm cache / Keras 3 fit = {ratio:.2f} (target <= 1/3); in CPU "
                 f"time {cpu_ratio:.2f}"]  # fmt: skip
    else:
        notes = [missing]
    notes.append(f"{epochs} epochs from building the model, each in a fresh process; compile = "
                 f"the first epoch, compilation included; median of {rounds} round(s)")  # fmt: skip
    return CaseResult(f"fit on the digits, total of {epochs} epochs", f"{epochs} epochs",
                      timings, notes)  # fmt: skip


def first_step_case(rounds: int) -> CaseResult:
    """From the first import to the first finished train step: plain JAX against fundl."""
    cached = _FIRST_STEP_FUNDL.replace("t_lib = ", "fl.cache_compilations()\nt_lib = ")
    with tempfile.TemporaryDirectory() as cache:
        bodies = {"plain JAX": (_FIRST_STEP_PLAIN, "0"), "fundl": (_FIRST_STEP_FUNDL, "0"),
                  "fundl, second run, cache on": (cached, cache)}  # fmt: skip
        child(_FIRST_STEP.format(events=_COMPILE_EVENTS, body=cached), cache)  # fills the cache
        results: dict[str, list[dict]] = {n: [] for n in bodies}
        for _ in range(rounds):
            for name, (body, where) in bodies.items():
                code = _FIRST_STEP.format(events=_COMPILE_EVENTS, body=body)
                results[name].append(child(code, where)[0])
    samples = {n: [r["total"] for r in rs] for n, rs in results.items()}
    cpu = {n: [r["cpu"] for r in rs] for n, rs in results.items()}
    compiling = {n: statistics.median(r["backend_compile_duration"] for r in rs)
                 for n, rs in results.items()}  # fmt: skip
    timings = with_ratios([summary(n, compiling[n], s, cpu[n]) for n, s in samples.items()])
    c = {n: statistics.median(s) for n, s in cpu.items()}
    notes = [f"fundl / plain JAX in CPU time = {c['fundl'] / c['plain JAX']:.2f} (target <= 1)"]
    for name, rs in results.items():
        parts = {k: statistics.median(r.get(k, 0.0) for r in rs)
                 for k in rs[0] if k in _LABELS}  # fmt: skip
        notes.append(f"{name}: " + ", ".join(f"{_LABELS[k]} {v:.3f}s" for k, v in parts.items()))
    notes.append(f"seed MLP 784-128-64-10, adam, batch 8; compile = XLA's compile time of all "
                 f"the process's programs; median of {rounds} round(s)")  # fmt: skip
    return CaseResult("time to first step: first import to the first finished train step",
                      "process", timings, notes)  # fmt: skip


def run(quick: bool = False, rounds: int | None = None) -> list[CaseResult]:
    """The three start-up cases, each sample a fresh process."""
    rounds = rounds or (1 if quick else 5)
    epochs = 2 if quick else 20
    return [example_case(rounds), fit_case(rounds, epochs), first_step_case(rounds)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="fresh processes per implementation (5)")
    main(run, parser)
