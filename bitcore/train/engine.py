"""Fine-tune a BiT model on an image-folder dataset with the BiT-HyperRule, end to end.

prepare (index, split, caches, initial model) -> train (loop.py, on one process or DDP ranks)
-> evaluate on the validation split -> save the artifact (safetensors + metadata).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bitcore.artifacts import ArtifactMetadata, save_artifact, software_versions
from bitcore.data import DatasetIndex, default_num_workers
from bitcore.devices import select_device, uses_bf16_autocast
from bitcore.hyperrule import Plan
from bitcore.quantize import FP32, INT8, validate_precision
from bitcore.train import state
from bitcore.train.callbacks import Progress, TrainCallbacks
from bitcore.train.distributed import RankJob, free_tcp_init_method, run_distributed
from bitcore.train.history import validation_steps
from bitcore.train.loop import LoopConfig, LoopOutcome, Validate, run_loop, to_channels_last
from bitcore.train.metrics import classification_metrics, predict_batches
from bitcore.train.microbatch import choose_micro_batch_size
from bitcore.train.prepare import (
    architecture_of,
    initial_model,
    prepare_data,
    resolve_checkpoint,
)
from bitcore.train.serving_precision import int8_precision

# finetune's checkpoints live in <work_dir>/state (bitcore.train.state's layout); a service
# that moves them between machines (worker.checkpoints) finds them there.
STATE_DIR = "state"


@dataclass(frozen=True)
class FinetuneResult:
    artifact_dir: Path
    metrics: dict[str, Any]
    steps: int
    seconds: float
    resumed_from: int | None


def train_model(
    model: torch.nn.Module,
    train_set: Any,
    plan: Plan,
    state_dir: str | Path,
    *,
    seed: int = 0,
    device: str | torch.device | None = None,
    callbacks: TrainCallbacks | None = None,
    resume: bool = True,
    checkpoint_every: int = 50,
    micro_batch_size: int | None = None,
    num_workers: int = 0,
    world_size: int = 1,
    fingerprint: dict[str, Any] | None = None,
    validate: Validate | None = None,
) -> LoopOutcome:
    """Run the HyperRule schedule on `model` in place (its weights end trained, on `device`).

    `train_set[(index, aug_seed)] -> (x, label)`. `micro_batch_size` (global, all ranks) is
    plan.micro_batch_size or chosen to fit memory. With world_size > 1 the ranks are spawned
    processes; their final weights come back through the last checkpoint. `validate` scores
    the validation split at `history.validation_steps(plan.total_steps)` and reports each
    result to callbacks.on_validation (one process only: spawned ranks do not share it).
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if world_size < 1 or plan.batch_size % world_size:
        raise ValueError(f"batch_size {plan.batch_size} must split evenly over {world_size} ranks")
    callbacks = callbacks or TrainCallbacks()
    dev = select_device(str(device) if device is not None else None)
    if not resume:
        state.clear(state_dir)
    bf16 = uses_bf16_autocast(dev)
    micro = micro_batch_size or plan.micro_batch_size
    if micro is not None and (plan.batch_size % micro or micro % world_size):
        raise ValueError(
            f"micro_batch_size {micro} must divide batch_size {plan.batch_size} and split "
            f"evenly over {world_size} ranks"
        )
    config = LoopConfig(
        plan=plan,
        seed=seed,
        micro_batch_size=micro or 0,
        state_dir=Path(state_dir),
        fingerprint=fingerprint or {},
        resume=resume,
        checkpoint_every=checkpoint_every,
        num_workers=num_workers,
        autocast=bf16,
        channels_last=dev.type == "cuda",
        validate_at=validation_steps(plan.total_steps) if validate is not None else (),
    )
    if world_size > 1:
        job = RankJob(model.cpu(), train_set, config, dev.type, free_tcp_init_method())
        outcome = run_distributed(job, world_size, callbacks)
        saved = state.latest(state_dir)
        if saved is None:
            raise RuntimeError(f"distributed training left no checkpoint in {state_dir}")
        state.load_model(saved, model)
        model.to(dev)
        return outcome
    model.to(dev)
    if config.channels_last:
        to_channels_last(model)
    if not micro:
        micro = choose_micro_batch_size(
            model,
            plan.batch_size,
            plan.crop,
            dev,
            autocast=bf16,
            channels_last=config.channels_last,
        )
        config = dataclasses.replace(config, micro_batch_size=micro)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    return run_loop(model, train_set, config, dev, callbacks, validate=validate)


