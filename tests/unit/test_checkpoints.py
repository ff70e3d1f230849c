"""Loading official BiT .npz checkpoints (bitcore.checkpoints).

The checkpoint is written by hand in the published naming (tests/npz_fixtures.py) and the loaded
model is compared with an independent re-implementation of the reference forward pass that reads
the raw arrays with torch.nn.functional only (nothing from bitcore).
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from bitcore.checkpoints import (
    CheckpointError,
    load_bit_npz,
    npz_key,
    npz_to_state_dict,
    save_bit_npz,
    state_dict_to_npz,
    state_key,
)
from bitcore.layers import fold_weight_standardization, group_norm
from bitcore.models import ResNetV2, create_model
from tests.npz_fixtures import TINY_GROUPS, TINY_WIDTH, official_arrays, write_official_npz

# Two units in stages 1 and 4 so identity shortcuts (unit02) are exercised as well as projections.
DEPTHS = (2, 1, 1, 2)
CLASSES = 5


def small_model(num_classes: int = CLASSES) -> Any:  # Any: tests reach into submodules
    return ResNetV2(DEPTHS, TINY_WIDTH, num_classes, norm=partial(group_norm, groups=TINY_GROUPS))


# --- the independent reference (bit_pytorch/models.py, re-derived from docs/bit.md) -----------------


def _get(arrays: dict[str, np.ndarray], name: str) -> torch.Tensor:
    """Look a tensor up by its canonical name, accepting the `standardized_conv2d_N` spelling."""
    pattern = re.compile(
        re.escape(name).replace("standardized_conv2d", r"standardized_conv2d(_\d+)?")
    )
    found = [k for k in arrays if pattern.fullmatch(k)]
    assert len(found) == 1, (name, found)
    return torch.from_numpy(arrays[found[0]]).double()


def _ws_conv(arrays, scope, x, stride=1, padding=0):
    w = _get(arrays, f"{scope}/standardized_conv2d/kernel").permute(3, 2, 0, 1)  # HWIO -> OIHW
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)  # biased, per output channel
    return F.conv2d(x, (w - mean) / torch.sqrt(var + 1e-10), stride=stride, padding=padding)


def _gn_relu(arrays, scope, x, groups):
    gamma = _get(arrays, f"{scope}/group_norm/gamma")
    beta = _get(arrays, f"{scope}/group_norm/beta")
    n, c, h, w = x.shape
    g = min(groups, c)
    xg = x.reshape(n, g, -1)
    mean = xg.mean(-1, keepdim=True)
    var = xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + 1e-5)).reshape(n, c, h, w)
    return torch.relu(y * gamma[None, :, None, None] + beta[None, :, None, None])


def reference_forward(arrays: dict[str, np.ndarray], x: torch.Tensor, groups: int) -> torch.Tensor:
    x = x.double()
    x = _ws_conv(arrays, "resnet/root_block", x, stride=2, padding=3)
    x = F.pad(x, (1, 1, 1, 1), value=0.0)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    block = 1
    while any(k.startswith(f"resnet/block{block}/") for k in arrays):
        unit = 1
        while any(k.startswith(f"resnet/block{block}/unit{unit:02d}/") for k in arrays):
            scope = f"resnet/block{block}/unit{unit:02d}"
            stride = 2 if (block > 1 and unit == 1) else 1
            out = _gn_relu(arrays, f"{scope}/a", x, groups)
            has_proj = any(k.startswith(f"{scope}/a/proj/") for k in arrays)
            shortcut = _ws_conv(arrays, f"{scope}/a/proj", out, stride=stride) if has_proj else x
            out = _ws_conv(arrays, f"{scope}/a", out)
            out = _ws_conv(
                arrays, f"{scope}/b", _gn_relu(arrays, f"{scope}/b", out, groups), stride, 1
            )
            out = _ws_conv(arrays, f"{scope}/c", _gn_relu(arrays, f"{scope}/c", out, groups))
            x = out + shortcut
            unit += 1
        block += 1
    x = _gn_relu(arrays, "resnet", x, groups).mean(dim=(2, 3))
    kernel = _get(arrays, "resnet/head/conv2d/kernel")[0, 0]  # [C, K]
    return x @ kernel + _get(arrays, "resnet/head/conv2d/bias")


# --- tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return official_arrays(DEPTHS, TINY_WIDTH, CLASSES, seed=1)


def test_fixture_uses_both_conv_spellings(arrays):
    assert any(re.search(r"standardized_conv2d_\d+/", k) for k in arrays)
    assert "resnet/block1/unit02/a/standardized_conv2d/kernel" in arrays
    assert not any(k.startswith("resnet/block1/unit02/a/proj") for k in arrays)
    assert any(k.startswith("resnet/block2/unit01/a/proj/standardized_conv2d") for k in arrays)


def test_loaded_model_matches_independent_reference(arrays, tmp_path: Path):
    path = write_official_npz(tmp_path / "BiT-test.npz", arrays)
    model = small_model().eval()
    load_bit_npz(model, path)
    x = torch.rand(2, 3, 36, 36, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = reference_forward(arrays, x, TINY_GROUPS)
    with torch.no_grad():
        got32 = model(x)
        got64 = model.double()(x.double())
    assert expected.abs().max() > 0.1  # not a degenerate all-zero comparison
    torch.testing.assert_close(got32.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got64, expected, atol=1e-10, rtol=0)


def test_folded_model_matches_reference(arrays):
    model = small_model().eval()
    load_bit_npz(model, arrays)
    fold_weight_standardization(model)
    x = torch.rand(2, 3, 33, 33, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            model(x).double(), reference_forward(arrays, x, TINY_GROUPS), atol=1e-4, rtol=0
        )


def test_registry_tiny_model_loads_its_format(tmp_path: Path):
    path = write_official_npz(tmp_path / "tiny.npz", official_arrays(seed=2))
    model: Any = create_model("tiny-R10x0.25", CLASSES)
    load_bit_npz(model, path)
    expected = torch.from_numpy(np.load(path)["resnet/head/conv2d/bias"])
    assert torch.equal(model.head.conv.bias, expected)


def test_kernel_is_transposed_hwio_to_oihw(arrays):
    model = small_model()
    load_bit_npz(model, arrays)
    hwio = arrays["resnet/root_block/standardized_conv2d/kernel"]
    w = model.root.conv.weight
    assert tuple(w.shape) == (16, 3, 7, 7)
    assert w[5, 2, 1, 4].item() == hwio[1, 4, 2, 5]


@pytest.mark.parametrize("reason", ["zero", "classes"])
def test_head_is_zeroed_on_request_or_class_mismatch(arrays, reason):
    model = small_model(CLASSES if reason == "zero" else 3)
    load_bit_npz(model, arrays, head="zero" if reason == "zero" else "keep")
    assert torch.count_nonzero(model.head.conv.weight) == 0
    assert torch.count_nonzero(model.head.conv.bias) == 0
    # The body still loaded.
    gamma = torch.from_numpy(arrays["resnet/group_norm/gamma"])
    assert torch.equal(model.head.gn.weight, gamma)


def test_head_kept_when_classes_match(arrays):
    model = small_model()
    load_bit_npz(model, arrays)
    kernel = arrays["resnet/head/conv2d/kernel"]
    assert torch.equal(model.head.conv.weight[:, :, 0, 0], torch.from_numpy(kernel[0, 0].T))


def test_missing_key_is_named(arrays):
    broken = dict(arrays)
    del broken["resnet/block3/unit01/b/group_norm/beta"]
    model = small_model()
    before = model.root.conv.weight.clone()
    with pytest.raises(CheckpointError, match=r"missing 1: resnet/block3/unit01/b/group_norm/beta"):
        load_bit_npz(model, broken)
    assert torch.equal(model.root.conv.weight, before)  # nothing was half-loaded


def test_missing_head_is_an_error_unless_zeroed(arrays):
    broken = {k: v for k, v in arrays.items() if not k.startswith("resnet/head/")}
    with pytest.raises(CheckpointError, match="resnet/head/conv2d/kernel"):
        load_bit_npz(small_model(), broken)
    model = small_model()
    load_bit_npz(model, broken, head="zero")
    assert torch.count_nonzero(model.head.conv.weight) == 0


def test_wrong_shape_is_named(arrays):
    broken = dict(arrays)
    broken["resnet/block2/unit01/a/group_norm/gamma"] = np.ones(63, np.float32)
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch 1: body\.block2\.unit01\.gn1\.weight \(checkpoint \(63,\)",
    ):
        load_bit_npz(small_model(), broken)


def test_wrong_model_size_lists_extra_and_missing_keys(arrays):
    # A checkpoint with more units than the model: its extra unit is "unexpected".
    model = ResNetV2((1, 1, 1, 2), TINY_WIDTH, CLASSES, norm=partial(group_norm, groups=8))
    with pytest.raises(CheckpointError, match=r"unexpected \d+: resnet/block1/unit02/"):
        load_bit_npz(model, arrays)


def test_unknown_key_is_named(arrays):
    broken = dict(arrays)
    broken["resnet/block1/unit01/d/group_norm/gamma"] = np.ones(4, np.float32)
    with pytest.raises(
        CheckpointError, match=r"unexpected key 'resnet/block1/unit01/d/group_norm/gamma'"
    ):
        load_bit_npz(small_model(), broken)
    broken = dict(arrays)
    broken["global_step"] = np.array([1.0], np.float32)
    with pytest.raises(CheckpointError, match="global_step"):
        load_bit_npz(small_model(), broken)


def test_duplicate_spellings_are_refused(arrays):
    broken = dict(arrays)
    broken["resnet/block1/unit01/c/standardized_conv2d_99/kernel"] = arrays[
        "resnet/block1/unit01/c/standardized_conv2d/kernel"
    ]
    with pytest.raises(CheckpointError, match=r"both map to 'body\.block1\.unit01\.conv3\.weight'"):
        load_bit_npz(small_model(), broken)


def test_pickled_object_array_is_refused(tmp_path: Path):
    path = tmp_path / "evil.npz"
    np.savez(path, **{"resnet/group_norm/gamma": np.array([{"x": 1}], dtype=object)})  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match=r"not a readable BiT \.npz"):
        load_bit_npz(small_model(), path)


def test_not_a_zip_is_refused(tmp_path: Path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"definitely not a zip")
    with pytest.raises(CheckpointError, match=r"not a readable BiT \.npz"):
        load_bit_npz(small_model(), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_bit_npz(small_model(), tmp_path / "absent.npz")


def test_npy_file_is_refused(tmp_path: Path):
    # np.load returns a bare array for an .npy: that must be a CheckpointError, not a TypeError.
    path = tmp_path / "array.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros(3, dtype=np.float32))
    with pytest.raises(CheckpointError, match=r"not a readable BiT \.npz checkpoint: not a zip"):
        load_bit_npz(small_model(), path)


def test_folded_model_is_refused(arrays):
    model: Any = fold_weight_standardization(small_model())
    with pytest.raises(CheckpointError, match="StdConv2d"):
        load_bit_npz(model, arrays)


def test_save_load_round_trip_is_exact(tmp_path: Path):
    source = small_model()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    path = save_bit_npz(source, tmp_path / "export.npz")
    with np.load(path, allow_pickle=False) as npz:
        assert all(k.startswith("resnet/") for k in npz.files)
        assert npz["resnet/head/conv2d/kernel"].shape == (1, 1, 512, CLASSES)
    target = small_model()
    load_bit_npz(target, path)
    for (name, a), (_, b) in zip(
        source.state_dict().items(), target.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_export_matches_hand_written_names(arrays):
    model = small_model()
    load_bit_npz(model, arrays)
    exported = state_dict_to_npz(model.state_dict())
    canonical = {
        re.sub(r"standardized_conv2d_\d+", "standardized_conv2d", k): v for k, v in arrays.items()
    }
    assert sorted(exported) == sorted(canonical)
    for key, value in canonical.items():
        assert np.array_equal(exported[key], value), key


def test_key_mapping_is_a_bijection():
    keys = list(small_model().state_dict())
    assert [state_key(npz_key(k)) for k in keys] == keys
    assert npz_key("body.block2.unit01.gn1.weight") == "resnet/block2/unit01/a/group_norm/gamma"
    assert npz_key("body.block4.unit01.downsample.weight") == (
        "resnet/block4/unit01/a/proj/standardized_conv2d/kernel"
    )
    assert state_key("resnet/block1/unit03/b/standardized_conv2d_7/kernel") == (
        "body.block1.unit03.conv2.weight"
    )
    with pytest.raises(CheckpointError):
        npz_key("body.block1.unit01.bn1.running_mean")


def test_npz_to_state_dict_checks_ranks():
    with pytest.raises(CheckpointError, match="4-D HWIO"):
        npz_to_state_dict(
            {"resnet/root_block/standardized_conv2d/kernel": np.ones((3, 3), np.float32)}
        )
    with pytest.raises(CheckpointError, match="1-D"):
        npz_to_state_dict({"resnet/group_norm/gamma": np.ones((3, 3), np.float32)})
