"""The layer registry: every public layer once, with the strategy that draws its cases.

The contract suite (``test_contract.py``) runs ``fundl.testing.check_layer`` over every
entry; a new layer is covered by adding one line here (Haiku's descriptors, in spirit).
"""

from typing import NamedTuple

from hypothesis import strategies as st

from fundl.testing import strategies as fst


class Descriptor(NamedTuple):
    name: str
    cases: st.SearchStrategy  # draws fundl.testing.strategies.LayerCase


LAYERS = [
    Descriptor("dense", fst.dense_cases()),
    Descriptor("flatten", fst.flatten_cases()),
    Descriptor("reshape", fst.reshape_cases()),
    Descriptor("function", fst.function_cases()),
    Descriptor("serial", fst.serial_cases()),
    Descriptor("parallel", fst.parallel_cases()),
    Descriptor("branch", fst.branch_cases()),
    Descriptor("residual", fst.residual_cases()),
    Descriptor("shared", fst.shared_cases()),
    Descriptor("embedding", fst.embedding_cases()),
    Descriptor("sinusoidal_positions", fst.sinusoidal_positions_cases()),
    Descriptor("learned_positions", fst.learned_positions_cases()),
    Descriptor("multi_head_attention", fst.multi_head_attention_cases()),
    Descriptor("encoder_block", fst.encoder_block_cases()),
    Descriptor("decoder_block", fst.decoder_block_cases()),
    Descriptor("repeat", fst.repeat_cases()),
    Descriptor("conv", fst.conv_cases()),
    Descriptor("conv_transpose", fst.conv_transpose_cases()),
    Descriptor("pool", fst.pool_cases()),
    Descriptor("global_pool", fst.global_pool_cases()),
    Descriptor("batch_norm", fst.batch_norm_cases()),
    Descriptor("layer_norm", fst.layer_norm_cases()),
    Descriptor("group_norm", fst.group_norm_cases()),
    Descriptor("rms_norm", fst.rms_norm_cases()),
    Descriptor("dropout", fst.dropout_cases()),
    # recurrent (issue 6)
    Descriptor("simple_rnn_cell", fst.simple_rnn_cell_cases()),
    Descriptor("lstm_cell", fst.lstm_cell_cases()),
    Descriptor("gru_cell", fst.gru_cell_cases()),
    Descriptor("rnn", fst.rnn_cases()),
    Descriptor("bidirectional", fst.bidirectional_cases()),
    Descriptor("stacked_rnn", fst.stacked_rnn_cases()),
]
