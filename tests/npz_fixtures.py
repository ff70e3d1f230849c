"""Checkpoints in the official BiT .npz format, written by hand for tests.

The arrays are named key by key from the published naming (docs/bit.md, "Official
checkpoint format"), HWIO kernels and all, WITHOUT calling bitcore.checkpoints: the loader is
tested against the format, not against its own exporter. Some convs carry TensorFlow's
`standardized_conv2d_N` suffix, as in some published files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The tiny registry model "tiny-R10x0.25": one unit per stage, a quarter of the width.
TINY_DEPTHS = (1, 1, 1, 1)
TINY_WIDTH = 0.25
TINY_GROUPS = 8


def official_arrays(
    depths: tuple[int, ...] = TINY_DEPTHS,
    width_factor: float = TINY_WIDTH,
    num_classes: int = 5,
    *,
    seed: int = 0,
    suffixed: bool = True,
) -> dict[str, np.ndarray]:
    """Random float32 weights for a BiT ResNetV2, in the official names and layouts.

    suffixed=True names every second unit conv `standardized_conv2d_<n>` (a running counter,
    as TensorFlow's name scoping produces); the others, and the root, keep the plain name, so
    both spellings are exercised in one file.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    counter = 0

    def conv_name(scope: str, index: int) -> str:
        nonlocal counter
        counter += 1
        if suffixed and index % 2 == 1:
            return f"{scope}/standardized_conv2d_{counter}/kernel"
        return f"{scope}/standardized_conv2d/kernel"

    def kernel(h: int, w: int, cin: int, cout: int) -> np.ndarray:
        # HWIO, as TensorFlow stores it. Scale is irrelevant: WS normalises it away.
        return rng.normal(0.0, 1.0, size=(h, w, cin, cout)).astype(np.float32)

    def group_norm(scope: str, channels: int) -> None:
        arrays[f"{scope}/group_norm/gamma"] = (1.0 + 0.1 * rng.normal(size=channels)).astype(
            np.float32
        )
        arrays[f"{scope}/group_norm/beta"] = (0.1 * rng.normal(size=channels)).astype(np.float32)

    root = int(64 * width_factor)
    arrays["resnet/root_block/standardized_conv2d/kernel"] = kernel(7, 7, 3, root)
    cin = root
    index = 0
    for block, depth in enumerate(depths, start=1):
        cout = int(256 * width_factor) * 2 ** (block - 1)
        cmid = cout // 4
        for unit in range(1, depth + 1):
            scope = f"resnet/block{block}/unit{unit:02d}"
            unit_in = cin if unit == 1 else cout
            group_norm(f"{scope}/a", unit_in)  # pre-activation GN, over the unit's input
            arrays[conv_name(f"{scope}/a", index)] = kernel(1, 1, unit_in, cmid)
            index += 1
            group_norm(f"{scope}/b", cmid)
            arrays[conv_name(f"{scope}/b", index)] = kernel(3, 3, cmid, cmid)
            index += 1
            group_norm(f"{scope}/c", cmid)
            arrays[conv_name(f"{scope}/c", index)] = kernel(1, 1, cmid, cout)
            index += 1
            if unit == 1 and (block > 1 or unit_in != cout):
                arrays[conv_name(f"{scope}/a/proj", index)] = kernel(1, 1, unit_in, cout)
                index += 1
        cin = cout
    features = int(2048 * width_factor)
    arrays["resnet/group_norm/gamma"] = (1.0 + 0.1 * rng.normal(size=features)).astype(np.float32)
    arrays["resnet/group_norm/beta"] = (0.1 * rng.normal(size=features)).astype(np.float32)
    arrays["resnet/head/conv2d/kernel"] = (
        0.05 * rng.normal(size=(1, 1, features, num_classes))
    ).astype(np.float32)
    arrays["resnet/head/conv2d/bias"] = (0.1 * rng.normal(size=num_classes)).astype(np.float32)
    return arrays


def write_official_npz(path: str | Path, arrays: dict[str, np.ndarray] | None = None) -> Path:
    """Write `arrays` (default: the tiny model's) as an uncompressed .npz, like the published files."""
    path = Path(path)
    np.savez(path, **(arrays if arrays is not None else official_arrays()))  # type: ignore[arg-type]
    return path
