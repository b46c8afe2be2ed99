"""Image preprocessing with the vision tower's own settings: resize (shortest side + centre crop, or pad to square),
normalize with its mean/std. Train-time augmentation is off by default: flips mirror the text and logos that tell
products apart, so they are a separate switch that stays off unless asked for.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

try:  # libjpeg-turbo straight into numpy; without it every image takes Pillow's path
    import simplejpeg
except ImportError:  # pragma: no cover
    simplejpeg = None

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageConfig:
    """How pixels reach the vision tower."""

    size: int = 224
    """Output height and width."""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resize: str = "shortest"
    """`shortest`: scale the shortest side to `size`, centre-crop (CLIP); `pad`: pad to a square with the mean
    colour, then scale (keeps the whole product in view)."""
    augment: bool = False
    """Random resized crop (scale 0.8–1) seeded per sample, so resumed runs see the same pixels."""
    hflip: bool = False
    """Random horizontal flip (only with augment). Off: flips break text and logos on products."""

    def __post_init__(self) -> None:
        if self.resize not in ("shortest", "pad"):
            raise ValueError(f"resize must be 'shortest' or 'pad', got {self.resize!r}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> "ImageConfig":
        """Read mean/std/size from a HF `preprocessor_config.json` (a file, or the directory holding it)."""
        return cls(**{**processor_settings(path), **overrides})


def processor_settings(path: str | os.PathLike) -> dict[str, Any]:
    """size, mean, std (and resize `pad` where the processor pads to a square) from a HF `preprocessor_config.json`
    (a file, or the directory holding it; in a directory without one, the image processor its
    `processor_config.json` holds, as transformers 5 saves a LLaVA's processor); {} where there is none."""
    p = Path(path)
    if p.is_dir():
        nested = p / "processor_config.json"
        p = p / "preprocessor_config.json"
        if not p.is_file() and nested.is_file():
            cfg = json.loads(nested.read_text()).get("image_processor")
            return _settings(cfg) if isinstance(cfg, dict) else {}
    if not p.is_file():
        return {}
    return _settings(json.loads(p.read_text()))


def _settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """ImageConfig's fields from one image processor's saved settings."""
    size = cfg.get("crop_size") or cfg.get("size") or ImageConfig.size
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or next(iter(size.values()))
    settings = {"size": int(size), "mean": tuple(cfg.get("image_mean", CLIP_MEAN)),
                "std": tuple(cfg.get("image_std", CLIP_STD))}
    if cfg.get("do_pad") or cfg.get("image_aspect_ratio") == "pad":
        settings["resize"] = "pad"
    return settings


class ImageTooLarge(ValueError):
    """The image header declares more pixels than allowed (a decompression bomb, or a photo far too big)."""


def decode_image_pil(data: bytes, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Pillow's decode to RGB: the path for PNG and for JPEGs `decode_array` leaves alone (CMYK, bombs, broken
    files). With `draft_size`, JPEG decoding scales down in the DCT when the image is at least twice that size. With
    `max_pixels`, the size the header declares is checked before a pixel is decoded (ImageTooLarge). The decode is
    forced here (`load`), not left lazy, so a broken file fails in this call."""
    img = Image.open(io.BytesIO(data))
    if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
        raise ImageTooLarge(_too_large(img.size[0], img.size[1], max_pixels))
    if draft_size is not None and img.format == "JPEG":
        img.draft("RGB", (draft_size, draft_size))
    if img.mode == "RGB":  # convert() would copy the decoded pixels once more
        img.load()
        return img
    return img.convert("RGB")


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"header declares {width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}"


def draft_scale(width: int, height: int, draft_size: int | None) -> int:
    """The DCT scale-down Pillow's `draft` picks (1, 2, 4 or 8): the largest that keeps both sides ≥ draft_size."""
    if not draft_size:
        return 1
    fits = min(width // draft_size, height // draft_size)
    return next((s for s in (8, 4, 2) if fits >= s), 1)


def decode_array(data: bytes, draft_size: int | None = None, max_pixels: int | None = None,
                 out: np.ndarray | None = None) -> np.ndarray | None:
    """JPEG bytes → uint8 [H, W, 3] with simplejpeg (libjpeg-turbo straight into a numpy array: no Pillow object,
    no RGB repack; ~2× faster than Pillow here), or None when the image should take Pillow's path instead: not a
    JPEG, not YCbCr/grey (CMYK, YCCK, Adobe RGB), a header past Pillow's own bomb limit (Pillow raises or warns,
    as before), or anything libjpeg-turbo refuses (Pillow then decodes it, or raises the error it always raised).

    Pixels equal Pillow's decode + `draft` exactly: both are libjpeg-turbo with the same IDCT and upsampling, and
    the DCT scale is Pillow's (`draft_scale`); tests compare them on catalog images, progressive, 4:4:4/4:2:2/4:2:0,
    grey, and 1/2–1/8 scaled decodes. `max_pixels` is checked on the header before any decode (ImageTooLarge).
    With `out` (uint8, C-contiguous) an unscaled image of exactly its shape is decoded into it and `out` itself is
    returned (the loader's shared pixel ring: no copy); anything else gets its own array. Pillow never runs here, so
    no Pillow warning can come from this function."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in ("YCbCr", "Gray"):
        return None
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None  # Pillow's DecompressionBombError / Warning, exactly as the Pillow path gives them
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(_too_large(width, height, max_pixels))
    s = draft_scale(width, height, draft_size)
    try:
        if s == 1 and out is not None and out.shape == (height, width, 3):
            simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out)
            return out
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // s), min_width=-(-width // s))
    except ValueError:  # truncated, corrupt, or a libjpeg warning in strict mode: Pillow has the last word
        return None


def decode_image(data: bytes, draft_size: int | None = None, max_pixels: int | None = None) -> Image.Image:
    """Decode JPEG/PNG bytes to an RGB Pillow image (eval/generate's path): `decode_array` when it takes the image,
    else Pillow. Same pixels as the loader's `preprocess_hwc`, which skips the Pillow object when it can."""
    array = decode_array(data, draft_size, max_pixels)
    if array is not None:
        return Image.fromarray(array)
    return decode_image_pil(data, draft_size, max_pixels)


def resize_image(img: Image.Image, cfg: ImageConfig, rng: random.Random | None = None) -> Image.Image:
    """Resize to `cfg.size` square the way `cfg.resize` says, with the optional seeded augmentation."""
    s = cfg.size
    if cfg.resize == "pad":
        side = max(img.size)
        fill = tuple(int(round(m * 255)) for m in cfg.mean)
        canvas = Image.new("RGB", (side, side), fill)
        canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
        img = canvas
    w, h = img.size
    if cfg.augment and rng is not None:
        scale = rng.uniform(0.8, 1.0)
        cw, ch = max(1, int(w * scale)), max(1, int(h * scale))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch))
        if cfg.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        w, h = img.size
    ratio = s / min(w, h)
    nw, nh = max(s, round(w * ratio)), max(s, round(h * ratio))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - s) // 2, (nh - s) // 2
    if (nw, nh) != (s, s):
        img = img.crop((left, top, left + s, top + s))
    return img


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB image → uint8 tensor [3, H, W] (4× smaller than float to pass between processes)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize_batch(pixels: torch.Tensor, cfg: ImageConfig) -> torch.Tensor:
    """uint8 [..., 3, H, W] → float, scaled to [0, 1] then normalized with the tower's mean/std; one vectorized
    op per batch instead of one per image."""
    mean = torch.tensor(cfg.mean).view(3, 1, 1) * 255.0
    inv_std = 1.0 / (torch.tensor(cfg.std).view(3, 1, 1) * 255.0)
    return pixels.float().sub_(mean).mul_(inv_std)


