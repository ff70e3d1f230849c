"""Predictor: WS folded once gives the training-form answers, top-k contract, bytes, threads."""

from __future__ import annotations

import copy
import io
import math
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bitcore.artifacts import ArtifactError, ArtifactMetadata, save_artifact
from bitcore.images import ImageError, decode_image
from bitcore.layers import StdConv2d, fold_weight_standardization
from bitcore.models import ResNetV2, create_model
from bitcore.predict import InputImageError, Predictor, top_k_labels
from bitcore.transforms import eval_preprocess

MODEL = "tiny-R10x0.25"
CLASSES = ["cat", "dog", "emu", "fox"]
CROP = 32


def _model(seed: int = 0) -> ResNetV2:
    torch.manual_seed(seed)
    return create_model(MODEL, len(CLASSES)).eval()


def _image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> ResNetV2:
    return _model()


@pytest.fixture(scope="module")
def predictor(model: ResNetV2) -> Predictor:
    return Predictor.from_model(model, CLASSES, CROP, device="cpu", model_name=MODEL)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_image(seed) for seed in range(6)]


def test_folded_model_gives_training_form_logits(model: ResNetV2) -> None:
    x = torch.randn(3, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(x)
        folded = fold_weight_standardization(copy.deepcopy(model))
        assert not any(isinstance(m, StdConv2d) for m in folded.modules())
        logits = folded(x)
    # Random weights give clearly non-zero, input-dependent logits, so agreement means something.
    assert reference.abs().max() > 0.1
    assert (reference[0] - reference[1]).abs().max() > 1e-3
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)


def test_predictor_probabilities_match_training_form(
    model: ResNetV2, predictor: Predictor, images: list[Image.Image]
) -> None:
    batch = predictor.preprocess(images)
    assert batch.shape == (len(images), 3, CROP, CROP)
    assert torch.equal(batch[2], eval_preprocess(images[2], CROP))
    with torch.inference_mode():
        expected = model(batch).softmax(dim=1)
    probs = predictor.predict_tensor(batch)
    assert probs.dtype == torch.float32 and probs.shape == (len(images), len(CLASSES))
    assert torch.allclose(probs, expected, atol=1e-6, rtol=0)


def test_from_model_copies_and_folds(model: ResNetV2, predictor: Predictor) -> None:
    assert sum(isinstance(m, StdConv2d) for m in model.modules()) > 0  # caller's model untouched
    assert not any(isinstance(m, StdConv2d) for m in predictor.model.modules())
    assert not predictor.model.training
    assert all(not p.requires_grad for p in predictor.model.parameters())
    assert predictor.classes == CLASSES
    assert predictor.crop == CROP
    assert predictor.device == torch.device("cpu")
    assert predictor.model_name == MODEL
    unfolded = Predictor.from_model(model, CLASSES, CROP, fold_ws=False)
    assert sum(isinstance(m, StdConv2d) for m in unfolded.model.modules()) > 0


def test_predict_output_contract(predictor: Predictor, images: list[Image.Image]) -> None:
    results = predictor.predict(images, top_k=len(CLASSES))
    assert len(results) == len(images)
    for row in results:
        labels = [label for label, _ in row]
        scores = [score for _, score in row]
        assert sorted(labels) == sorted(CLASSES)
        assert scores == sorted(scores, reverse=True)
        assert math.fsum(scores) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 < s < 1.0 for s in scores)
    # The same probabilities as predict_tensor, labelled by their class index.
    probs = predictor.predict_tensor(predictor.preprocess(images))
    for row, expected in zip(results, probs.tolist(), strict=True):
        for label, score in row:
            assert score == pytest.approx(expected[CLASSES.index(label)], abs=1e-7)


def test_top_k_is_clamped_and_validated(predictor: Predictor, images: list[Image.Image]) -> None:
    full = predictor.predict(images[:2], top_k=len(CLASSES))
    assert predictor.predict(images[:2], top_k=100) == full
    two = predictor.predict(images[:2], top_k=2)
    assert [row[:2] for row in full] == two
    assert [len(row) for row in predictor.predict(images[:2], top_k=1)] == [1, 1]
    for bad in (0, -3):
        with pytest.raises(ValueError, match="top_k must be >= 1"):
            predictor.predict(images[:1], top_k=bad)
    with pytest.raises(TypeError, match="top_k"):
        predictor.predict(images[:1], top_k=True)


