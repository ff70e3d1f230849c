"""ONNX export (bitcore.export) and the onnxruntime runtime (bitcore.runtimes): parity with
PyTorch eager within 1e-4, the metadata, the cached export, and the load check that refuses a
graph whose weights were altered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from bitcore import export
from bitcore.artifacts import ArtifactMetadata, load_metadata, save_artifact
from bitcore.models import ResNetV2, create_model
from bitcore.predict import Predictor
from bitcore.runtimes import (
    CHECK_TOLERANCE,
    OnnxRuntimeForward,
    RuntimeMismatch,
    check_inputs,
    validate_runtime,
)

MODEL = "tiny-R10x0.25"
CLASSES = ["cat", "dog", "emu", "fox"]
CROP = 32


def _model(seed: int = 0, name: str = MODEL, classes: int = len(CLASSES)) -> ResNetV2:
    torch.manual_seed(seed)
    model = create_model(name, classes).eval()
    # A head of a set scale: logits of a few units, so that scores clearly differ between
    # images and a wrong graph cannot hide in near-uniform scores; not ~20 (std 0.5 on a random
    # R50), where float32's own rounding in eager, against float64, is already 4e-4.
    torch.nn.init.normal_(model.head.conv.weight, std=0.1)
    return model


def _batch(count: int, crop: int = CROP, seed: int = 7) -> torch.Tensor:
    return torch.rand((count, 3, crop, crop), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def eager() -> Predictor:
    return Predictor.from_model(_model(), CLASSES, CROP, model_name=MODEL)


@pytest.fixture(scope="module")
def exported(eager: Predictor) -> bytes:
    return export.export_onnx_bytes(
        eager.model, crop=CROP, classes=CLASSES, model_name=MODEL, weights_sha256="ab" * 32
    )


def test_onnx_logits_match_eager_at_several_batch_sizes(eager: Predictor, exported: bytes) -> None:
    session = _session(exported)
    for count in (1, 3, 8):  # exported at batch 1: the batch axis must be dynamic
        x = _batch(count, seed=count)
        with torch.inference_mode():
            expected = eager.model(x)
        (got,) = session.run(None, {"input": x.numpy()})
        assert got.shape == (count, len(CLASSES))
        assert float(expected.abs().max()) > 0.1  # a real signal, not all zeros
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)


def test_graph_signature_and_preprocessing_metadata(exported: bytes) -> None:
    proto = onnx.load_from_string(exported)
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, dims) == ("input", ["batch", 3, CROP, CROP])
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.name == "logits"
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", 4]
    assert proto.opset_import[0].version == export.OPSET
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["bitserve.format"] == "bitserve-onnx"
    assert props["model_name"] == MODEL
    assert json.loads(props["classes"]) == CLASSES
    assert props["weights_sha256"] == "ab" * 32
    assert props["input.crop"] == "32"
    assert json.loads(props["input.mean"]) == [0.5, 0.5, 0.5]
    assert json.loads(props["input.std"]) == [0.5, 0.5, 0.5]
    assert props["input.resize"].startswith("bilinear, whole image squashed")
    assert props["input.layout"] == "NCHW float32 RGB, batch axis dynamic"
    # WS is folded: the graph standardises no kernel at run time (no ReduceMean on weights:
    # GroupNorm's own reductions run on activations, through InstanceNormalization).
    initializers = {i.name for i in proto.graph.initializer}
    assert not [n for n in proto.graph.node if set(n.input) & initializers and n.op_type == "Sub"]


def test_unprepared_training_form_module_is_exported_folded(eager: Predictor) -> None:
    """A module with StdConv2d layers (train mode even) exports the same graph numerically,
    and the caller's module is left untouched."""
    raw = _model()
    raw.train()
    data = export.export_onnx_bytes(raw, crop=CROP, classes=CLASSES, model_name=MODEL)
    assert raw.training  # not modified
    x = _batch(2)
    with torch.inference_mode():
        expected = eager.model(x).numpy()
    (got,) = _session(data).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_onnxruntime_predictor_matches_eager_probabilities(eager: Predictor) -> None:
    onnx_predictor = Predictor.from_model(
        _model(), CLASSES, CROP, model_name=MODEL, runtime="onnxruntime"
    )
    assert (onnx_predictor.runtime, eager.runtime) == ("onnxruntime", "torch")
    assert onnx_predictor.runtime_max_diff is not None
    assert onnx_predictor.runtime_max_diff <= CHECK_TOLERANCE
    x = _batch(5, seed=3)
    got, expected = onnx_predictor.predict_tensor(x), eager.predict_tensor(x)
    assert got.dtype == torch.float32 and got.shape == (5, 4)
    assert float((got - expected).abs().max()) <= 1e-5
    torch.testing.assert_close(got.sum(dim=1), torch.ones(5))


