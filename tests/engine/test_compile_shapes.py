"""trainer.compile=true compiles with static shapes: every new input shape (a progressive-resizing step, the
validation size, a last partial batch) gets its own specialised graph instead of one dynamic-shape graph."""

import pytest
import torch
from torch import nn

from res2net.engine.distributed import DistInfo, wrap_model


@pytest.mark.slow  # inductor compilations on the CPU
def test_wrap_model_compiles_each_input_shape_statically():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    net = wrap_model(nn.Linear(8, 4), DistInfo(), compile=True)
    for batch in (2, 3, 5):  # automatic dynamic shapes would compile a symbolic graph at 3 and reuse it at 5
        assert net(torch.randn(batch, 8)).shape == (batch, 4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()
