"""Image decoding with limits, and CLIP-style preprocessing to tensors.

Every image the platform reads (training data, gallery, HTTP requests) goes through
`decode_image`, so corrupt, empty or oversized input fails the same clear way everywhere.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from entityclip.errors import InputError, InputTooLarge

# open_clip's OPENAI_DATASET_MEAN / STD, repeated here so preprocessing needs no model object.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

MAX_IMAGE_BYTES = 20_000_000
MAX_IMAGE_PIXELS = 40_000_000


def decode_image(data: bytes, max_bytes: int = MAX_IMAGE_BYTES, max_pixels: int = MAX_IMAGE_PIXELS,
                 formats: list[str] | tuple[str, ...] | None = None) -> Image.Image:
    """Decode bytes to an RGB image, or raise `InputError` saying what is wrong with them. The
    pixel count is checked from the header, before anything is decoded; `formats` (Pillow names,
    e.g. ["JPEG", "PNG"]) limits which decoders may read the bytes at all (None: any)."""
    if not data:
        raise InputError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InputTooLarge(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data), formats=formats)
            except Image.UnidentifiedImageError:
                accepted = f"; accepted: {', '.join(formats)}" if formats else ""
                raise InputError(f"image cannot be decoded: not a recognised image format{accepted}") from None
            width, height = img.size
            if width * height > max_pixels:
                raise InputTooLarge(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
            img.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputTooLarge(f"image is larger than {max_pixels} pixels") from None
    except Exception as exc:  # PIL raises many types for corrupt data
        raise InputError(f"image cannot be decoded ({type(exc).__name__}: {exc})") from None
    return img.convert("RGB")


def to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize (bicubic, square) and normalise to a float [3, size, size] tensor."""
    arr = np.asarray(img.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def load_image_tensor(data: bytes, size: int, **limits) -> torch.Tensor:
    return to_tensor(decode_image(data, **limits), size)


def read_image_tensor(uri: str, size: int) -> torch.Tensor:
    """Read an image from storage and preprocess it; errors name the image's URI."""
    from entityclip import storage

    try:
        return load_image_tensor(storage.read_bytes(uri), size)
    except InputError as exc:
        raise InputError(f"{uri}: {exc}") from None


def encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
