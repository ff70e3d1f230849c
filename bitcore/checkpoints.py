"""Official BiT checkpoints (.npz, TensorFlow naming) <-> bitcore's ResNetV2.

The published files (google-research/big_transfer, storage.googleapis.com/bit_models) store
every tensor under a TF-style name with the prefix `resnet/`; conv kernels are HWIO and hold
the *unstandardised* weights (Weight Standardization runs in the forward pass). bitcore's module
names mirror the file's (root / block{b} / unit{NN} / head), so the mapping is a rename plus a
transpose. Loading is strict: every body tensor must be present with the right shape, and any
stray tensor is an error, because a silent partial load yields a model that runs and is wrong.

Naming (docs/bit.md, "Official checkpoint format"; reference: bit_pytorch/models.py `load_from`):
    root.conv.weight                   resnet/root_block/standardized_conv2d/kernel
    body.blockB.unitNN.gn1.{weight,bias}   resnet/blockB/unitNN/a/group_norm/{gamma,beta}
    body.blockB.unitNN.conv1.weight    resnet/blockB/unitNN/a/standardized_conv2d/kernel
    (gn2, conv2 -> b; gn3, conv3 -> c)
    body.blockB.unitNN.downsample.weight   resnet/blockB/unitNN/a/proj/standardized_conv2d/kernel
    head.gn.{weight,bias}              resnet/group_norm/{gamma,beta}
    head.conv.{weight,bias}            resnet/head/conv2d/{kernel,bias}
`gn1` is the pre-activation norm of the unit *input* (over cin), stored under `a`.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from bitcore.atomic import atomic_write
from bitcore.layers import StdConv2d
from bitcore.models import ResNetV2

PREFIX = "resnet/"
HEAD_KEYS = ("head.conv.weight", "head.conv.bias")
# HWIO (TensorFlow) -> OIHW (PyTorch), and back.
HWIO_TO_OIHW = (3, 2, 0, 1)
OIHW_TO_HWIO = (2, 3, 1, 0)

NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first bytes (the second: empty zip)

_LETTER = {"1": "a", "2": "b", "3": "c"}
_NUMBER = {v: k for k, v in _LETTER.items()}
_GN_PARAM = {"weight": "gamma", "bias": "beta"}
_TORCH_PARAM = {v: k for k, v in _GN_PARAM.items()}
# Some published files name convs `standardized_conv2d_1`, `_2`, ... (TF's uniquifying suffix).
_CONV_SUFFIX = re.compile(r"/standardized_conv2d_\d+/")

_SD_UNIT = re.compile(
    r"body\.block(\d+)\.unit(\d+)\.(?:(conv|gn)([123])|(downsample))\.(weight|bias)"
)
_NPZ_UNIT = re.compile(
    r"resnet/block(\d+)/unit(\d+)/([abc])/(?:(proj)/)?(standardized_conv2d/kernel|group_norm/(gamma|beta))"
)


class CheckpointError(ValueError):
    """The checkpoint does not match the model (or is not a BiT checkpoint); says which keys."""


def normalize_npz_key(key: str) -> str:
    """Drop TF's `_N` uniquifying suffix: `.../standardized_conv2d_3/kernel` -> `.../standardized_conv2d/kernel`."""
    return _CONV_SUFFIX.sub("/standardized_conv2d/", key)


def npz_key(state_key: str) -> str:
    """The official .npz name of a ResNetV2 state-dict key (CheckpointError if it has none)."""
    if state_key == "root.conv.weight":
        return f"{PREFIX}root_block/standardized_conv2d/kernel"
    if state_key in ("head.gn.weight", "head.gn.bias"):
        return f"{PREFIX}group_norm/{_GN_PARAM[state_key.rsplit('.', 1)[1]]}"
    if state_key == "head.conv.weight":
        return f"{PREFIX}head/conv2d/kernel"
    if state_key == "head.conv.bias":
        return f"{PREFIX}head/conv2d/bias"
    match = _SD_UNIT.fullmatch(state_key)
    if match is not None:
        block, unit, kind, number, downsample, param = match.groups()
        where = f"{PREFIX}block{block}/unit{unit}"
        if downsample is not None and param == "weight":
            return f"{where}/a/proj/standardized_conv2d/kernel"
        if kind == "conv" and param == "weight":
            return f"{where}/{_LETTER[number]}/standardized_conv2d/kernel"
        if kind == "gn":
            return f"{where}/{_LETTER[number]}/group_norm/{_GN_PARAM[param]}"
    raise CheckpointError(f"state-dict key {state_key!r} has no counterpart in the BiT format")


def state_key(key: str) -> str:
    """The ResNetV2 state-dict key of an official .npz name (suffixes normalised)."""
    key = normalize_npz_key(key)
    if key == f"{PREFIX}root_block/standardized_conv2d/kernel":
        return "root.conv.weight"
    if key in (f"{PREFIX}group_norm/gamma", f"{PREFIX}group_norm/beta"):
        return f"head.gn.{_TORCH_PARAM[key.rsplit('/', 1)[1]]}"
    if key == f"{PREFIX}head/conv2d/kernel":
        return "head.conv.weight"
    if key == f"{PREFIX}head/conv2d/bias":
        return "head.conv.bias"
    match = _NPZ_UNIT.fullmatch(key)
    if match is not None:
        block, unit, letter, proj, _, gn_param = match.groups()
        where = f"body.block{block}.unit{unit}"
        if proj is not None:
            if letter == "a" and gn_param is None:
                return f"{where}.downsample.weight"
        elif gn_param is None:
            return f"{where}.conv{_NUMBER[letter]}.weight"
        else:
            return f"{where}.gn{_NUMBER[letter]}.{_TORCH_PARAM[gn_param]}"
    raise CheckpointError(f"unexpected key {key!r}: not part of the BiT ResNetV2 format")


