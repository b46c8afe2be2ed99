"""The abstractor's toy-scale options (off by default): image_only, center, output_scale."""

from __future__ import annotations

import torch

from mmtrain.model.connectors.abstractor import AbstractorOptions, VisualAbstractor


def _abstractor(**options) -> VisualAbstractor:
    torch.manual_seed(0)
    o = AbstractorOptions(num_queries=4, num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32, **options)
    return VisualAbstractor(o, vision_width=8, out_width=12)


def test_defaults_are_mplug_owl() -> None:
    a = _abstractor()
    assert a.visual_fc.bias is not None and a.running_mean is None and a.output_gain is None
    assert torch.equal(a.queries, torch.zeros_like(a.queries))


def test_image_only_output_comes_from_the_image() -> None:
    a = _abstractor(image_only=True, end_token=False)
    assert a.visual_fc.bias is None and a.queries.abs().sum() > 0
    images = torch.randn(3, 5, 8)
    out = a(images)
    assert not torch.allclose(out[0], out[1])
    q = a.queries.expand(3, -1, -1)  # what the layer added to the queries, not the queries themselves
    torch.testing.assert_close(out, a.visual_fc(a.layers[0](q, a.vision_in(images)) - q))


def test_center_subtracts_the_batch_mean_in_training_and_the_running_mean_otherwise() -> None:
    a = _abstractor(center=True, center_momentum=0.5, end_token=False)
    images = torch.randn(4, 5, 8)
    a.train()
    out = a(images)
    torch.testing.assert_close(out.mean(0), torch.zeros(4, 12), atol=1e-6, rtol=0)
    assert a.running_mean.abs().sum() > 0  # updated half way to the batch mean
    a.eval()
    single = a(images[:1])
    raw = a.visual_fc(a.layers[0](a.queries.expand(1, -1, -1), a.vision_in(images[:1])))
    torch.testing.assert_close(single, raw - a.running_mean)


def test_output_scale_normalises_each_token() -> None:
    a = _abstractor(output_scale=0.024, end_token=False)
    out = a(torch.randn(2, 5, 8) * 10)
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.024), rtol=1e-3, atol=0)