@functools.lru_cache(maxsize=16)
def _hwc_constants(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """mean × 255 and 1 / (std × 255) as float32 [3, 1, 1], computed exactly as `normalize_batch` does (torch float32),
    once per mean/std instead of once per batch."""
    m = (torch.tensor(mean) * 255.0).numpy()[:, None, None]
    inv = (1.0 / (torch.tensor(std) * 255.0)).numpy()[:, None, None]
    m.flags.writeable = inv.flags.writeable = False
    return m, inv


def normalize_hwc_batch(pixels: torch.Tensor | np.ndarray | Sequence[np.ndarray], cfg: ImageConfig) -> torch.Tensor:
    """uint8 images as decoded ([N, H, W, 3], or N arrays [H, W, 3]) → normalized float [N, 3, H, W], contiguous,
    values identical to `normalize_batch` (same float32 constants, same subtract-then-multiply). Done in numpy: one
    strided cast-copy into CHW, then two contiguous in-place passes (the whole batch at once for one array, else per
    image): one thread, ~0.6 ms for 8 × 224² (measured), where torch's broadcast ops on a busy 2-core machine took
    15 ms with 2 intra-op threads. Reads the source once, so it can copy straight out of a worker's shared buffer or
    out of the per-sample arrays (no stacking copy)."""
    if isinstance(pixels, torch.Tensor):
        pixels = pixels.numpy()
    if len(pixels) == 0:
        return torch.zeros((0, *cfg.shape))
    return _normalize_hwc(pixels, tuple(cfg.mean), tuple(cfg.std))


def _normalize_hwc(pixels: np.ndarray | Sequence[np.ndarray], mean_: tuple[float, ...],
                   std_: tuple[float, ...]) -> torch.Tensor:
    mean, inv_std = _hwc_constants(mean_, std_)
    h, w, c = pixels[0].shape
    out = np.empty((len(pixels), c, h, w), dtype=np.float32)
    if isinstance(pixels, np.ndarray):
        out[...] = pixels.transpose(0, 3, 1, 2)  # the one strided read, cast on the way; then two contiguous passes
        out -= mean
        out *= inv_std
        return torch.from_numpy(out)
    for i, img in enumerate(pixels):
        chw = out[i]
        chw[...] = img.transpose(2, 0, 1)
        chw -= mean
        chw *= inv_std
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=16)
def _device_constants(mean: tuple[float, ...], std: tuple[float, ...],
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`_hwc_constants` as tensors on `device`: moved there once per mean/std and device, not once per batch."""
    m, inv = _hwc_constants(mean, std)
    return torch.from_numpy(m.copy()).to(device), torch.from_numpy(inv.copy()).to(device)


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, 3, H, W] (any strides: the loader's are channels-last views) → normalized float32 [N, 3, H, W],
    contiguous, on the pixels' own device. Why here and not in the loader: the trainer moves the uint8 batch to the
    accelerator first (4× fewer bytes over the host link, no float pass in the loader's process) and normalizes
    there. Values are identical to `normalize_hwc_batch` / `normalize_batch`: the same float32 constants and the
    same subtract-then-multiply, each an exactly rounded float32 op on every device."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize_pixels takes uint8 pixels, got {pixels.dtype}")
    if pixels.device.type == "cpu":  # torch's cast + broadcast ops took 20 ms per 8 × 224² here (2 busy threads)
        if len(pixels) == 0:
            return torch.zeros(pixels.shape)
        return _normalize_hwc(pixels.permute(0, 2, 3, 1).numpy(), tuple(mean), tuple(std))
    return _normalize_torch(pixels, tuple(mean), tuple(std))


def _normalize_torch(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """`normalize_pixels` in torch ops, for accelerators (tested equal to the numpy path on the CPU)."""
    m, inv = _device_constants(mean, std, pixels.device)
    out = torch.empty(pixels.shape, dtype=torch.float32, device=pixels.device)
    out.copy_(pixels)  # cast + layout change in one pass
    return out.sub_(m).mul_(inv)


def hwc_to_nchw_uint8(pixels: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 images as decoded ([N, H, W, 3], or N arrays [H, W, 3]) → a uint8 tensor [N, 3, H, W] that owns its
    pixels: one contiguous copy, laid out channels-last (a permuted view; `normalize_pixels` makes it NCHW on the
    device). A copy, so a view into a worker's shared ring can be handed back as soon as this returns."""
    stacked = pixels.copy() if isinstance(pixels, np.ndarray) else np.stack(pixels)
    return torch.from_numpy(stacked).permute(0, 3, 1, 2)


def normalize(img: Image.Image, cfg: ImageConfig) -> torch.Tensor:
    """RGB image → normalized float tensor [3, H, W]."""
    return normalize_batch(to_uint8(img), cfg)


def preprocess(data: bytes, cfg: ImageConfig, rng: random.Random | None = None) -> torch.Tensor:
    """JPEG bytes → normalized [3, size, size] float tensor."""
    return normalize(resize_image(decode_image(data, draft_size=cfg.size), cfg, rng), cfg)


def preprocess_uint8(data: bytes, cfg: ImageConfig, rng: random.Random | None = None) -> torch.Tensor:
    """JPEG bytes → resized uint8 [3, size, size]; normalize later, per batch, with `normalize_batch`."""
    return to_uint8(resize_image(decode_image(data, draft_size=cfg.size), cfg, rng))


def preprocess_hwc(data: bytes, cfg: ImageConfig, rng: random.Random | None = None,
                   max_pixels: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG bytes → resized uint8 [size, size, 3] as decoded (no transpose, no torch): the loader's per-sample path.
    A JPEG that decodes to exactly size × size (the shard builder's usual output) is returned as simplejpeg decoded
    it: `resize_image` would leave it unchanged. Batches transpose and normalize once with `normalize_hwc_batch`.
    With `out` ([size, size, 3] uint8) the pixels are written into it and `out` is returned: decoded in place on the
    fast path, copied in otherwise."""
    return finish_hwc(data, decode_hwc(data, cfg, rng, max_pixels, out), cfg, rng, max_pixels, out)


def decode_hwc(data: bytes, cfg: ImageConfig, rng: random.Random | None = None, max_pixels: int | None = None,
               out: np.ndarray | None = None) -> np.ndarray | None:
    """`preprocess_hwc`'s first step, simplejpeg only (no Pillow, so no Pillow warning can fire): the decoded array
    (into `out` when it is already the final image), or None for Pillow's path. `finish_hwc` completes it."""
    direct = out if not (cfg.augment and rng is not None) else None  # augmentation resizes: decode aside
    return decode_array(data, cfg.size, max_pixels, direct)


def finished(array: np.ndarray | None, cfg: ImageConfig, rng: random.Random | None = None) -> bool:
    """Whether `decode_hwc`'s result is already the final image (exactly size × size, no augmentation)."""
    return array is not None and array.shape[:2] == (cfg.size, cfg.size) and not (cfg.augment and rng is not None)


def finish_hwc(data: bytes, array: np.ndarray | None, cfg: ImageConfig, rng: random.Random | None = None,
               max_pixels: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """`preprocess_hwc`'s second step: Pillow's decode when simplejpeg left the image, then resize / augment; the
    result is written into `out` when given."""
    if finished(array, cfg, rng):
        result = array
    else:
        img = Image.fromarray(array) if array is not None else decode_image_pil(data, cfg.size, max_pixels)
        result = np.asarray(resize_image(img, cfg, rng))
    if out is None or result is out:
        return result
    out[...] = result
    return out


def sample_rng(key: str, epoch: int, seed: int) -> random.Random:
    """Per-sample augmentation RNG: same key, epoch and seed → same crop, whatever rank or worker reads it."""
    return random.Random(f"{seed}:{epoch}:{key}")
