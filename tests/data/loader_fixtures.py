"""Test fixtures for the loader: deterministic shard sets in the builder's format, and a tiny trained tokenizer.

Shards are written with webdataset's TarWriter exactly as the shard builder lays them out (`<key>.json`,
`<key>.0.jpg` …, `manifest.json`), with tiny generated images whose pixels encode the sample, so tests can
compare batches pixel for pixel.
"""

from __future__ import annotations

import functools
import io
import json
import tarfile
import tempfile
from pathlib import Path

import webdataset as wds
from PIL import Image

WORDS = ("shirt blue red cotton shoes men women watch leather black white casual formal summer winter sports "
         "bag belt jeans dress kurta saree sandals heels").split()


def make_image(seed: int, size: int = 24) -> bytes:
    """A small deterministic RGB JPEG whose colours depend on `seed`."""
    img = Image.new("RGB", (size + seed % 7, size), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    for x in range(0, img.width, 4):
        for y in range(0, size, 4):
            img.putpixel((x, y), ((x * 11 + seed) % 256, (y * 13) % 256, (seed * 7) % 256))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_conversation(i: int, num_images: int, turns: int = 1) -> list[dict]:
    """A deterministic conversation with `num_images` marks in the first user turn."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(6)]
    conv = []
    for t in range(turns):
        marks = "<image>\n" * num_images if t == 0 else ""
        conv.append({"role": "user", "content": f"{marks}What is the {words[t % 6]} item number {i}?"})
        conv.append({"role": "assistant", "content": f"It is a {words[(t + 1) % 6]} {words[(t + 2) % 6]} #{i}."})
    return conv


def write_shard_set(root: Path, shard_sizes: list[int], split: str = "train", text_only_every: int = 3,
                    source: str = "catalog", key_prefix: str = "p") -> Path:
    """Write `len(shard_sizes)` shards with the given sample counts plus a manifest; every `text_only_every`-th
    sample is text-only, the others have 1 or 2 images."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    n = 0
    total_images = 0
    for s, count in enumerate(shard_sizes):
        name = f"{split}-{s:06d}.tar"
        images_in_shard = 0
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(count):
                num_images = 0 if text_only_every and n % text_only_every == 0 else 1 + n % 2
                key = f"{key_prefix}{n}-catqa-{n % 5}"
                record = {"key": key, "conversation": make_conversation(n, num_images, turns=1 + n % 2),
                          "task": "catqa", "source": source, "product_id": str(n), "num_images": num_images}
                sample = {"__key__": key, "json": json.dumps(record).encode()}
                for k in range(num_images):
                    sample[f"{k}.jpg"] = make_image(n * 3 + k)
                sink.write(sample)
                images_in_shard += num_images
                n += 1
        shards.append({"name": name, "samples": count, "images": images_in_shard})
        total_images += images_in_shard
    manifest = {"format": "mmtrain-shards", "version": 1,
                "splits": {split: {"samples": n, "images": total_images, "shards": shards}},
                "tasks": {"catqa": n}, "seed": 0, "spec": {}, "tool_version": "test"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "rejects.jsonl").write_text("")
    return root


@functools.cache
def break_json(shard: Path, key: str) -> None:
    """Rewrite `shard` with sample `key`'s JSON made unparsable, every other member as it was."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    by_key: dict = {}
    for name, data in members:
        sample, _, ext = name.partition(".")
        by_key.setdefault(sample, {"__key__": sample})[ext] = data
    by_key[key]["json"] = b"{not json"
    with wds.TarWriter(str(shard)) as sink:
        for sample in by_key.values():
            sink.write(sample)


def tiny_tokenizer_dir() -> str:
    """Train (once per process) a small sentencepiece tokenizer on fixture text; returns its HF directory."""
    from mmtrain.data.loader.tokenizer import iter_shard_texts, train_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="mmtrain-tok-"))
    shards = write_shard_set(tmp / "shards", [40, 40])
    train_tokenizer(iter_shard_texts(shards), vocab_size=400, out_dir=tmp / "tok")
    return str(tmp / "tok")


@functools.cache
def tiny_tokenizer():
    from mmtrain.data.loader.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir())