def finetune(
    dataset: DatasetIndex | str | Path,
    base_model: str,
    plan: Plan,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    checkpoint: str | Path | None = None,
    from_scratch: bool = False,
    validation_fraction: float = 0.1,
    seed: int = 0,
    callbacks: TrainCallbacks | None = None,
    resume: bool = True,
    checkpoint_every: int = 50,
    work_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    num_workers: int | None = None,
    world_size: int = 1,
    serving_precision: str = FP32,
) -> FinetuneResult:
    """Fine-tune `base_model` on `dataset` following `plan` and write the artifact to `out_dir`.

    Pre-trained weights come from `checkpoint` (an official .npz) or the local catalog copy;
    without either, MissingCheckpointError / catalog.CheckpointMissing (FileNotFoundError)
    says where to put the file, unless `from_scratch`. Progress, cancel and checkpoints go
    through `callbacks`; a cancelled run raises TrainingCancelled after checkpointing, and a
    later call with the same arguments resumes from it (resume=True). Caches and checkpoints
    live in `work_dir` (default: `<out_dir>.work` next to `out_dir`); the checkpoints are
    removed once the artifact is written. `cache_dir` points at a shared, dataset-level image
    cache instead (the service builds one at upload): it then caches whole-dataset copies, so
    every job on the dataset, whatever its seed or split, reuses them.
    `serving_precision="int8"` runs the int8 guard after evaluation (bitcore.quantize): the
    int8 graph is written beside the weights only if it agrees with float32 on the validation
    split; metrics["precision"] records what was measured and decided.
    """
    validate_precision(serving_precision)
    t0 = time.perf_counter()
    callbacks = callbacks or TrainCallbacks()
    out = Path(out_dir)
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".work")
    callbacks.on_progress(Progress(0, plan.total_steps, None, 0.0, 0.0, None, "preparing"))
    weights = resolve_checkpoint(base_model, checkpoint, from_scratch)
    data = prepare_data(
        dataset,
        plan,
        Path(cache_dir) if cache_dir is not None else work / "cache",
        validation_fraction=validation_fraction,
        seed=seed,
        shared_cache=cache_dir is not None,
    )
    classes = list(data.index.classes)
    model = initial_model(base_model, len(classes), plan, weights, seed=seed)
    fingerprint = {
        "base_model": base_model,
        "from_scratch": from_scratch,
        "classes": classes,
        "plan": plan.to_dict(),
        "seed": seed,
        "validation_fraction": validation_fraction,
        "train_samples": len(data.train_samples),
        "dataset": data.index.fingerprint(),
    }
    workers = default_num_workers() if num_workers is None else num_workers

    def validate(trained: torch.nn.Module) -> dict[str, Any]:
        on = next(trained.parameters()).device
        scored = evaluate(trained, data.val_set, classes, on, num_workers=workers)
        return {"accuracy": scored["accuracy"], "loss": scored["loss"]}

    has_validation = len(data.val_set) > 0
    t1 = time.perf_counter()
    outcome = train_model(
        model,
        data.train_set,
        plan,
        work / STATE_DIR,
        seed=seed,
        device=device,
        callbacks=callbacks,
        resume=resume,
        checkpoint_every=checkpoint_every,
        num_workers=workers,
        world_size=world_size,
        fingerprint=fingerprint,
        validate=validate if has_validation else None,
    )
    t2 = time.perf_counter()
    callbacks.on_progress(
        Progress(outcome.steps, plan.total_steps, outcome.last_loss, 0.0, 0.0, None, "evaluating")
    )
    dev = next(model.parameters()).device
    metrics = evaluate(model, data.val_set, classes, dev, num_workers=workers)
    if has_validation:
        final = {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}
        callbacks.on_validation(outcome.steps, final)
    if serving_precision == INT8:
        metrics["precision"] = int8_precision(
            model, data, plan.crop, out, model_name=architecture_of(base_model)
        )
    t3 = time.perf_counter()
    extra = {
        "seed": seed,
        "validation_fraction": validation_fraction,
        "dataset": data.facts(),
        "resumed_from": outcome.resumed_from,
        "from_scratch": from_scratch,
        "world_size": world_size,
        "device": str(dev),
        "timings": {
            "prepare_seconds": t1 - t0,
            "train_seconds": t2 - t1,
            "evaluate_seconds": t3 - t2,
            "train_images_per_second": outcome.images / outcome.seconds if outcome.images else None,
        },
        # Major.minor only: what loading the weights depends on, not the patch level that
        # would tell a downloader which known bugs the server has (bitcore.artifacts).
        "software": software_versions(),
    }
    meta = ArtifactMetadata(
        model_name=architecture_of(base_model),
        classes=classes,
        crop=plan.crop,
        plan=plan.to_dict(),
        metrics=metrics,
        base_model=None if from_scratch else base_model,
        extra=extra,
    )
    save_artifact(out, model, meta)  # it stores contiguous CPU copies
    state.clear(work / STATE_DIR)
    return FinetuneResult(
        out, metrics, outcome.steps, time.perf_counter() - t0, outcome.resumed_from
    )


def evaluate(
    model: torch.nn.Module,
    val_set: Any,
    classes: list[str],
    device: torch.device,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix and mean CE loss."""
    loader = DataLoader(
        val_set, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    labels, preds, loss = predict_batches(
        model,
        loader,
        device,
        autocast=uses_bf16_autocast(device),
        channels_last=device.type == "cuda",
    )
    metrics = classification_metrics(labels, preds, classes)
    metrics["loss"] = loss if len(labels) else None
    return metrics
