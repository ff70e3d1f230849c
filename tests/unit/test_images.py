"""Image decoding: magic bytes decide, an allow-list, bombs and broken files refused with reasons."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bitcore.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, sniff_format

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _pixels(width: int = 24, height: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _gradient(width: int = 24, height: int = 16) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 10, yy * 15, 255 - xx * 10], axis=-1).astype(np.uint8)


def _colours(image: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(p) for p in np.asarray(image).reshape(-1, 3).tolist()}


def _encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (8-bit RGB) but holds one empty IDAT chunk.

    A real decompression bomb is tiny compressed data that inflates to gigabytes; the size in
    the header is what must stop it, before any pixel is inflated.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
        (b"GIF87a\x01\x00", "GIF"),
        (b"GIF89a\x01\x00", "GIF"),
        (b"BM\x00\x00\x00\x00", "BMP"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),  # RIFF but audio
        (b"II*\x00\x08\x00\x00\x00", None),  # TIFF: not on the allow-list
        (b"%PDF-1.7", None),
        (b"hello", None),
        (b"", None),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected


@pytest.mark.parametrize(
    ("fmt", "params", "lossless"),
    [
        ("PNG", {}, True),
        ("BMP", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("JPEG", {"quality": 95}, False),
    ],
)
def test_allowed_formats_decode_to_rgb(fmt: str, params: dict[str, object], lossless: bool) -> None:
    # Noise for the lossless formats (every pixel must survive); a smooth gradient for JPEG.
    pixels = _pixels() if lossless else _gradient()
    decoded = decode_image(_encode(Image.fromarray(pixels), fmt, **params))
    assert decoded.mode == "RGB"
    assert decoded.size == (24, 16)
    error = np.abs(np.asarray(decoded, dtype=np.int16) - pixels)
    if lossless:
        assert error.max() == 0
    else:
        assert error.mean() < 3


def test_magic_bytes_decide_not_the_file_name(tmp_path: Path) -> None:
    pixels = _pixels()
    path = tmp_path / "photo.jpg"  # a PNG with a JPEG name
    path.write_bytes(_encode(Image.fromarray(pixels), "PNG"))
    for source in (path, str(path)):
        assert np.array_equal(np.asarray(decode_image(source)), pixels)  # lossless: it was a PNG
    text = tmp_path / "cat.png"
    text.write_text("definitely a cat picture\n")
    with pytest.raises(ImageError) as info:
        decode_image(text)
    assert info.value.reason == "unsupported_format"
    assert "JPEG, PNG, WEBP, BMP, GIF" in str(info.value)


def test_formats_outside_the_allow_list_are_refused() -> None:
    tiff = _encode(Image.fromarray(_pixels()), "TIFF")
    with pytest.raises(ImageError) as info:
        decode_image(tiff)
    assert info.value.reason == "unsupported_format"


def test_empty_file_is_refused() -> None:
    with pytest.raises(ImageError) as info:
        decode_image(b"")
    assert info.value.reason == "empty"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_undecodable(fmt: str) -> None:
    data = _encode(Image.fromarray(_pixels(64, 64)), fmt)
    with pytest.raises(ImageError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.reason == "undecodable"
    assert fmt in str(info.value)


def test_right_magic_then_garbage_is_undecodable() -> None:
    with pytest.raises(ImageError) as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert info.value.reason == "undecodable"


def test_pixel_cap_is_exact() -> None:
    data = _encode(Image.fromarray(_pixels(10, 10)), "PNG")
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=99)
    assert info.value.reason == "too_many_pixels"
    assert "10x10 = 100 pixels, over the 99 cap" in str(info.value)


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (9000, 9000),  # 81M: over our 64M default, under Pillow's own warning threshold
        (10_000, 10_000),  # 100M: Pillow warns (a warning is not enough: it must be an error)
        (30_000, 30_000),  # 900M: Pillow refuses at open
    ],
)
def test_decompression_bombs_are_refused_before_inflating(width: int, height: int) -> None:
    assert width * height > DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError) as info:
        decode_image(_png_header_only(width, height))
    assert info.value.reason == "too_many_pixels"


def test_exif_orientation_is_applied() -> None:
    # Stored landscape 40x20: left half red, right half blue. Orientation 6 means "rotate 90
    # degrees clockwise to display": the displayed image is portrait 20x40, red on top.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = RED
    pixels[:, 20:] = BLUE
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode_image(_encode(image, "JPEG", quality=95, exif=exif))
    assert decoded.size == (20, 40)
    top = np.asarray(decoded)[:15].reshape(-1, 3).mean(axis=0)
    bottom = np.asarray(decoded)[25:].reshape(-1, 3).mean(axis=0)
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50
    plain = decode_image(_encode(image, "JPEG", quality=95))
    assert plain.size == (40, 20)  # no EXIF: left as stored


def test_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (12, 8), colour) for colour in (RED, GREEN, BLUE)]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3  # really animated
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (12, 8)
    assert _colours(decoded) == {RED}


def test_other_modes_become_rgb() -> None:
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 0
    decoded = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert decoded.mode == "RGB"
    assert _colours(decoded) == {(10, 20, 30)}  # alpha dropped, colour kept
    grey = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    decoded = decode_image(_encode(Image.fromarray(grey, "L"), "PNG"))
    assert decoded.mode == "RGB"
    assert np.array_equal(np.asarray(decoded), np.repeat(grey[..., None], 3, axis=2))
    palette = Image.new("P", (5, 5), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    decoded = decode_image(_encode(palette, "PNG"))
    assert decoded.mode == "RGB" and _colours(decoded) == {(200, 100, 50)}
    cmyk = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), "JPEG"))
    assert cmyk.mode == "RGB" and cmyk.size == (8, 8)


def _big_gradient(width: int = 800, height: int = 600) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize(
    ("min_size", "size"),
    [
        (100, (200, 150)),  # 800 // 100 = 8, 600 // 100 = 6: the largest scale <= 6 is 1/4
        (150, (200, 150)),  # 5 and 4: 1/4 still keeps 150
        (151, (400, 300)),  # 1/4 would give 150 < 151: 1/2
        (300, (400, 300)),
        (301, (800, 600)),  # no reduction keeps both sides >= 301 but the full image
        (70, (100, 75)),  # 1/8 is libjpeg's smallest scale
        (10, (100, 75)),
    ],
)
def test_jpeg_draft_decodes_at_the_smallest_scale_that_keeps_min_size(
    min_size: int, size: tuple[int, int]
) -> None:
    data = _encode(_big_gradient(), "JPEG", quality=90)
    decoded = decode_image(data, jpeg_min_size=min_size)
    assert (decoded.mode, decoded.size) == ("RGB", size)
    # The same picture: the draft matches a full decode box-downscaled to its size.
    full = decode_image(data).resize(size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(decoded, np.int16) - np.asarray(full, np.int16))
    assert diff.mean() < 2.0


def test_jpeg_draft_leaves_other_formats_and_the_default_alone() -> None:
    image = _big_gradient()
    png = _encode(image, "PNG")
    assert decode_image(png, jpeg_min_size=50).size == (800, 600)
    jpeg = _encode(image, "JPEG", quality=90)
    assert decode_image(jpeg).size == (800, 600)


def test_jpeg_draft_keeps_the_pixel_cap_and_the_orientation() -> None:
    data = _encode(_big_gradient(), "JPEG", quality=90)
    # The cap counts the stored pixels, not the reduced ones: a bomb stays a bomb.
    with pytest.raises(ImageError) as caught:
        decode_image(data, max_pixels=800 * 600 - 1, jpeg_min_size=50)
    assert caught.value.reason == "too_many_pixels"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: portrait
    rotated = _encode(_big_gradient(), "JPEG", quality=90, exif=exif)
    assert decode_image(rotated, jpeg_min_size=100).size == (150, 200)
