"""Device selection: explicit choice, $BITSERVE_DEVICE, auto order, clear errors."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

from bitcore.devices import (
    ENV_VAR,
    select_device,
    step_marker,
    to_device,
    uploads_pinned,
    uses_bf16_autocast,
)

HAS_XLA = importlib.util.find_spec("torch_xla") is not None


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_explicit_cpu() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(str(torch.device("cpu"))) == torch.device("cpu")


def test_environment_variable_is_used_and_the_argument_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert select_device() == torch.device("cpu")
    monkeypatch.setenv(ENV_VAR, "not-a-device")
    assert select_device("cpu") == torch.device("cpu")  # the bad env value is never parsed
    with pytest.raises(
        RuntimeError, match=r"unknown device 'not-a-device' \(from \$BITSERVE_DEVICE"
    ):
        select_device()
    monkeypatch.setenv(ENV_VAR, "auto")
    assert select_device() == select_device("auto")


def test_unknown_device_string_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match=r"unknown device 'gpu' \(from argument\)") as info:
        select_device("gpu")
    assert "cpu, cuda[:N], mps or xla[:N]" in str(info.value)
    with pytest.raises(RuntimeError, match="unknown device 'cuda:x'"):
        select_device("cuda:x")


def test_auto_prefers_cuda_then_mps_then_xla_then_cpu() -> None:
    if torch.cuda.is_available():
        expected = "cuda"
    elif torch.backends.mps.is_available():
        expected = "mps"
    elif HAS_XLA:
        expected = "xla"
    else:
        expected = "cpu"
    assert select_device().type == expected
    assert select_device("auto").type == expected


def test_cuda_requested() -> None:
    if torch.cuda.is_available():
        assert select_device("cuda:0") == torch.device("cuda:0")
    else:
        with pytest.raises(RuntimeError, match=r"'cuda:0' requested but CUDA is not available"):
            select_device("cuda:0")


def test_mps_requested() -> None:
    if torch.backends.mps.is_available():
        assert select_device("mps").type == "mps"
    else:
        with pytest.raises(RuntimeError, match="'mps' requested but Apple MPS is not available"):
            select_device("mps")


def test_xla_requested() -> None:
    if HAS_XLA:
        assert select_device("xla").type == "xla"
        assert select_device("xla:0").type == "xla"
        return
    # No TPU here: the missing-package case, which names what to install for this torch.
    torch_version = torch.__version__.split("+")[0]
    for choice in ("xla", "xla:0", "xla:3"):
        with pytest.raises(RuntimeError) as info:
            select_device(choice)
        message = str(info.value)
        assert message.startswith(f"device {choice!r} requested but torch_xla is not installed")
        assert f"pip install 'torch_xla[tpu]=={torch_version}'" in message
        assert isinstance(info.value.__cause__, ImportError)


def test_xla_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "xla:1")
    if HAS_XLA:
        assert select_device().type == "xla"
    else:
        with pytest.raises(RuntimeError, match=r"'xla:1' requested but torch_xla is not installed"):
            select_device()


def test_malformed_xla_is_an_unknown_device() -> None:
    for choice in ("xla:", "xla:x", "xla:-1", "xla1"):
        with pytest.raises(RuntimeError, match=rf"unknown device '{choice}'") as info:
            select_device(choice)
        assert "xla[:N]" in str(info.value)


def test_bf16_autocast_only_on_capable_cuda() -> None:
    assert uses_bf16_autocast(torch.device("cpu")) is False
    assert uses_bf16_autocast(torch.device("meta")) is False
    assert uses_bf16_autocast(torch.device("xla")) is True  # TPUs compute in bf16
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert uses_bf16_autocast(torch.device("cuda")) is cuda_bf16


def test_only_an_xla_device_gets_a_step_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch_xla is not installed here: stand-in modules show which function is chosen, and
    # that nothing is imported for the other devices (the stand-ins are absent then).
    assert step_marker(torch.device("cpu")) is None
    assert step_marker(torch.device("cuda", 0)) is None
    assert step_marker(torch.device("mps")) is None
    calls: list[str] = []
    xla_model = types.ModuleType("torch_xla.core.xla_model")
    xla_model.mark_step = lambda: calls.append("mark_step")  # type: ignore[attr-defined]
    for name, module in {
        "torch_xla": types.ModuleType("torch_xla"),
        "torch_xla.core": types.ModuleType("torch_xla.core"),
        "torch_xla.core.xla_model": xla_model,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    sys.modules["torch_xla"].core = sys.modules["torch_xla.core"]  # type: ignore[attr-defined]
    sys.modules["torch_xla.core"].xla_model = xla_model  # type: ignore[attr-defined]
    marker = step_marker(torch.device("xla"))
    assert marker is xla_model.mark_step  # type: ignore[attr-defined]
    marker()
    assert calls == ["mark_step"]
    assert step_marker(torch.device("cpu")) is None  # even with torch_xla importable


@pytest.mark.skipif(HAS_XLA, reason="torch_xla is installed")
def test_step_marker_needs_torch_xla_only_for_xla() -> None:
    with pytest.raises(ImportError):
        step_marker(torch.device("xla"))


def test_to_device_on_the_cpu_is_the_same_tensor_without_a_copy() -> None:
    batch = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    moved = to_device(batch, torch.device("cpu"))
    assert moved is batch
    assert moved.data_ptr() == batch.data_ptr()
    labels = torch.tensor([1, 0])
    assert to_device(labels, torch.device("cpu")) is labels


def test_uploads_are_pinned_only_for_cuda() -> None:
    assert uploads_pinned(torch.device("cuda")) is True
    assert uploads_pinned(torch.device("cuda", 1)) is True
    for name in ("cpu", "mps", "meta"):
        assert uploads_pinned(torch.device(name)) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_on_cuda_copies_through_pinned_memory() -> None:
    batch = torch.rand(4, 3, 8, 8)
    moved = to_device(batch, torch.device("cuda"))
    assert moved.device.type == "cuda"
    assert not batch.is_pinned()  # the caller's tensor is left as it was
    torch.testing.assert_close(moved.cpu(), batch, rtol=0, atol=0)
    pinned = batch.pin_memory()
    torch.testing.assert_close(to_device(pinned, torch.device("cuda")).cpu(), batch, rtol=0, atol=0)
