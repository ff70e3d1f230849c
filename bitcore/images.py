"""Safe image decoding shared by the data pipeline and the predictor.

Magic bytes decide the format (never a file name or a client's Content-Type); only an
allow-list of formats is decoded; decompression bombs are errors, not warnings; EXIF
orientation is applied; the result is always RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_PIXELS = 64_000_000  # ~8000x8000; larger is refused as a possible bomb

_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


class ImageError(ValueError):
    """The bytes are not an acceptable image; `reason` is short and machine-friendly."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sniff_format(head: bytes) -> str | None:
    """The image format from the first bytes, or None if not an allowed one."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    return None


def _unsupported() -> ImageError:
    return ImageError(
        "unsupported_format", f"not an allowed image type ({', '.join(ALLOWED_FORMATS)})"
    )


def decode_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    jpeg_min_size: int | None = None,
) -> Image.Image:
    """Decode fully (so truncation is caught now) to an RGB image, or raise ImageError.

    `jpeg_min_size`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT (Pillow's
    draft mode: much less work for a large photo) as long as both sides stay at least this
    many pixels. The pixels differ slightly from a full decode followed by a resize
    (benchmarks/RESULTS.md, "Image decoding (issue 13)"); None (the default) decodes in full.
    """
    if isinstance(source, bytes):
        data = source
    else:
        with open(source, "rb") as fh:
            data = fh.read(16)
            # Sniff before reading it all: a large non-image file costs 16 bytes, not its size.
            if data and sniff_format(data) is None:
                raise _unsupported()
            data += fh.read()
    if not data:
        raise ImageError("empty", "file is empty (0 bytes)")
    fmt = sniff_format(data[:16])
    if fmt is None:
        raise _unsupported()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[fmt]) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(
                        "too_many_pixels",
                        f"image is {width}x{height} = {width * height} pixels, over the {max_pixels} cap",
                    )
                img.seek(0)  # GIF/WebP: first frame only
                if jpeg_min_size is not None and fmt == "JPEG":
                    # Before load(): the scale is chosen from the header, the pixels decoded
                    # once at it. Square: the orientation applied below cannot break it.
                    img.draft("RGB", (jpeg_min_size, jpeg_min_size))
                img.load()
                rgb = ImageOps.exif_transpose(img).convert("RGB")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too_many_pixels", f"decompression bomb refused: {exc}") from exc
    except UnidentifiedImageError as exc:
        # Pillow's own message names an in-memory buffer object: not useful to a user.
        raise ImageError("undecodable", f"cannot decode {fmt} image: corrupt data") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError("undecodable", f"cannot decode {fmt} image: {exc}") from exc
    if rgb.width < 1 or rgb.height < 1:
        raise ImageError("empty", "image has no pixels")
    return rgb
