"""Datasets: index an image folder, split it, cache resized pixels, serve torch Datasets.

Indexing and splitting need only Pillow and numpy; the cache and the torch Datasets are
imported on first use, so the CLI's `plan` and the service gateway (which indexes uploads)
do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bitcore.data.index import DatasetError, DatasetIndex, Rejected, Sample, index_directory
from bitcore.data.split import stratified_split

if TYPE_CHECKING:
    from bitcore.data.cache import ImageCache, build_cache
    from bitcore.data.datasets import CachedImageDataset, default_num_workers

_LAZY = {
    "ImageCache": "bitcore.data.cache",
    "build_cache": "bitcore.data.cache",
    "CachedImageDataset": "bitcore.data.datasets",
    "default_num_workers": "bitcore.data.datasets",
}

__all__ = [
    "CachedImageDataset",
    "DatasetError",
    "DatasetIndex",
    "ImageCache",
    "Rejected",
    "Sample",
    "build_cache",
    "default_num_workers",
    "index_directory",
    "stratified_split",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bitcore.data' has no attribute {name!r}")
