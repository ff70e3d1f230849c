"""Int8 serving (bitcore.quantize): the guard keeps int8 only when it agrees with float32 on the
validation images, and a predictor serves exactly the graph the guard accepted.

Tiny registry model at a 32 px crop on generated class images; ONNX Runtime's real static
quantization and CPU kernels (seconds per test).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from bitcore.artifacts import ArtifactError, ArtifactMissing, load_model
from bitcore.export import export_onnx_bytes, serving_form
from bitcore.hyperrule import plan as hyperrule_plan
from bitcore.models import create_model
from bitcore.predict import Predictor
from bitcore.quantize import (
    FP32,
    INT8,
    INT8_FILE,
    MIN_AGREEMENT,
    PrecisionCheck,
    int8_guard,
    quantize_int8,
)
from bitcore.runtimes import OnnxRuntimeForward, RuntimeMismatch
from bitcore.train import finetune
from bitcore.train.serving_precision import calibration_samples
from bitcore.transforms import eval_preprocess
from tests.imagegen import class_image, make_image_folder

MODEL = "tiny-R10x0.25"
CROP = 32
CLASSES = ["a", "b", "c", "d"]


def images(count: int, seed: int) -> torch.Tensor:
    """`count` preprocessed generated images, cycling over the classes."""
    return torch.stack(
        [
            eval_preprocess(
                class_image(i % len(CLASSES), len(CLASSES), (40, 48), seed=seed + i), CROP
            )
            for i in range(count)
        ]
    )


def undecided_model() -> torch.nn.Module:
    """Near ties: every class row is the same vector plus 1e-4 of noise, so the classes'
    logits differ by far less than int8 rounding moves them."""
    torch.manual_seed(0)
    model = create_model(MODEL, len(CLASSES))
    head: torch.nn.Conv2d = model.head.conv  # type: ignore[assignment]
    with torch.no_grad():
        shared = torch.randn_like(head.weight[:1])
        head.weight.copy_(shared + 1e-4 * torch.randn_like(head.weight))
        head.bias.zero_()
    return serving_form(model)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model fine-tuned from scratch on easy generated classes with
    serving_precision="int8": the engine ran the guard (about 20-30 s on 2 cores)."""
    root = tmp_path_factory.mktemp("int8")
    folder = make_image_folder(root / "images", {c: 15 for c in CLASSES}, size=(40, 48))
    plan = hyperrule_plan(60, (40, 48), steps=20, batch_size=16, precrop=40, crop=CROP)
    finetune(
        folder,
        MODEL,
        plan,
        root / "model",
        from_scratch=True,
        validation_fraction=0.34,
        serving_precision=INT8,
        num_workers=0,
    )
    return root / "model"


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "model"))


def serving_model(artifact: Path) -> torch.nn.Module:
    model, _meta = load_model(artifact, device="cpu")
    return serving_form(model)


def guard(model: torch.nn.Module, out: Path, **kwargs: object) -> PrecisionCheck:
    exported = export_onnx_bytes(model, crop=CROP, classes=CLASSES, model_name=MODEL)
    return int8_guard(
        model,
        exported,
        [images(16, seed=1)],
        [images(24, seed=500), images(16, seed=600)],
        crop=CROP,
        out_dir=out,
        **kwargs,  # type: ignore[arg-type]
    )


def agreement_by_hand(model: torch.nn.Module, int8_file: Path) -> tuple[int, int]:
    forward = OnnxRuntimeForward(int8_file, torch.device("cpu"))
    batch = torch.cat([images(24, seed=500), images(16, seed=600)])
    with torch.inference_mode():
        same = model(batch).argmax(1) == forward(batch).argmax(1)
    return int(same.sum()), len(batch)


def test_finetune_runs_the_guard_and_keeps_int8_that_agrees(trained: Path) -> None:
    metrics = json.loads((trained / "metadata.json").read_text())["metrics"]
    check = PrecisionCheck.from_dict(metrics["precision"])
    assert (check.requested, check.served) == (INT8, INT8)
    # 15 images per class, a third held out: 5 x 4 validation images, the other 40 calibrate.
    assert (check.agreeing, check.validation_images, check.calibration_images) == (20, 20, 40)
    assert check.agreement == 1.0 and metrics["accuracy"] == 1.0
    assert check.int8_sha256 == hashlib.sha256((trained / INT8_FILE).read_bytes()).hexdigest()
    assert check.check_max_diff is not None and 0 < check.check_max_diff < 0.05
    assert check.reason == (
        "int8 agreed with float32 on 20 of 20 validation images (100.00%, at least 99.5% required)"
    )
    # The guard's figure is real: the written graph agrees on other images of the classes too.
    assert agreement_by_hand(serving_model(trained), trained / INT8_FILE) == (40, 40)


def test_fp32_is_the_default_and_writes_no_int8(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "images", {c: 3 for c in CLASSES}, size=(40, 48))
    plan = hyperrule_plan(12, (40, 48), steps=2, batch_size=4, precrop=40, crop=CROP)
    result = finetune(folder, MODEL, plan, tmp_path / "model", from_scratch=True, num_workers=0)
    assert "precision" not in result.metrics
    assert not (tmp_path / "model" / INT8_FILE).exists()
    assert Predictor.load(tmp_path / "model", runtime="onnxruntime").precision == FP32
    with pytest.raises(ValueError, match="unknown serving precision 'bf16'"):
        finetune(folder, MODEL, plan, tmp_path / "x", from_scratch=True, serving_precision="bf16")


