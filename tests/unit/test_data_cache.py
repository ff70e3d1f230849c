"""bitcore.data.cache and bitcore.data.datasets: decode-once pixels and the BiT transforms."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitcore.cpus import available_cpus
from bitcore.data import (
    CachedImageDataset,
    DatasetError,
    DatasetIndex,
    ImageCache,
    build_cache,
    default_num_workers,
    index_directory,
)
from bitcore.data.cache import KIND_NAMES
from bitcore.images import decode_image
from tests.imagegen import class_image, encode, make_image_folder


@pytest.fixture
def index(tmp_path: Path) -> DatasetIndex:
    make_image_folder(tmp_path / "ds", {"a": 3, "b": 4}, size=[(40, 48), (31, 64)], fmt="JPEG")
    return index_directory(tmp_path / "ds")


def _expected(index: DatasetIndex, path: str, size: int) -> np.ndarray:
    """Independent of the cache code: Pillow bilinear squash of the decoded file."""
    image = decode_image(index.root / path)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def test_pixels_equal_a_direct_resize(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 36, tmp_path / "cache", workers=1)  # 7 rows > 4-row window
    assert len(cache) == 7 and cache.size == 36 and not cache.reused
    for sample in index.samples:
        pixels = cache.pixels(sample)
        assert pixels.shape == (36, 36, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable
        np.testing.assert_array_equal(pixels, _expected(index, sample.path, 36))
    assert [cache.row(s) for s in index.samples] == list(range(7))  # rows in path order
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    key = files[0][10:26]
    assert files == [f"images-36-{key}.idx", f"images-36-{key}.pack", "images-36.json"]
    assert (tmp_path / "cache" / files[0]).stat().st_size == 7 * 3 * 8  # offset, length, kind


def _dataset_bytes(index: DatasetIndex) -> int:
    return sum((index.root / s.path).stat().st_size for s in index.samples)


def test_each_form_loads_the_exact_pixels_within_the_files_bytes(tmp_path: Path) -> None:
    """RAW (shrunk, raw no bigger), PNG (shrunk, smooth), ORIGINAL (upscaled at load time)."""
    root = tmp_path / "ds"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "noisy.png").write_bytes(encode(class_image(0, 2, (64, 70), noise=40), "PNG"))
    smooth = class_image(1, 2, (240, 200), noise=0)
    (root / "a" / "smooth.png").write_bytes(encode(smooth, "PNG"))  # 0.7 kB: raw would be 3 kB
    (root / "b" / "small.jpg").write_bytes(encode(class_image(1, 2, (20, 24)), "JPEG"))
    (root / "b" / "wide.jpg").write_bytes(encode(class_image(0, 2, (20, 90)), "JPEG"))
    index = index_directory(root, min_images_per_class=1)
    cache = build_cache(index, 32, tmp_path / "c")
    forms = {s.path: KIND_NAMES[int(cache.entries[cache.row(s), 2])] for s in index.samples}
    assert forms == {
        "a/noisy.png": "raw",
        "a/smooth.png": "png",
        "b/small.jpg": "original",
        "b/wide.jpg": "png",  # shrunk in width, stretched in height: one squash, stored
    }
    assert cache.kinds() == {"raw": 1, "png": 2, "original": 1, "shared": 0}
    for sample in index.samples:
        np.testing.assert_array_equal(cache.pixels(sample), _expected(index, sample.path, 32))
    assert cache.data_path.stat().st_size <= _dataset_bytes(index)  # reserved, then cut
    assert cache.data_path.stat().st_size == int(cache.entries[:, 1].sum())
    # Larger than every image: only the files' own bytes, squashed up when loaded; small.jpg's
    # are in the 32 px cache's pack already, and read from there.
    big = build_cache(index, 160, tmp_path / "c")
    assert big.kinds() == {"raw": 0, "png": 0, "original": 3, "shared": 1}
    assert big.donor_path == cache.data_path
    small = index.root / "b" / "small.jpg"
    assert big.data_path.stat().st_size == _dataset_bytes(index) - small.stat().st_size
    for sample in index.samples:
        np.testing.assert_array_equal(big.pixels(sample), _expected(index, sample.path, 160))
    # Alone in a directory, the 160 px cache keeps all four files' bytes.
    alone = build_cache(index, 160, tmp_path / "alone")
    assert alone.kinds() == {"raw": 0, "png": 0, "original": 4, "shared": 0}
    assert alone.data_path.stat().st_size == _dataset_bytes(index) and alone.donor_path is None


def test_cache_at_the_pre_crop_is_bounded_by_the_upload(tmp_path: Path) -> None:
    """The finding of issue 12: 96 px JPEGs cached at 512 px were N x 512 x 512 x 3 bytes."""
    make_image_folder(tmp_path / "ds", {"a": 20, "b": 20}, size=(96, 96), fmt="JPEG")
    index = index_directory(tmp_path / "ds")
    cache = build_cache(index, 512, tmp_path / "c")
    stored = sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    assert stored <= 1.05 * _dataset_bytes(index)  # the pack, its index and the manifest
    assert 100 * stored < 40 * 512 * 512 * 3  # what version 1 stored (noisy q95 JPEGs: 7 kB)
    sample = index.samples[7]
    np.testing.assert_array_equal(cache.pixels(sample), _expected(index, sample.path, 512))


def test_a_version_1_cache_is_replaced(index: DatasetIndex, tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    legacy = tmp_path / "c" / "images-20-0123456789abcdef.u8"
    legacy.write_bytes(bytes(7 * 20 * 20 * 3))
    (tmp_path / "c" / "images-20.json").write_text(
        '{"format": "bitserve-image-cache", "version": 1}'
    )
    cache = build_cache(index, 20, tmp_path / "c")
    assert not cache.reused and not legacy.exists()
    assert build_cache(index, 20, tmp_path / "c").reused


def test_second_build_reuses_without_decoding(index: DatasetIndex, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    first = build_cache(index, 32, tmp_path / "c", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 7) for i in range(1, 8)]
    before = first.data_path.stat()

    calls.clear()
    reloaded = index_directory(index.root)  # a new index object of the same files
    second = build_cache(reloaded, 32, tmp_path / "c", progress=lambda d, t: calls.append((d, t)))
    assert second.reused and calls == []
    after = second.data_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    for sample in index.samples:
        np.testing.assert_array_equal(second.pixels(sample), first.pixels(sample))


def test_rebuilt_when_the_dataset_changes(index: DatasetIndex, tmp_path: Path) -> None:
    first = build_cache(index, 32, tmp_path / "c")
    old_data = first.data_path
    target = index.root / index.samples[0].path
    target.write_bytes(encode(class_image(1, 2, (40, 48), seed=42), "PNG"))  # PNG bytes, .jpg name
    os.utime(target, ns=(2_000_000_000, 2_000_000_000))

    second = build_cache(index_directory(index.root), 32, tmp_path / "c")
    assert not second.reused and second.data_path != old_data
    assert not old_data.exists()  # the stale data file was removed
    np.testing.assert_array_equal(
        second.pixels(index.samples[0]), _expected(index, index.samples[0].path, 32)
    )
    assert not np.array_equal(second.pixels(index.samples[0]), first.pixels(index.samples[0]))


def test_subset_then_superset_and_sizes_are_separate(index: DatasetIndex, tmp_path: Path) -> None:
    subset = index.samples[:3]
    small = build_cache(index, 20, tmp_path / "c", samples=subset)
    assert len(small) == 3
    with pytest.raises(KeyError, match="is not in the image cache"):
        small.row(index.samples[5])
    assert build_cache(index, 20, tmp_path / "c", samples=subset[:2]).reused  # covered
    full = build_cache(index, 20, tmp_path / "c")  # not covered: rebuilt with all samples
    assert not full.reused and len(full) == 7
    other = build_cache(index, 24, tmp_path / "c")
    assert not other.reused and build_cache(index, 20, tmp_path / "c").reused


def test_vanished_file_is_a_dataset_error(index: DatasetIndex, tmp_path: Path) -> None:
    (index.root / index.samples[2].path).write_bytes(b"gone")
    with pytest.raises(DatasetError, match="no longer decodes") as info:
        build_cache(index, 16, tmp_path / "c")
    assert info.value.code == "dataset_changed"
    assert list((tmp_path / "c").iterdir()) == []


def test_pickles_without_the_pixels(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 64, tmp_path / "c")
    cache.pixels(index.samples[0])  # open it
    blob = pickle.dumps(cache)
    assert len(blob) < 2_000  # neither the pixels nor the entry index are in it
    clone: ImageCache = pickle.loads(blob)
    np.testing.assert_array_equal(clone.pixels(index.samples[4]), cache.pixels(index.samples[4]))


def _unit(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def test_eval_item_exact_values(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 32, tmp_path / "c")
    same = CachedImageDataset(cache, index.samples, 32, train=False)
    image, label = same[4]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and label == 1
    torch.testing.assert_close(image, _unit(cache.pixels(index.samples[4])), rtol=0, atol=1e-6)

    resized = CachedImageDataset(cache, index.samples, 24, train=False)
    image, _ = resized[4]
    expected = np.asarray(
        Image.fromarray(np.array(cache.pixels(index.samples[4]))).resize(
            (24, 24), Image.Resampling.BILINEAR
        )
    )
    torch.testing.assert_close(image, _unit(expected), rtol=0, atol=1e-6)
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    with pytest.raises(TypeError, match="indexed by int"):
        same[(0, 1)]  # type: ignore[index]


def _locate(window: torch.Tensor, source: torch.Tensor) -> set[tuple[int, int, bool]]:
    """All (top, left, flipped) placements of `window` (3, c, c) inside `source` (3, H, W)."""
    crop = window.shape[-1]
    found = set()
    for top in range(source.shape[1] - crop + 1):
        for left in range(source.shape[2] - crop + 1):
            patch = source[:, top : top + crop, left : left + crop]
            for flipped in (False, True):
                if torch.equal(patch.flip(-1) if flipped else patch, window):
                    found.add((top, left, flipped))
    return found


def test_train_item_is_a_seeded_crop_and_flip(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 20, tmp_path / "c")
    data = CachedImageDataset(cache, index.samples, 16, train=True)
    source = _unit(cache.pixels(index.samples[3]))
    placements = set()
    for seed in range(24):
        image, label = data[(3, seed)]
        assert image.shape == (3, 16, 16) and label == 1
        assert torch.equal(data[(3, seed)][0], image)  # same key, same augmentation
        where = _locate(image, source)
        assert len(where) == 1  # the noisy images make every placement unique
        placements |= where
    assert len(placements) >= 12  # 24 draws over 5 x 5 x 2 = 50 placements
    assert {flipped for _, _, flipped in placements} == {False, True}
    assert len({(top, left) for top, left, _ in placements}) >= 8
    with pytest.raises(TypeError, match=r"\(index, aug_seed\)"):
        data[3]  # type: ignore[index]


def test_train_crop_equal_to_cache_size_only_flips(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 16, tmp_path / "c")
    data = CachedImageDataset(cache, index.samples, 16, train=True)
    source = _unit(cache.pixels(index.samples[0]))
    seen = {torch.equal(data[(0, s)][0], source) for s in range(16)}
    flips = {torch.equal(data[(0, s)][0], source.flip(-1)) for s in range(16)}
    assert seen == {True, False} and flips == {True, False}


def test_dataset_checks(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 16, tmp_path / "c", samples=index.samples[:4])
    with pytest.raises(ValueError, match="larger than the cached size"):
        CachedImageDataset(cache, index.samples[:4], 20, train=True)
    with pytest.raises(KeyError, match="is not in the image cache"):
        CachedImageDataset(cache, index.samples, 16, train=False)
    data = CachedImageDataset(cache, index.samples[:4], 12, train=False)
    assert len(data) == 4 and data.labels == [0, 0, 0, 1]


def test_data_loader_batches(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 20, tmp_path / "c")
    data = CachedImageDataset(cache, index.samples, 16, train=True)
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, sampler=[(i, 100 + i) for i in range(7)]
    )
    batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 16, 16), (3, 3, 16, 16)]
    assert batches[1][1].tolist() == [1, 1, 1]
    torch.testing.assert_close(batches[0][0][2], data[(2, 102)][0], rtol=0, atol=0)


def test_default_num_workers_fits_the_machine() -> None:
    workers = default_num_workers()
    cpus = available_cpus()
    assert workers == (0 if cpus <= 2 else min(4, cpus - 1))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_processes_load_the_same_pixels(
    index: DatasetIndex, tmp_path: Path, context: str
) -> None:
    """Decoding moves into the DataLoader workers: each opens the pack itself."""
    cache = build_cache(index, 44, tmp_path / "c")  # 40 x 48 and 31 x 64: squashed at load
    assert cache.kinds()["original"] > 0
    data = CachedImageDataset(cache, index.samples, 40, train=True)
    keys = [(i, 7 * i) for i in range(7)]
    loader = torch.utils.data.DataLoader(
        data, batch_size=7, sampler=keys, num_workers=2, multiprocessing_context=context
    )
    (batch, labels), *_ = list(loader)
    expected = torch.stack([data[key][0] for key in keys])
    torch.testing.assert_close(batch, expected, rtol=0, atol=0)
    assert labels.tolist() == [s.label for s in index.samples]
