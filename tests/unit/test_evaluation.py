"""bitcore.evaluation: every metric equals scikit-learn's on the predictor's own answers.

The reference predictions come from Predictor.predict on the same files (the served path),
one image at a time; the metrics from sklearn.metrics. A seeded random tiny model spreads its
answers over several classes (some right, most wrong), so every metric is exercised.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from bitcore.data.index import DatasetIndex, index_directory
from bitcore.evaluation import (
    EvaluationCancelled,
    EvaluationResult,
    UnknownLabels,
    WorstExample,
    check_labels,
    evaluate_model,
    thumbnail,
)
from bitcore.models import create_model
from bitcore.predict import Predictor
from tests.imagegen import corrupt_bytes, make_image_folder

MODEL = "tiny-R10x0.25"
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]  # K = 6: top-3 and top-5 mean something
K = len(CLASSES)
CROP = 32
pytestmark = [
    # Float32 softmax rows sum to 1 within ~1e-7, outside sklearn's sqrt(float64 eps) check.
    pytest.mark.filterwarnings("ignore:The y_prob values do not sum to one:UserWarning"),
    # top-K with k = K (always 1.0) is checked on purpose: it is one of the reported figures.
    pytest.mark.filterwarnings("ignore:'k' \\(6\\) greater than or equal"),
]
METRIC_KEYS = {
    "num_examples",
    "accuracy",
    "loss",
    "per_class",
    "macro_f1",
    "confusion_matrix",
    "top_k_accuracy",
    "most_confused",
    "classes",
    "labels_evaluated",
    "skipped",
    "skipped_paths",
}


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)  # this seed predicts 5 of the 6 classes on the full dataset
    model = create_model(MODEL, K).eval()
    return Predictor.from_model(model, CLASSES, CROP, model_name=MODEL)


def _dataset(root: Path, classes: list[str], per_class: int = 5) -> DatasetIndex:
    make_image_folder(root, dict.fromkeys(classes, per_class))
    return index_directory(root)


@dataclass(frozen=True)
class Reference:
    paths: list[str]
    y_true: np.ndarray[Any, Any]  # model class indices
    y_score: np.ndarray[Any, Any]  # (N, K) probabilities
    y_pred: np.ndarray[Any, Any]


def _reference(
    predictor: Predictor, index: DatasetIndex, skip: frozenset[str] = frozenset()
) -> Reference:
    """Labels, scores and predictions from Predictor.predict, one file at a time."""
    paths: list[str] = []
    y_true: list[int] = []
    y_score: list[list[float]] = []
    y_pred: list[int] = []
    for sample in index.samples:
        if sample.path in skip:
            continue
        (ranked,) = predictor.predict([index.path_of(sample).read_bytes()], top_k=K)
        scores = dict(ranked)
        paths.append(sample.path)
        y_true.append(CLASSES.index(index.classes[sample.label]))
        y_score.append([scores[name] for name in CLASSES])
        y_pred.append(CLASSES.index(ranked[0][0]))
    return Reference(paths, np.array(y_true), np.array(y_score, dtype=np.float64), np.array(y_pred))


def _assert_matches_sklearn(
    result: EvaluationResult, ref: Reference, top_k: list[int], worst: int = 12
) -> None:
    m = result.metrics
    y_true, y_pred, y_score = ref.y_true, ref.y_pred, ref.y_score
    labels = list(range(K))
    assert set(m) == METRIC_KEYS
    json.dumps(m, allow_nan=False)  # JSON-ready
    assert m["classes"] == CLASSES
    assert m["num_examples"] == len(y_true)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-9)
    assert m["confusion_matrix"] == confusion_matrix(y_true, y_pred, labels=labels).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    assert [row["label"] for row in m["per_class"]] == CLASSES
    assert [row["support"] for row in m["per_class"]] == support.tolist()
    for name, expected in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert [row[name] for row in m["per_class"]] == pytest.approx(expected.tolist(), abs=1e-9)
    macro = f1_score(y_true, y_pred, average="macro", zero_division=0)
    assert m["macro_f1"] == pytest.approx(macro, abs=1e-9)
    assert m["loss"] == pytest.approx(log_loss(y_true, y_score, labels=labels), abs=1e-6)
    assert list(m["top_k_accuracy"]) == [str(k) for k in top_k]
    for k in top_k:
        expected_k = top_k_accuracy_score(y_true, y_score, k=k, labels=labels)
        assert m["top_k_accuracy"][str(k)] == pytest.approx(expected_k, abs=1e-9)
    assert m["top_k_accuracy"]["1"] == m["accuracy"]

    # most_confused: the off-diagonal cells of sklearn's matrix, by count, label, predicted.
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    cells = sorted(
        ((int(cm[t, p]), CLASSES[t], CLASSES[p]) for t in labels for p in labels if t != p),
        key=lambda c: (-c[0], c[1], c[2]),
    )
    expected_cells = [{"label": t, "predicted": p, "count": n} for n, t, p in cells if n > 0]
    assert m["most_confused"] == expected_cells[:10]

    # worst: lowest probability for the true label, ties by path.
    rows = range(len(y_true))
    order = sorted(rows, key=lambda i: (y_score[i, y_true[i]], ref.paths[i]))
    assert [w.path for w in result.worst] == [ref.paths[i] for i in order[:worst]]
    for w, i in zip(result.worst, order, strict=False):
        assert isinstance(w, WorstExample)
        assert (w.label, w.predicted) == (CLASSES[y_true[i]], CLASSES[y_pred[i]])
        assert w.label_score == pytest.approx(y_score[i, y_true[i]], abs=1e-6)
        assert w.predicted_score == pytest.approx(y_score[i].max(), abs=1e-6)


def test_full_dataset_matches_sklearn_with_exact_progress(
    predictor: Predictor, tmp_path: Path
) -> None:
    index = _dataset(tmp_path, CLASSES)  # 30 images
    progress: list[tuple[int, int]] = []
    result = evaluate_model(
        predictor, index, batch_size=8, on_progress=lambda *a: progress.append(a)
    )
    assert progress == [(8, 30), (16, 30), (24, 30), (30, 30)]
    ref = _reference(predictor, index)
    # The random model is wrong often, right sometimes, and spreads its answers.
    assert 0 < result.metrics["accuracy"] < 0.5
    assert len(set(ref.y_pred.tolist())) >= 4
    _assert_matches_sklearn(result, ref, [1, 3, 5])
    assert result.metrics["labels_evaluated"] == CLASSES
    assert (result.metrics["skipped"], result.metrics["skipped_paths"]) == (0, [])
    assert len(result.worst) == 12


def test_subset_of_the_model_classes(predictor: Predictor, tmp_path: Path) -> None:
    subset = ["bee", "dog", "fox"]
    index = _dataset(tmp_path, subset, per_class=4)
    result = evaluate_model(predictor, index, batch_size=5, top_k=(5, 1, 3, 6, 9), worst=3)
    ref = _reference(predictor, index)
    # Some answers are classes the dataset lacks: macro F1 then averages over 3 < n < 6 labels.
    seen = set(ref.y_true.tolist()) | set(ref.y_pred.tolist())
    assert 3 < len(seen) < K
    _assert_matches_sklearn(result, ref, [1, 3, 5, 6], worst=3)  # 9 > K is left out
    assert result.metrics["labels_evaluated"] == subset
    support = {row["label"]: row["support"] for row in result.metrics["per_class"]}
    assert support == {"ant": 0, "bee": 4, "cat": 0, "dog": 4, "eel": 0, "fox": 4}
    assert len(result.worst) == 3


def test_unknown_labels_refused_before_decoding(predictor: Predictor, tmp_path: Path) -> None:
    with pytest.raises(UnknownLabels) as caught:
        check_labels(["yak", "bee", "gnu"], CLASSES)
    assert caught.value.labels == ["gnu", "yak"]
    assert str(caught.value) == (
        "the model does not know the labels: gnu, yak (it knows: ant, bee, cat, dog, eel, fox)"
    )
    assert isinstance(caught.value, ValueError)
    check_labels(["fox", "ant"], CLASSES)  # a subset is fine

    index = _dataset(tmp_path, ["bee", "owl"], per_class=2)
    calls: list[str] = []

    def should_cancel() -> bool:
        calls.append("should_cancel")
        return False

    with pytest.raises(UnknownLabels, match=r"labels: owl \(it knows"):
        evaluate_model(
            predictor,
            index,
            on_progress=lambda *a: calls.append("on_progress"),
            should_cancel=should_cancel,
        )
    assert calls == []


def test_cancel_after_the_first_batch(predictor: Predictor, tmp_path: Path) -> None:
    index = _dataset(tmp_path, CLASSES, per_class=2)  # 12 images, 3 batches of 4
    progress: list[tuple[int, int]] = []
    polls: list[int] = []

    def should_cancel() -> bool:
        polls.append(len(progress))
        return len(progress) >= 1

    with pytest.raises(EvaluationCancelled, match="after 4 of 12 images"):
        evaluate_model(
            predictor,
            index,
            batch_size=4,
            on_progress=lambda *a: progress.append(a),
            should_cancel=should_cancel,
        )
    assert progress == [(4, 12)]
    assert polls == [0, 1]


def test_undecodable_images_are_skipped_and_counted(predictor: Predictor, tmp_path: Path) -> None:
    index = _dataset(tmp_path, CLASSES, per_class=3)  # 18 images
    # Valid at ingestion, broken (or gone) since: corrupt two files, delete a third.
    broken = [index.samples[1].path, index.samples[7].path]
    gone = index.samples[12].path
    (index.root / broken[0]).write_bytes(corrupt_bytes("truncated"))
    (index.root / broken[1]).write_bytes(corrupt_bytes("text"))
    (index.root / gone).unlink()
    progress: list[tuple[int, int]] = []
    result = evaluate_model(
        predictor, index, batch_size=7, on_progress=lambda *a: progress.append(a)
    )
    assert progress == [(7, 18), (14, 18), (18, 18)]
    assert result.metrics["skipped"] == 3
    assert result.metrics["skipped_paths"] == [*broken, gone]
    assert result.metrics["num_examples"] == 15
    assert all(w.path not in {*broken, gone} for w in result.worst)
    ref = _reference(predictor, index, skip=frozenset({*broken, gone}))
    _assert_matches_sklearn(result, ref, [1, 3, 5])


def test_nothing_decodable_gives_empty_metrics(predictor: Predictor, tmp_path: Path) -> None:
    index = _dataset(tmp_path, ["ant", "bee"], per_class=2)
    for sample in index.samples:
        index.path_of(sample).write_bytes(b"")
    result = evaluate_model(predictor, index)
    m = result.metrics
    assert (m["num_examples"], m["skipped"], result.worst) == (0, 4, [])
    assert (m["accuracy"], m["loss"], m["macro_f1"]) == (None, None, None)
    assert m["top_k_accuracy"] == {"1": None, "3": None, "5": None}
    assert m["confusion_matrix"] == [[0] * K for _ in range(K)]
    assert m["most_confused"] == []
    json.dumps(m, allow_nan=False)


def test_bad_arguments(predictor: Predictor, tmp_path: Path) -> None:
    index = _dataset(tmp_path, ["ant", "bee"], per_class=2)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_model(predictor, index, batch_size=0)
    with pytest.raises(ValueError, match="top_k"):
        evaluate_model(predictor, index, top_k=(1, 0))
    with pytest.raises(ValueError, match="worst"):
        evaluate_model(predictor, index, worst=-1)


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.mode == "RGB"
    return image


def test_thumbnail_keeps_the_aspect(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGBA", (600, 300), (10, 200, 30, 255)).save(path)
    image = _open(thumbnail(path))
    assert image.size == (128, 64)
    small = tmp_path / "small.png"
    Image.new("RGB", (50, 20), (10, 200, 30)).save(small)
    assert _open(thumbnail(small)).size == (50, 20)  # never enlarged
    assert _open(thumbnail(path, size=32)).size == (32, 16)


def test_thumbnail_of_an_exif_rotated_jpeg_is_upright(tmp_path: Path) -> None:
    # Stored 200 wide x 100 high: left half red, right half blue. Orientation 6 says "turn
    # 90 degrees clockwise to view": upright it is 100 wide x 200 high, red on top.
    stored = Image.new("RGB", (200, 100), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    path = tmp_path / "rotated.jpg"
    stored.save(path, format="JPEG", exif=exif, quality=95)
    image = _open(thumbnail(path))
    assert image.size == (64, 128)
    assert image.getexif().get(0x0112, 1) == 1  # no orientation left to apply twice
    top, bottom = image.getpixel((32, 20)), image.getpixel((32, 108))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60  # red
    assert bottom[2] > 200 and bottom[0] < 60  # blue
