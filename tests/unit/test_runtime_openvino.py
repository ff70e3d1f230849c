"""The openvino runtime (bitcore.runtime_openvino): parity with PyTorch eager at batch 1 and 3
on the exported graph, fp32 and the thread settings actually applied, the predictor reporting
it, the cached export, and the shared load check refusing a broken export."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from onnx import numpy_helper
from PIL import Image

from bitcore import export
from bitcore.artifacts import ArtifactMetadata, save_artifact
from bitcore.models import ResNetV2, create_model
from bitcore.predict import Predictor
from bitcore.runtime_openvino import OpenVinoForward
from bitcore.runtimes import (
    CHECK_TOLERANCE,
    OPENVINO,
    RUNTIMES,
    RuntimeMismatch,
    check_against_eager,
    graph_forward,
)

MODEL = "tiny-R10x0.25"
CLASSES = ["cat", "dog", "emu", "fox"]
CROP = 32


def _model(seed: int = 0) -> ResNetV2:
    torch.manual_seed(seed)
    model = create_model(MODEL, len(CLASSES)).eval()
    # Logits of a few units (as in test_export.py): scores that differ clearly between images.
    torch.nn.init.normal_(model.head.conv.weight, std=0.1)
    return model


def _batch(count: int, seed: int = 7) -> torch.Tensor:
    return torch.rand((count, 3, CROP, CROP), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def eager() -> Predictor:
    return Predictor.from_model(_model(), CLASSES, CROP, model_name=MODEL)


@pytest.fixture(scope="module")
def exported(eager: Predictor) -> bytes:
    return export.export_onnx_bytes(eager.model, crop=CROP, classes=CLASSES, model_name=MODEL)


def test_logits_match_eager_at_batch_1_and_3_and_settings_applied(
    eager: Predictor, exported: bytes
) -> None:
    forward = OpenVinoForward(exported, torch.device("cpu"), threads=1)
    # As compiled, not just as asked: fp32 (never bf16 by itself), one stream, our threads.
    assert forward.property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert forward.property("NUM_STREAMS") == 1
    assert forward.property("INFERENCE_NUM_THREADS") == 1 and forward.threads == 1
    assert forward.property("ENABLE_CPU_PINNING") is False
    assert str(forward.property("PERFORMANCE_HINT")) == "LATENCY"
    for count in (1, 3, 1):  # one compiled model serves each batch size, and back again
        x = _batch(count, seed=count)
        with torch.inference_mode():
            expected = eager.model(x)
        got = forward(x)
        assert got.dtype == torch.float32 and got.shape == (count, len(CLASSES))
        assert float(expected.abs().max()) > 0.1  # a real signal, not all zeros
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_predictor_reports_openvino_and_matches_eager_probabilities(eager: Predictor) -> None:
    predictor = Predictor.from_model(_model(), CLASSES, CROP, model_name=MODEL, runtime=OPENVINO)
    assert OPENVINO in RUNTIMES
    assert (predictor.runtime, eager.runtime) == ("openvino", "torch")
    assert predictor.runtime_max_diff is not None
    assert predictor.runtime_max_diff <= 1e-5  # float32 rounding only, far inside 1e-3
    x = _batch(5, seed=3)
    got, expected = predictor.predict_tensor(x), eager.predict_tensor(x)
    assert got.dtype == torch.float32 and got.shape == (5, 4)
    assert float((got - expected).abs().max()) <= 1e-5
    torch.testing.assert_close(got.sum(dim=1), torch.ones(5))
    assert [label for label, _ in predictor.predict([_image()], top_k=4)[0]] == [
        label for label, _ in eager.predict([_image()], top_k=4)[0]
    ]


def test_check_passes_exact_and_fails_past_tolerance(eager: Predictor, exported: bytes) -> None:
    forward = graph_forward(OPENVINO, exported, torch.device("cpu"))
    assert isinstance(forward, OpenVinoForward)
    assert check_against_eager(eager.model, forward, CROP, runtime=OPENVINO) <= 1e-5
    with pytest.raises(RuntimeMismatch, match="the openvino runtime disagrees"):
        check_against_eager(eager.model, forward, CROP, runtime=OPENVINO, tolerance=1e-9)


def _save(tmp_path: Path) -> Path:
    meta = ArtifactMetadata(model_name=MODEL, classes=CLASSES, crop=CROP)
    return save_artifact(tmp_path / "artifact", _model(), meta)


def test_load_uses_the_cached_export_and_refuses_a_broken_one(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    predictor = Predictor.load(directory, "cpu", runtime="openvino")
    path = directory / export.ONNX_FILE
    assert path.is_file() and predictor.runtime == "openvino"
    eager = Predictor.load(directory, "cpu")
    x = _batch(3)
    assert float((predictor.predict_tensor(x) - eager.predict_tensor(x)).abs().max()) <= 1e-5
    # The file altered behind the metadata's back (noise of 0.2x its std on the largest
    # kernel, as in test_export.py): it still claims to be the current export, OpenVINO reads
    # it, and the shared load check refuses it.
    proto = onnx.load(str(path))
    largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(largest)
    noise = np.random.default_rng(0).standard_normal(array.shape) * array.std() * 0.2
    largest.CopyFrom(numpy_helper.from_array((array + noise).astype(np.float32), largest.name))
    onnx.save(proto, str(path))
    with pytest.raises(RuntimeMismatch, match=r"openvino runtime disagrees with PyTorch") as err:
        Predictor.load(directory, "cpu", runtime="openvino")
    assert err.value.runtime == "openvino"
    assert err.value.max_diff > CHECK_TOLERANCE
    assert err.value.tolerance == CHECK_TOLERANCE
    assert Predictor.load(directory, "cpu").runtime == "torch"  # eager is unaffected


def test_openvino_is_imported_only_when_chosen() -> None:
    """The other runtimes never load openvino's native libraries (a fresh interpreter)."""
    code = (
        "import sys; from bitcore.predict import Predictor; import bitcore.runtimes; "
        "print('openvino' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_graph_forward_refuses_a_runtime_without_a_graph(exported: bytes) -> None:
    with pytest.raises(ValueError, match="'torch' does not run an exported graph"):
        graph_forward("torch", exported, torch.device("cpu"))
