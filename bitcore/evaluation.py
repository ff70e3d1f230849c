"""Score a served model on a labelled dataset: metrics, the worst examples, thumbnails.

The images go through `Predictor.preprocess` (the served path: the same decoding, pixel cap
and JPEG draft setting as a predict request) and `Predictor.predict_tensor`, so the figures
describe the model as clients get it, runtime and int8 included. Dataset classes are matched
to the model's by name: a dataset may hold a subset of the model's classes, never a class the
model does not know. Every metric is over the model's classes, in its order, and each one
equals scikit-learn's (tests/unit/test_evaluation.py checks them all against it).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from bitcore.data.index import DatasetIndex, decode_workers
from bitcore.images import ImageError, decode_image
from bitcore.predict import Predictor
from bitcore.train.metrics import classification_metrics

MAX_SKIPPED_PATHS = 20
MAX_MOST_CONFUSED = 10
THUMBNAIL_QUALITY = 85


class UnknownLabels(ValueError):
    """The dataset has classes the model does not know; `labels` lists them, sorted."""

    def __init__(self, labels: Sequence[str], known: Sequence[str]) -> None:
        self.labels = sorted(labels)
        super().__init__(
            f"the model does not know the labels: {', '.join(self.labels)} "
            f"(it knows: {', '.join(known)})"
        )


class EvaluationCancelled(Exception):
    """should_cancel() said stop; raised between batches."""


@dataclass(frozen=True)
class WorstExample:
    path: str  # relative to the dataset root (posix)
    label: str  # true label
    predicted: str  # top-1 label
    label_score: float  # the model's probability for the true label
    predicted_score: float


@dataclass(frozen=True)
class EvaluationResult:
    metrics: dict[str, Any]  # JSON-ready
    worst: list[WorstExample]


def check_labels(dataset_classes: Sequence[str], model_classes: Sequence[str]) -> None:
    """Raise UnknownLabels if any dataset class is not one of the model's classes."""
    known = set(model_classes)
    unknown = [name for name in dataset_classes if name not in known]
    if unknown:
        raise UnknownLabels(unknown, model_classes)


