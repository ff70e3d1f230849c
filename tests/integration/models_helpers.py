"""Models for the /v1/models tests (test_models_api.py, test_models_predict.py).

Models are real bitcore artifacts of the tiny architecture, published through
service.job_runs.finish_succeeded as a finished job is (tests.model_fixtures): one with random
weights (every image gets its own answer, so order matters) and one whose head is set so its
scores are KNOWN exactly. Also test images and their multipart parts.
"""

from __future__ import annotations

from datetime import datetime

import pytest
import torch

from bitcore.models import create_model
from tests.imagegen import class_image, encode
from tests.integration.conftest import LiveServer
from tests.model_fixtures import publish_model

CLASSES = ["ant", "bee", "cat"]
KNOWN = [0.7, 0.2, 0.1]  # the scores of the "known head" model, for every image
METRICS = {
    "accuracy": 0.75,
    "per_class": [
        {"label": "ant", "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2},
        {"label": "bee", "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1},
        {"label": "cat", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1},
    ],
    "confusion_matrix": [[1, 1, 0], [0, 1, 0], [0, 0, 1]],
}


def _add_model(
    server: LiveServer,
    *,
    seed: int = 0,
    known_head: bool = False,
    created_at: datetime | None = None,
) -> str:
    return _publish(server, seed=seed, known_head=known_head, created_at=created_at)[0]


def _publish(
    server: LiveServer,
    *,
    seed: int = 0,
    known_head: bool = False,
    created_at: datetime | None = None,
) -> tuple[str, str]:
    """A tiny model published as a finished job does: (model id, job id)."""
    torch.manual_seed(seed)
    model = create_model("tiny-R10x0.25", len(CLASSES))
    if known_head:
        # Zero weights, bias = log p: softmax gives exactly p for any image.
        head: torch.nn.Conv2d = model.head.conv  # type: ignore[assignment]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor(KNOWN).log())  # type: ignore[union-attr]
    state = server.app.state
    return publish_model(
        state.db,
        state.storage,
        model,
        "tiny-R10x0.25",
        CLASSES,
        32,
        metrics=METRICS,
        created_at=created_at,
    )


def _images(count: int, fmt: str = "PNG") -> list[bytes]:
    return [encode(class_image(i % 3, 3, (40, 48), seed=i), fmt) for i in range(count)]


def _files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f"img{i}.png", data)) for i, data in enumerate(images)]


# Registered as `random_model`: a test module imports random_model_fixture, and its tests
# take `random_model` without shadowing the import.
@pytest.fixture(scope="module", name="random_model")
def random_model_fixture(live_server_instance: LiveServer) -> str:
    return _add_model(live_server_instance, seed=1)
