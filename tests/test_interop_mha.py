"""PyTorch nn.MultiheadAttention <-> fl.multi_head_attention weight conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fundl as fl
from fundl.interop import mha_from_torch, mha_to_torch

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kdim", [None, 5])
def test_matches_torch_multihead_attention(bias, kdim):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, bias=bias, batch_first=True, kdim=kdim, vdim=kdim)
    q = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    kv = np.random.default_rng(1).standard_normal((2, 4, kdim or 8)).astype(np.float32)
    pad = np.zeros((2, 4), bool)
    pad[1, 2:] = True  # torch: True = ignore this key
    with torch.no_grad():
        expected, _ = mha(torch.from_numpy(q), torch.from_numpy(kv), torch.from_numpy(kv),
                          key_padding_mask=torch.from_numpy(pad))  # fmt: skip
    params = jax.tree.map(jnp.asarray, mha_from_torch(mha.state_dict()))
    layer = fl.multi_head_attention(2, use_bias=bias)
    y, _ = layer.apply(params, (), q, kv, ~pad[:, None, :])
    np.testing.assert_allclose(y, expected.numpy(), rtol=1e-5, atol=1e-5)
    back = mha_to_torch(params)
    for name, value in mha.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy())


def test_conversion_errors():
    with pytest.raises(ValueError, match=r"expected in_proj_weight or q/k/v_proj_weight"):
        mha_from_torch({"weight": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"uses add_bias_kv"):
        mha_from_torch({"bias_k": np.zeros((1, 1, 4))})
    params, _ = fl.multi_head_attention(4, num_kv_heads=2).init(jax.random.key(0),
                                                                jnp.zeros((1, 2, 8)))  # fmt: skip
    with pytest.raises(ValueError, match=r"grouped-query attention has no"):
        mha_to_torch(params)
