"""bitcore.data.cache: the caches of two sizes in one directory keep the original bytes once."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitcore.data import CachedImageDataset, DatasetIndex, build_cache, index_directory
from bitcore.data.cache import CACHE_VERSION, SHARED
from bitcore.images import decode_image
from tests.imagegen import make_image_folder


@pytest.fixture
def index(tmp_path: Path) -> DatasetIndex:
    # 9 JPEGs of ~2 kB, smaller than both sizes: every entry is the file's own bytes.
    make_image_folder(tmp_path / "ds", {"a": 4, "b": 5}, size=[(40, 48), (31, 64)], fmt="JPEG")
    return index_directory(tmp_path / "ds")


def _expected(index: DatasetIndex, path: str, size: int) -> np.ndarray:
    """Independent of the cache code: Pillow bilinear squash of the decoded file."""
    image = decode_image(index.root / path)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def _dataset_bytes(index: DatasetIndex) -> int:
    return sum((index.root / s.path).stat().st_size for s in index.samples)


def _stored(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())}


def test_two_sizes_store_the_original_bytes_once(index: DatasetIndex, tmp_path: Path) -> None:
    train = build_cache(index, 80, tmp_path / "c")  # the upload's pre-crop
    val = build_cache(index, 64, tmp_path / "c")  # a job's crop, in the same directory
    assert train.kinds() == {"raw": 0, "png": 0, "original": 9, "shared": 0}
    assert val.kinds() == {"raw": 0, "png": 0, "original": 0, "shared": 9}
    assert train.data_path.stat().st_size == _dataset_bytes(index)
    assert val.data_path.stat().st_size == 0 and val.donor_path == train.data_path
    np.testing.assert_array_equal(val.entries[:, :2], train.entries[:, :2])  # same bytes
    manifest = json.loads((tmp_path / "c" / "images-64.json").read_text())
    assert manifest["version"] == CACHE_VERSION == 3
    assert manifest["donor"]["data_file"] == train.data_path.name
    for sample in index.samples:
        np.testing.assert_array_equal(val.pixels(sample), _expected(index, sample.path, 64))
        np.testing.assert_array_equal(train.pixels(sample), _expected(index, sample.path, 80))
    # Both reused as they are, the referring one with its donor.
    again = build_cache(index_directory(index.root), 64, tmp_path / "c")
    assert again.reused and again.donor_path == train.data_path
    np.testing.assert_array_equal(again.pixels(index.samples[5]), val.pixels(index.samples[5]))
    assert build_cache(index, 80, tmp_path / "c").reused


def test_a_changed_or_missing_donor_rebuilds_the_referrer(
    index: DatasetIndex, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "c"
    train = build_cache(index, 80, cache_dir)
    build_cache(index, 64, cache_dir)
    files = _stored(cache_dir)
    # The donor rebuilt from the same dataset state: same name, same layout, still valid.
    (cache_dir / "images-80.json").unlink()
    rebuilt = build_cache(index, 80, cache_dir)
    assert not rebuilt.reused and rebuilt.data_path == train.data_path
    assert _stored(cache_dir) == files
    assert build_cache(index, 64, cache_dir).reused
    # A donor index that no longer says what the referrer recorded (here: two rows swapped):
    # the referrer is rebuilt, never read at the wrong offsets.
    donor_index = train.index_path
    rows = np.fromfile(donor_index, dtype="<i8").reshape(-1, 3)
    rows[[0, 1]] = rows[[1, 0]]
    rows.tofile(donor_index)
    assert build_cache(index, 80, cache_dir).reused  # its own pack is still whole
    val = build_cache(index, 64, cache_dir)
    assert not val.reused
    # Re-pointed at the donor as it is now; the two swapped rows no longer have their files'
    # lengths, and the build's guard keeps those files' bytes in its own pack instead.
    assert val.kinds() == {"raw": 0, "png": 0, "original": 2, "shared": 7}
    for sample in index.samples:
        np.testing.assert_array_equal(val.pixels(sample), _expected(index, sample.path, 64))
    # The donor gone: the referrer keeps the bytes itself; a referrer is never a donor.
    for name in ("images-80.json", train.data_path.name, train.index_path.name):
        (cache_dir / name).unlink()
    val = build_cache(index, 64, cache_dir)
    assert not val.reused and val.kinds()["original"] == 9 and val.donor_path is None
    assert val.data_path.stat().st_size == _dataset_bytes(index)
    train = build_cache(index, 80, cache_dir)
    assert train.kinds()["shared"] == 9 and train.donor_path == val.data_path
    other = build_cache(index, 72, cache_dir)
    assert other.donor_path == val.data_path  # the one with original bytes of its own
    for sample in index.samples:
        np.testing.assert_array_equal(train.pixels(sample), _expected(index, sample.path, 80))


def test_a_changed_dataset_rebuilds_both(index: DatasetIndex, tmp_path: Path) -> None:
    cache_dir = tmp_path / "c"
    old_train = build_cache(index, 80, cache_dir)
    old_val = build_cache(index, 64, cache_dir)
    extra = index.root / "b" / "zz-extra.jpg"
    extra.write_bytes((index.root / index.samples[0].path).read_bytes())
    changed = index_directory(index.root)
    val = build_cache(changed, 64, cache_dir)  # the donor's fingerprint differs: no donor
    assert not val.reused and val.donor_path is None and len(val) == 10
    train = build_cache(changed, 80, cache_dir)
    assert not train.reused and train.donor_path == val.data_path
    assert not old_train.data_path.exists() and not old_val.data_path.exists()
    sample = changed.samples[-1]
    np.testing.assert_array_equal(train.pixels(sample), _expected(changed, sample.path, 80))


def test_a_version_2_cache_is_rebuilt(index: DatasetIndex, tmp_path: Path) -> None:
    cache = build_cache(index, 64, tmp_path / "c")
    manifest_path = tmp_path / "c" / "images-64.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 2
    manifest_path.write_text(json.dumps(manifest))
    again = build_cache(index, 64, tmp_path / "c")
    assert not again.reused and again.data_path == cache.data_path


def test_only_the_sizes_own_bytes_are_reserved(index: DatasetIndex, tmp_path: Path) -> None:
    """A referrer that only points at its donor writes an empty pack, whatever it reserved."""
    build_cache(index, 80, tmp_path / "c")
    val = build_cache(index, 64, tmp_path / "c", workers=1)
    assert val.data_path.stat().st_size == 0
    assert int((val.entries[:, 2] == SHARED).sum()) == 9


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_worker_processes_read_the_donor(index: DatasetIndex, tmp_path: Path, context: str) -> None:
    build_cache(index, 80, tmp_path / "c")
    val = build_cache(index, 64, tmp_path / "c")
    assert len(pickle.dumps(val)) < 2_000  # no descriptors, no entries
    data = CachedImageDataset(val, index.samples, 56, train=True)
    keys = [(i, 3 * i) for i in range(9)]
    loader = torch.utils.data.DataLoader(
        data, batch_size=9, sampler=keys, num_workers=2, multiprocessing_context=context
    )
    (batch, _), *_ = list(loader)
    torch.testing.assert_close(batch, torch.stack([data[key][0] for key in keys]), rtol=0, atol=0)
