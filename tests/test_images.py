import io

import pytest
import torch
from PIL import Image

from entityclip.data.images import decode_image, encode_png, load_image_tensor
from entityclip.errors import InputError


def png(width=16, height=16) -> bytes:
    return encode_png(Image.new("RGB", (width, height), (200, 10, 10)))


def test_valid_image_becomes_a_normalised_tensor():
    t = load_image_tensor(png(20, 10), 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert t[0].mean() > 1.0 > t[1].mean()  # red channel far above the CLIP mean, green below


def test_grayscale_and_rgba_are_converted_to_rgb():
    for mode in ("L", "RGBA", "P"):
        buf = io.BytesIO()
        Image.new(mode, (8, 8)).save(buf, format="PNG")
        assert decode_image(buf.getvalue()).mode == "RGB"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n garbage", "cannot be decoded"),
    (b"hello world", "not a recognised image format"),
])
def test_bad_bytes_are_input_errors(data, message):
    with pytest.raises(InputError, match=message):
        decode_image(data)


def test_truncated_image_is_an_input_error():
    with pytest.raises(InputError, match="cannot be decoded"):
        decode_image(png(64, 64)[:60])


def test_too_many_bytes_or_pixels_are_refused_before_decoding():
    with pytest.raises(InputError, match="bytes; the limit"):
        decode_image(png(), max_bytes=10)
    with pytest.raises(InputError, match="pixels; the limit"):
        decode_image(png(100, 100), max_pixels=50 * 50)
