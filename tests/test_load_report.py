"""Load reports: every missing, unexpected and mismatched path in one value (graft, checkpoints)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from fundl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fundl.load_report import Mismatch, compare_leaves


def _expected():
    return {
        "body": [{"w": jnp.zeros((4, 8)), "b": jnp.zeros(8)}, {"scale": jnp.ones(8)}],
        "head": {"w": jnp.zeros((8, 3)), "b": jnp.zeros(3)},
    }


def _given():
    return {  # body[0]['w'] of another shape, body[0]['b'] of another dtype, head['b'] absent
        "body": [{"w": jnp.ones((4, 9)), "b": jnp.ones(8, jnp.bfloat16)}, {"scale": jnp.ones(8)}],
        "head": {"w": jnp.ones((8, 3)), "bias": jnp.ones(3)},
        "extra": jnp.ones(()),
    }


def test_compare_trees_lists_every_difference_sorted():
    report = fl.compare_trees(_expected(), _given())
    assert report == fl.LoadReport(
        missing=("['head']['b']",),
        unexpected=("['extra']", "['head']['bias']"),
        mismatched=(
            Mismatch("['body'][0]['b']", "float32[8]", "bfloat16[8]"),
            Mismatch("['body'][0]['w']", "float32[4, 8]", "float32[4, 9]"),
        ),
    )
    assert not report.ok
    assert str(report) == (
        "1 missing, 2 unexpected, 2 mismatched:\n"
        "  missing ['head']['b']\n"
        "  unexpected ['extra']\n"
        "  unexpected ['head']['bias']\n"
        "  mismatched ['body'][0]['b']: expected float32[8], got bfloat16[8]\n"
        "  mismatched ['body'][0]['w']: expected float32[4, 8], got float32[4, 9]"
    )
    hash(report)  # a frozen value: usable as a dict key, comparable


def test_compare_trees_reads_shapes_only_and_takes_a_prefix():
    expected = jax.eval_shape(lambda: _expected())  # ShapeDtypeStructs, nothing allocated
    assert fl.compare_trees(expected, _expected()).ok
    assert str(fl.compare_trees(expected, expected)) == "no differences"
    # a list and a tuple of the same items have the same paths
    as_tuple = {**_expected(), "body": tuple(_expected()["body"])}
    assert fl.compare_trees(_expected(), as_tuple).ok
    report = fl.compare_trees({"w": jnp.zeros(2)}, {"w": jnp.zeros(3)}, prefix="['body'][1]")
    assert report.mismatched == (Mismatch("['body'][1]['w']", "float32[2]", "float32[3]"),)
    keys = compare_leaves({"k": jax.random.key(0)}, {"k": jnp.zeros((), jnp.uint32)})
    assert keys.mismatched == (Mismatch("k", "key[]", "uint32[]"),)


def test_graft_raises_one_error_with_every_path():
    with pytest.raises(ValueError) as err:
        fl.graft({"model": _expected()}, _given(), at=("model",))
    message = str(err.value)
    assert message.startswith(
        "graft: pretrained at ('model',) does not fit params['model']: 1 missing, 2 unexpected, "
        "2 mismatched:\n  missing ['model']['head']['b']\n"
    )
    for path in ("['model']['extra']", "['model']['body'][0]['w']: expected float32[4, 8], got "
                 "float32[4, 9]", "['model']['body'][0]['b']"):  # fmt: skip
        assert path in message
    assert message.endswith("pass strict=False to graft the paths that match and get this report.")


def test_graft_not_strict_loads_what_matches_and_returns_the_report():
    expected, given = _expected(), _given()
    params, report = fl.graft(expected, given, strict=False)
    assert report == fl.compare_trees(expected, given)
    # matched: taken from given
    np.testing.assert_array_equal(params["body"][1]["scale"], given["body"][1]["scale"])
    np.testing.assert_array_equal(params["head"]["w"], np.ones((8, 3)))
    # missing or mismatched: the params' own leaf, with its shape and dtype
    np.testing.assert_array_equal(params["head"]["b"], np.zeros(3))
    np.testing.assert_array_equal(params["body"][0]["w"], np.zeros((4, 8)))
    assert params["body"][0]["b"].dtype == jnp.float32
    assert "extra" not in params and "bias" not in params["head"]
    np.testing.assert_array_equal(expected["head"]["w"], np.zeros((8, 3)))  # not modified
    # a tree that fits gives an empty report
    same, empty = fl.graft(expected, jax.tree_util.tree_map(jnp.ones_like, expected), strict=False)
    assert empty.ok and empty == fl.LoadReport()
    np.testing.assert_array_equal(same["head"]["b"], np.ones(3))


def test_load_checkpoint_reports_every_path_and_loads_what_matches(tmp_path):
    path = save_checkpoint(tmp_path / "c.npz", _given())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, _expected())
    assert f"checkpoint {path} does not match the model: " in str(err.value)
    assert str(fl.compare_trees(_expected(), _given())) in str(err.value)
    tree, meta, report = load_checkpoint(path, _expected(), strict=False)
    assert meta is None
    assert report == fl.compare_trees(_expected(), _given())
    np.testing.assert_array_equal(tree["head"]["w"], np.ones((8, 3)))  # loaded
    np.testing.assert_array_equal(tree["head"]["b"], np.zeros(3))  # missing: like's leaf
    assert tree["body"][0]["w"].shape == (4, 8)  # mismatched: like's leaf