def test_top_k_labels_clamps_and_keeps_class_order_on_ties() -> None:
    # Powers of two: exact in float32, so the scores compare exactly.
    probs = torch.tensor([[0.25, 0.5, 0.25], [0.125, 0.25, 0.625]])
    classes = ["ant", "bee", "cat"]
    assert top_k_labels(probs, classes, 10) == [
        [("bee", 0.5), ("ant", 0.25), ("cat", 0.25)],
        [("cat", 0.625), ("bee", 0.25), ("ant", 0.125)],
    ]
    assert top_k_labels(probs, classes, 1) == [[("bee", 0.5)], [("cat", 0.625)]]
    assert top_k_labels(probs, classes, 0) == [[("bee", 0.5)], [("cat", 0.625)]]


def test_hand_set_head_gives_the_known_answer(images: list[Image.Image]) -> None:
    model = _model(seed=3)
    head = model.head.conv
    assert isinstance(head, torch.nn.Conv2d) and head.bias is not None
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0, 5.0, 0.0]))
    predictor = Predictor.from_model(model, CLASSES, CROP)
    total = 2 * math.exp(0.0) + math.exp(1.0) + math.exp(5.0)
    expected = [
        ("emu", math.exp(5.0) / total),
        ("dog", math.exp(1.0) / total),
        ("cat", 1.0 / total),  # a tie with fox: class order decides
        ("fox", 1.0 / total),
    ]
    for row in predictor.predict(images[:3], top_k=4):
        assert [label for label, _ in row] == [label for label, _ in expected]
        for (_, score), (_, want) in zip(row, expected, strict=True):
            assert score == pytest.approx(want, abs=1e-6)


def test_bytes_input_matches_pil_input(predictor: Predictor, images: list[Image.Image]) -> None:
    png = [_encode(image) for image in images[:3]]
    assert predictor.predict(png, top_k=4) == predictor.predict(images[:3], top_k=4)
    mixed: list[Image.Image | bytes | bytearray] = [bytearray(png[0]), images[1]]
    assert predictor.predict(mixed, top_k=4) == predictor.predict(images[:2], top_k=4)
    jpeg = predictor.predict([_encode(images[0], "JPEG")], top_k=4)
    assert len(jpeg[0]) == 4


