"""fit's gradient accumulation (N micro-batches make one batch N times larger), and the
learning rate in its history."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

import fundl as fl
from fundl.testing import count_compiles

xent = optax.softmax_cross_entropy_with_integer_labels

# One step sums the batch's per-example float32 gradient terms in one reduction; accumulation
# sums each micro-batch's, then the N partial sums: the same terms in another order, a few
# float32 ulps (~1e-7) apart, which these few sgd/adam steps do not amplify past 1e-6.
ACCUMULATED = 1e-6


def _data(n=40, features=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    return x, np.argmax(x[:, :classes], axis=1).astype(np.int32)


def _fit(data, optimizer=None, **kwargs):
    model = fl.serial(fl.dense(8), jax.nn.tanh, fl.dense(3))
    args = {"epochs": 2, "seed": 0, "progress": False, "shuffle": False}
    args.update(kwargs)
    return fl.fit(model, xent, optimizer or optax.adam(1e-2), data, **args)


def _assert_accumulated_equal(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        u, v = np.asarray(u), np.asarray(v)
        np.testing.assert_allclose(u, v, rtol=ACCUMULATED, atol=ACCUMULATED * np.abs(v).max())


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
def test_micro_batches_give_the_big_batch_step(optimizer):
    """40 examples: a full step of 32 and a partial one of 8 (1 micro-batch of 4, padded)."""
    metrics = {"accuracy": fl.accuracy}
    acc, h_acc = _fit(_data(), optimizer, batch_size=8, num_micro_batches=4, metrics=metrics)
    big, h_big = _fit(_data(), optimizer, batch_size=32, metrics=metrics)
    _assert_accumulated_equal(acc.params, big.params)
    _assert_accumulated_equal(acc.opt_state, big.opt_state)
    for a, b in zip(h_acc, h_big, strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=ACCUMULATED)


def test_an_optimizer_step_counts_once_and_k_counts_optimizer_steps():
    # 80 examples, 2 x 8 per step: 5 steps an epoch; K=2 runs them as 2 + 2 + 1.
    one, _ = _fit(_data(80), batch_size=8, num_micro_batches=2)
    many, _ = _fit(_data(80), batch_size=8, num_micro_batches=2, steps_per_call=2)
    assert int(one.step) == int(many.step) == 10
    assert int(one.opt_state[0].count) == 10  # adam's own count of updates
    _assert_accumulated_equal(one.params, many.params)


def test_iterable_batches_split_into_micro_batches():
    x, y = _data(40)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    split, _ = _fit(batches, num_micro_batches=4)
    whole, _ = _fit(batches)
    assert int(split.step) == int(whole.step) == 10
    _assert_accumulated_equal(split.params, whole.params)
    with pytest.raises(ValueError, match=r"a batch of 8 examples does not split into "
                       r"num_micro_batches=3 equal micro-batches"):  # fmt: skip
        _fit(batches, num_micro_batches=3)


def test_no_recompilation_after_the_first_epoch():
    seen = []
    with count_compiles() as compiles:
        _fit(_data(50), epochs=3, batch_size=8, num_micro_batches=2,
             callbacks=[lambda e, logs, ts: seen.append(len(compiles))])  # fmt: skip
    assert seen[0] > 0
    assert seen[1:] == [seen[0]] * 2, f"recompiled after epoch 1: {seen}"


def test_a_model_with_state_updates_it_per_micro_batch_in_order():
    model = fl.serial(fl.dense(8), fl.batch_norm(momentum=0.5), fl.dense(3))
    x, y = _data(32)
    args = {"batch_size": 8, "shuffle": False, "progress": False, "seed": 0}
    start, _ = fl.fit(model, xent, optax.adam(1e-2), (x, y), epochs=0, **args)
    ts, _ = fl.fit(model, xent, optax.adam(1e-2), (x, y), epochs=1, num_micro_batches=4, **args)
    assert int(ts.step) == 1
    state = start.state  # every micro-batch runs on the step's params, the state in turn
    for i in range(0, 32, 8):
        _, state = model.apply(start.params, state, x[i : i + 8], train=True)
    # eager applies and the step's compiled scan: float32 sums of 8 terms, ordered apart
    fl.testing.assert_trees_close(ts.state, state, rtol=1e-5, atol=1e-6, what="batch stats")


@pytest.mark.parametrize("bad", [0, -2, 2.0, True])
def test_a_bad_count_says_what_it_needs(bad):
    with pytest.raises(ValueError, match=r"fit: num_micro_batches must be a positive int \("):
        _fit(_data(), batch_size=8, num_micro_batches=bad)


def test_history_has_the_learning_rate_of_a_scheduled_optimizer():
    """5 optimizer steps an epoch (each of 2 micro-batches): a schedule counts those."""
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    optimizer = optax.chain(
        optax.clip(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    )
    _, history = _fit(_data(40), optimizer, batch_size=4, num_micro_batches=2)
    # the rate of each epoch's last update: steps 4 and 9 of the schedule
    rates = [h["learning_rate"] for h in history]
    np.testing.assert_allclose(rates, [0.1 * (1 - 4 / 10), 0.1 * (1 - 9 / 10)], rtol=1e-6)
    _, plain = _fit(_data(40), optax.sgd(schedule), batch_size=8)
    assert "learning_rate" not in plain[0]  # optax.sgd(schedule) keeps no rate to read
