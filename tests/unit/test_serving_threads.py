"""service.serving's threads: sized from bitcore.cpus when the cache starts (torch, ONNX
Runtime, the decode pool), reported in the log and the metrics; decoding, resizing and the
batch join never run on the event loop, and decoding never on a forward thread."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest
import torch

import bitcore.predict
from bitcore.cpus import cpu_budget
from service.metrics import Metrics
from service.serving import ModelCache
from service.storage import Storage
from tests.unit.test_serving import _images, _save_model, _settings


def test_threads_are_sized_from_the_cpus_when_the_cache_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # tests/conftest.py sets BITSERVE_CPUS=1; the setting (the gateway's) wins over it.
    settings = _settings(tmp_path, cpus=2, predict_runtime="onnxruntime", predict_jpeg_draft=True)
    storage = Storage(settings.artifact_root)
    model_id = _save_model(storage)
    metrics = Metrics()
    before = torch.get_num_threads()
    seen: dict[str, object] = {}

    async def scenario() -> None:
        cache = ModelCache(settings, storage, metrics)
        seen["threads_after_init"] = torch.get_num_threads()  # nothing set before start()
        cache.start()
        seen["threads_after_start"] = torch.get_num_threads()
        try:
            predictor = await cache.get(model_id)
            assert predictor._onnx is not None
            seen["onnx_threads"] = predictor._onnx.threads
            seen["jpeg_draft"] = predictor.jpeg_draft
        finally:
            await cache.close()

    try:
        torch.set_num_threads(1)
        with caplog.at_level(logging.INFO, logger="service.serving"):
            asyncio.run(scenario())
    finally:
        torch.set_num_threads(before)
    assert seen == {
        "threads_after_init": 1,
        "threads_after_start": 2,
        "onnx_threads": 2,
        "jpeg_draft": True,  # the opt-in setting reaches the predictor
    }
    lines = [r.getMessage() for r in caplog.records if "predict threads" in r.getMessage()]
    describe = cpu_budget(override=2).describe()
    assert lines == [f"predict threads: 2 compute, 2 decode (cpus: {describe})"]
    assert describe.endswith(", BITSERVE_CPUS 2")
    registry = metrics.registry
    assert registry.get_sample_value("bitserve_available_cpus") == 2
    assert registry.get_sample_value("bitserve_predict_threads", {"pool": "compute"}) == 2
    assert registry.get_sample_value("bitserve_predict_threads", {"pool": "decode"}) == 2


def test_the_decode_pool_is_capped_at_8(tmp_path: Path) -> None:
    settings = _settings(tmp_path, cpus=12)
    cache = ModelCache(settings, Storage(settings.artifact_root))
    assert (cache.compute_threads, cache.decode_workers) == (12, 8)


def test_without_a_setting_the_environment_sizes_the_pools(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITSERVE_CPUS", "3")
    settings = _settings(tmp_path)
    assert settings.cpus == 3  # the same variable, validated by Settings
    monkeypatch.delenv("BITSERVE_CPUS")
    cache = ModelCache(_settings(tmp_path), Storage(settings.artifact_root))
    assert cache.compute_threads == cache.cpu_budget.cpus == cpu_budget().cpus


def test_a_bad_cpus_setting_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BITSERVE_CPUS", "0")
    with pytest.raises(ValueError, match="cpus"):
        _settings(tmp_path)


def test_decoding_and_resizing_run_on_decode_threads_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, predict_runtime="torch")
    storage = Storage(settings.artifact_root)
    model_id = _save_model(storage)
    where: dict[str, set[str]] = {"decode": set(), "resize": set(), "join": set()}
    decode, resize, cat = bitcore.predict.decode_image, bitcore.predict.eval_preprocess, torch.cat

    # Spies that record the thread and call the real functions.
    def spy_decode(*args: object, **kwargs: object) -> object:
        where["decode"].add(threading.current_thread().name)
        return decode(*args, **kwargs)  # type: ignore[arg-type]

    def spy_resize(*args: object, **kwargs: object) -> object:
        where["resize"].add(threading.current_thread().name)
        return resize(*args, **kwargs)  # type: ignore[arg-type]

    def spy_cat(*args: object, **kwargs: object) -> object:
        where["join"].add(threading.current_thread().name)
        return cat(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(bitcore.predict, "decode_image", spy_decode)
    monkeypatch.setattr(bitcore.predict, "eval_preprocess", spy_resize)

    async def scenario() -> None:
        cache = ModelCache(settings, storage)
        cache.start()
        await cache.get(model_id)  # loaded (and warmed up) before the spies watch torch.cat
        monkeypatch.setattr(torch, "cat", spy_cat)
        try:
            await asyncio.gather(*[cache.predict(model_id, _images(3), top_k=1) for _ in range(3)])
        finally:
            monkeypatch.setattr(torch, "cat", cat)
            await cache.close()

    asyncio.run(scenario())
    assert where["decode"] and all(n.startswith("bitserve-decode") for n in where["decode"])
    assert where["resize"] and all(n.startswith("bitserve-decode") for n in where["resize"])
    # The batch join (and the predictor's own cat of chunks) runs on the forward threads.
    assert where["join"] and all(n.startswith("bitserve-forward") for n in where["join"])
