"""Transforms: the exact [-1, 1] mapping, squash resizing, seeded random crop and flip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bitcore.transforms import eval_preprocess, random_crop_flip, resize_squash, to_unit_range


def test_unit_range_exact_values() -> None:
    pixels = np.array([[[0, 255, 51], [102, 153, 204]]], dtype=np.uint8)  # 1x2 HWC
    out = to_unit_range(pixels)
    assert out.dtype == torch.float32
    assert out.shape == (3, 1, 2)
    assert out[0, 0, 0] == -1.0
    assert out[1, 0, 0] == 1.0
    # BiT's convention (x/255 - 0.5) / 0.5, computed independently in float64.
    expected = (pixels.astype(np.float64) / 255.0 - 0.5) / 0.5
    assert np.allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6, rtol=0)
    assert out[2, 0, 0].item() == pytest.approx(-0.6, abs=1e-6)
    assert out[2, 0, 1].item() == pytest.approx(0.6, abs=1e-6)


def test_unit_range_full_byte_range_and_batches() -> None:
    ramp = torch.arange(256, dtype=torch.uint8)
    out = to_unit_range(ramp.view(1, 256, 1).expand(1, 256, 3))
    assert torch.equal(out[0], out[2])
    assert out.min() == -1.0 and out.max() == 1.0
    assert torch.all(out[0, 0, 1:] > out[0, 0, :-1])  # strictly increasing: no clipping
    batch = torch.zeros((5, 7, 9, 3), dtype=torch.uint8)  # NHWC -> NCHW
    assert to_unit_range(batch).shape == (5, 3, 7, 9)


def test_unit_range_does_not_modify_or_warn_on_read_only_input() -> None:
    image = Image.new("RGB", (4, 3), (255, 0, 0))
    pixels = np.asarray(image)  # read-only view, as the data pipeline gets it
    assert not pixels.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when wrapping a read-only array
        out = to_unit_range(pixels)
    assert torch.equal(out[0], torch.ones(3, 4))
    assert np.asarray(image)[0, 0].tolist() == [255, 0, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.uint16])
def test_unit_range_refuses_non_byte_pixels(dtype: type) -> None:
    with pytest.raises(TypeError, match="expected uint8 pixels"):
        to_unit_range(np.zeros((2, 2, 3), dtype=dtype))


@pytest.mark.parametrize(
    ("size", "target"), [((64, 32), 16), ((30, 90), 128), ((128, 128), 128), ((1, 1), 5)]
)
def test_resize_squash_ignores_aspect_ratio(size: tuple[int, int], target: int) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    out = resize_squash(image, target)
    assert out.size == (target, target)
    assert np.all(np.asarray(out) == (10, 20, 30))  # a flat colour stays exactly that colour


def test_resize_squash_keeps_a_right_sized_image_and_squashes_halves() -> None:
    image = Image.new("RGB", (32, 32))
    assert resize_squash(image, 32) is image
    # Left half black, right half white, 80x20: squashed to 10x10 the halves stay halves
    # (a centre crop would have kept only the middle of the image).
    pixels = np.zeros((20, 80, 3), dtype=np.uint8)
    pixels[:, 40:] = 255
    out = np.asarray(resize_squash(Image.fromarray(pixels), 10))
    assert out[:, :4].max() == 0
    assert out[:, 6:].min() == 255


def test_eval_preprocess_values_and_shape() -> None:
    image = Image.new("RGB", (50, 30), (255, 0, 51))
    out = eval_preprocess(image, 24)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert torch.equal(out[0], torch.ones(24, 24))
    assert torch.equal(out[1], -torch.ones(24, 24))
    assert torch.allclose(out[2], torch.full((24, 24), -0.6), atol=1e-6)
    grey = eval_preprocess(Image.new("L", (8, 8), 255), 8)  # other modes converted to RGB
    assert torch.equal(grey, torch.ones(3, 8, 8))


def _ramp(channels: int = 3, height: int = 10, width: int = 12) -> torch.Tensor:
    return torch.arange(channels * height * width, dtype=torch.float32).view(
        channels, height, width
    )


def _locate(pixels: torch.Tensor, out: torch.Tensor) -> tuple[int, int, bool]:
    """Where `out` came from: (top, left, flipped). Values in `pixels` are all distinct."""
    crop = out.shape[-1]
    for flipped in (False, True):
        window = out.flip(-1) if flipped else out
        top, left = np.argwhere(pixels[0].numpy() == window[0, 0, 0].item())[0]
        if torch.equal(pixels[..., top : top + crop, left : left + crop], window):
            return int(top), int(left), flipped
    raise AssertionError("output is not a (possibly mirrored) window of the input")


def test_random_crop_flip_is_a_window_and_seeded() -> None:
    pixels = _ramp()
    seen = set()
    for seed in range(40):
        first = random_crop_flip(pixels, 6, torch.Generator().manual_seed(seed))
        again = random_crop_flip(pixels, 6, torch.Generator().manual_seed(seed))
        assert torch.equal(first, again)  # same seed, same crop and flip
        assert first.shape == (3, 6, 6)
        top, left, flipped = _locate(pixels, first)
        assert 0 <= top <= 4 and 0 <= left <= 6
        seen.add((top, left, flipped))
    flips = {flipped for _, _, flipped in seen}
    assert flips == {False, True}  # both outcomes of the coin occur
    assert len({(t, left) for t, left, _ in seen}) > 10  # positions vary


def test_random_crop_flip_generator_sequence_and_batches() -> None:
    pixels = _ramp()
    generator = torch.Generator().manual_seed(7)
    sequence = [random_crop_flip(pixels, 5, generator) for _ in range(5)]
    generator = torch.Generator().manual_seed(7)
    assert all(torch.equal(a, random_crop_flip(pixels, 5, generator)) for a in sequence)
    batch = torch.stack([pixels, pixels + 1000])  # (N, C, H, W): one window for the whole batch
    out = random_crop_flip(batch, 5, torch.Generator().manual_seed(3))
    assert out.shape == (2, 3, 5, 5)
    assert torch.equal(out[1], out[0] + 1000)


def test_random_crop_flip_full_size_and_too_large() -> None:
    pixels = _ramp(height=8, width=8)
    outs = {
        _locate(pixels, random_crop_flip(pixels, 8, torch.Generator().manual_seed(s)))
        for s in range(20)
    }
    assert outs == {(0, 0, False), (0, 0, True)}  # only the flip is random
    with pytest.raises(ValueError, match="crop 9 larger than image 8x8"):
        random_crop_flip(pixels, 9, torch.Generator().manual_seed(0))
