"""Resource faults of a training run, told apart from bugs: a full disk and running out of memory.

Both fail the job with a code the user can act on (docs/api.md, "Jobs"), instead of the generic
`training_error`, and leave the worker healthy for its next job:

- a full disk (ENOSPC/EDQUOT, however the writer reported it: bitcore.atomic.is_disk_full)
  while writing checkpoints, caches or the artifact -> `insufficient_storage`;
- out of memory -> `out_of_memory`, with the micro-batch to try next. torch on the CPU raises a
  RuntimeError ("DefaultCPUAllocator: can't allocate memory"), numpy and Python a MemoryError,
  CUDA a torch.cuda.OutOfMemoryError (a RuntimeError too). The memory itself is released once
  the exception (and the frames its traceback holds, full of activations) is gone:
  `release_memory` then collects and hands cached CUDA blocks back.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import torch

from bitcore import catalog
from bitcore.atomic import is_disk_full
from bitcore.train.microbatch import CPU_MICRO_BATCH, power_of_two_divisors
from service.settings import Settings

_OOM_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` (or the exception it was raised from) is an allocation that failed."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return True
        if isinstance(current, RuntimeError) and any(
            words in str(current).lower() for words in _OOM_WORDS
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def resource_failure(exc: BaseException, plan: dict[str, Any]) -> tuple[str, str] | None:
    """(code, message) for a resource fault, None for anything else."""
    if is_out_of_memory(exc):
        return "out_of_memory", out_of_memory_message(plan)
    if is_disk_full(exc):
        return (
            "insufficient_storage",
            "the server's disk is full: training could not write its checkpoints or model, "
            "and nothing of it was kept. Submit the job again once space has been freed.",
        )
    return None


def out_of_memory_message(plan: dict[str, Any]) -> str:
    batch = int(plan.get("batch_size") or 1)
    crop = plan.get("crop")
    given = plan.get("micro_batch_size")
    # Unset: chosen at run time, on the CPU as the engine chooses it (bitcore.train.microbatch).
    used = int(given) if given else power_of_two_divisors(batch, CPU_MICRO_BATCH)[0]
    how = "" if given else " (chosen automatically)"
    smaller = [d for d in range(used // 2, 0, -1) if batch % d == 0]
    if smaller:
        advice = (
            f"submit the job again with a smaller micro_batch_size override, e.g. "
            f'"micro_batch_size": {smaller[0]} (it must divide batch_size {batch}); the '
            "result is the same, only slower"
        )
    else:
        advice = "micro_batch_size is already 1: use a smaller crop or base model"
    return (
        f"training ran out of memory with micro_batch_size {used}{how} at {crop} px crops; {advice}"
    )


def release_memory() -> None:
    """Return what a failed run held: Python garbage, and CUDA's cached blocks."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def internal_error_message(error_id: str) -> str:
    return (
        f"training stopped on an internal error (error id {error_id}); the worker's log has "
        "its details under that id. Submit the job again, or report the id to the operator."
    )


def checkpoint_missing_message(name: str, path: Path, settings: Settings, why: str) -> str:
    """What a user (and their operator) can do, naming no directory of the server's."""
    url = catalog.get_entry(name).url(settings.checkpoint_base_url)
    return (
        f"the {name} checkpoint is not on the server ({why}). An operator downloads {url} and "
        f"saves it as {path.name} in the server's checkpoint directory (BITSERVE_CHECKPOINT_DIR)."
    )
