"""The layer registry: every public layer once, with the strategy that draws its cases.

The contract suite (``test_contract.py``) runs ``fundl.testing.check_case`` over every
entry; a new layer is covered by adding one line here (Haiku's descriptors, in spirit).
"""

from typing import NamedTuple

from hypothesis import strategies as st

from tests import cases


class Descriptor(NamedTuple):
    name: str
    cases: st.SearchStrategy  # draws fundl.testing.LayerCase
    # the share of the hypothesis profile's max_examples this layer runs: a transformer
    # block takes seconds per example to compile (forward, jvp, vjp and vmap programs)
    share: float = 1.0


LAYERS = [
    Descriptor("dense", cases.dense_cases()),
    Descriptor("flatten", cases.flatten_cases()),
    Descriptor("reshape", cases.reshape_cases()),
    Descriptor("function", cases.function_cases()),
    Descriptor("serial", cases.serial_cases()),
    Descriptor("parallel", cases.parallel_cases()),
    Descriptor("branch", cases.branch_cases()),
    Descriptor("residual", cases.residual_cases()),
    Descriptor("remat", cases.remat_cases()),
    Descriptor("with_policy", cases.with_policy_cases()),
    Descriptor("shared", cases.shared_cases()),
    Descriptor("embedding", cases.embedding_cases()),
    Descriptor("sinusoidal_positions", cases.sinusoidal_positions_cases()),
    Descriptor("learned_positions", cases.learned_positions_cases()),
    Descriptor("multi_head_attention", cases.multi_head_attention_cases(), share=0.5),
    Descriptor("encoder_block", cases.encoder_block_cases(), share=0.34),
    Descriptor("decoder_block", cases.decoder_block_cases(), share=0.34),
    Descriptor("repeat", cases.repeat_cases(), share=0.34),
    Descriptor("conv", cases.conv_cases()),
    Descriptor("conv_transpose", cases.conv_transpose_cases()),
    Descriptor("pool", cases.pool_cases()),
    Descriptor("global_pool", cases.global_pool_cases()),
    Descriptor("batch_norm", cases.batch_norm_cases()),
    Descriptor("layer_norm", cases.layer_norm_cases()),
    Descriptor("group_norm", cases.group_norm_cases()),
    Descriptor("rms_norm", cases.rms_norm_cases()),
    Descriptor("dropout", cases.dropout_cases()),
    Descriptor("simple_rnn_cell", cases.simple_rnn_cell_cases()),
    Descriptor("lstm_cell", cases.lstm_cell_cases()),
    Descriptor("gru_cell", cases.gru_cell_cases()),
    Descriptor("rnn", cases.rnn_cases(), share=0.5),
    Descriptor("bidirectional", cases.bidirectional_cases(), share=0.5),
    Descriptor("stacked_rnn", cases.stacked_rnn_cases(), share=0.5),
]