def test_bad_bytes_raise_image_error_naming_the_image(
    predictor: Predictor, images: list[Image.Image]
) -> None:
    good = _encode(images[0])
    with pytest.raises(ImageError) as info:
        predictor.predict([good, b"hello, not an image"])
    assert isinstance(info.value, InputImageError)
    assert info.value.reason == "unsupported_format"
    assert info.value.index == 1
    assert "image 1" in str(info.value)
    with pytest.raises(ImageError) as info:
        predictor.predict([good[: len(good) // 2]])
    assert info.value.reason == "undecodable"
    with pytest.raises(TypeError, match="image 0"):
        predictor.predict(["not bytes"])  # type: ignore[list-item]


def test_max_pixels_is_applied_to_bytes(model: ResNetV2, images: list[Image.Image]) -> None:
    small = Predictor.from_model(model, CLASSES, CROP, max_pixels=40 * 48 - 1)
    with pytest.raises(ImageError) as info:
        small.predict([_encode(images[0])])
    assert info.value.reason == "too_many_pixels"


def test_concurrent_callers_get_sequential_results(
    predictor: Predictor, images: list[Image.Image]
) -> None:
    sequential = [predictor.predict([image], top_k=4) for image in images]
    results: dict[tuple[int, int], list[list[tuple[str, float]]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(images))

    def worker(index: int) -> None:
        try:
            start.wait()
            for repeat in range(3):
                results[(index, repeat)] = predictor.predict([images[index]], top_k=4)
        except BaseException as exc:  # reported below; a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(results) == 3 * len(images)
    for (index, _), result in results.items():
        assert result == sequential[index]


def test_chunked_batches_match_one_batch(model: ResNetV2, images: list[Image.Image]) -> None:
    whole = Predictor.from_model(model, CLASSES, CROP)
    chunked = Predictor.from_model(model, CLASSES, CROP, max_batch_size=4)
    batch = whole.preprocess(images)
    # GroupNorm statistics are per image, so chunking cannot change an image's answer.
    assert torch.allclose(chunked.predict_tensor(batch), whole.predict_tensor(batch), atol=1e-6)
    alone = torch.cat([whole.predict_tensor(batch[i : i + 1]) for i in range(len(images))])
    assert torch.allclose(alone, whole.predict_tensor(batch), atol=1e-6)


def test_edge_cases_and_bad_arguments(model: ResNetV2, predictor: Predictor) -> None:
    assert predictor.predict([]) == []
    assert predictor.predict_tensor(torch.zeros(0, 3, CROP, CROP)).shape == (0, len(CLASSES))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        predictor.predict_tensor(torch.zeros(3, CROP, CROP))
    with pytest.raises(ValueError, match="4 outputs but 3 classes"):
        Predictor.from_model(model, CLASSES[:3], CROP)
    with pytest.raises(ValueError, match="max_batch_size"):
        Predictor.from_model(model, CLASSES, CROP, max_batch_size=0)
    seconds = predictor.warmup()
    assert 0.0 < seconds < 30.0


def test_saved_artifact_predicts_like_the_in_memory_model(
    tmp_path: Path, model: ResNetV2, predictor: Predictor, images: list[Image.Image]
) -> None:
    meta = ArtifactMetadata(model_name=MODEL, classes=CLASSES, crop=CROP)
    save_artifact(tmp_path / "artifact", model, meta)
    loaded = Predictor.load(tmp_path / "artifact", "cpu")
    assert loaded.classes == CLASSES
    assert loaded.crop == CROP
    assert loaded.model_name == MODEL
    assert loaded.device == torch.device("cpu")
    batch = predictor.preprocess(images)
    # Same weights bit for bit (safetensors), same folding: identical probabilities.
    assert torch.equal(loaded.predict_tensor(batch), predictor.predict_tensor(batch))
    assert loaded.predict(images, top_k=3) == predictor.predict(images, top_k=3)
    training_form = Predictor.load(tmp_path / "artifact", torch.device("cpu"), fold_ws=False)
    assert torch.allclose(
        training_form.predict_tensor(batch), predictor.predict_tensor(batch), atol=1e-6, rtol=0
    )


def test_load_refuses_a_directory_that_is_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"metadata\.json not found"):
        Predictor.load(tmp_path, "cpu")


def test_jpeg_draft_is_off_by_default_and_decodes_at_2x_crop_when_on(model: ResNetV2) -> None:
    yy, xx = np.mgrid[0:300, 0:400]
    pixels = np.stack([xx * 255 // 400, yy * 255 // 300, (xx * yy) % 256], axis=-1)
    data = _encode(Image.fromarray(pixels.astype(np.uint8)), "JPEG")
    full = eval_preprocess(decode_image(data), CROP)
    # 400x300 with both sides >= 64: 1/4 scale (100x75) then the same resize.
    reduced = decode_image(data, jpeg_min_size=2 * CROP)
    assert reduced.size == (100, 75)
    plain = Predictor.from_model(model, CLASSES, CROP)
    assert plain.jpeg_draft is False
    torch.testing.assert_close(plain.preprocess([data])[0], full, rtol=0, atol=0)
    draft = Predictor.from_model(model, CLASSES, CROP, jpeg_draft=True)
    got = draft.preprocess([data])[0]
    torch.testing.assert_close(got, eval_preprocess(reduced, CROP), rtol=0, atol=0)
    assert not torch.equal(got, full)  # the pixels do move a little: hence off by default
    assert float((got - full).abs().mean()) * 127.5 < 2.0  # under 2 of 255 on average
