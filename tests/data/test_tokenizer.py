"""`mmtrain tokenizer train` makes a HF tokenizer directory that reloads to identical ids."""

import sentencepiece as spm
from loader_fixtures import write_shard_set
from transformers import AutoTokenizer

from mmtrain.cli import main
from mmtrain.data.loader.image_token import IMAGE_TOKEN, image_token_id
from mmtrain.data.loader.tokenizer import iter_shard_texts

TEXTS = ["What is the blue shirt item number 12?", "It is a cotton  kurta #5.\n\n### Response:\n",
         " leading space and ünïcode ☃", "Human: AI: <image>"]


def test_cli_trains_and_reload_gives_identical_ids(tmp_path):
    shards = write_shard_set(tmp_path / "shards", [30, 20])
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--shards", str(shards), "--vocab-size", "400", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.model"))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert image_token_id(tok) == sp.piece_to_id(IMAGE_TOKEN) == 4
    assert tok.encode("a <image> b", add_special_tokens=False).count(4) == 1
    # same text, same model: a second training run gives the same ids
    out2 = tmp_path / "tok2"
    assert main(["tokenizer", "train", "--shards", str(shards), "--vocab-size", "400", "--out", str(out2)]) == 0
    tok2 = AutoTokenizer.from_pretrained(str(out2))
    assert all(tok2.encode(t) == tok.encode(t) for t in TEXTS)
    assert len(tok) >= 400


def test_shard_text_has_no_image_marks(tmp_path):
    texts = list(iter_shard_texts(write_shard_set(tmp_path / "s", [6])))
    assert len(texts) == sum(2 + 2 * (i % 2) for i in range(6)) and not any(IMAGE_TOKEN in t for t in texts)


def test_cli_user_errors(tmp_path, capsys):
    assert main(["tokenizer", "train", "--shards", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    shards = write_shard_set(tmp_path / "s", [3])
    assert main(["tokenizer", "train", "--shards", str(shards), "--vocab-size", "10", "--out", "o"]) == 2


def test_template_strings_tokenize_compactly(tmp_path):
    """Every rendered sample starts with the system line: the tokenizer must learn it as words, not characters."""
    from mmtrain.data.loader.templates import TEMPLATES
    from mmtrain.data.loader.tokenizer import train_tokenizer

    import random

    rng = random.Random(0)  # catalog-like text with more words than merges, so the merges are contested
    words = ["".join(rng.choice("abcdefghiklmnoprstuy") for _ in range(rng.randint(3, 8))) for _ in range(600)]
    catalog = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(3000)]
    tok = AutoTokenizer.from_pretrained(str(train_tokenizer(catalog, 600, tmp_path / "tok")))
    for name, template in TEMPLATES.items():
        pieces = tok.encode(template.system, add_special_tokens=False)
        assert tok.decode(pieces) == template.system
        words = len(template.system.split())
        assert len(pieces) <= 1.5 * words, (name, len(pieces), words)  # unweighted: ~3 characters a piece
