"""Every registered layer keeps the contract (fundl.testing.check_layer), over drawn cases."""

import pytest
from hypothesis import given

from fundl.testing import check_layer
from tests.registry import LAYERS


@pytest.mark.parametrize("descriptor", LAYERS, ids=lambda d: d.name)
def test_layer_contract(descriptor):
    @given(descriptor.cases)
    def check(case):
        check_layer(case.layer, *case.inputs, train=case.train, output_shapes=case.output_shapes,
                    grad_modes=case.grad_modes)  # fmt: skip

    check()
