"""What the client sends as files: a folder zipped for upload, images as multipart parts."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Union

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ImageInput = Union[str, "os.PathLike[str]", bytes, "PILImage"]

# What an archive upload is sent as, by its suffix (the server judges it by its content).
ARCHIVE_TYPES = {".zip": "application/zip", ".tgz": "application/gzip", ".gz": "application/gzip"}


def zip_folder(folder: Path, out: Path) -> Path:
    """Zip the files under `folder` (relative paths; hidden files and folders left out)."""
    count = 0
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for root, dirs, names in os.walk(folder):  # does not follow folder symlinks
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                path = Path(root) / name
                if name.startswith(".") or not path.is_file():
                    continue
                archive.write(path, path.relative_to(folder).as_posix())
                count += 1
    if count == 0:
        raise ValueError(f"{folder} has no files to upload (expected <class>/<image> folders)")
    return out


def image_parts(
    images: Sequence[ImageInput],
) -> list[tuple[str, tuple[str, IO[bytes] | bytes, str]]]:
    """The multipart `files` of a predict request (the model's route or a deployment's)."""
    if isinstance(images, (str, bytes, os.PathLike)) or is_pil(images):
        raise TypeError("images must be a list (of paths, bytes or PIL images)")
    parts = [image_part(i, image) for i, image in enumerate(images)]
    return [("files", (name, data, "application/octet-stream")) for name, data in parts]


def image_part(index: int, image: ImageInput) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return f"image{index}", image
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        return path.name, path.read_bytes()
    if is_pil(image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the server sees exactly these pixels
        return f"image{index}.png", buffer.getvalue()
    raise TypeError(f"image {index}: expected a path, bytes or a PIL image, got {type(image)!r}")


def is_pil(value: object) -> bool:
    try:
        from PIL import Image
    except ImportError:  # Pillow is optional for the client
        return False
    return isinstance(value, Image.Image)
