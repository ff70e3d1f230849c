"""Small, real, learnable image datasets for tests: class folders of encoded images.

Each class gets its own colour (hue spread evenly round the colour wheel) and its own stripe
pattern (orientation and period), plus per-pixel noise, so a tiny model separates the classes
in a few steps while no two images are identical. Everything is seeded: the same arguments give
byte-identical files.
"""

from __future__ import annotations

import colorsys
import io
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "WEBP": "webp", "GIF": "gif"}
# Kinds of broken file `make_image_folder(corrupt=...)` can write, and what each one is.
CORRUPT_KINDS = {
    "truncated": "a valid image cut off half-way",
    "text": "a plain-text file with an image extension",
    "empty": "a zero-byte file",
    "bad_data": "correct PNG magic bytes followed by garbage",
}

Size = tuple[int, int]


def class_image(
    class_index: int,
    num_classes: int,
    size: Size = (40, 48),
    *,
    seed: int = 0,
    noise: float = 20.0,
) -> Image.Image:
    """One RGB image of class `class_index` of `num_classes`; `size` is (height, width)."""
    height, width = size
    rng = np.random.default_rng([seed, class_index, num_classes, height, width])
    hue = class_index / max(1, num_classes)
    base = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.85)) * 255.0
    yy, xx = np.mgrid[0:height, 0:width]
    period = 4 + 2 * (class_index % 3)
    coord = yy if class_index % 2 == 0 else xx
    phase = rng.integers(0, period)
    stripes = (((coord + phase) // (period // 2)) % 2) * 2.0 - 1.0  # +-1 bands
    pixels = base[None, None, :] + 45.0 * stripes[..., None]
    pixels = pixels + rng.normal(0.0, noise, size=(height, width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    """The image encoded as `fmt` (PNG, JPEG, BMP, WEBP, GIF)."""
    buffer = io.BytesIO()
    kwargs = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def corrupt_bytes(kind: str, *, seed: int = 0) -> bytes:
    """The contents of a broken file of `kind` (see CORRUPT_KINDS)."""
    if kind == "truncated":
        data = encode(class_image(0, 2, (40, 48), seed=seed), "PNG")
        return data[: len(data) // 2]
    if kind == "text":
        return b"this is not an image\n" * 4
    if kind == "empty":
        return b""
    if kind == "bad_data":
        rng = np.random.default_rng(seed)
        return b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    raise ValueError(f"unknown corrupt kind {kind!r}; known: {sorted(CORRUPT_KINDS)}")


def make_image_folder(
    root: str | Path,
    classes: Mapping[str, int] | None = None,
    size: Size | Sequence[Size] = (40, 48),
    fmt: str = "PNG",
    seed: int = 0,
    corrupt: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    top_level: str | None = None,
) -> Path:
    """Write `<root>[/<top_level>]/<class>/<class>_<i>.<ext>` and return `root`.

    `classes` maps class name -> number of valid images (default {"cat": 6, "dog": 6}); class
    index (colour and pattern) follows the sorted class names, as the dataset index labels them.
    `size` is one (height, width) for all images, or a sequence cycled over each class's images.
    `corrupt` adds broken files: relative path (under the class-folder level) -> kind, e.g.
    {"cat/broken.png": "truncated", "dog/readme.jpg": "text"}.
    """
    classes = dict(classes) if classes is not None else {"cat": 6, "dog": 6}
    root = Path(root)
    base = root / top_level if top_level else root
    base.mkdir(parents=True, exist_ok=True)
    sizes: list[Size] = [size] if _is_size(size) else list(size)  # type: ignore[list-item,arg-type]
    names = sorted(classes)
    ext = EXTENSIONS[fmt]
    for label, name in enumerate(names):
        folder = base / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(classes[name]):
            hw = sizes[i % len(sizes)]
            image = class_image(label, len(names), hw, seed=seed * 100_003 + i)
            (folder / f"{name}_{i:03d}.{ext}").write_bytes(encode(image, fmt))
    items = corrupt.items() if isinstance(corrupt, Mapping) else corrupt
    for n, (relpath, kind) in enumerate(items):
        target = base / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(corrupt_bytes(kind, seed=seed + n))
    return root


def _is_size(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value)


def make_archive(folder: str | Path, kind: str = "zip", dest: str | Path | None = None) -> Path:
    """Pack the *contents* of `folder` (paths relative to it) as .zip or .tar.gz; return the file.

    The archive goes next to `folder` as `<folder>.zip` / `<folder>.tar.gz` unless `dest` is given.
    """
    folder = Path(folder)
    suffix = {"zip": ".zip", "tar.gz": ".tar.gz", "tgz": ".tgz"}.get(kind)
    if suffix is None:
        raise ValueError(f"kind must be 'zip', 'tar.gz' or 'tgz', got {kind!r}")
    out = Path(dest) if dest is not None else folder.parent / f"{folder.name}{suffix}"
    members = sorted(p for p in folder.rglob("*") if p != out)
    if kind == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in members:
                archive.write(path, path.relative_to(folder).as_posix())
    else:
        with tarfile.open(out, "w:gz") as archive:
            for path in members:
                archive.add(path, path.relative_to(folder).as_posix(), recursive=False)
    return out
