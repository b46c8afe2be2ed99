"""Regional compilation: torch.compile each decoder block of the LLM in place.

Compiling blocks rather than the whole model keeps compile time to one block's graph (the blocks share code, so
dynamo reuses it for every layer) and leaves the parts around them — the vision tower, the connector's hooks on the
layer inputs, the loss — in eager mode, where shapes vary from batch to batch.
"""

from __future__ import annotations

from torch import nn

from mmtrain.model.llm import decoder_layers


def compile_decoder_blocks(llm: nn.Module, **compile_options) -> int:
    """`nn.Module.compile` on every decoder block of `llm` (its call, hooks included); returns how many."""
    layers = decoder_layers(llm)
    for layer in layers:
        layer.compile(**compile_options)
    return len(layers)
