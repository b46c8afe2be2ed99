"""The data↔model contract: a batch from the real loader feeds `mmtrain.model` for each of the four connectors,
with the slots per image taken from the model config (abstractor 65, mlp patches + CLS, xattn 1, layerwise 0)."""

import pytest
import torch
import torch.nn.functional as F
from loader_fixtures import tiny_tokenizer, write_shard_set

from mmtrain.data.loader.images import ImageConfig
from mmtrain.data.loader.config import LoaderConfig
from mmtrain.data.loader.stream import build_loader
from mmtrain.data.loader.image_token import image_token_id
from mmtrain.model import VisionLanguageModel, num_image_slots, tiny_config
from mmtrain.train.runtime import model_inputs

SLOTS = {"abstractor": 65, "mlp": 17, "xattn": 1, "layerwise": 0}  # mlp: (32 / 8)² patches + CLS


def assert_loss_is_the_labels_cross_entropy(out, labels: torch.Tensor) -> None:
    """The model's loss is the next-token cross-entropy of its logits against the batch's labels (the contract:
    labels are aligned with input_ids, -100 where nothing is learned), and there is something to learn."""
    assert int((labels[:, 1:] != -100).sum()) > 0
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shard_set(tmp_path_factory.mktemp("contract") / "s", [6])


def first_batch(shards, slots, pack=False):
    cfg = LoaderConfig(data=str(shards), num_image_slots=slots, batch_size=1 if pack else 4, max_length=1024,
                       num_workers=0,
                       image=ImageConfig(size=32), shuffle=False, pack=pack)
    return next(iter(build_loader(cfg, tiny_tokenizer(), rank=0, world_size=1)))


@pytest.mark.parametrize("connector", ["abstractor", "mlp", "xattn", "layerwise"])
def test_loader_batch_runs_forward_with_loss(shards, connector):
    tok = tiny_tokenizer()
    config = tiny_config(connector, vocab_size=len(tok), image_token_id=image_token_id(tok), layers=2)
    slots = num_image_slots(config)
    assert slots == SLOTS[connector]
    batch = first_batch(shards, slots)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)  # samples 1, 2 (2 images), 3 are not text-only
    assert batch["pixel_values"].dtype == torch.uint8  # normalized by the trainer, on the device
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config).eval()
    ids = batch["input_ids"]
    assert int((ids == image_token_id(tok)).sum()) == 3 * slots
    for row, start in batch["image_slots"].tolist():
        if slots:
            assert ids[row, start:start + slots].eq(image_token_id(tok)).all()
        else:  # the first token after the mark: the owl fixture writes "<image>\n", so a newline token
            assert tok.decode(ids[row, start:start + 1]).startswith("\n")
    with torch.no_grad():
        inputs = model_inputs(batch, torch.device("cpu"), torch.float32)
        out = model(**inputs)
    assert_loss_is_the_labels_cross_entropy(out, inputs["labels"])


def test_packed_layerwise_batch_runs_forward(shards):
    tok = tiny_tokenizer()
    config = tiny_config("layerwise", vocab_size=len(tok), image_token_id=image_token_id(tok), layers=2)
    batch = first_batch(shards, 0, pack=True)
    assert batch["input_ids"].shape[0] == 1 and batch["image_slots"][:, 0].tolist() == [0] * 8
    assert batch["segment_ids"].max().item() == 8  # eight samples in one row; positions shifted by their offsets
    model = VisionLanguageModel.from_config(config).eval()
    with torch.no_grad():
        inputs = model_inputs(batch, torch.device("cpu"), torch.float32)
        assert torch.equal(inputs["segment_ids"], batch["segment_ids"])  # the model builds its document mask
        out = model(**inputs)
    assert_loss_is_the_labels_cross_entropy(out, inputs["labels"])
