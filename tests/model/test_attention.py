"""Packed rows through every attention implementation: flex and varlen give the dense-mask path's losses and gradients
(fp32, atol 1e-5) for every connector and LLM family, positions restart per document, and a packed row's loss is
its documents' losses computed alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex

from mmtrain.data.loader.collate import Example, pack
from mmtrain.errors import UserError
from mmtrain.model.attention import check_window, cu_seqlens, dense_document_mask, resolve_attention
from mmtrain.model.presets import tiny_config
from mmtrain.model.vlm import VisionLanguageModel

IMPLEMENTATIONS = ("flex", "flash_varlen")
ROWS = (((1, 5), (0, 7), (2, 3)), ((0, 4), (1, 6)))
"""Two packed rows of documents, each (images, text tokens); the second row ends in padding."""


@pytest.fixture
def flex_on_cpu(monkeypatch):
    """torch refuses flex_attention's backward on CPU by a device check alone; its reference math (the same mask
    semantics the CUDA kernel computes) runs once the check is lifted, so the mask can be checked here."""
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *args: None)


def make_model(connector: str, family: str = "llama", seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    model = VisionLanguageModel.from_config(tiny_config(connector, llm_family=family, layers=4))
    with torch.no_grad():  # open every gate so images really change the text's hidden states
        for name, p in model.connector.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.7)
    return model


def document(model: VisionLanguageModel, images: int, text: int, gen: torch.Generator) -> tuple[list[int], list[int]]:
    """Token ids of one sample (2 text tokens before each image's slot run, then `text` tokens) and its image starts."""
    vocab = model.config.text_config["vocab_size"] - 2
    ids, starts = [], []
    for _ in range(images):
        ids += torch.randint(1, vocab, (2,), generator=gen).tolist()
        starts.append(len(ids))
        ids += [model.config.image_token_id] * model.num_image_slots
    return ids + torch.randint(1, vocab, (text,), generator=gen).tolist(), starts


def packed_batch(model: VisionLanguageModel, rows=ROWS, seed: int = 3) -> tuple[dict, list[dict]]:
    """A packed batch (as the loader's pack() lays it out: first label of each document masked, positions restarting,
    segment ids, trailing padding) and each document alone as a batch of one."""
    gen = torch.Generator().manual_seed(seed)
    docs = [[document(model, images, text, gen) for images, text in row] for row in rows]
    width = max(sum(len(ids) for ids, _ in row) for row in docs) + 3
    size = model.vision.image_size
    pixels = torch.randn(sum(len(s) for row in docs for _, s in row), 3, size, size, generator=gen)
    batch = {k: torch.zeros(len(rows), width, dtype=torch.long) for k in ("input_ids", "position_ids", "segment_ids",
                                                                           "attention_mask")}
    batch["labels"] = torch.full((len(rows), width), -100)
    slots, alone, image = [], [], 0
    for r, row in enumerate(docs):
        offset = 0
        for d, (ids, starts) in enumerate(row):
            n = len(ids)
            span = slice(offset, offset + n)
            ids_t = torch.tensor(ids)
            labels = ids_t.masked_fill(ids_t == model.config.image_token_id, -100)
            batch["input_ids"][r, span], batch["labels"][r, span] = ids_t, labels
            batch["labels"][r, offset] = -100
            batch["position_ids"][r, span] = torch.arange(n)
            batch["segment_ids"][r, span], batch["attention_mask"][r, span] = d + 1, 1
            slots += [(r, offset + s) for s in starts]
            alone.append({"input_ids": ids_t[None], "labels": labels[None], "pixel_values": pixels[image:image + len(starts)],
                          "image_slots": torch.tensor([(0, s) for s in starts], dtype=torch.long).reshape(-1, 2)})
            image += len(starts)
            offset += n
    batch["pixel_values"], batch["image_slots"] = pixels, torch.tensor(slots, dtype=torch.long).reshape(-1, 2)
    return batch, alone


def loss_and_grads(model: VisionLanguageModel, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(reference: tuple, other: tuple, what: str) -> None:
    torch.testing.assert_close(other[0], reference[0], atol=1e-5, rtol=0, msg=lambda m: f"{what} loss: {m}")
    assert sorted(other[1]) == sorted(reference[1]), f"{what}: other parameters got gradients"
    for name, grad in reference[1].items():
        torch.testing.assert_close(other[1][name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} {name}: {m}")


@pytest.mark.parametrize("connector", ["abstractor", "mlp", "xattn", "layerwise"])
def test_block_skipping_attention_equals_the_dense_mask_for_every_connector(connector, flex_on_cpu):
    model = make_model(connector)
    batch, _ = packed_batch(model)
    reference = loss_and_grads(model, batch)
    llm = [n for n, _ in model.named_parameters() if n.startswith("llm.")]
    assert set(llm) <= set(reference[1]) and any(n.startswith("connector.") for n in reference[1])
    for implementation in IMPLEMENTATIONS:
        model.set_attention(implementation)
        assert_same(reference, loss_and_grads(model, batch), f"{connector}/{implementation}")
        model.set_attention("sdpa")
    assert_same(reference, loss_and_grads(model, batch), f"{connector}/sdpa again")


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gemma", "gpt_neox"])
def test_block_skipping_attention_equals_the_dense_mask_for_every_family(family, flex_on_cpu):
    model = make_model("abstractor", family)
    batch, _ = packed_batch(model)
    reference = loss_and_grads(model, batch)
    for implementation in IMPLEMENTATIONS:
        model.set_attention(implementation)
        assert_same(reference, loss_and_grads(model, batch), f"{family}/{implementation}")


def test_soft_capped_attention_is_kept_by_flex_and_refused_by_varlen(flex_on_cpu):
    """Gemma-2 soft-caps attention logits (transformers runs it eagerly for that): a cap small enough to matter
    changes the loss, flex applies it as a score_mod, and varlen, which cannot, refuses rather than drop it."""
    config = tiny_config("abstractor", llm_family="gemma2", layers=4)
    config.text_config.update(attn_logit_softcapping=0.5, initializer_range=0.5)  # scores large enough to cap
    torch.manual_seed(0)
    model = VisionLanguageModel.from_config(config)
    batch, _ = packed_batch(model)
    model.set_attention("sdpa")
    assert model.llm.config._attn_implementation == "eager"
    reference = loss_and_grads(model, batch)
    attention = [layer.self_attn for layer in model.llm.model.layers]
    for module in attention:
        module.attn_logit_softcapping = None
    assert abs(loss_and_grads(model, batch)[0] - reference[0]) > 1e-3
    for module in attention:
        module.attn_logit_softcapping = 0.5
    model.set_attention("flex")
    assert_same(reference, loss_and_grads(model, batch), "gemma2/flex")
    model.set_attention("flash_varlen")
    with pytest.raises(UserError, match="soft-capping"):
        loss_and_grads(model, batch)


@pytest.mark.parametrize("implementation", ["sdpa", *IMPLEMENTATIONS])
@pytest.mark.parametrize("connector", ["abstractor", "mlp", "xattn", "layerwise"])
def test_a_packed_rows_loss_is_its_documents_losses_alone(connector, implementation, flex_on_cpu):
    """Restarted positions, the masked first label, images seen only by their own document (a document after one
    with an image included): the packed loss is the label-weighted mean of the documents' own losses, each computed
    in a batch of its own (no packing, no mask)."""
    model = make_model(connector).eval()
    model.set_attention(implementation)
    batch, alone = packed_batch(model)
    with torch.no_grad():
        packed = model(**batch).loss
        total = count = 0
        for doc in alone:
            labels = doc["labels"].clone()
            labels[0, 0] = -100  # the packed row masks each document's first label; the lone batch never learns it
            n = int((labels[:, 1:] != -100).sum())
            total += model(**{**doc, "labels": labels}).loss * n
            count += n
    torch.testing.assert_close(packed, total / count, atol=1e-5, rtol=0)


def test_packed_batches_restart_positions_per_document():
    """The loader's packing (collate.pack): positions count 0, 1, … within each document, 0 on padding, and the
    segment ids number the documents of each row from 1, so every implementation sees the same boundaries."""
    lengths = (5, 9, 3, 7, 12, 2)
    examples = [Example(list(range(10, 10 + n)), list(range(10, 10 + n)), [], None, f"k{i}")
                for i, n in enumerate(lengths)]
    batch = pack(examples, 0, (3, 4, 4), max_length=16)
    seen = []
    for row, segments in enumerate(batch["segment_ids"].tolist()):
        for s in range(1, max(segments) + 1):
            where = [t for t, v in enumerate(segments) if v == s]
            assert where == list(range(where[0], where[0] + len(where)))  # one contiguous run per document
            assert batch["position_ids"][row, where].tolist() == list(range(len(where)))
            assert batch["labels"][row, where[0]].item() == -100  # never learns from the previous document
            seen.append(len(where))
        padding = [t for t, v in enumerate(segments) if v == 0]
        assert batch["position_ids"][row, padding].tolist() == [0] * len(padding)
    assert sorted(seen) == sorted(lengths)


def test_document_boundaries_for_varlen_kernels():
    segments = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1], [1, 2, 3, 0, 0, 0]])
    bounds, longest = cu_seqlens(segments)
    assert bounds.tolist() == [0, 2, 5, 6, 12, 13, 14, 15, 18] and bounds.dtype == torch.int32 and longest == 6


def test_dense_document_mask_lets_padding_see_only_itself():
    allowed = (dense_document_mask(torch.tensor([[1, 1, 2, 0, 0]]))[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


def test_attention_choice_is_resolved_or_refused_with_the_reason():
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("auto", "cuda") == "flex"
    assert resolve_attention("auto", "cuda", packed=False) == "sdpa"
    assert resolve_attention("flash_varlen", "cpu") == "flash_varlen"
    assert resolve_attention("flex", "cpu", training=False) == "flex"
    with pytest.raises(UserError, match="backward only on CUDA"):
        resolve_attention("flex", "cpu")
    with pytest.raises(UserError, match="auto, sdpa, flex, flash_varlen"):
        resolve_attention("flash", "cuda")
    check_window(None, 8192), check_window(4096, 4096)
    with pytest.raises(UserError, match="rows of 4104 tokens exceed the LLM's sliding_window 4096"):
        check_window(4096, 4104)
