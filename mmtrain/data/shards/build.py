"""The ways into shards: a product catalog + spec (the five product tasks), or open-domain instruction data (a
LLaVA / Alpaca / ShareGPT file, or Hugging Face `datasets` data)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from mmtrain.data.shards.catalog import CatalogSpec, Product, read_catalog
from mmtrain.data.shards.hf_datasets import HFColumns, hf_items, hf_source_meta, open_hf_input
from mmtrain.data.shards.instruction_formats import read_format
from mmtrain.data.shards.product_tasks import TASKS, product_samples
from mmtrain.data.shards.records import Reject, WorkItem
from mmtrain.data.shards.writer import BuildOptions, BuildSummary, build_shards, split_of
from mmtrain.errors import UserError


@dataclass(frozen=True)
class ProductItems:
    """Product → WorkItem: its task samples share its images; text-only items carry no images.

    Picklable, so the build workers draw the samples (the parent only reads and validates catalog rows).
    """

    catalog: str
    tasks: tuple[str, ...]
    per_task: int
    seed: int
    text_only: bool
    val_every_attribute: bool = False
    """Held-out products (val and test) ask every attribute (`product_samples(every_attribute=True)`)."""
    val_fraction: float = 0.0
    attribute_weights: tuple[tuple[str, float], ...] = ()
    """(name, weight) pairs for attribute QA's draw (`product_samples(attribute_weights=...)`); () draws uniformly."""
    test_fraction: float = 0.0

    def __call__(self, product: Product) -> WorkItem:
        every = self.val_every_attribute and split_of(product.product_id, self.val_fraction,
                                                       self.test_fraction) != "train"
        samples = tuple(product_samples(product, self.tasks, self.per_task, self.seed, self.text_only, every,
                                        dict(self.attribute_weights)))
        images_of_item = () if self.text_only else product.image_paths
        return WorkItem(product.product_id, images_of_item, samples, product.row, self.catalog)


def catalog_items(catalog: str | Path, spec: CatalogSpec, images: str | Path | None, tasks: Sequence[str],
                  per_task: int, seed: int, text_only: bool) -> Iterator[WorkItem | Reject]:
    """One WorkItem per good product, one Reject per bad row, in file order."""
    to_item = ProductItems(str(catalog), tuple(tasks), per_task, seed, text_only)
    for entry in read_catalog(catalog, spec, images, need_images=not text_only):
        yield entry if isinstance(entry, Reject) else to_item(entry)


def _count_rows(path: Path) -> int | None:
    try:
        with open(path, "rb") as fh:
            return max(sum(1 for _ in fh) - 1, 0)
    except OSError:
        return None


def check_attribute_weights(weights: Mapping[str, float], spec: CatalogSpec) -> dict[str, float]:
    """The weights sorted by name, each a finite number > 0 naming one of the spec's attributes (by display name,
    after `names`; a spec whose attributes come from one JSON `field` has no fixed names to check against)."""
    known = None
    if "columns" in spec.attributes:
        renames = spec.attributes.get("names") or {}
        known = [renames.get(c, c) for c in spec.attributes["columns"]]
    out = {}
    for name, weight in sorted(weights.items()):
        if known is not None and name not in known:
            raise UserError(f"attribute weight for {name!r}: catalog spec {spec.name!r} has no such attribute "
                            f"(its attributes: {', '.join(known)})")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight > 0):
            raise UserError(f"attribute weight for {name!r} must be a number > 0, got {weight!r}")
        out[name] = float(weight)
    return out


def build_from_catalog(spec_path: str | Path, catalog: str | Path, images: str | Path | None,
                       options: BuildOptions, tasks: Sequence[str] = TASKS, per_task: int = 1,
                       text_only: bool = False, val_every_attribute: bool = False,
                       attribute_weights: Mapping[str, float] | None = None) -> BuildSummary:
    """Catalog → shards. `val_every_attribute`: the val split asks every attribute of each product (attribute QA),
    the train split stays as drawn, byte for byte. `attribute_weights`: attribute QA draws its attribute with these
    weights (name → weight, 1 for the rest) instead of uniformly, e.g. to ask more often what the photo shows."""
    spec = CatalogSpec.from_yaml(spec_path)
    weights = check_attribute_weights(attribute_weights or {}, spec)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown tasks {unknown}; known: {list(TASKS)}")
    if per_task < 1:
        raise UserError("--per-task must be ≥ 1")
    products = read_catalog(catalog, spec, images, need_images=not text_only)
    to_item = ProductItems(str(catalog), tuple(tasks), per_task, options.seed, text_only, val_every_attribute,
                           options.val_fraction, tuple(weights.items()), options.test_fraction)
    meta = {"source": {"kind": "catalog", "catalog": str(catalog), "images": str(images) if images else None,
                       "spec": spec.to_json(), "tasks": list(tasks), "per_task": per_task, "text_only": text_only,
                       "val_every_attribute": val_every_attribute, "attribute_weights": weights}}
    return build_shards(products, options, meta, total=_count_rows(Path(catalog)) if spec.format == "csv" else None,
                        expand=to_item)


def build_from_format(fmt: str, input_path: str | Path, images: str | Path | None,
                      options: BuildOptions) -> BuildSummary:
    meta = {"source": {"kind": "format", "format": fmt, "input": str(input_path),
                       "images": str(images) if images else None}}
    return build_shards(read_format(fmt, input_path, images), options, meta)


def build_from_hf(inputs: Sequence[str | Path], columns: HFColumns, images: str | Path | None,
                  options: BuildOptions, split: str | None = None) -> BuildSummary:
    """Hugging Face `datasets` data (a save_to_disk folder, parquet files) → shards, as an open-domain format is."""
    source = open_hf_input(inputs, split)
    source.check_columns(columns.names())  # before the output folder is touched
    meta = {"source": hf_source_meta(inputs, source, columns, images)}
    return build_shards(hf_items(source, columns, images), options, meta, total=source.total)
