"""Sharding rules by param path: matching, the built-in layouts, errors, the optimizer state.

Rules are a pure function of shapes and a mesh's axis sizes, so these run on one device
with ``AbstractMesh``es of any shape; training on forced CPU devices is in
``tests/test_sharding_fit.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import fundl as fl

VOCAB, WIDTH, HEADS, MLP, LAYERS = 32, 16, 4, 64, 2
MESH_2D = AbstractMesh((2, 4), ("data", "model"))
MESH_8 = AbstractMesh((8,), ("data",))


def gpt():
    return fl.serial(
        embed=fl.embedding(VOCAB, WIDTH),
        blocks=fl.repeat(fl.decoder_block(WIDTH, HEADS, mlp_features=MLP), times=LAYERS),
        norm=fl.layer_norm(),
        head=fl.dense(VOCAB),
    )


def gpt_shapes():
    tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    return jax.eval_shape(gpt().init, jax.random.key(0), tokens)[0]


def specs(shardings):
    paths = fl.param_paths(shardings)
    return {path: s.spec for path, s in zip(paths, _leaves(shardings), strict=True)}


def _leaves(tree):
    return jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))


def test_param_paths_join_dict_keys_and_tuple_positions():
    params = gpt_shapes()
    paths = fl.param_paths(params)
    assert "blocks/attn/attn/query/w" in paths and "embed/table" in paths
    tuple_model = fl.serial(fl.dense(4), fl.dense(2))
    shapes = jax.eval_shape(tuple_model.init, jax.random.key(0), jnp.zeros((1, 3)))[0]
    assert fl.param_paths(shapes) == ["0/b", "0/w", "1/b", "1/w"]


def test_tensor_parallel_layout_is_megatron_on_the_stacked_blocks():
    rules = (*fl.tensor_parallel_rules("model"), ("head/*", P("model")), ("norm/*", P()))
    got = specs(fl.shard_params(gpt_shapes(), MESH_2D, rules))
    column, row, rep = P(None, None, "model"), P(None, "model", None), P(None, None)
    # repeat stacks each block param along a leading layer axis, never split
    expected = {
        **{f"blocks/attn/attn/{p}/w": column for p in ("query", "key", "value")},
        **{f"blocks/attn/attn/{p}/b": P(None, "model") for p in ("query", "key", "value")},
        "blocks/attn/attn/out/w": row,
        "blocks/attn/attn/out/b": rep,
        "blocks/mlp/up/w": column,
        "blocks/mlp/up/b": P(None, "model"),
        "blocks/mlp/down/w": row,
        "blocks/mlp/down/b": rep,
        **{f"blocks/{b}/norm/{p}": rep for b in ("attn", "mlp") for p in ("scale", "bias")},
        "embed/table": P("model", None),  # over the vocabulary
        "head/w": P(None, "model"),
        "head/b": P("model"),
        "norm/scale": P(None),
        "norm/bias": P(None),
    }
    assert got == expected
    width = (*fl.tensor_parallel_rules(embedding="width"), ("head/*", P()), ("norm/*", P()))
    assert specs(fl.shard_params(gpt_shapes(), MESH_2D, width))["embed/table"] == P(None, "model")


def test_the_first_matching_rule_wins_and_specs_name_the_last_axes():
    params = {"a": {"w": jnp.zeros((2, 8, 4))}, "b": {"w": jnp.zeros((8, 4))}}
    rules = [("a/*", P("model", None)), ("*/w", P("data")), ("*", P())]
    got = specs(fl.shard_params(params, MESH_2D, rules))
    assert got == {"a/w": P(None, "model", None), "b/w": P(None, "data")}


def test_fsdp_splits_each_param_on_its_largest_divisible_axis():
    params = {"w": jnp.zeros((2, 16, 64)), "v": jnp.zeros((24, 16)), "b": jnp.zeros(3),
              "s": jnp.zeros(())}  # fmt: skip
    rules = fl.fsdp_rules(params, MESH_8)
    assert dict(rules) == {"w": P(None, None, "data"), "v": P("data", None), "b": P(None),
                           "s": P()}  # fmt: skip
    # one explicit rule per param: strict rules cover the whole model
    assert len(specs(fl.shard_params(gpt_shapes(), MESH_8, fl.fsdp_rules(gpt_shapes(), MESH_8))))


def test_a_rule_that_matches_no_param_names_it_and_the_paths():
    rules = (*fl.tensor_parallel_rules(), ("*/atention/*", P()), ("*", P()))
    message = r"1 rule\(s\) match no param: \['\*/atention/\*'\]\. The params' paths are"
    with pytest.raises(ValueError, match=message) as e:
        fl.shard_params(gpt_shapes(), MESH_2D, rules)
    assert "blocks/attn/attn/key/b" in str(e.value) and "more)" in str(e.value)


def test_strict_rules_name_the_params_no_rule_covers_and_loose_ones_replicate():
    rules = fl.tensor_parallel_rules()
    message = r"no rule covers 4 param\(s\): head/b, head/w, norm/bias, norm/scale\. Add rules"
    with pytest.raises(ValueError, match=message):
        fl.shard_params(gpt_shapes(), MESH_2D, rules)
    loose = fl.sharding_rules(rules, strict=False)
    assert specs(fl.shard_params(gpt_shapes(), MESH_2D, loose))["head/w"] == P()


def test_specs_are_checked_against_the_mesh_and_the_shapes():
    params = {"w": jnp.zeros((6, 8))}
    with pytest.raises(ValueError, match=r"the mesh has axes \('data', 'model'\), not \['x'\]"):
        fl.shard_params(params, MESH_2D, [("w", P("x"))])
    with pytest.raises(ValueError, match=r"axis of size 6 does not split over \('model',\)"):
        fl.shard_params(params, MESH_2D, [("w", P("model", None))])
    with pytest.raises(ValueError, match=r"the spec has 3 entries, the param 2 axes"):
        fl.shard_params(params, MESH_2D, [("w", P(None, None, "data"))])
    with pytest.raises(TypeError, match=r"rule 0 must be a \(pattern, PartitionSpec\) pair"):
        fl.sharding_rules([("w", ("model",))])
    with pytest.raises(ValueError, match=r'embedding must be "vocab", "width" or None'):
        fl.tensor_parallel_rules(embedding="rows")
    with pytest.raises(ValueError, match=r"fsdp_rules: the mesh has axes \('data',\), not 'd'"):
        fl.fsdp_rules(params, MESH_8, axis="d")


def test_the_optimizer_state_follows_its_params():
    params = gpt_shapes()
    rules = (*fl.tensor_parallel_rules(), ("head/*", P("model")), ("norm/*", P()))
    shardings = fl.shard_params(params, MESH_2D, rules)
    opt_shapes = jax.eval_shape(optax.adam(1e-3).init, params)
    opt = fl.shard_like(opt_shapes, params, shardings)
    assert specs(opt[0].mu) == specs(opt[0].nu) == specs(shardings)
    assert opt[0].count.spec == P()
    # a leaf shaped unlike the param at its path (a factored statistic) is replicated
    tree = {"w": jnp.zeros(3), "stats": {"head": {"w": jnp.zeros((WIDTH, VOCAB))}}}
    got = fl.shard_like(tree, params, shardings)
    assert got["w"].spec == P() and got["stats"]["head"]["w"].spec == P(None, "model")


def test_init_sharded_gives_the_values_of_init():
    layer = fl.dense(8)
    x = jnp.zeros((2, 3))
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    rules = [("w", P(None, "model")), ("b", P("model"))]
    params, _ = fl.init_sharded(layer.init, jax.random.key(0), x, mesh=mesh, rules=rules)
    expected, _ = layer.init(jax.random.key(0), x)
    # jit and eager compile the initializers separately: equal to float32 rounding
    tol = 4 * float(np.finfo(np.float32).eps)
    fl.testing.assert_trees_close(params, expected, rtol=tol, atol=tol, what="params")
    assert params["w"].sharding.spec == P(None, "model")
    assert params["b"].sharding.spec == P("model")


def test_fit_needs_a_mesh_for_rules_and_not_both_layouts():
    x, y = np.zeros((8, 3), np.float32), np.zeros(8, np.int32)
    model, xent = fl.dense(2), optax.softmax_cross_entropy_with_integer_labels
    with pytest.raises(ValueError, match=r"fit: rules place params on a mesh; pass mesh="):
        fl.fit(model, xent, optax.sgd(0.1), (x, y), epochs=1, rules=[("*", P())], progress=False)
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match=r"fit: pass rules or shard_params=True, not both"):
        fl.fit(model, xent, optax.sgd(0.1), (x, y), epochs=1, rules=[("*", P())], mesh=mesh,
               shard_params=True, progress=False)  # fmt: skip
