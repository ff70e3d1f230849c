"""finetune() end to end on generated image folders: artifact, resume, cancel, checkpoints, DDP.

Tiny registry model, 12-18 images of 40x48 px, 32 px crops, a few steps: seconds each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bitcore import artifacts
from bitcore.catalog import CheckpointMissing
from bitcore.data import index_directory
from bitcore.hyperrule import Plan
from bitcore.hyperrule import plan as hyperrule_plan
from bitcore.train import (
    MissingCheckpointError,
    Progress,
    ResumeError,
    TrainCallbacks,
    TrainingCancelled,
    finetune,
)
from bitcore.train import state as train_state
from bitcore.train.batching import TrainBatches
from bitcore.train.order import DataOrder
from bitcore.train.prepare import initial_model, prepare_data
from tests.imagegen import make_image_folder
from tests.npz_fixtures import official_arrays, write_official_npz

MODEL = "tiny-R10x0.25"
CLASSES = {"ant": 6, "bee": 6, "cow": 6}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"), CLASSES, size=(40, 48))


def tiny_plan(steps: int = 4, batch: int = 4, micro_batch_size: int | None = None) -> Plan:
    return hyperrule_plan(
        18,
        (40, 48),
        steps=steps,
        batch_size=batch,
        micro_batch_size=micro_batch_size,
        precrop=40,
        crop=32,
    )


class Recorder(TrainCallbacks):
    def __init__(self, cancel_after: int | None = None) -> None:
        self.progress: list[Progress] = []
        self.checkpoints: list[int] = []
        self.cancel_after = cancel_after

    def on_progress(self, progress: Progress) -> None:
        self.progress.append(progress)

    def should_cancel(self) -> bool:
        done = [p.step for p in self.progress if p.phase == "training"]
        return self.cancel_after is not None and bool(done) and done[-1] >= self.cancel_after

    def on_checkpoint(self, step: int) -> None:
        self.checkpoints.append(step)


def test_finetune_writes_a_complete_artifact(folder: Path, tmp_path: Path) -> None:
    plan = tiny_plan(steps=4)
    rec = Recorder()
    result = finetune(
        folder,
        MODEL,
        plan,
        tmp_path / "model",
        from_scratch=True,
        seed=3,
        callbacks=rec,
        validation_fraction=1 / 3,
        num_workers=0,
    )
    assert result.steps == 4 and result.resumed_from is None and result.seconds > 0
    assert [p.phase for p in rec.progress] == ["preparing"] + ["training"] * 4 + ["evaluating"]
    assert rec.checkpoints == [4]  # the final state (checkpoint_every=50 > 4 steps)
    assert not (tmp_path / "model.work" / "state").exists()  # removed once the artifact exists

    meta = artifacts.load_metadata(result.artifact_dir)
    assert meta.model_name == MODEL and meta.base_model is None
    assert meta.classes == ["ant", "bee", "cow"] and meta.crop == 32
    assert Plan.from_dict(meta.plan) == plan
    m = meta.metrics
    assert m == result.metrics
    assert m["num_examples"] == 6 and [c["support"] for c in m["per_class"]] == [2, 2, 2]
    assert sum(map(sum, m["confusion_matrix"])) == 6
    assert m["accuracy"] == sum(m["confusion_matrix"][i][i] for i in range(3)) / 6
    assert meta.extra["seed"] == 3 and meta.extra["dataset"]["num_train"] == 12
    assert meta.extra["dataset"]["classes"] == CLASSES
    assert set(meta.extra["timings"]) >= {"prepare_seconds", "train_seconds", "evaluate_seconds"}

    # The artifact reloads and reproduces the reported validation accuracy.
    model, _ = artifacts.load_model(result.artifact_dir)
    data = prepare_data(folder, plan, tmp_path / "cache2", validation_fraction=1 / 3, seed=3)
    x = torch.stack([data.val_set[i][0] for i in range(6)])
    y = torch.tensor([data.val_set[i][1] for i in range(6)])
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    assert accuracy == pytest.approx(m["accuracy"])


def test_resume_after_cancel_reaches_the_same_weights(folder: Path, tmp_path: Path) -> None:
    index = index_directory(folder)
    plan = tiny_plan(steps=6, batch=4)
    common = dict(from_scratch=True, seed=1, num_workers=0, checkpoint_every=100)
    straight = finetune(index, MODEL, plan, tmp_path / "a", **common)  # type: ignore[arg-type]

    rec = Recorder(cancel_after=3)
    with pytest.raises(TrainingCancelled) as info:
        finetune(index, MODEL, plan, tmp_path / "b", callbacks=rec, **common)  # type: ignore[arg-type]
    assert info.value.step == 3 and rec.checkpoints == [3]
    saved = train_state.latest(tmp_path / "b.work" / "state")
    assert saved is not None and saved.step == 3
    assert not (tmp_path / "b" / artifacts.WEIGHTS_FILE).exists()  # a cancelled job keeps no model

    # A different run must not pick that checkpoint up silently.
    with pytest.raises(ResumeError, match="seed"):
        finetune(index, MODEL, plan, tmp_path / "b", **{**common, "seed": 2})  # type: ignore[arg-type]

    rec = Recorder()
    resumed = finetune(index, MODEL, plan, tmp_path / "b", callbacks=rec, **common)  # type: ignore[arg-type]
    assert resumed.resumed_from == 3
    assert [p.step for p in rec.progress if p.phase == "training"] == [4, 5, 6]
    a = artifacts.load_weights(straight.artifact_dir)
    b = artifacts.load_weights(resumed.artifact_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert resumed.metrics["confusion_matrix"] == straight.metrics["confusion_matrix"]
    assert resumed.metrics["loss"] == pytest.approx(straight.metrics["loss"], abs=1e-5)


def test_periodic_checkpoints(folder: Path, tmp_path: Path) -> None:
    rec = Recorder(cancel_after=5)
    with pytest.raises(TrainingCancelled):
        finetune(
            folder,
            MODEL,
            tiny_plan(steps=6, batch=2),
            tmp_path / "m",
            from_scratch=True,
            checkpoint_every=2,
            callbacks=rec,
            num_workers=0,
        )
    assert rec.checkpoints == [2, 4, 5]
    state_dir = tmp_path / "m.work" / "state"
    assert [p.name for p in state_dir.iterdir()] == ["step-00000005"]  # only the newest is kept


def test_missing_catalog_checkpoint_is_a_clear_error(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BITSERVE_CHECKPOINT_DIR", str(tmp_path / "ckpts"))
    with pytest.raises(CheckpointMissing) as info:
        finetune(folder, "BiT-M-R50x1", tiny_plan(), tmp_path / "m")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / "ckpts" / "BiT-M-R50x1.npz") in message
    assert "from_scratch=True" in message
    assert not (tmp_path / "m.work").exists()  # failed before any data work

    with pytest.raises(MissingCheckpointError, match=r"not a published BiT model.*from_scratch"):
        finetune(folder, MODEL, tiny_plan(), tmp_path / "m")
    with pytest.raises(MissingCheckpointError, match=r"nowhere\.npz"):
        finetune(folder, MODEL, tiny_plan(), tmp_path / "m", checkpoint=tmp_path / "nowhere.npz")


def test_transfer_from_an_official_checkpoint_keeps_the_body(folder: Path, tmp_path: Path) -> None:
    npz = write_official_npz(tmp_path / "tiny.npz", official_arrays(num_classes=5, seed=4))
    # One step at full lr: with BiT's zero head, the body gets no gradient on that first step,
    # so the artifact's body is the checkpoint's and only the new 3-class head has moved.
    plan = tiny_plan(steps=1)
    result = finetune(folder, MODEL, plan, tmp_path / "m", checkpoint=npz, num_workers=0)
    from bitcore.checkpoints import npz_to_state_dict

    expected = npz_to_state_dict(dict(np.load(npz)))
    got = artifacts.load_weights(result.artifact_dir)
    body = [k for k in got if not k.startswith("head.conv")]
    assert body and all(torch.equal(got[k], expected[k]) for k in body)
    assert got["head.conv.weight"].shape[0] == 3 and got["head.conv.weight"].abs().sum() > 0
    assert artifacts.load_metadata(result.artifact_dir).base_model == MODEL


def test_two_ddp_processes_match_one_process(folder: Path, tmp_path: Path) -> None:
    index = index_directory(folder)
    plan = tiny_plan(steps=3, batch=4, micro_batch_size=4)
    common = dict(from_scratch=True, seed=5, num_workers=0, validation_fraction=1 / 3)
    rec = Recorder()
    two = finetune(index, MODEL, plan, tmp_path / "two", world_size=2, callbacks=rec, **common)  # type: ignore[arg-type]
    one = finetune(index, MODEL, plan, tmp_path / "one", world_size=1, **common)  # type: ignore[arg-type]
    assert [p.step for p in rec.progress if p.phase == "training"] == [1, 2, 3]
    assert rec.checkpoints == [3]
    a = artifacts.load_weights(one.artifact_dir)
    b = artifacts.load_weights(two.artifact_dir)
    start = initial_model(MODEL, 3, plan, None, seed=5).state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # it did train
    # Same update up to float32 summation order (gloo averages the two ranks' gradients).
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert artifacts.load_metadata(two.artifact_dir).extra["world_size"] == 2


@pytest.mark.parametrize("mixup", [False, True])
def test_batched_fetch_is_bit_identical_to_the_dataset(
    folder: Path, tmp_path: Path, mixup: bool
) -> None:
    plan = tiny_plan()
    data = prepare_data(folder, plan, tmp_path / "cache", validation_fraction=1 / 3, seed=0)
    keys = DataOrder(len(data.train_set), seed=9).batch(3, 5)
    items = [data.train_set[k] for k in keys]
    expected = [torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])]
    if mixup:
        partners = keys[::-1]
        more = [data.train_set[k] for k in partners]
        expected += [torch.stack([x for x, _ in more]), torch.tensor([y for _, y in more])]
        keys = list(zip(keys, partners, strict=True))  # type: ignore[arg-type]
    got = TrainBatches(data.train_set, mixup=mixup).__getitems__(keys)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
