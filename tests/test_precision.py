"""Precision policies: what fl.with_policy casts (seen by a spy layer and in the jaxpr), the
gradients' dtype, the numbers against NumPy in bfloat16, the keep= patterns and their errors,
float16 training with loss scaling, and (slow) bfloat16 training accuracy against float32."""

import importlib.util
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import fundl as fl
from fundl.core import Layer, named

ROOT = Path(__file__).resolve().parent.parent
MIXED = fl.Policy(jnp.float32, jnp.bfloat16, jnp.float32, keep=("*norm*",))


def spy(layer, seen):
    """``layer``, recording the dtypes of the params and inputs its apply receives."""

    def apply(params, state, *inputs, **options):
        seen.append((jax.tree.map(lambda p: p.dtype, params), [x.dtype for x in inputs]))
        return layer.apply(params, state, *inputs, **options)

    return named(Layer(layer.init, apply), fl.core.layer_name(layer))


def eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in it (pjit, custom_jvp, ...)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from eqns(sub)


def test_policy_casts_params_and_inputs_except_kept_paths():
    seen = []
    model = fl.serial(
        dense=spy(fl.dense(8), seen), norm=spy(fl.layer_norm(), seen), head=fl.dense(2)
    )
    mixed = fl.with_policy(model, MIXED)
    x = jax.ShapeDtypeStruct((4, 3), jnp.float32)  # eval_shape: the spies see dtypes, no compile
    params, state = jax.eval_shape(mixed.init, jax.random.key(0), x)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    seen.clear()  # init's shape inference ran the spies too
    y, _ = jax.eval_shape(mixed.apply, params, state, x)
    (dense_params, dense_in), (norm_params, norm_in) = seen
    assert dense_params == {"w": jnp.bfloat16, "b": jnp.bfloat16} and dense_in == [jnp.bfloat16]
    assert norm_params == {"scale": jnp.float32, "bias": jnp.float32}  # kept: "*norm*"
    assert norm_in == [jnp.bfloat16]
    assert y.dtype == jnp.float32
    # the model it was given is unchanged: float32 in, float32 throughout
    seen.clear()
    assert jax.eval_shape(model.apply, params, state, x)[0].dtype == jnp.float32
    assert {d for _, ins in seen for d in ins} == {jnp.dtype(jnp.float32)}


def test_matmuls_in_bfloat16_softmax_and_norm_statistics_in_float32():
    """In the jaxpr of an attention block under the policy: every dot_general reads bfloat16
    operands; the softmax's exp and the norms' mean reductions run in float32."""
    model = fl.serial(fl.embedding(11, 16), fl.decoder_block(16, 2, mlp_features=32))
    mixed = fl.with_policy(model, MIXED)
    ids = jnp.zeros((2, 5), jnp.int32)
    params, state = jax.eval_shape(mixed.init, jax.random.key(0), ids)
    jaxpr = jax.make_jaxpr(lambda p, x: mixed.apply(p, state, x)[0])(params, ids).jaxpr
    found = list(eqns(jaxpr))
    dots = [e for e in found if e.primitive.name == "dot_general"]
    exps = [e for e in found if e.primitive.name == "exp"]
    sums = [e for e in found if e.primitive.name == "reduce_sum"]
    assert len(dots) >= 7  # q, k, v, two attention einsums, out, up, down
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert exps and all(e.invars[0].aval.dtype == jnp.float32 for e in exps)
    assert sums and all(e.invars[0].aval.dtype == jnp.float32 for e in sums)


@pytest.mark.numerics
def test_bfloat16_dense_matches_numpy_on_rounded_operands():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    mixed = fl.with_policy(fl.dense(4), MIXED._replace(keep=()))
    params = {"w": rng.standard_normal((5, 4)).astype(np.float32),
              "b": rng.standard_normal(4).astype(np.float32)}  # fmt: skip
    state = ()
    y, _ = jax.jit(mixed.apply)(params, state, x)

    def bf16(a):
        return np.asarray(a).astype(ml_dtypes.bfloat16).astype(np.float64)

    expected = bf16(bf16(x) @ bf16(params["w"]) + bf16(params["b"]))
    assert y.dtype == jnp.float32
    # a bfloat16 result: one rounding of the output (2**-8 relative) plus the accumulation's
    # and the bias addition's roundings, which XLA may order differently: 2 ulps of 2**-7
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2 * 2.0**-7, atol=2 * 2.0**-7)


def test_grads_come_back_in_the_param_dtype():
    model = fl.serial(fl.dense(8), fl.batch_norm(), jax.nn.relu, fl.dense(3))
    x, labels = jnp.ones((4, 5)), jnp.array([0, 1, 2, 0])
    for param_dtype in (jnp.float32, jnp.bfloat16):
        policy = fl.Policy(param_dtype, jnp.bfloat16, jnp.float32, keep=("*batch_norm*",))
        mixed = fl.with_policy(model, policy)
        params, state = jax.eval_shape(mixed.init, jax.random.key(0), x)

        def loss(params, state, mixed=mixed):
            logits, _ = mixed.apply(params, state, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.eval_shape(jax.grad(loss), params, state)
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(param_dtype)}


