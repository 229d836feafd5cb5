"""summary: rows, shapes, param counts, FLOPs and totals of the seed model."""

import io

import jax
import jax.numpy as jnp

import fundl as fl


def test_summary_of_the_seed_model():
    model = fl.serial(fl.flatten(), fl.dense(128), jax.nn.relu, fl.dense(64), jax.nn.relu,
                      fl.dense(10))  # fmt: skip
    out = io.StringIO()
    text = fl.summary(model, jnp.zeros((1, 28, 28)), file=out)
    assert out.getvalue().strip() == text
    lines = text.splitlines()
    row = next(line for line in lines if "[1] dense(128)" in line).split()
    assert row[2:4] == ["(1,", "128)"] and row[4] == f"{784 * 128 + 128:,}"
    # dense FLOPs: 2 * in * out for the matmul plus out for the bias, as XLA counts them
    assert row[5] == f"{(2 * 784 * 128 + 128) / 1e3:.2f}k"
    assert f"Total params: {784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10:,}" in text
    assert any("[5] dense(10)" in line and "(1, 10)" in line for line in lines)


def test_summary_nested_and_multi_output():
    model = fl.serial(
        head=fl.serial(fl.dense(4), jax.nn.relu), out=fl.branch(fl.dense(2), fl.dense(3))
    )
    text = fl.summary(model, jnp.zeros((1, 5)), file=io.StringIO())
    assert "  [head] serial" in text
    assert "    [0] dense(4)" in text
    assert "[(1, 2), (1, 3)]" in text


def test_summary_keyword_children_out_of_alphabetical_order():
    """Params of keyword children come back key-sorted from eval_shape; rows must not mix up."""
    model = fl.serial(zeta=fl.dense(3), alpha=fl.dense(7))
    text = fl.summary(model, jnp.zeros((1, 5)), file=io.StringIO())
    zeta = next(line for line in text.splitlines() if "[zeta] dense(3)" in line).split()
    alpha = next(line for line in text.splitlines() if "[alpha] dense(7)" in line).split()
    assert zeta[2:5] == ["(1,", "3)", f"{5 * 3 + 3}"]
    assert alpha[2:5] == ["(1,", "7)", f"{3 * 7 + 7}"]
