"""`compile: true`: every decoder block compiled (regional), and training computes the same losses as eager."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from mmtrain.model.compile import compile_decoder_blocks
from mmtrain.model.llm import decoder_layers

from test_attention import make_model, packed_batch
from vlm_helpers import adamw_losses


def train_losses(connector: str, compiled: bool, steps: int = 3) -> list[float]:
    model = make_model(connector)
    batch, _ = packed_batch(model)
    if compiled:
        assert compile_decoder_blocks(model.llm) == len(decoder_layers(model.llm)) == 4
    return adamw_losses(model, batch, steps)


@pytest.mark.parametrize("connector, graphs", [("abstractor", 1), ("xattn", 3)])
def test_compiled_blocks_train_with_the_eager_losses(connector, graphs):
    """One graph serves every block (xattn: blocks with and without a cross-attention block before them, and the
    first call's), with no graph break (the connector's hooks are traced with the block)."""
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = train_losses(connector, False), train_losses(connector, True)
    assert eager[-1] < eager[0]  # the steps really train
    assert compiled == pytest.approx(eager, abs=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