def test_integer_inputs_and_side_inputs_stay_as_they_are():
    seen = []
    model = fl.serial(spy(fl.embedding(7, 4), seen), fl.rnn(fl.gru_cell(3)))
    mixed = fl.with_policy(model, fl.Policy(dtype=jnp.bfloat16))
    ids = jnp.zeros((2, 5), jnp.int32)
    params, state = jax.eval_shape(mixed.init, jax.random.key(0), ids)
    seen.clear()
    y, _ = jax.eval_shape(lambda p, x: mixed.apply(p, state, x), params, ids)
    assert seen[0][1] == [jnp.int32] and y.dtype == jnp.float32


def test_policy_paths_name_layers_through_combinators():
    model = fl.serial(
        fl.bidirectional(fl.rnn(fl.lstm_cell(4)), fl.rnn(fl.lstm_cell(4), reverse=True)),
        fl.residual(fl.serial(ln=fl.layer_norm(), up=fl.dense(8))),
        fl.repeat(fl.dense(8), times=2),
    )
    params, _ = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5, 8)))
    paths = fl.policy_paths(model, params)
    assert len(paths) == len(jax.tree.leaves(params))
    assert "serial[0].bidirectional.backward.rnn lstm_cell(4)['wi']" in paths
    assert "serial[1].residual.serial[ln] layer_norm()['scale']" in paths
    assert "serial[2].repeat dense(8)['w']" in paths
    # brackets match themselves, '*' anything: keep only the residual's norm
    kept = fl.with_policy(model, fl.Policy(dtype=jnp.bfloat16, keep=("serial[1]*[ln]*",)))
    jax.eval_shape(kept.init, jax.random.key(0), jnp.zeros((1, 5, 8)))  # no ValueError


def test_a_keep_pattern_matching_nothing_lists_the_paths():
    model = fl.serial(fl.dense(4), fl.dense(2))
    mixed = fl.with_policy(model, fl.Policy(dtype=jnp.bfloat16, keep=("*norm*",)))
    x = jax.ShapeDtypeStruct((1, 3), jnp.float32)  # the checks run at trace time: no compile
    with pytest.raises(ValueError, match=r"keep pattern '\*norm\*' matches no param path") as e:
        jax.eval_shape(mixed.init, jax.random.key(0), x)
    assert "serial[0] dense(4)['w']" in str(e.value) and "serial[1] dense(2)['b']" in str(e.value)
    params, state = jax.eval_shape(model.init, jax.random.key(0), x)  # the bare model's params
    with pytest.raises(ValueError, match=r"\n  serial\[1\] dense\(2\)\['w'\]"):
        jax.eval_shape(mixed.apply, params, state, x)


def test_bad_policies_are_type_errors():
    model = fl.dense(2)
    with pytest.raises(TypeError, match=r"policy must be a fl\.Policy, got dict"):
        fl.with_policy(model, {"dtype": jnp.bfloat16})
    with pytest.raises(TypeError, match="Policy: dtype is int32, expected a floating-point"):
        fl.with_policy(model, fl.Policy(dtype=jnp.int32))
    with pytest.raises(TypeError, match=r"keep must be a tuple of pattern strings.*\(note"):
        fl.with_policy(model, fl.Policy(keep="*norm*"))


@pytest.mark.slow  # fit compiles a train and an eval step: ~5 s
def test_float16_fit_with_loss_scaling_trains():
    (x, y), _ = fl.datasets.digits_split()
    model = fl.serial(fl.flatten(), fl.dense(32), fl.layer_norm(), jax.nn.relu, fl.dense(10))
    half = fl.with_policy(model, fl.Policy(jnp.float32, jnp.float16, jnp.float32, ("*norm*",)))
    loss = optax.softmax_cross_entropy_with_integer_labels
    with jax.numpy_dtype_promotion("standard"):  # optax's adam counts steps in int32
        ts, history = fl.fit(half, loss, optax.adam(3e-3), (x, y), epochs=3, batch_size=64,
                             seed=0, loss_scale=2.0**10, progress=False)  # fmt: skip
    losses = [h["loss"] for h in history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] * 0.5
    assert {p.dtype for p in jax.tree.leaves(ts.params)} == {jnp.dtype(jnp.float32)}


def load_benchmark():
    path = ROOT / "benchmarks" / "precision_accuracy.py"
    spec = importlib.util.spec_from_file_location("precision_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # trains the digits CNN twice for 5 epochs: ~20 s of one core
@pytest.mark.numerics
def test_bfloat16_digits_cnn_within_one_percent_of_float32():
    """Same seed, same batches; the char transformer's 0.05 bpc target takes minutes of
    training on a CPU, so only ``python -m benchmarks.precision_accuracy`` measures it."""
    bench = load_benchmark()
    with jax.numpy_dtype_promotion("standard"):  # optax's adam counts steps in int32
        f32 = bench.digits_accuracy(bench.FLOAT32, epochs=5)
        bf16 = bench.digits_accuracy(bench.BFLOAT16, epochs=5)
    assert f32 > 0.95
    assert abs(bf16 - f32) <= 0.01, (bf16, f32)