def _is_kernel(state_key_: str) -> bool:
    return state_key_.endswith(".weight") and (
        state_key_ in ("root.conv.weight", "head.conv.weight")
        or ".conv" in state_key_
        or ".downsample." in state_key_
    )


def npz_to_state_dict(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Official arrays -> ResNetV2 state dict (HWIO kernels transposed to OIHW). Pure mapping."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key in arrays:
        name = state_key(key)
        if name in out:
            raise CheckpointError(f"keys {origin[name]!r} and {key!r} both map to {name!r}")
        array = np.asarray(arrays[key])
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(f"{key!r} has dtype {array.dtype}, expected floating point")
        if _is_kernel(name):
            if array.ndim != 4:
                raise CheckpointError(
                    f"{key!r} has shape {array.shape}, expected a 4-D HWIO kernel"
                )
            array = array.transpose(HWIO_TO_OIHW)
        elif array.ndim != 1:
            raise CheckpointError(f"{key!r} has shape {array.shape}, expected a 1-D vector")
        out[name] = torch.from_numpy(np.ascontiguousarray(array))
        origin[name] = key
    return out


def state_dict_to_npz(state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """ResNetV2 state dict -> official arrays (OIHW kernels transposed to HWIO). Pure mapping."""
    out: dict[str, np.ndarray] = {}
    for name, tensor in state_dict.items():
        array = tensor.detach().cpu().numpy()
        if _is_kernel(name):
            array = array.transpose(OIHW_TO_HWIO)
        out[npz_key(name)] = np.ascontiguousarray(array)
    return out


def is_npz(path: str | Path) -> bool:
    """Whether the file starts like a zip archive, which is what np.load reads as an .npz.

    Checked before np.load: given anything else it returns a bare array (an .npy) or refuses a
    "pickle" with advice to pass allow_pickle=True, neither of which fits a checkpoint.
    """
    with open(path, "rb") as fh:
        return fh.read(4).startswith(NPZ_MAGIC)


def _read_arrays(source: str | Path | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} not found")
    try:
        if is_npz(path):
            # allow_pickle=False: an .npz can carry pickled object arrays, i.e. arbitrary code.
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable BiT .npz checkpoint: {exc}") from exc
    raise CheckpointError(f"{path} is not a readable BiT .npz checkpoint: not a zip archive")


def _names(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


@torch.no_grad()
def load_bit_npz(
    model: ResNetV2,
    path_or_arrays: str | Path | Mapping[str, np.ndarray],
    *,
    head: Literal["keep", "zero"] = "keep",
) -> None:
    """Load an official BiT checkpoint into `model` in place, strictly.

    head="keep" copies the checkpoint's classifier when its class count matches the model's;
    when it differs (e.g. a 21843-class BiT-M file into a 10-class model), or with head="zero",
    the head is zero-initialised instead, which is BiT's transfer recipe (docs/bit.md, HyperRule;
    bit_pytorch/train.py builds its model with zero_head=True). The body must match exactly:
    a new head does not excuse a missing body tensor. On any mismatch nothing is copied.
    """
    if head not in ("keep", "zero"):
        raise ValueError(f"head must be 'keep' or 'zero', got {head!r}")
    if not isinstance(model.root.conv, StdConv2d):
        # The files hold raw kernels; a folded (or non-WS) conv would use them unstandardised.
        raise CheckpointError(
            "load official BiT weights into the training form (StdConv2d convolutions); "
            "fold Weight Standardization after loading"
        )
    state = npz_to_state_dict(_read_arrays(path_or_arrays))
    params = model.state_dict()

    zero_head = head == "zero"
    ckpt_head = state.get("head.conv.weight")
    if ckpt_head is not None and ckpt_head.shape[0] != model.num_classes:
        zero_head = True  # class count differs: a new task, so a new (zero) head
    if zero_head:
        for key in HEAD_KEYS:
            state.pop(key, None)

    expected = [k for k in params if not (zero_head and k in HEAD_KEYS)]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in params]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(params[k].shape)})"
        for k in expected
        if k in state and state[k].shape != params[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {_names([npz_key(k) for k in missing])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {_names([npz_key(k) for k in unexpected])}")
    if mismatched:
        problems.append(f"shape mismatch {len(mismatched)}: {_names(mismatched)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model; " + "; ".join(problems))

    for key in expected:
        params[key].copy_(state[key])
    if zero_head:
        model.zero_head()


def save_bit_npz(model: ResNetV2, path: str | Path) -> Path:
    """Export `model` in the official format (readable by the BiT reference loaders)."""
    if not isinstance(model.root.conv, StdConv2d):
        raise CheckpointError("export the training form (StdConv2d); folded kernels are not BiT's")
    arrays = state_dict_to_npz(model.state_dict())
    path = Path(path)
    # An open file, not the name: np.savez appends ".npz" to a name that lacks it.
    with atomic_write(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    return path
