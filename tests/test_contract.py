"""Every registered layer keeps the contract (fundl.testing.check_case), over drawn cases."""

import pytest
from hypothesis import given, settings

from fundl.testing import check_case
from tests.registry import LAYERS


@pytest.mark.numerics  # jit vs eager, vmap vs loop, modes vs finite differences
@pytest.mark.parametrize("descriptor", LAYERS, ids=lambda d: d.name)
def test_layer_contract(descriptor):
    examples = max(2, round(settings.default.max_examples * descriptor.share))

    @settings(max_examples=examples)
    @given(descriptor.cases)
    def check(case):
        check_case(case)

    check()