def test_a_model_whose_agreement_is_too_low_stays_fp32(tmp_path: Path) -> None:
    model = undecided_model()
    (tmp_path / INT8_FILE).write_bytes(b"an earlier attempt's graph")
    check = guard(model, tmp_path)
    assert check.served == FP32
    assert check.agreement is not None and check.agreement < MIN_AGREEMENT
    assert check.validation_images == 40
    assert check.int8_sha256 is None
    assert not (tmp_path / INT8_FILE).exists()  # nothing int8 is left to be served
    assert f"under the required {MIN_AGREEMENT:.1%}" in check.reason
    # The figure is real: the same quantization measured by hand agrees exactly as reported.
    exported = export_onnx_bytes(model, crop=CROP, classes=CLASSES, model_name=MODEL)
    (tmp_path / "measured.onnx").write_bytes(quantize_int8(exported, [images(16, seed=1)]))
    assert (check.agreeing, 40) == agreement_by_hand(model, tmp_path / "measured.onnx")


def test_no_validation_images_means_fp32(tmp_path: Path) -> None:
    model = undecided_model()
    exported = export_onnx_bytes(model, crop=CROP, classes=CLASSES, model_name=MODEL)
    check = int8_guard(model, exported, [images(8, seed=1)], [], crop=CROP, out_dir=tmp_path)
    assert (check.served, check.agreement, check.validation_images) == (FP32, None, 0)
    assert check.reason == "no validation images to measure int8 agreement on"
    assert not (tmp_path / INT8_FILE).exists()


def test_calibration_samples_are_evenly_spaced_and_capped() -> None:
    assert calibration_samples(list(range(10)), count=64) == list(range(10))
    assert calibration_samples(list(range(100)), count=4) == [0, 25, 50, 75]


def record(artifact: Path, check: PrecisionCheck) -> None:
    """Replace the guard's record in the artifact's metadata.json."""
    path = artifact / "metadata.json"
    meta = json.loads(path.read_text())
    meta["metrics"]["precision"] = check.to_dict()
    path.write_text(json.dumps(meta))


def test_predictor_serves_the_accepted_int8_graph(trained: Path, tmp_path: Path) -> None:
    artifact = copy_of(trained, tmp_path)
    check = PrecisionCheck.from_dict(
        json.loads((artifact / "metadata.json").read_text())["metrics"]["precision"]
    )
    served = Predictor.load(artifact, runtime="onnxruntime")
    assert (served.runtime, served.precision) == ("onnxruntime", INT8)
    assert served.runtime_max_diff is not None
    assert abs(served.runtime_max_diff - (check.check_max_diff or 0)) < 1e-5
    fp32 = Predictor.load(artifact, runtime="onnxruntime", int8=False)
    eager = Predictor.load(artifact, runtime="torch")
    assert (fp32.precision, eager.precision) == (FP32, FP32)
    batch = images(24, seed=500)
    int8_probs, fp32_probs = served.predict_tensor(batch), fp32.predict_tensor(batch)
    assert torch.equal(int8_probs.argmax(1), fp32_probs.argmax(1))
    assert torch.equal(fp32_probs.argmax(1), torch.arange(24) % len(CLASSES))
    # int8 rounding moves the scores a little, never the answers
    assert 0 < float((int8_probs - fp32_probs).abs().max()) < 0.05


def test_a_replaced_int8_file_is_refused(trained: Path, tmp_path: Path) -> None:
    artifact = copy_of(trained, tmp_path)
    (artifact / INT8_FILE).write_bytes((artifact / INT8_FILE).read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="not the graph the int8 guard accepted"):
        Predictor.load(artifact, runtime="onnxruntime")
    (artifact / INT8_FILE).unlink()
    with pytest.raises(ArtifactMissing, match=r"model\.int8\.onnx is missing"):
        Predictor.load(artifact, runtime="onnxruntime")


def test_an_int8_graph_that_answers_differently_is_refused(trained: Path, tmp_path: Path) -> None:
    """A graph quantized from other weights, with a metadata record forged to match its
    hash: the load check against eager float32 refuses it."""
    artifact = copy_of(trained, tmp_path)
    check = PrecisionCheck.from_dict(
        json.loads((artifact / "metadata.json").read_text())["metrics"]["precision"]
    )
    other = serving_form(create_model(MODEL, len(CLASSES)))
    wrong = quantize_int8(
        export_onnx_bytes(other, crop=CROP, classes=CLASSES, model_name=MODEL),
        [images(16, seed=1)],
    )
    (artifact / INT8_FILE).write_bytes(wrong)
    forged = PrecisionCheck.from_dict(
        {**check.to_dict(), "int8_sha256": hashlib.sha256(wrong).hexdigest()}
    )
    record(artifact, forged)
    with pytest.raises(RuntimeMismatch, match=r"onnxruntime \(int8\)"):
        Predictor.load(artifact, runtime="onnxruntime")
    # eager serving never looks at the int8 graph
    assert Predictor.load(artifact, runtime="torch").precision == FP32
