"""/v1/models over real HTTP (uvicorn) on PostgreSQL: a model's documented shape, the
paginated list, the artifact as .zip and as ONNX (matching eager torch), and delete (by this
process or another). Predicting is in test_models_predict.py; the models are published as a
finished job publishes them (tests/integration/models_helpers.py).
"""

from __future__ import annotations

import io
import time
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import torch

from bitcore.artifacts import INPUT_RESIZE
from bitcore.predict import Predictor
from service.known_models import KnownModels
from service.tables import Model
from tests.integration.api_errors import assert_error
from tests.integration.conftest import LiveServer
from tests.integration.models_helpers import (
    CLASSES,
    METRICS,
    _add_model,
    _files,
    _images,
    _publish,
    random_model_fixture,  # noqa: F401 (the fixture random_model)
)
from tests.model_fixtures import fixture_plan

pytestmark = pytest.mark.integration

# Far in the future: these rows sort first (newest first) whatever other modules add.
FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


def test_get_model_has_the_documented_shape(
    client: httpx.Client, live_server_instance: LiveServer
) -> None:
    at = FUTURE - timedelta(days=1)
    model_id, job_id = _publish(live_server_instance, created_at=at)
    response = client.get(f"/v1/models/{model_id}")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": model_id,
        "name": None,
        "job_id": job_id,
        "base_model": "tiny-R10x0.25",
        "classes": CLASSES,
        "plan": fixture_plan(32),
        "metrics": {
            **METRICS,
            "macro_f1": None,
            "num_examples": None,
            "loss": None,
            "precision": None,  # the job asked for float32: no int8 guard ran
        },
        "input": {
            "crop": 32,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "resize": INPUT_RESIZE,  # a fixture model without the field: the same preprocessing
        },
        "created_at": "2099-12-31T00:00:00Z",
    }


def test_list_is_paginated_newest_first(
    client: httpx.Client, live_server_instance: LiveServer
) -> None:
    ids = [
        _add_model(live_server_instance, created_at=FUTURE + timedelta(seconds=i)) for i in range(3)
    ]
    first = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in first["items"]] == [ids[2], ids[1]]
    assert first["next_cursor"]
    second = client.get("/v1/models", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert second["items"][0]["id"] == ids[0]
    assert_error(client.get("/v1/models", params={"limit": 0}), 422, "invalid_request")
    assert_error(client.get("/v1/models", params={"cursor": "garbage!"}), 400, "invalid_cursor")
    for model_id in ids:  # keep the future-dated rows out of the other tests' way
        assert client.delete(f"/v1/models/{model_id}").status_code == 204


def test_artifact_zip_holds_weights_and_metadata(
    client: httpx.Client, live_server_instance: LiveServer, random_model: str
) -> None:
    response = client.get(f"/v1/models/{random_model}/artifact")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert f'filename="{random_model}.zip"' in response.headers["content-disposition"]
    directory = live_server_instance.app.state.storage.model_dir(random_model)
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["metadata.json", "model.safetensors"]
        for name in archive.namelist():
            assert archive.read(name) == (directory / name).read_bytes()


def test_artifact_onnx_is_exported_once_and_matches_eager(
    client: httpx.Client, live_server_instance: LiveServer, random_model: str
) -> None:
    import json

    import numpy as np
    import onnx
    import onnxruntime as ort

    from bitcore.runtimes import check_inputs

    directory = live_server_instance.app.state.storage.model_dir(random_model)
    response = client.get(f"/v1/models/{random_model}/artifact", params={"format": "onnx"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="{random_model}.onnx"' in response.headers["content-disposition"]
    cached = directory / "model.onnx"
    assert response.content == cached.read_bytes()  # exported into the model's folder
    stamp = cached.stat().st_mtime_ns, cached.stat().st_ino
    again = client.get(f"/v1/models/{random_model}/artifact", params={"format": "onnx"})
    assert again.content == response.content
    assert (cached.stat().st_mtime_ns, cached.stat().st_ino) == stamp  # not exported again

    proto = onnx.load_from_string(response.content)
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == CLASSES and props["input.crop"] == "32"
    session = ort.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    inputs = check_inputs(32, count=3)
    (logits,) = session.run(None, {"input": inputs.numpy()})
    eager = Predictor.load(directory, "cpu", runtime="torch")
    expected = eager.predict_tensor(inputs).numpy()
    got = torch.from_numpy(logits).softmax(dim=1).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # The default is still the .zip; an unknown format is a 422.
    plain = client.get(f"/v1/models/{random_model}/artifact")
    assert plain.headers["content-type"] == "application/zip"
    assert_error(
        client.get(f"/v1/models/{random_model}/artifact", params={"format": "pt"}),
        422,
        "invalid_request",
    )


def test_delete_removes_row_files_and_cached_model(
    client: httpx.Client, live_server_instance: LiveServer
) -> None:
    model_id = _add_model(live_server_instance, known_head=True)
    cache = live_server_instance.app.state.models
    assert (
        client.post(f"/v1/models/{model_id}/predict", files=_files(_images(1))).status_code == 200
    )
    assert model_id in cache.loaded
    directory: Path = live_server_instance.app.state.storage.model_dir(model_id)
    assert directory.is_dir()

    response = client.delete(f"/v1/models/{model_id}")
    assert response.status_code == 204 and response.content == b""
    assert model_id not in cache.loaded
    assert not directory.exists()
    assert_error(client.get(f"/v1/models/{model_id}"), 404, "not_found")
    assert_error(
        client.post(f"/v1/models/{model_id}/predict", files=_files(_images(1))), 404, "not_found"
    )


def test_a_model_deleted_by_another_process_answers_404_once_its_check_expires(
    client: httpx.Client, live_server_instance: LiveServer
) -> None:
    # The predict path trusts a model it found for a few seconds (service.known_models).
    model_id = _add_model(live_server_instance, known_head=True)
    app = live_server_instance.app
    saved = app.state.known_models
    app.state.known_models = KnownModels(seconds=1.0)
    try:
        url = f"/v1/models/{model_id}/predict"
        assert client.post(url, files=_files(_images(1))).status_code == 200
        # Another gateway process deletes the row: this one is not told.
        with app.state.db.session() as session:
            session.delete(session.get(Model, model_id))
        time.sleep(1.0)
        assert_error(client.post(url, files=_files(_images(1))), 404, "not_found")
    finally:
        app.state.known_models = saved