def test_real_architecture_parity_at_small_resolution() -> None:
    """BiT-M-R50x1's full graph (random weights: parity does not depend on their values)."""
    model = _model(name="BiT-M-R50x1", classes=10)
    predictor = Predictor.from_model(model, [str(i) for i in range(10)], 64, model_name="R50")
    data = export.export_onnx_bytes(
        predictor.model, crop=64, classes=predictor.classes, model_name="BiT-M-R50x1"
    )
    x = _batch(2, crop=64)
    with torch.inference_mode():
        expected = predictor.model(x)
    (got,) = _session(data).run(None, {"input": x.numpy()})
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-4)
    probs = torch.from_numpy(got).softmax(1)
    assert float((probs - expected.softmax(1)).abs().max()) <= CHECK_TOLERANCE


def _save(tmp_path: Path, seed: int = 0) -> Path:
    meta = ArtifactMetadata(model_name=MODEL, classes=CLASSES, crop=CROP)
    return save_artifact(tmp_path / "artifact", _model(seed), meta)


def test_load_exports_once_and_reexports_for_new_weights(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    predictor = Predictor.load(directory, "cpu", runtime="onnxruntime")
    path = directory / export.ONNX_FILE
    assert path.is_file() and predictor.runtime == "onnxruntime"
    props = export.read_metadata(path)
    assert props["weights_sha256"] == load_metadata(directory).weights_sha256
    first = path.stat().st_mtime_ns, path.stat().st_ino
    Predictor.load(directory, "cpu", runtime="onnxruntime")
    assert (path.stat().st_mtime_ns, path.stat().st_ino) == first  # the cached export
    # Re-published with other weights: the stale export is replaced, not served.
    _save(tmp_path, seed=1)
    reloaded = Predictor.load(directory, "cpu", runtime="onnxruntime")
    assert path.stat().st_ino != first[1]
    eager = Predictor.load(directory, "cpu")
    x = _batch(2)
    assert float((reloaded.predict_tensor(x) - eager.predict_tensor(x)).abs().max()) <= 1e-5


def _alter_weights(path: Path, relative: float) -> None:
    """Noise of `relative` x its own std added to the largest initializer (a conv kernel), the
    metadata kept: the file still claims to be the current export of these weights. (Noise,
    not a scale: a kernel followed by GroupNorm is blind to a scale.)"""
    proto = onnx.load(str(path))
    largest = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(largest)
    noise = np.random.default_rng(0).standard_normal(array.shape) * array.std() * relative
    largest.CopyFrom(numpy_helper.from_array((array + noise).astype(np.float32), largest.name))
    onnx.save(proto, str(path))


def test_broken_export_is_refused_at_load(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    path = export.ensure_onnx(directory)
    _alter_weights(path, 0.2)
    with pytest.raises(RuntimeMismatch, match=r"onnxruntime runtime disagrees with PyTorch") as err:
        Predictor.load(directory, "cpu", runtime="onnxruntime")
    assert err.value.max_diff > CHECK_TOLERANCE
    assert err.value.tolerance == CHECK_TOLERANCE
    # Eager is unaffected: the safetensors weights are the truth.
    assert Predictor.load(directory, "cpu").runtime == "torch"


def test_check_passes_exact_and_fails_past_tolerance(eager: Predictor, exported: bytes) -> None:
    forward = OnnxRuntimeForward(exported, torch.device("cpu"), threads=1)
    assert forward.providers == ["CPUExecutionProvider"] and forward.threads == 1
    from bitcore.runtimes import check_against_eager

    assert check_against_eager(eager.model, forward, CROP) <= 1e-5
    with pytest.raises(RuntimeMismatch):
        check_against_eager(eager.model, forward, CROP, tolerance=1e-9)


def test_check_inputs_are_fixed() -> None:
    a, b = check_inputs(CROP), check_inputs(CROP)
    assert a.shape == (2, 3, CROP, CROP) and torch.equal(a, b)
    assert float(a.min()) >= -1 and float(a.max()) <= 1


def test_bad_runtime_name_and_too_large_model(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown predict runtime 'tensorrt'"):
        validate_runtime("tensorrt")
    with pytest.raises(ValueError, match="unknown predict runtime"):
        Predictor.from_model(_model(), CLASSES, CROP, runtime="tensorrt")
    monkeypatch.setattr(export, "MAX_WEIGHT_BYTES", 1000)
    with pytest.raises(export.ExportError, match="an ONNX file holds at most 2 GiB"):
        export.export_onnx_bytes(_model(), crop=CROP, classes=CLASSES, model_name=MODEL)


def test_unreadable_cached_file_is_exported_again(tmp_path: Path) -> None:
    directory = _save(tmp_path)
    (directory / export.ONNX_FILE).write_bytes(b"not an onnx file")
    with pytest.raises(export.ExportError, match="not a readable ONNX file"):
        export.read_metadata(directory / export.ONNX_FILE)
    path = export.ensure_onnx(directory)
    assert export.read_metadata(path)["model_name"] == MODEL
