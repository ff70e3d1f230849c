"""service.serving: dynamic batching, the bounded queue and the LRU of loaded models.

Real predictors (a tiny model saved as a real artifact), real Settings/Storage/Metrics; the
answers are compared with bitcore's Predictor on the same images.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from bitcore.artifacts import ArtifactMetadata, save_artifact
from bitcore.models import create_model
from bitcore.predict import InputImageError, Predictor
from service.ids import new_id
from service.metrics import Metrics
from service.serving import ModelCache, ModelUnavailable, Overloaded
from service.settings import Settings
from service.storage import Storage
from tests.imagegen import class_image, encode

CLASSES = ["ant", "bee", "cat"]


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "home": tmp_path,
        "device": "cpu",
        "predict_max_batch_size": 4,
        "predict_max_queue_delay_ms": 20,
        **overrides,
    }
    return Settings(**values)  # type: ignore[arg-type]


def _save_model(storage: Storage, seed: int = 0) -> str:
    model_id = new_id("mdl")
    torch.manual_seed(seed)
    model = create_model("tiny-R10x0.25", len(CLASSES))
    save_artifact(
        storage.model_dir(model_id), model, ArtifactMetadata("tiny-R10x0.25", CLASSES, 32)
    )
    return model_id


def _images(count: int) -> list[bytes]:
    return [encode(class_image(i % 3, 3, (40, 48), seed=i)) for i in range(count)]


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def test_concurrent_requests_are_batched_split_and_exact(tmp_path: Path) -> None:
    # Eager, to the reference's 1e-6: batching itself changes no score. (The onnxruntime
    # default differs from eager by ~1e-6 here: compared in its own test below, at 1e-5.)
    settings = _settings(tmp_path, predict_runtime="torch")
    storage = Storage(settings.artifact_root)
    model_id = _save_model(storage)
    images = _images(10)
    expected = Predictor.load(storage.model_dir(model_id), "cpu").predict(images, top_k=3)
    metrics = Metrics()

    async def scenario() -> list[list[list[tuple[str, float]]]]:
        cache = ModelCache(settings, storage, metrics)
        cache.start()
        await cache.get(model_id)  # loaded first, so the requests below arrive together
        try:
            sizes = [3, 3, 3, 1]
            starts = [0, 3, 6, 9]
            return await asyncio.gather(
                *[
                    cache.predict(model_id, images[s : s + n], top_k=5)
                    for s, n in zip(starts, sizes, strict=True)
                ]
            )
        finally:
            await cache.close()

    results = asyncio.run(scenario())
    got = [prediction for result in results for prediction in result]
    assert [[label for label, _ in p] for p in got] == [[label for label, _ in p] for p in expected]
    for mine, reference in zip(got, expected, strict=True):
        for (_, a), (_, b) in zip(mine, reference, strict=True):
            assert a == pytest.approx(b, abs=1e-6)
    # 10 images, batches of at most 4, requests of 3 split across batches: 4 + 4 + 2.
    assert _sample(metrics, "bitserve_predict_batch_size_count") == 3
    assert _sample(metrics, "bitserve_predict_batch_size_sum") == 10
    assert _sample(metrics, "bitserve_predict_queue_seconds_count") == 4
    assert _sample(metrics, "bitserve_predict_compute_seconds_count") == 3
    assert _sample(metrics, "bitserve_predict_images_total") == 10
    assert _sample(metrics, "bitserve_predict_queue_depth") == 0


def test_queue_bound_answers_overloaded_and_recovers(tmp_path: Path) -> None:
    settings = _settings(tmp_path, predict_max_queue=3, predict_max_queue_delay_ms=0)
    storage = Storage(settings.artifact_root)
    model_id = _save_model(storage)
    images = _images(3)

    async def scenario() -> tuple[str, int]:
        cache = ModelCache(settings, storage)
        cache.start()
        predictor = await cache.get(model_id)
        # Hold the forward pass: the first request waits inside the batcher.
        predictor._lock.acquire()
        try:
            first = asyncio.ensure_future(cache.predict(model_id, images[:2], top_k=1))
            while cache.queued(model_id) != (0, 2):
                await asyncio.sleep(0.01)  # until its images are in the forward pass
            with pytest.raises(Overloaded) as excinfo:
                await cache.predict(model_id, images[:2], top_k=1)  # 2 + 2 > 3
            assert cache.waiting == 2
        finally:
            predictor._lock.release()
        result = await first
        # Room again once the first request is answered.
        after = await cache.predict(model_id, images[2:], top_k=1)
        await cache.close()
        return f"{excinfo.value.waiting}/{excinfo.value.limit}:{len(result)}", len(after)

    assert asyncio.run(scenario()) == ("2/3:2", 1)


def test_one_load_for_concurrent_requests_and_lru_eviction(tmp_path: Path) -> None:
    settings = _settings(tmp_path, model_cache_size=2)
    storage = Storage(settings.artifact_root)
    ids = [_save_model(storage, seed) for seed in range(3)]

    async def scenario() -> None:
        cache = ModelCache(settings, storage)
        cache.start()
        same = await asyncio.gather(*[cache.get(ids[0]) for _ in range(5)])
        assert all(p is same[0] for p in same)  # one load shared by all five
        await cache.get(ids[1])
        await cache.get(ids[0])  # used again: now the most recent
        await cache.get(ids[2])  # evicts the least recently used: ids[1]
        assert cache.loaded == [ids[0], ids[2]]
        assert (await cache.get(ids[0])) is same[0]  # still cached, not reloaded
        assert cache.evict(ids[0]) is True
        assert cache.loaded == [ids[2]]
        assert (await cache.get(ids[0])) is not same[0]  # loaded again
        await cache.close()

    asyncio.run(scenario())


def test_missing_artifact_is_unavailable_and_not_cached(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    storage = Storage(settings.artifact_root)
    model_id = new_id("mdl")

    async def scenario() -> None:
        cache = ModelCache(settings, storage)
        with pytest.raises(ModelUnavailable, match=model_id):
            await cache.predict(model_id, _images(1), top_k=1)
        assert cache.loaded == [] and cache.waiting == 0
        torch.manual_seed(0)
        save_artifact(
            storage.model_dir(model_id),
            create_model("tiny-R10x0.25", 3),
            ArtifactMetadata("tiny-R10x0.25", CLASSES, 32),
        )
        assert len(await cache.predict(model_id, _images(1), top_k=1)) == 1  # retried
        await cache.close()

    asyncio.run(scenario())


def test_bad_image_names_its_index(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    storage = Storage(settings.artifact_root)
    model_id = _save_model(storage)

    async def scenario() -> None:
        cache = ModelCache(settings, storage)
        with pytest.raises(InputImageError) as excinfo:
            await cache.predict(model_id, [*_images(2), b"GIF89a-truncated"], top_k=1)
        assert excinfo.value.index == 2
        assert excinfo.value.reason == "undecodable"
        assert cache.waiting == 0
        await cache.close()

    asyncio.run(scenario())


def test_forward_runs_off_the_event_loop(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    storage = Storage(settings.artifact_root)
    model_id = _save_model(storage)
    threads: set[str] = set()

    async def scenario() -> None:
        cache = ModelCache(settings, storage)
        predictor = await cache.get(model_id)
        original = predictor.predict_tensor

        def spy(batch: torch.Tensor) -> torch.Tensor:
            threads.add(threading.current_thread().name)
            return original(batch)

        predictor.predict_tensor = spy  # type: ignore[method-assign]
        await cache.predict(model_id, _images(2), top_k=1)
        await cache.close()

    asyncio.run(scenario())
    assert threads and all(name.startswith("bitserve-forward") for name in threads)


@pytest.mark.parametrize("damage", ["truncate", "bit_flip"])
def test_a_damaged_artifact_fails_that_model_only_is_logged_once_and_not_cached(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _settings(tmp_path)
    storage = Storage(settings.artifact_root)
    good, bad = _save_model(storage, seed=1), _save_model(storage, seed=2)
    weights = storage.model_dir(bad) / "model.safetensors"
    intact = weights.read_bytes()
    data = bytearray(intact)
    if damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data[-64] ^= 0x10  # inside the tensor data: only the checksum notices
    weights.write_bytes(bytes(data))

    async def scenario() -> None:
        cache = ModelCache(settings, storage)
        for _ in range(3):
            with pytest.raises(ModelUnavailable) as caught:
                await cache.predict(bad, _images(1), top_k=1)
            assert caught.value.code == "model_artifact_corrupt"
            assert caught.value.retry_after == 60
            assert str(weights) not in str(caught.value)  # no server paths for clients
            assert len(await cache.predict(good, _images(2), top_k=1)) == 2
        assert cache.loaded == [good] and cache.waiting == 0
        errors = [r for r in caplog.records if r.levelname == "ERROR" and bad in r.getMessage()]
        assert len(errors) == 1 and str(weights) in errors[0].getMessage()
        weights.write_bytes(intact)  # restored by the operator: loaded on the next request
        assert len(await cache.predict(bad, _images(1), top_k=1)) == 1
        assert sorted(cache.loaded) == sorted([good, bad])
        await cache.close()

    asyncio.run(scenario())


def _save_model_with_head(storage: Storage) -> str:
    """A model with a head of a set scale: scores far from uniform, so a wrong graph shows."""
    model_id = new_id("mdl")
    torch.manual_seed(0)
    model = create_model("tiny-R10x0.25", len(CLASSES))
    torch.nn.init.normal_(model.head.conv.weight, std=0.1)
    save_artifact(
        storage.model_dir(model_id), model, ArtifactMetadata("tiny-R10x0.25", CLASSES, 32)
    )
    return model_id


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_graph_runtime_serves_eager_answers_and_a_broken_export_is_refused(
    tmp_path: Path, runtime: str
) -> None:
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from bitcore.export import ONNX_FILE

    settings = _settings(tmp_path, predict_runtime=runtime)
    storage = Storage(settings.artifact_root)
    good, bad = _save_model_with_head(storage), _save_model_with_head(storage)
    images = _images(3)
    expected = Predictor.load(storage.model_dir(good), "cpu").predict(images, top_k=3)
    # `bad`: exported, then one kernel altered in the file (its metadata still claims to be
    # the current export of these weights, so it is not re-exported).
    onnx_path = storage.model_dir(bad) / ONNX_FILE
    Predictor.load(storage.model_dir(bad), "cpu", runtime=runtime)
    proto = onnx.load(str(onnx_path))
    kernel = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(kernel)
    noise = np.random.default_rng(0).standard_normal(array.shape) * array.std() * 0.2
    kernel.CopyFrom(numpy_helper.from_array((array + noise).astype(np.float32), kernel.name))
    onnx.save(proto, str(onnx_path))

    async def scenario() -> None:
        cache = ModelCache(settings, storage)
        got = await cache.predict(good, images, top_k=3)
        assert (await cache.get(good)).runtime == runtime
        assert (storage.model_dir(good) / ONNX_FILE).is_file()  # exported at first load
        for mine, reference in zip(got, expected, strict=True):
            assert [label for label, _ in mine] == [label for label, _ in reference]
            for (_, a), (_, b) in zip(mine, reference, strict=True):
                assert a == pytest.approx(b, abs=1e-5)
        with pytest.raises(ModelUnavailable) as caught:
            await cache.predict(bad, images, top_k=1)
        assert caught.value.code == "model_unavailable" and caught.value.retry_after == 60
        assert f"{runtime} runtime disagrees with PyTorch eager" in str(caught.value)
        assert cache.loaded == [good]
        onnx_path.unlink()  # the operator removes the bad file: exported afresh, served
        assert len(await cache.predict(bad, images, top_k=1)) == 3
        assert sorted(cache.loaded) == sorted([good, bad])
        await cache.close()

    asyncio.run(scenario())
