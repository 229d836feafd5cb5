"""fundl: a functional neural-network library for JAX.

Every layer is a :class:`Layer`, a pair of pure functions ``init(key, *inputs) -> (params,
state)`` and ``apply(params, state, *inputs, key=None, train=False) -> (outputs, state)``;
combinators compose them, XLA compiles them, optax trains them.
"""

from fundl import bench, checkpoint, datasets, interop, metrics, sharded_checkpoint, testing
from fundl.activations import (
    elu,
    gelu,
    leaky_relu,
    log_softmax,
    relu,
    sigmoid,
    silu,
    softmax,
    swish,
    tanh,
)
from fundl.attention import KVCache, init_cache, multi_head_attention
from fundl.attention_kernels import dot_product_attention
from fundl.combinators import (
    as_layer,
    branch,
    fan_in_concat,
    fan_in_sum,
    fan_out,
    function,
    identity,
    parallel,
    repeat,
    residual,
    serial,
    shared,
)
from fundl.compilation_cache import cache_compilations
from fundl.conv import conv, conv_transpose
from fundl.core import ApplyFn, InitFn, Layer, Params, State
from fundl.dense import dense, flatten, reshape
from fundl.dropout import dropout
from fundl.embedding import (
    attend,
    embedding,
    learned_positions,
    rotary,
    sinusoidal_positions,
    sinusoidal_table,
)
from fundl.export import export, load_exported
from fundl.inspect import capture, layer_paths, submodel
from fundl.interop import from_torch, to_torch_state_dict
from fundl.load_report import LoadReport, compare_trees
from fundl.metrics import accuracy, masked_mean
from fundl.norm import BatchNormState, batch_norm, group_norm, layer_norm, rms_norm
from fundl.onnx import to_onnx
from fundl.plot import plot_history
from fundl.pooling import avg_pool, global_avg_pool, global_max_pool, max_pool
from fundl.precision import Policy, policy_paths, with_policy
from fundl.recurrent import (
    Cell,
    bidirectional,
    gru_cell,
    initial_carry,
    lstm_cell,
    make_cell,
    rnn,
    simple_rnn_cell,
)
from fundl.remat import remat
from fundl.sharding import (
    ShardingRules,
    fsdp_rules,
    init_sharded,
    param_paths,
    shard_like,
    shard_params,
    sharding_rules,
    tensor_parallel_rules,
)
from fundl.summary import summary
from fundl.train import (
    NonFiniteLossError,
    StopTraining,
    TrainState,
    early_stopping,
    evaluate,
    fit,
    freeze,
    graft,
    init_train_state,
    make_eval_step,
    make_train_step,
)
from fundl.transformer import attention_residual, decoder_block, encoder_block

__version__ = "0.2.0"

__all__ = [
    # the contract
    "Layer",
    "InitFn",
    "ApplyFn",
    "Params",
    "State",
    # combinators
    "serial",
    "parallel",
    "branch",
    "fan_out",
    "fan_in_sum",
    "fan_in_concat",
    "residual",
    "shared",
    "repeat",
    "remat",
    "function",
    "identity",
    "as_layer",
    # dense layers
    "dense",
    "flatten",
    "reshape",
    # activations (from jax.nn)
    "relu",
    "leaky_relu",
    "elu",
    "gelu",
    "silu",
    "swish",
    "sigmoid",
    "tanh",
    "softmax",
    "log_softmax",
    # convolutional networks
    "conv",
    "conv_transpose",
    "max_pool",
    "avg_pool",
    "global_avg_pool",
    "global_max_pool",
    # normalization and regularization
    "batch_norm",
    "BatchNormState",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "dropout",
    # recurrent layers
    "Cell",
    "simple_rnn_cell",
    "lstm_cell",
    "gru_cell",
    "make_cell",
    "initial_carry",
    "rnn",
    "bidirectional",
    # attention and transformers
    "embedding",
    "attend",
    "sinusoidal_table",
    "sinusoidal_positions",
    "learned_positions",
    "rotary",
    "dot_product_attention",
    "multi_head_attention",
    "KVCache",
    "init_cache",
    "attention_residual",
    "encoder_block",
    "decoder_block",
    # training
    "TrainState",
    "init_train_state",
    "make_train_step",
    "make_eval_step",
    "evaluate",
    "fit",
    "early_stopping",
    "StopTraining",
    "NonFiniteLossError",
    "freeze",
    "graft",
    "LoadReport",
    "compare_trees",
    "cache_compilations",
    # precision
    "Policy",
    "with_policy",
    "policy_paths",
    # sharding
    "ShardingRules",
    "sharding_rules",
    "tensor_parallel_rules",
    "fsdp_rules",
    "param_paths",
    "shard_params",
    "shard_like",
    "init_sharded",
    # metrics and tools
    "accuracy",
    "masked_mean",
    "summary",
    "plot_history",
    # models in and out
    "export",
    "load_exported",
    "to_onnx",
    "from_torch",
    "to_torch_state_dict",
    # looking inside a model
    "layer_paths",
    "capture",
    "submodel",
    # submodules
    "bench",
    "checkpoint",
    "datasets",
    "interop",
    "metrics",
    "sharded_checkpoint",
    "testing",
]
