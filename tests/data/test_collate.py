"""Padding and packing: exact tensors, image index, and packed logits equal to each sample run alone."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmtrain.model.attention import dense_document_mask
from mmtrain.data.loader.collate import Example, collate, pack, pack_rows, padding_waste

SHAPE = (3, 4, 4)


def ex(n, images=(), key="", start=10):
    ids = list(range(start, start + n))
    labels = [-100] * (n // 2) + ids[n // 2:]
    pix = torch.stack([torch.full(SHAPE, float(len(key) + i)) for i in range(len(images))]) if images else None
    return Example(ids, labels, list(images), pix, key)


def test_dynamic_padding_masks_and_image_index():
    batch = collate([ex(5, (1,), "a"), ex(11, (), "bb"), ex(9, (0, 5), "ccc")], pad_id=3, image_shape=SHAPE)
    assert batch["input_ids"].shape == (3, 16)  # longest 11 → multiple of 8
    assert batch["input_ids"][0].tolist() == list(range(10, 15)) + [3] * 11
    assert batch["labels"][0].tolist() == [-100, -100, 12, 13, 14] + [-100] * 11
    assert batch["attention_mask"].sum(1).tolist() == [5, 11, 9]
    assert batch["image_slots"].tolist() == [[0, 1], [2, 0], [2, 5]]
    assert batch["pixel_values"].shape == (3, *SHAPE)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 3.0, 4.0]
    assert batch["keys"] == ["a", "bb", "ccc"] and batch["filler"].tolist() == [False] * 3
    assert padding_waste(batch) == (48 - 25, 48)


def test_text_only_batch_has_empty_pixels():
    batch = collate([ex(3), ex(4)], pad_id=0, image_shape=SHAPE)
    assert batch["pixel_values"].shape == (0, *SHAPE) and batch["image_slots"].shape == (0, 2)
    assert batch["input_ids"].shape == (2, 8)


def test_pack_layout():
    assert pack_rows([5, 9, 3, 7, 16], 16) == [[0, 1], [2, 3], [4]]
    b = pack([ex(5, (2,), "a"), ex(9, (), "b"), ex(3, (), "c"), ex(7, (1,), "d")], 0, SHAPE, max_length=16)
    assert b["input_ids"].shape == (2, 16)
    assert b["position_ids"][0].tolist() == list(range(5)) + list(range(9)) + [0, 0]
    assert b["segment_ids"][1].tolist() == [1] * 3 + [2] * 7 + [0] * 6
    assert b["labels"][0, 5].item() == -100  # first token of a packed sample never learns
    assert b["cu_seqlens"].tolist() == [0, 5, 14, 17, 24] and b["max_seqlen"] == 9
    assert b["image_slots"].tolist() == [[0, 2], [1, 4]]
    assert b["keys"] == ["a", "b", "c", "d"]


def test_packed_logits_equal_each_sample_alone():
    """Tiny LlamaForCausalLM (eager and sdpa) with the 4D block-diagonal causal mask + restarted positions."""
    torch.manual_seed(0)
    examples = [ex(n, start=s) for n, s in ((5, 1), (9, 7), (3, 20), (7, 33), (12, 2))]
    batch = pack(examples, 0, SHAPE, max_length=16)
    for impl in ("eager", "sdpa"):
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        cfg._attn_implementation = impl
        model = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=dense_document_mask(batch["segment_ids"])).logits
            seg = batch["segment_ids"]
            checked = 0
            for row in range(seg.shape[0]):
                for s in range(1, int(seg[row].max()) + 1):
                    where = (seg[row] == s).nonzero().flatten()
                    ids = batch["input_ids"][row, where][None]
                    alone = model(input_ids=ids).logits[0]
                    torch.testing.assert_close(packed[row, where], alone, atol=1e-5, rtol=1e-5)
                    checked += 1
            assert checked == len(examples)
            assert not torch.isnan(packed).any()


def test_dense_document_mask_values():
    m = dense_document_mask(torch.tensor([[1, 1, 2, 0]]))
    allowed = (m[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_zero_slot_positions_shift_with_the_sample_in_a_packed_row():
    """Layer-wise adapters: image_slots[:, 1] = first token after the mark, moved by the sample's row offset."""
    from loader_fixtures import make_conversation, tiny_tokenizer

    from mmtrain.data.loader.templates import Renderer

    tok = tiny_tokenizer()
    renderer = Renderer(tok, "owl", 0)
    rendered = [renderer.render(make_conversation(i, n, turns=2)) for i, n in ((1, 2), (2, 0), (3, 1))]
    examples = [Example(r.input_ids, r.labels, r.image_starts,
                        torch.zeros((len(r.image_starts), *SHAPE)) if r.image_starts else None, f"k{i}")
                for i, r in enumerate(rendered)]
    a, b, c = (len(r) for r in rendered)
    packed = pack(examples, 0, SHAPE, max_length=a + b + c)
    starts = [s for r, off in zip(rendered, (0, a, a + b)) for s in (off + x for x in r.image_starts)]
    assert packed["input_ids"].shape[0] == 1
    assert packed["image_slots"].tolist() == [[0, s] for s in starts]
    assert starts == [rendered[0].image_starts[0], rendered[0].image_starts[1], a + b + rendered[2].image_starts[0]]
    flat = [t for r in rendered for t in r.input_ids]
    assert [packed["input_ids"][0, s].item() for s in starts] == [flat[s] for s in starts]
    padded = collate(examples, 0, SHAPE)
    assert padded["image_slots"].tolist() == [[0, s] for s in rendered[0].image_starts] + [
        [2, rendered[2].image_starts[0]]]
