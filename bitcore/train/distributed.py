"""DistributedDataParallel on one node: one process per device, spawned by torch.multiprocessing.

GroupNorm + Weight Standardization have no batch statistics (docs/bit.md), so ranks need no SyncBN:
each rank takes its slice of every micro-batch and DDP averages the gradients, which gives the
same update as one process on the whole batch. Backend nccl on CUDA, gloo on CPU.

The caller's callbacks stay in the parent process: rank 0 sends progress and checkpoint events
over a queue, and the parent relays a cancel request to the ranks through an event that rank 0
polls (ranks then agree by an all-reduce, see loop._Context).
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import distributed as dist
from torch import multiprocessing as mp

from bitcore.cpus import available_cpus
from bitcore.train.callbacks import Progress, TrainCallbacks, TrainingCancelled
from bitcore.train.loop import LoopConfig, LoopOutcome, run_loop, to_channels_last
from bitcore.train.microbatch import choose_micro_batch_size

PARENT_POLL_SECONDS = 0.2


@dataclass
class RankJob:
    """Everything a rank needs; pickled into each spawned process."""

    model: torch.nn.Module  # on the CPU; every rank starts from these exact weights
    train_set: Any
    config: LoopConfig  # micro_batch_size 0: each rank probes, the smallest choice wins
    device_type: str  # "cuda" or "cpu"
    init_method: str


def run_distributed(
    job: RankJob, world_size: int, callbacks: TrainCallbacks, *, timeout_s: float | None = None
) -> LoopOutcome:
    """Run `job` on `world_size` ranks; returns rank 0's outcome or raises TrainingCancelled."""
    ctx = mp.get_context("spawn")
    events: Any = ctx.Queue()
    cancel = ctx.Event()
    procs = mp.start_processes(
        _rank_main,
        args=(world_size, job, events, cancel),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    outcome: LoopOutcome | None = None
    cancelled_at: int | None = None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last_poll = 0.0
    done = False
    while not done:
        done = procs.join(timeout=PARENT_POLL_SECONDS)
        for kind, payload in _drain(events):
            if kind == "progress":
                callbacks.on_progress(payload)
            elif kind == "checkpoint":
                callbacks.on_checkpoint(payload)
            elif kind == "done":
                outcome = payload
            elif kind == "cancelled":
                cancelled_at = payload
        if not cancel.is_set() and time.monotonic() - last_poll >= PARENT_POLL_SECONDS:
            last_poll = time.monotonic()
            if callbacks.should_cancel():
                cancel.set()
        if deadline is not None and time.monotonic() > deadline:
            for p in procs.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"distributed training did not finish in {timeout_s} s")
    if cancelled_at is not None:
        raise TrainingCancelled(cancelled_at)
    if outcome is None:
        raise RuntimeError("rank 0 exited without reporting an outcome")
    return outcome


def free_tcp_init_method() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def _drain(events: Any) -> list[tuple[str, Any]]:
    out = []
    while True:
        try:
            out.append(events.get_nowait())
        except queue.Empty:
            return out


class _RankReporter(TrainCallbacks):
    def __init__(self, events: Any, cancel: Any) -> None:
        self.events = events
        self.cancel = cancel

    def on_progress(self, progress: Progress) -> None:
        self.events.put(("progress", progress))

    def should_cancel(self) -> bool:
        return bool(self.cancel.is_set())

    def on_checkpoint(self, step: int) -> None:
        self.events.put(("checkpoint", step))


def _rank_main(rank: int, world_size: int, job: RankJob, events: Any, cancel: Any) -> None:
    # torch.multiprocessing hands CPU tensors to spawned processes in shared memory: without a
    # private copy every rank's optimizer would update the same weights (measured: 2x steps).
    # Copied before the rendezvous below, so no rank trains while another is still copying.
    model = copy.deepcopy(job.model)
    cuda = job.device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        torch.backends.cudnn.benchmark = True  # fixed shapes, as in the single-process path
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, available_cpus() // world_size))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=job.init_method,
        rank=rank,
        world_size=world_size,
        device_id=device if cuda else None,
    )
    try:
        model = model.to(device)
        if job.config.channels_last:
            model = to_channels_last(model)
        config = job.config
        if config.micro_batch_size == 0:
            config = dataclasses.replace(
                config, micro_batch_size=_agree_micro(model, job, device, world_size)
            )
        reporter = _RankReporter(events, cancel)
        try:
            outcome = run_loop(
                model, job.train_set, config, device, reporter, rank=rank, world_size=world_size
            )
        except TrainingCancelled as stop:
            if rank == 0:
                events.put(("cancelled", stop.step))
            return
        if rank == 0:
            events.put(("done", outcome))
    finally:
        dist.destroy_process_group()


def _agree_micro(
    model: torch.nn.Module, job: RankJob, device: torch.device, world_size: int
) -> int:
    plan = job.config.plan
    mine = choose_micro_batch_size(
        model,
        plan.batch_size,
        plan.crop,
        device,
        world_size=world_size,
        autocast=job.config.autocast,
        channels_last=job.config.channels_last,
    )
    t = torch.tensor([mine], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
