"""Shard builder speed: products/s of `build_from_catalog` next to the raw decode + re-encode of the same images.

All run in this process, interleaved, on the same products (the real catalog in ../shared when present, else the
shipped sample). Target: builder ≥ 0.8 × raw (PIL), per worker. The builder decodes JPEGs with simplejpeg
(libjpeg-turbo to numpy), so a second raw row does the same work with simplejpeg, and the builder is shown against both.

    python bench/shards_build.py [--products 1500] [--image-size 448] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmtrain.data.shards.build import build_from_catalog  # noqa: E402
from mmtrain.data.shards.writer import BuildOptions  # noqa: E402


def subset(catalog_dir: Path, n: int, dest: Path) -> list[Path]:
    lines = (catalog_dir / "styles.csv").read_bytes().splitlines(keepends=True)[: n + 1]
    (dest / "styles.csv").write_bytes(b"".join(lines))
    with open(dest / "styles.csv", encoding="utf-8", newline="") as fh:
        return [catalog_dir / "images" / f"{row['id']}.jpg" for row in csv.DictReader(fh)]


def raw_rate(paths: list[Path], image_size: int) -> float:
    """The floor any builder pays: decode fully, RGB, downscale, encode JPEG; nothing else."""
    start = time.perf_counter()
    for path in paths:
        img = Image.open(path)
        img.load()
        img = img.convert("RGB")
        if max(img.size) > image_size:
            img.thumbnail((image_size, image_size), Image.Resampling.BICUBIC)
        img.save(io.BytesIO(), format="JPEG", quality=90)
    return len(paths) / (time.perf_counter() - start)


def raw_rate_simplejpeg(paths: list[Path], image_size: int) -> float:
    """The same floor with the builder's decoder: simplejpeg decode, downscale (PIL), simplejpeg encode."""
    import numpy as np
    import simplejpeg

    start = time.perf_counter()
    for path in paths:
        pixels = simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB")
        if max(pixels.shape[:2]) > image_size:
            img = Image.fromarray(pixels)
            img.thumbnail((image_size, image_size), Image.Resampling.BICUBIC)
            pixels = np.asarray(img)
        simplejpeg.encode_jpeg(pixels, quality=90, colorspace="RGB", colorsubsampling="420")
    return len(paths) / (time.perf_counter() - start)


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def builder_rate(catalog_dir: Path, spec: Path, out: Path, image_size: int, workers: int, n: int,
                 cpu: list[tuple[float, float]] | None = None) -> float:
    """Products/s; appends (parent, workers) CPU seconds per product to `cpu` (workers are reaped when the pool shuts
    down, so RUSAGE_CHILDREN holds them)."""
    parent, children = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    build_from_catalog(spec, catalog_dir / "styles.csv", catalog_dir.parent / "images_root",
                       BuildOptions(out=out, image_size=image_size, workers=workers, overwrite=True, progress=False))
    rate = n / (time.perf_counter() - start)
    if cpu is not None:
        cpu.append(((_cpu(resource.RUSAGE_SELF) - parent) / n, (_cpu(resource.RUSAGE_CHILDREN) - children) / n))
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    shared = REPO.parent / "shared" / "datasets" / "fashion-products"
    source = shared if (shared / "styles.csv").is_file() else REPO / "shards" / "sample"
    spec = REPO / "shards" / "catalogs" / "fashion-products.yaml"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "cat").mkdir()
        (tmp / "images_root").symlink_to(source)  # images/{id}.jpg resolves under the real catalog folder
        paths = subset(source, args.products, tmp / "cat")
        n = len(paths)
        raw_rate(paths[:100], args.image_size)  # warm the page cache for both
        raws, sjs, builds, twos = [], [], [], []
        cpu1: list[tuple[float, float]] = []
        cpu2: list[tuple[float, float]] = []
        for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all alike
            raws.append(raw_rate(paths, args.image_size))
            sjs.append(raw_rate_simplejpeg(paths, args.image_size))
            builds.append(builder_rate(tmp / "cat", spec, tmp / "out", args.image_size, 1, n, cpu1))
            twos.append(builder_rate(tmp / "cat", spec, tmp / "out", args.image_size, 2, n, cpu2))
        shutil.rmtree(tmp / "out", ignore_errors=True)
    raw, sj, build, two = max(raws), max(sjs), max(builds), max(twos)
    print(f"source: {source} ({n} products, 5 tasks each, --image-size {args.image_size}, best of {args.repeats})")
    print(f"{'':40s} {'products/s':>11s} {'× raw':>7s} {'× raw sj':>9s}")
    print(f"{'raw decode + RGB + downscale + JPEG, PIL':40s} {raw:11.1f} {1.0:7.2f} {raw / sj:9.2f}")
    print(f"{'the same with simplejpeg':40s} {sj:11.1f} {sj / raw:7.2f} {1.0:9.2f}")
    print(f"{'mmtrain shards build, 1 worker':40s} {build:11.1f} {build / raw:7.2f} {build / sj:9.2f}"
          f"   target ≥ 0.80 × raw: {'PASS' if build / raw >= 0.8 else 'FAIL'}")
    print(f"{'mmtrain shards build, 2 workers':40s} {two:11.1f} {two / raw:7.2f} {two / sj:9.2f}"
          f"   {two / build:.2f} × 1 worker on {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    (p1, _), (p2, w2) = min(cpu1, key=sum), min(cpu2, key=sum)
    print(f"CPU ms per product (least of {args.repeats}): 1 worker {1e3 * p1:.3f};  2 workers: parent {1e3 * p2:.3f}, "
          f"workers {1e3 * w2:.3f} (each {5e2 * w2:.3f})")


if __name__ == "__main__":
    main()
