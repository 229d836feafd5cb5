"""Renamed keywords (CHANGELOG.md) fail with a TypeError naming the new one; no aliases."""

import re

import jax
import jax.numpy as jnp
import pytest

import fundl as fl


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: fl.conv(out_features=8, kernel_size=3), "conv() got the keyword out_features=, "
         "renamed to features= in fundl 0.2."),
        (lambda: fl.conv_transpose(out_features=8, kernel_size=3), "conv_transpose() got the "
         "keyword out_features=, renamed to features= in fundl 0.2."),
        (lambda: fl.repeat(fl.dense(2), n=3), "repeat() got the keyword n=, renamed to times= "
         "in fundl 0.2."),
        (lambda: fl.fan_out(n=2), "fan_out() got the keyword n=, renamed to times= in fundl 0.2."),
    ],
)  # fmt: skip
def test_old_keyword_names_the_new_one(call, message):
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        call()


def test_new_keywords_work():
    x = jnp.ones((1, 4, 4, 2))
    for make in (fl.conv, fl.conv_transpose):
        params, _ = make(features=3, kernel_size=2).init(jax.random.key(0), x)
        assert params["w"].shape == (2, 2, 2, 3)
    stack = fl.repeat(fl.dense(2), times=3)
    assert stack.init(jax.random.key(0), jnp.ones((1, 2)))[0]["w"].shape == (3, 2, 2)
    assert len(fl.fan_out(times=2).apply((), (), jnp.ones(1))[0]) == 2


def test_a_typo_is_not_taken_for_a_renamed_keyword():
    # only the listed old names get the rename message; others fail as Python's own error
    with pytest.raises(TypeError, match="unexpected keyword argument 'feature'"):
        fl.conv(feature=8, kernel_size=3)


def test_renamed_keeps_name_signature_and_doc():
    import inspect

    assert fl.conv.__name__ == "conv"
    assert list(inspect.signature(fl.repeat).parameters) == ["layer", "times", "unroll", "remat"]
    assert "times" in fl.fan_out.__doc__
