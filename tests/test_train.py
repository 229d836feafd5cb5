"""Tests of the training loop: steps, fit, K steps per call, callbacks, freezing, precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fundl as fl
from fundl.core import Layer, named
from fundl.testing import count_compiles

xent = optax.softmax_cross_entropy_with_integer_labels


def _data(n=50, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    y = np.argmax(x[:, :classes], axis=1).astype(np.int32)  # linearly separable
    return x, y


def _model(classes=3):
    return fl.serial(fl.dense(8), jax.nn.relu, fl.dense(classes))


def _noise() -> Layer:
    """A tiny stochastic test layer: adds N(0, 1) noise drawn from its key in training."""

    def init(key, x):
        del key, x
        return (), ()

    def apply(params, state, x, key=None, train=False):
        del params
        if not train:
            return x, state
        if key is None:
            raise ValueError("noise: train=True needs a key.")
        return x + jax.random.normal(key, x.shape, x.dtype), state

    return named(Layer(init, apply), "noise")


def _fit(**kwargs):
    x, y = kwargs.pop("data", _data())
    model = kwargs.pop("model", _model())
    args = {"epochs": 2, "batch_size": 8, "seed": 0, "progress": False}
    args.update(kwargs)
    return fl.fit(model, xent, optax.adam(1e-2), (x, y), **args)


def _leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def _assert_bitwise(a, b):
    """For runs of the same compiled programs on the same data: bitwise equal."""
    for u, v in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)


# A K-step scan and K single steps (or a step on sliced device data and one on fed batches)
# are separately compiled programs: XLA may fuse and order their float32 reductions
# differently on another CPU. A few ulps per step, over the 14 adam steps of these runs,
# stay far below 1e-5 relative (adam's normalised updates do not amplify them).
SEPARATELY_COMPILED = {"rtol": 1e-5, "atol": 1e-6}


def _assert_close(a, b):
    for u, v in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_allclose(u, v, **SEPARATELY_COMPILED)


# ---- make_train_step / make_eval_step


def test_make_train_step_matches_hand_written_step_and_does_not_recompile():
    x, y = _data(8)
    model, opt = _model(), optax.sgd(0.1)
    ts = fl.init_train_state(model, opt, jax.random.key(1), x)
    params0 = jax.tree_util.tree_map(np.asarray, ts.params)

    # Independent reference: softmax cross-entropy written out in NumPy-style jnp, plain sgd.
    def ref_loss(p):
        h = jnp.maximum(x @ p[0]["w"] + p[0]["b"][None, :], 0.0)
        logits = h @ p[2]["w"] + p[2]["b"][None, :]
        logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
        return -jnp.mean(logp[jnp.arange(8), y])

    ref_value, grads = jax.value_and_grad(ref_loss)(jax.tree_util.tree_map(jnp.asarray, params0))
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params0, grads)

    step = fl.make_train_step(model, xent, opt, {"accuracy": fl.accuracy})
    ts, logs = step(ts, (x, y))
    fl.testing.assert_trees_close(ts.params, expected, atol=1e-6, rtol=1e-6, what="params")
    np.testing.assert_allclose(float(logs["loss"]), float(ref_value), rtol=1e-6)
    assert int(ts.step) == 1
    assert int(logs["count"]) == 8
    with count_compiles() as compiles:
        ts, _ = step(ts, (x, y))
    assert len(compiles) == 0


def test_make_train_step_mask_equals_training_on_valid_examples_only():
    x, y = _data(8)
    model, opt = _model(), optax.adam(1e-2)
    ts = fl.init_train_state(model, opt, jax.random.key(0), x)
    step = fl.make_train_step(model, xent, opt, {"accuracy": fl.accuracy})
    padded = x.copy()
    padded[5:] = 1e3  # garbage in the masked rows must not matter
    mask = np.arange(8) < 5
    a, logs_a = step(jax.tree_util.tree_map(jnp.copy, ts), (padded, y, mask))
    b, logs_b = step(ts, (x[:5], y[:5]))
    # A masked mean sums 8 terms (3 zeros) where the unpadded mean sums 5: equal up to
    # float32 rounding of the reordered sum.
    fl.testing.assert_trees_close(a.params, b.params, atol=1e-6, rtol=1e-5, what="params")
    np.testing.assert_allclose(float(logs_a["loss"]), float(logs_b["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(logs_a["accuracy"]), float(logs_b["accuracy"]))
    assert int(logs_a["count"]) == 5


def test_dropout_keys_come_from_fold_in_of_the_step():
    model = fl.serial(_noise(), fl.dense(2))
    x = np.ones((4, 3), np.float32)
    y = np.zeros((4,), np.int32)
    opt = optax.sgd(0.0)  # params fixed: the loss only reflects the noise
    ts = fl.init_train_state(model, opt, jax.random.key(3), x)
    params, state, key = jax.tree_util.tree_map(jnp.copy, (ts.params, ts.state, ts.key))
    step = fl.make_train_step(model, xent, opt)
    losses = []
    for _ in range(3):
        ts, logs = step(ts, (x, y))
        losses.append(float(logs["loss"]))
    assert len(set(losses)) == 3  # every step draws a fresh mask

    for s in range(3):  # reproduce each step's loss from fold_in(key, s)
        out, _ = model.apply(params, state, x, key=jax.random.fold_in(key, s), train=True)
        np.testing.assert_allclose(losses[s], float(jnp.mean(xent(out, y))), rtol=1e-6)

    run1, _ = _fit(model=fl.serial(_noise(), fl.dense(3)), epochs=1)
    run2, _ = _fit(model=fl.serial(_noise(), fl.dense(3)), epochs=1)
    _assert_bitwise(run1.params, run2.params)


def test_make_eval_step_runs_without_key_and_matches_numpy_accuracy():
    x, y = _data(20)
    model, opt = fl.serial(_noise(), _model()), optax.sgd(0.1)
    ts = fl.init_train_state(model, opt, jax.random.key(0), x)
    logs = fl.make_eval_step(model, xent, {"accuracy": fl.accuracy})(ts, (x, y))
    logits, _ = model.apply(ts.params, ts.state, x)
    expected = np.mean(np.argmax(np.asarray(logits), axis=1) == y)
    np.testing.assert_allclose(float(logs["accuracy"]), expected)
    result = fl.evaluate(model, xent, ts, (x, y), batch_size=7, metrics={"acc": fl.accuracy})
    np.testing.assert_allclose(result["acc"], expected, rtol=1e-6)


def test_make_train_step_rejects_a_bare_array_batch():
    x, _ = _data(4)
    model, opt = _model(), optax.sgd(0.1)
    ts = fl.init_train_state(model, opt, jax.random.key(0), x)
    with pytest.raises(TypeError, match=r"train_step: a batch is a tuple \(inputs, targets\)"):
        fl.make_train_step(model, xent, opt)(ts, x)


# ---- fit


def test_fit_history_is_plain_data_and_learns():
    x, y = _data(200)
    ts, history = _fit(
        data=(x, y), epochs=15, eval_data=(x[:40], y[:40]), metrics={"accuracy": fl.accuracy}
    )
    assert [h["epoch"] for h in history] == list(range(1, 16))
    assert set(history[0]) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(type(v) in (int, float) for h in history for v in h.values())
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert history[-1]["val_accuracy"] > 0.8
    assert int(ts.step) == 15 * 25


def test_fit_epoch_loss_is_the_example_weighted_mean_of_step_losses():
    # 50 examples, batch 8: 6 full batches and one of 2. Replay the same batches by hand.
    x, y = _data(50)
    ts_fit, history = _fit(data=(x, y), epochs=1, shuffle=False)
    model, opt = _model(), optax.adam(1e-2)
    ts = fl.init_train_state(model, opt, jax.random.split(jax.random.key(0))[0], x[:8])
    step = fl.make_train_step(model, xent, opt)
    total = 0.0
    for start in range(0, 50, 8):
        ts, logs = step(ts, (x[start : start + 8], y[start : start + 8]))
        total += float(logs["loss"]) * len(x[start : start + 8])
    # The last batch is padded to 8 and masked in fit but unpadded here: equal to rounding.
    np.testing.assert_allclose(history[0]["loss"], total / 50, rtol=1e-5)
    fl.testing.assert_trees_close(ts_fit.params, ts.params, atol=1e-6, rtol=1e-5, what="params")


def test_fit_partial_last_batch_compiles_once():
    seen = []
    with count_compiles() as compiles:
        _fit(
            epochs=4,
            eval_data=_data(13),
            callbacks=[lambda e, logs, ts: seen.append(len(compiles))],
        )
    assert seen[0] > 0
    assert seen[1:] == [seen[0]] * 3, f"recompiled after epoch 1: {seen}"


@pytest.mark.parametrize("k", [3, 7])
def test_steps_per_call_is_bitwise_equal_to_single_steps(k):
    # 50/8 -> 7 steps per epoch: K=3 gives blocks 3+3 then 1 single step; K=7 one block.
    one, h1 = _fit(epochs=2, metrics={"accuracy": fl.accuracy})
    many, hk = _fit(epochs=2, metrics={"accuracy": fl.accuracy}, steps_per_call=k)
    _assert_close(one.params, many.params)
    _assert_close(one.opt_state, many.opt_state)
    assert [sorted(h) for h in h1] == [sorted(h) for h in hk]
    for a, b in zip(h1, hk, strict=True):
        np.testing.assert_allclose([a[m] for m in sorted(a)], [b[m] for m in sorted(a)],
                                   **SEPARATELY_COMPILED)  # fmt: skip


def test_fit_on_an_iterable_of_batches_equals_in_memory_without_shuffle():
    x, y = _data(50)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 50, 8)]
    a, ha = _fit(data=(x, y), shuffle=False)
    b, hb = fl.fit(_model(), xent, optax.adam(1e-2), batches, epochs=2, seed=0, progress=False)
    _assert_close(a.params, b.params)
    np.testing.assert_allclose(ha[-1]["loss"], hb[-1]["loss"], rtol=1e-6)


def test_fit_eval_data_as_batches_and_one_shot_generator_error():
    x, y = _data(50)
    eval_batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 50, 16)]  # last of 2
    ts, history = _fit(data=(x, y), eval_data=eval_batches, metrics={"accuracy": fl.accuracy})
    expected = fl.evaluate(_model(), xent, ts, (x, y), metrics={"accuracy": fl.accuracy})
    np.testing.assert_allclose(history[-1]["val_loss"], expected["loss"], rtol=1e-5)
    np.testing.assert_allclose(history[-1]["val_accuracy"], expected["accuracy"], rtol=1e-6)
    generator = ((x[i : i + 8], y[i : i + 8]) for i in range(0, 50, 8))
    with pytest.raises(ValueError, match=r"fit: train_data gave no batches in epoch 2\. A "
                       r"one-shot iterator"):  # fmt: skip
        fl.fit(_model(), xent, optax.sgd(0.1), generator, epochs=2, progress=False)


def test_fit_shuffle_depends_on_the_seed_only():
    a, _ = _fit(seed=1)
    b, _ = _fit(seed=1)
    c, _ = _fit(seed=2)
    _assert_bitwise(a.params, b.params)
    assert not np.array_equal(_leaves(a.params)[0], _leaves(c.params)[0])


def test_fit_errors_on_bad_data():
    x, y = _data(50)
    bad = x.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"fit: train_data inputs contains NaN or inf \(first at "
                       r"index \(7, 2\)\)"):  # fmt: skip
        _fit(data=(bad, y))
    with pytest.raises(ValueError, match=r"fit: train_data targets has the label 5, outside 0..2 "
                       r"for a model with 3 outputs"):  # fmt: skip
        _fit(data=(x, np.where(np.arange(50) == 3, 5, y).astype(np.int32)))
    batches = [(x[:8], y[:8]), (x[8:16, :3], y[8:16])]
    with pytest.raises(ValueError, match=r"fit: batch 1 of epoch 1 has batch size 8 and "
                       r"per-example shapes"):  # fmt: skip
        fl.fit(_model(), xent, optax.sgd(0.1), batches, epochs=1, progress=False)
    nan_batches = [(x[:8], y[:8]), (bad[:8], y[:8])]
    with pytest.raises(
        ValueError, match=r"fit: train_data inputs \(batch 1 of epoch 1\) contains NaN"
    ):
        fl.fit(_model(), xent, optax.sgd(0.1), nan_batches, epochs=1, progress=False)


def test_fit_scalar_loss_needs_drop_remainder():
    x, y = _data(50)

    def mean_loss(out, t):
        return jnp.mean(xent(out, t))

    with pytest.raises(ValueError, match="fit: the loss returns a scalar, so the last partial"):
        fl.fit(_model(), mean_loss, optax.sgd(0.1), (x, y), epochs=1, progress=False)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    with pytest.raises(ValueError, match=r"fit: batch 1 of epoch 1 is smaller than the first "
                       r"\(18 < 32\) and the loss returns a scalar"):  # fmt: skip
        fl.fit(_model(), mean_loss, optax.sgd(0.1), batches, epochs=1, progress=False)
    ts, _ = fl.fit(
        _model(),
        mean_loss,
        optax.sgd(0.1),
        (x, y),
        epochs=1,
        batch_size=8,
        progress=False,
        drop_remainder=True,
    )
    assert int(ts.step) == 6


def _nan_loss(out, t):
    # a negative target makes sqrt NaN: the batch that holds example 20 has a NaN loss
    return xent(out, jnp.abs(t)) * jnp.sqrt(t.astype(jnp.float32) + 0.5)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_last_good_state(tmp_path):
    x, y = _data(50)
    y = y.copy()
    y[20] = -1  # in batch 2 (examples 16..23) of epoch 1 without shuffle
    with pytest.raises(fl.NonFiniteLossError, match=r"at step 2 \(epoch 1\)") as info:
        fl.fit(_model(), _nan_loss, optax.adam(1e-2), (x, y), epochs=2, batch_size=8,
               shuffle=False, progress=False, check_data=False,
               checkpoint_dir=tmp_path, checkpoint_every=1)  # fmt: skip
    assert info.value.step == 2
    good, _ = fl.fit(_model(), _nan_loss, optax.adam(1e-2), (x[:16], y[:16]), epochs=1,
                     batch_size=8, shuffle=False, progress=False)  # fmt: skip
    manager = fl.checkpoint.CheckpointManager(tmp_path)
    assert manager.latest() == 2  # written after steps 1 and 2, none after the NaN step
    restored, _ = manager.restore(good)
    _assert_bitwise(restored.params, good.params)


def test_nonfinite_loss_skip_option_skips_the_update():
    x, y = _data(50)
    y = y.copy()
    y[20] = -1
    ts, history = fl.fit(_model(), _nan_loss, optax.adam(1e-2), (x, y), epochs=2, batch_size=8,
                         shuffle=False, progress=False, check_data=False,
                         on_nonfinite="skip")  # fmt: skip
    assert [h["skipped"] for h in history] == [1, 1]
    assert all(np.all(np.isfinite(v)) for v in _leaves(ts.params))
    assert np.isfinite(history[-1]["loss"])


# ---- callbacks


def test_callbacks_get_epoch_logs_and_state_and_can_stop():
    calls = []

    def record(epoch, logs, ts):
        calls.append((epoch, logs["loss"], int(ts.step)))
        return fl.StopTraining() if epoch == 2 else None

    _, history = _fit(epochs=5, callbacks=[record])
    assert [c[0] for c in calls] == [1, 2]
    assert [c[2] for c in calls] == [7, 14]
    assert len(history) == 2


def test_raising_stop_training_ends_fit_as_returning_it_does():
    def stopper(raise_it):
        def callback(epoch, logs, ts):
            if epoch == 2:
                # end with epoch 2's params shifted by one, so the given state shows
                stop = fl.StopTraining(
                    ts._replace(params=jax.tree_util.tree_map(lambda p: p + 1.0, ts.params))
                )
                if raise_it:
                    raise stop
                return stop
            return None

        return callback

    seen = []
    returned, h_returned = _fit(epochs=5, callbacks=[stopper(False), lambda e, *_: seen.append(e)])
    raised, h_raised = _fit(epochs=5, callbacks=[stopper(True), lambda e, *_: seen.append(e)])
    assert len(h_returned) == 2
    assert h_raised == h_returned
    _assert_bitwise((raised.params, raised.opt_state, raised.step),
                    (returned.params, returned.opt_state, returned.step))  # fmt: skip
    assert seen == [1, 2, 1, 2]  # the epoch's other callbacks still run after a raise
    plain, _ = _fit(epochs=2)
    _assert_bitwise(returned.params, jax.tree_util.tree_map(lambda p: p + 1.0, plain.params))


def test_steps_are_named_for_what_they_are():
    model, opt = _model(), optax.sgd(0.1)
    assert fl.make_train_step(model, xent, opt).__name__ == "train_step"
    assert fl.make_eval_step(model, xent).__name__ == "eval_step"


def test_early_stopping_unit():
    stop = fl.early_stopping("val_loss", patience=2)
    ts = fl.init_train_state(_model(), optax.sgd(0.1), jax.random.key(0), np.zeros((1, 4)))
    marked = ts._replace(params=jax.tree_util.tree_map(lambda p: p + 1.0, ts.params))
    assert stop(1, {"val_loss": 1.0}, ts) is None
    assert stop(2, {"val_loss": 0.5}, marked) is None  # best
    assert stop(3, {"val_loss": 0.7}, ts) is None  # 1 epoch without improvement of 2
    result = stop(4, {"val_loss": 0.6}, ts)
    assert isinstance(result, fl.StopTraining)
    _assert_bitwise(result.train_state.params, marked.params)
    with pytest.raises(ValueError, match=r"early_stopping: monitor 'val_loss' is not in the"):
        fl.early_stopping()(1, {"loss": 1.0}, ts)


def test_early_stopping_in_fit_restores_best_params():
    # Training loss falls every epoch, so in mode "max" epoch 1 stays the best: patience 0
    # stops after epoch 2 and restores epoch 1's params.
    stop = fl.early_stopping("loss", mode="max", patience=0)
    ts, history = _fit(epochs=10, callbacks=[stop])
    assert len(history) == 2
    one, _ = _fit(epochs=1)
    _assert_bitwise(ts.params, one.params)


def test_progress_bar_on_request_and_off_when_not_a_terminal(capsys):
    _fit(epochs=1, progress=True)
    assert "step" in capsys.readouterr().err
    _fit(epochs=1, progress=None)  # pytest's stderr is not a terminal
    assert capsys.readouterr().err == ""


# ---- freezing, transfer, precision


def test_freeze_keeps_the_marked_params_and_trains_the_rest():
    model = fl.serial(body=fl.dense(8), act=jax.nn.relu, head=fl.dense(3))
    x, y = _data(50)
    ts0 = fl.init_train_state(model, optax.sgd(0.1), jax.random.key(0), x[:1])
    opt = fl.freeze(optax.adam(1e-2), {"body": True, "act": True, "head": False})
    start = fl.init_train_state(model, opt, jax.random.key(0), x[:1])
    ts, _ = fl.fit(model, xent, opt, (x, y), epochs=1, train_state=start, progress=False)
    _assert_bitwise(ts.params["body"], ts0.params["body"])
    assert not np.array_equal(ts.params["head"]["w"], ts0.params["head"]["w"])


def test_freeze_mask_marks_the_frozen_params_and_the_old_keyword_names_the_new_one():
    params = {"body": {"w": jnp.ones((2, 2))}, "head": {"w": jnp.ones((2,))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    for mask in ({"body": True, "head": False}, lambda p: {"body": True, "head": False}):
        opt = fl.freeze(optax.sgd(0.5), mask)
        updates, _ = opt.update(grads, opt.init(params), params)
        np.testing.assert_array_equal(updates["body"]["w"], np.zeros((2, 2)))
        np.testing.assert_array_equal(updates["head"]["w"], np.full((2,), -0.5))
    with pytest.raises(TypeError) as err:
        fl.freeze(optax.sgd(0.5), trainable={"body": False, "head": True})
    assert str(err.value) == (
        "freeze() got the keyword trainable=, renamed to frozen= in fundl 0.2. True now marks "
        "the params to freeze (trainable= marked the params to train): "
        "fl.freeze(optimizer, frozen={'body': True, 'head': False})."
    )
    wrong = fl.freeze(optax.sgd(0.5), {"neck": True})
    with pytest.raises(ValueError, match=r"freeze: the frozen mask does not match the params"):
        wrong.init(params)


def test_graft_into_a_tuple_position_leaves_the_rest_and_the_input_unchanged():
    params = ({"w": jnp.zeros((2,))}, {"w": jnp.zeros((3,))})
    grafted = fl.graft(params, {"w": np.arange(3.0, dtype=np.float32)}, at=(1,))
    assert isinstance(grafted, tuple)
    np.testing.assert_array_equal(grafted[1]["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(params[1]["w"], np.zeros(3))  # params is not modified
    assert grafted[0] is params[0]
    with pytest.raises(ValueError, match=r"graft: cannot index tuple with 5"):
        fl.graft(params, {"w": jnp.zeros((3,))}, at=(5,))


def test_init_train_state_is_one_program_compiled_once_per_model():
    model = fl.serial(fl.dense(8), jax.nn.relu, fl.dense(3))
    opt = optax.adam(1e-2)
    keys, x = (jax.random.key(0), jax.random.key(1)), jnp.zeros((2, 4))
    with count_compiles() as first:
        ts = fl.init_train_state(model, opt, keys[0], x)
    with count_compiles() as second:  # other values and key, the same shapes: no compile
        fl.init_train_state(model, opt, keys[1], np.ones((2, 4), np.float32))
    assert (len(first), len(second)) == (1, 0)
    init_key, step_key = jax.random.split(jax.random.key(0))
    params, _ = model.init(init_key, jnp.zeros((2, 4)))  # eagerly, op by op
    # the same draws; 1e-6 because XLA may fuse the initializers' scaling differently
    # in one program than op by op
    leaves = jax.tree_util.tree_leaves
    for got, want in zip(leaves(ts.params), leaves(params), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert jax.random.key_data(ts.key).tolist() == jax.random.key_data(step_key).tolist()
    # under an outer trace it is part of the caller's program
    shapes = jax.eval_shape(lambda k: fl.init_train_state(model, opt, k, jnp.zeros((2, 4))),
                            jax.random.key(0))  # fmt: skip
    assert shapes.params[0]["w"].shape == (4, 8)


def test_init_train_state_from_given_params():
    model = fl.serial(body=fl.dense(8), head=fl.dense(3))
    params, _ = model.init(jax.random.key(5), jnp.zeros((1, 4)))
    opt = optax.adam(1e-2)
    ts = fl.init_train_state(model, opt, jax.random.key(0), jnp.zeros((1, 4)), params=params)
    _assert_bitwise(ts.params, params)
    assert ts.params["head"]["w"] is params["head"]["w"]  # the given arrays, not copies
    assert int(ts.step) == 0
    # the optimizer state is built for these params (adam's moments start at zero)
    _assert_bitwise(ts.opt_state, opt.init(params))
    wrong = fl.serial(body=fl.dense(8), head=fl.dense(5)).init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(ValueError) as err:
        fl.init_train_state(model, opt, jax.random.key(0), jnp.zeros((1, 4)), params=wrong[0])
    assert str(err.value) == (
        "init_train_state: params for this model differs: 0 missing, 0 unexpected, "
        "2 mismatched:\n"
        "  mismatched ['head']['b']: expected float32[3], got float32[5]\n"
        "  mismatched ['head']['w']: expected float32[8, 3], got float32[8, 5]. Pass params "
        "made by this model's init (or grafted into them with fl.graft)."
    )


def test_graft_copies_a_subtree_and_names_mismatches():
    old = fl.serial(body=fl.dense(8), head=fl.dense(3))
    new = fl.serial(body=fl.dense(8), head=fl.dense(5))
    p_old, _ = old.init(jax.random.key(0), jnp.zeros((1, 4)))
    p_new, _ = new.init(jax.random.key(1), jnp.zeros((1, 4)))
    merged = fl.graft(p_new, p_old["body"], at=("body",))
    _assert_bitwise(merged["body"], p_old["body"])
    _assert_bitwise(merged["head"], p_new["head"])
    with pytest.raises(ValueError) as err:
        fl.graft(p_new, p_old["head"], at=("head",))
    assert str(err.value) == (  # every path that differs, in one error
        "graft: pretrained at ('head',) does not fit params['head']: 0 missing, 0 unexpected, "
        "2 mismatched:\n"
        "  mismatched ['head']['b']: expected float32[5], got float32[3]\n"
        "  mismatched ['head']['w']: expected float32[8, 5], got float32[8, 3]\n"
        "Graft params of the same model configuration, or pass strict=False to graft the "
        "paths that match and get this report."
    )
    with pytest.raises(ValueError, match=r"graft: no key 'neck' in params"):
        fl.graft(p_new, p_old["body"], at=("neck",))


def test_bf16_compute_keeps_f32_params_and_learns():
    model = fl.serial(
        fl.dense(16, dtype=jnp.bfloat16), jax.nn.relu, fl.dense(3, dtype=jnp.bfloat16)
    )
    x, y = _data(200)
    ts, history = _fit(model=model, data=(x, y), epochs=8)
    assert {v.dtype for v in _leaves(ts.params)} == {np.dtype(np.float32)}
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]


def test_loss_scale_by_a_power_of_two_matches_unscaled_training():
    # Scaling the loss by 2**10 and the grads by 2**-10 is exact in binary floating point,
    # but XLA fuses the scaled graph differently (measured: 1-ulp differences after 14 adam
    # steps), so compare to a few float32 ulps rather than bitwise.
    a, _ = _fit()
    b, _ = _fit(loss_scale=1024.0)
    fl.testing.assert_trees_close(a.params, b.params, atol=1e-7, rtol=1e-6, what="params")


def test_partial_batch_of_a_model_with_state_runs_at_its_own_size():
    # Padding must never enter batch norm's statistics: after 3 epochs of batches of sizes
    # (4, 4, 2) the running mean is the NumPy recurrence over the real batches only.
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 1.0, size=(10, 1)).astype(np.float32)
    y = np.zeros((10, 1), np.float32)

    def loss(out, t):
        return jnp.mean((out - t) ** 2, axis=-1)

    expected = 0.0
    for _ in range(3):
        for batch in (x[:4], x[4:8], x[8:]):
            expected = 0.9 * expected + 0.1 * float(np.mean(batch))
    model = fl.batch_norm(momentum=0.9)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    for data in ((x, y), batches):
        seen = []
        with count_compiles() as compiles:
            ts, _ = fl.fit(model, loss, optax.sgd(0.0), data, epochs=3, batch_size=4,
                           shuffle=False, progress=False,
                           callbacks=[lambda *_, s=seen, c=compiles: s.append(len(c))])  # fmt: skip
        assert seen[1:] == [seen[0]] * 2, f"recompiled after epoch 1: {seen}"
        np.testing.assert_allclose(np.asarray(ts.state.mean), [expected], rtol=1e-5)


def test_fit_names_an_optimizer_state_from_another_optimizer():
    x, y = _data(16)
    model = fl.serial(body=fl.dense(4), head=fl.dense(3))
    frozen = fl.freeze(optax.adam(1e-3), {"body": True, "head": False})
    ts = fl.init_train_state(model, frozen, jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"fit: the optimizer state of train_state differs: "
                       r"9 missing, 5 unexpected, 0 mismatched:\n  missing \[0\]\.count\n"
                       r"(.|\n)*It was made by another "
                       r"optimizer than the one given to fit\. Start the optimizer afresh: "
                       r"train_state\._replace\(opt_state=optimizer\.init\("):  # fmt: skip
        fl.fit(model, xent, optax.adam(1e-3), (x, y), epochs=1, train_state=ts, progress=False)
