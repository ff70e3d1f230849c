"""The whole user loop over HTTP, shared by the e2e tests (external servers or embedded).

upload a generated dataset (202 `processing`) -> follow its ingestion over Server-Sent Events ->
ready -> start a tiny-R10x0.25 job -> follow it over Server-Sent Events -> succeeded -> read the
model and its metrics -> classify fresh images of known classes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.imagegen import class_image, encode, make_archive, make_image_folder

CLASSES = {"cat": 10, "dog": 10}
# Small enough for seconds on a shared 2-core CPU, enough steps to separate two colours.
OVERRIDES: dict[str, Any] = {"steps": 40, "batch_size": 8, "crop": 32, "precrop": 40}
FRESH_PER_CLASS = 3


@dataclass
class LoopResult:
    dataset: dict[str, Any]  # the ready dataset
    job: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    model: dict[str, Any]
    predictions: list[dict[str, Any]]
    expected_labels: list[str] = field(default_factory=list)
    accepted: dict[str, Any] = field(default_factory=dict)  # the upload's 202 answer
    dataset_events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def run_loop(
    client: httpx.Client,
    tmp_path: Path,
    *,
    job_timeout: float = 180.0,
    ingest_timeout: float = 120.0,
) -> LoopResult:
    folder = make_image_folder(tmp_path / "pets", CLASSES, size=(40, 48), seed=3)
    archive = make_archive(folder)
    response = client.post(
        "/v1/datasets",
        files={"file": ("pets.zip", archive.read_bytes(), "application/zip")},
        data={"name": "pets"},
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert response.headers["location"] == f"/v1/datasets/{accepted['id']}"
    # An ingest worker makes it ready: follow that as a client would, over its event stream.
    dataset_events = follow_stream(
        client, f"/v1/datasets/{accepted['id']}/events", timeout=ingest_timeout
    )
    assert dataset_events[-1][0] == "done", dataset_events[-3:]
    dataset = dataset_events[-1][1]
    assert dataset["status"] == "ready", dataset

    response = client.post(
        "/v1/jobs",
        json={
            "dataset_id": dataset["id"],
            "base_model": "tiny-R10x0.25",
            "validation_fraction": 0.2,
            "seed": 0,
            "overrides": OVERRIDES,
        },
    )
    assert response.status_code == 202, response.text
    job = response.json()

    events = follow_events(client, job["id"], timeout=job_timeout)
    final = events[-1][1]
    assert events[-1][0] == "done", events[-3:]
    assert final["status"] == "succeeded", final
    response = client.get(f"/v1/models/{final['model_id']}")
    assert response.status_code == 200, response.text
    model = response.json()

    names = sorted(CLASSES)
    fresh = [
        (name, encode(class_image(label, len(names), (40, 48), seed=1000 + i)))
        for label, name in enumerate(names)
        for i in range(FRESH_PER_CLASS)
    ]
    response = client.post(
        f"/v1/models/{model['id']}/predict",
        params={"top_k": 2},
        files=[("files", (f"{name}_{i}.png", data)) for i, (name, data) in enumerate(fresh)],
    )
    assert response.status_code == 200, response.text
    return LoopResult(
        dataset=dataset,
        job=final,
        events=events,
        model=model,
        predictions=response.json()["predictions"],
        expected_labels=[name for name, _ in fresh],
        accepted=accepted,
        dataset_events=dataset_events,
    )


def follow_events(
    client: httpx.Client, job_id: str, *, timeout: float
) -> list[tuple[str, dict[str, Any]]]:
    """Read GET /v1/jobs/{id}/events to its end: [(event name, data)], ending with "done"."""
    return follow_stream(client, f"/v1/jobs/{job_id}/events", timeout=timeout)


def follow_stream(
    client: httpx.Client, path: str, *, timeout: float
) -> list[tuple[str, dict[str, Any]]]:
    """Read an event stream (a job's or a dataset's /events) to its end: [(event name,
    data)], ending with "done"."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "message", []
    with client.stream("GET", path, timeout=httpx.Timeout(10.0, read=timeout)) as stream:
        assert stream.status_code == 200, stream.read()
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith(":"):  # a keep-alive comment
                continue
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                data.append(line.split(":", 1)[1].strip())
            elif line == "" and data:
                events.append((name, json.loads("\n".join(data))))
                if name == "done":
                    break
                name, data = "message", []
    return events


def check_loop(result: LoopResult) -> None:
    """What every run of the loop must show."""
    accepted = result.accepted
    assert (accepted["status"], accepted["name"], accepted["num_images"]) == (
        "processing",
        "pets",
        0,
    )
    assert accepted["id"] == result.dataset["id"]
    names = [name for name, _ in result.dataset_events]
    assert names[0] == "status" and names[-1] == "done", names
    assert set(names) <= {"status", "progress", "done"}, names
    statuses = [data["status"] for name, data in result.dataset_events if name == "status"]
    assert statuses[-1] == "ready" and set(statuses) <= {"processing", "ready"}, statuses
    phases = [data["phase"] for name, data in result.dataset_events if name == "progress"]
    order = ["queued", "extracting", "indexing", "storing", "done"]
    assert [order.index(p) for p in phases] == sorted(order.index(p) for p in phases), phases
    assert (result.dataset["progress"], result.dataset["error"]) == (None, None)
    assert result.dataset["image_size"] == {"median_height": 40, "median_width": 48}

    assert result.dataset["num_images"] == sum(CLASSES.values())
    assert result.dataset["classes"] == [
        {"name": k, "count": v} for k, v in sorted(CLASSES.items())
    ]

    names = result.names()
    assert names[0] == "status" and names[-1] == "done"
    steps = [data["step"] for name, data in result.events if name == "progress"]
    assert steps, f"no progress events: {names}"
    assert steps == sorted(steps) and steps[-1] == OVERRIDES["steps"]
    statuses = [data["status"] for name, data in result.events if name == "status"]
    assert statuses[-1] == "succeeded"
    assert "running" in statuses

    model = result.model
    assert model["id"] == result.job["model_id"]
    assert model["job_id"] == result.job["id"]
    assert model["base_model"] == "tiny-R10x0.25"
    assert model["classes"] == sorted(CLASSES)
    assert {k: model["input"][k] for k in ("crop", "mean", "std")} == {
        "crop": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    assert model["input"]["resize"].startswith("bilinear, whole image squashed")
    assert model["plan"]["total_steps"] == OVERRIDES["steps"]
    metrics = model["metrics"]
    assert [c["label"] for c in metrics["per_class"]] == sorted(CLASSES)
    support = sum(c["support"] for c in metrics["per_class"])
    assert support == 4  # validation_fraction 0.2 of 20 images
    assert sum(map(sum, metrics["confusion_matrix"])) == support
    assert metrics["accuracy"] == 1.0, metrics

    top1 = [p["top_k"][0]["label"] for p in result.predictions]
    assert top1 == result.expected_labels
    for prediction in result.predictions:
        scores = [p["score"] for p in prediction["top_k"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
        assert abs(sum(scores) - 1.0) < 1e-5  # two classes: the whole distribution