def evaluate_model(
    predictor: Predictor,
    index: DatasetIndex,
    *,
    batch_size: int = 32,
    top_k: Sequence[int] = (1, 3, 5),
    worst: int = 12,
    on_progress: Callable[[int, int], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> EvaluationResult:
    """Run every sample of `index` through `predictor` in batches and score the answers.

    on_progress(done, total) follows each batch (done counts skipped images too);
    should_cancel() is polled before each batch and True raises EvaluationCancelled. An image
    that no longer decodes is skipped and counted (metrics "skipped", "skipped_paths").
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in top_k):
        raise ValueError(f"top_k values must be ints >= 1, got {list(top_k)}")
    if worst < 0:
        raise ValueError(f"worst must be >= 0, got {worst}")
    check_labels(index.classes, predictor.classes)  # before any image is decoded
    model_index = {name: i for i, name in enumerate(predictor.classes)}
    to_model = [model_index[name] for name in index.classes]

    total = len(index.samples)
    paths: list[str] = []
    labels: list[int] = []
    probs: list[torch.Tensor] = []
    skipped: list[str] = []
    # preprocess is thread-safe and Pillow releases the GIL while decoding.
    with ThreadPoolExecutor(max_workers=decode_workers()) as pool:
        for start in range(0, total, batch_size):
            if should_cancel is not None and should_cancel():
                raise EvaluationCancelled(f"evaluation cancelled after {start} of {total} images")
            batch = index.samples[start : start + batch_size]
            decoded = pool.map(lambda s: _preprocess(predictor, index.path_of(s)), batch)
            tensors = []
            for sample, tensor in zip(batch, decoded, strict=True):
                if tensor is None:
                    skipped.append(sample.path)
                else:
                    paths.append(sample.path)
                    labels.append(to_model[sample.label])
                    tensors.append(tensor)
            if tensors:
                probs.append(predictor.predict_tensor(torch.stack(tensors)))
            if on_progress is not None:
                on_progress(start + len(batch), total)

    scores = torch.cat(probs) if probs else torch.empty((0, predictor.num_classes))
    metrics = score(torch.tensor(labels, dtype=torch.long), scores, predictor.classes, top_k)
    metrics["labels_evaluated"] = list(index.classes)
    metrics["skipped"] = len(skipped)
    metrics["skipped_paths"] = skipped[:MAX_SKIPPED_PATHS]
    return EvaluationResult(
        metrics, worst_examples(paths, labels, scores, predictor.classes, worst)
    )


def _preprocess(predictor: Predictor, path: Path) -> torch.Tensor | None:
    """The image as the predictor serves it, or None if it cannot be read or decoded."""
    try:
        return predictor.preprocess([path.read_bytes()])[0]
    except (ImageError, OSError):
        return None


def score(
    labels: torch.Tensor, probs: torch.Tensor, classes: Sequence[str], top_k: Sequence[int]
) -> dict[str, Any]:
    """The metrics of true `labels` (N,) against softmax `probs` (N, K) over `classes` (K).

    With no examples the ratios (accuracy, loss, macro_f1, top-k) are None.
    """
    k_classes = len(classes)
    n = int(labels.shape[0])
    # The predictor's ranking (stable: ties keep class order), so top-1 is the served answer.
    ranked = probs.sort(dim=1, descending=True, stable=True).indices
    predicted = ranked[:, 0] if n else torch.zeros(0, dtype=torch.long)
    metrics = classification_metrics(labels, predicted, classes)
    # scikit-learn's macro average: over the labels seen in the truth or the predictions only.
    seen = torch.unique(torch.cat([labels, predicted]))
    f1 = torch.tensor([row["f1"] for row in metrics["per_class"]], dtype=torch.float64)
    metrics["macro_f1"] = float(f1[seen].mean()) if n else None
    # Cross-entropy clipped as scikit-learn's log_loss does, so a zero probability stays finite.
    eps = torch.finfo(torch.float64).eps
    true_probs = probs.double()[torch.arange(n), labels].clamp(eps, 1 - eps)
    metrics["loss"] = float(-true_probs.log().mean()) if n else None
    metrics["top_k_accuracy"] = {
        str(k): float((ranked[:, :k] == labels[:, None]).any(dim=1).double().mean()) if n else None
        for k in sorted(set(top_k))
        if k <= k_classes
    }
    metrics["most_confused"] = most_confused(metrics["confusion_matrix"], classes)
    metrics["classes"] = [str(c) for c in classes]
    return metrics


def most_confused(matrix: list[list[int]], classes: Sequence[str]) -> list[dict[str, Any]]:
    """The off-diagonal cells with a count, largest first (then by label, then predicted)."""
    cells = sorted(
        (-count, str(classes[t]), str(classes[p]))
        for t, row in enumerate(matrix)
        for p, count in enumerate(row)
        if t != p and count > 0
    )
    return [
        {"label": label, "predicted": predicted, "count": -negative}
        for negative, label, predicted in cells[:MAX_MOST_CONFUSED]
    ]


def worst_examples(
    paths: Sequence[str],
    labels: Sequence[int],
    probs: torch.Tensor,
    classes: Sequence[str],
    count: int,
) -> list[WorstExample]:
    """The `count` samples with the lowest probability for their true label (ties: by path)."""
    rows = probs.tolist()
    tops = probs.argmax(dim=1).tolist()  # the first maximum, as the predictor ranks ties
    order = sorted(range(len(paths)), key=lambda i: (rows[i][labels[i]], paths[i]))
    result = []
    for i in order[:count]:
        top = tops[i]
        result.append(
            WorstExample(
                path=paths[i],
                label=str(classes[labels[i]]),
                predicted=str(classes[top]),
                label_score=rows[i][labels[i]],
                predicted_score=rows[i][top],
            )
        )
    return result


def thumbnail(path: Path, size: int = 128) -> bytes:
    """A JPEG of the image, upright (EXIF orientation applied), RGB, longest side <= size.

    Raises bitcore.images.ImageError for a file that does not decode.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    image = decode_image(path)  # EXIF-transposed, RGB
    image.thumbnail((size, size), Image.Resampling.LANCZOS)  # keeps the aspect; never enlarges
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


__all__ = [
    "EvaluationCancelled",
    "EvaluationResult",
    "UnknownLabels",
    "WorstExample",
    "check_labels",
    "evaluate_model",
    "most_confused",
    "score",
    "thumbnail",
    "worst_examples",
]
