"""The parts of benchmarks/gpu_check.py (read its docstring): train, predict, ddp, serve.

Each part function takes the device, its configuration (FULL, or QUICK for the test's CPU
mode) and a time budget in seconds, and returns the part's results (a dict) or raises; the
driver records a raise as the part skipped, with the error as the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist
from torch.nn import functional as F

from bitcore.devices import uploads_pinned, uses_bf16_autocast
from bitcore.hyperrule import MOMENTUM
from bitcore.models import create_model
from bitcore.runtimes import OnnxRuntimeForward

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "benchmarks" / "gpu_check.py"  # a DDP rank is the driver run with --ddp-rank
NUM_CLASSES = 10
FULL: dict[str, Any] = {
    "model": "BiT-M-R50x1",
    "train": ((128, 128), (480, 32)),  # (crop, batch)
    "train_steps": (3, 20),  # (warm-up, at most timed)
    "predict_crop": 128,
    "predict_batches": (1, 8, 32),
    "predict_calls": (3, 300),
    "ddp": (128, 64, 3, 20),  # (crop, per-process batch, warm-up, timed)
    # serve_speed.py's options: batching off vs on (no queue delay), 1 and 16 in flight.
    "serve": "--model BiT-M-R50x1 --crop 128 --requests 128 --rounds 2 --warmup 8"
    " --concurrency 1 16 --delays 0 --threads 4",
}
QUICK: dict[str, Any] = {  # --quick: the test's CPU mode, a tiny model; every code path, few steps
    "model": "tiny-R10x0.25",
    "train": ((32, 4), (48, 2)),
    "train_steps": (1, 2),
    "predict_crop": 32,
    "predict_batches": (1, 8, 32),
    "predict_calls": (1, 3),
    "ddp": (32, 2, 1, 2),
    "serve": "--model tiny-R10x0.25 --crop 32 --requests 4 --rounds 1 --warmup 1"
    " --concurrency 1 --delays 0",
}


class Children:
    """The child processes a part is waiting on, each the leader of its own session
    (start_new_session): killing its group also ends what it started (serve_speed.py's
    servers). The driver's watchdog kills them too."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def kill(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self.procs = []


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], None], warmup: int, most: int, seconds: float) -> list[float]:
    """Seconds of each timed call of `step` (which must synchronize): `warmup` untimed calls,
    then up to `most` timed ones, stopping early (after at least one) past `seconds`."""
    for _ in range(warmup):
        step()
    times: list[float] = []
    stop = time.perf_counter() + seconds
    while len(times) < most and (not times or time.perf_counter() < stop):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return times


def train_step_fn(
    model: torch.nn.Module, device: torch.device, crop: int, batch: int, bf16: bool
) -> Callable[[], None]:
    """One training step as the engine runs it (bitcore.train.loop): channels_last input on
    CUDA, bf16 autocast or none, float32 cross-entropy, SGD with the rule's momentum."""
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = (torch.rand(batch, 3, crop, crop, device=device) * 2 - 1).contiguous(memory_format=fmt)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=MOMENTUM, weight_decay=0.0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
        sync(device)

    return step


def engine_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, zero_head=True).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model.train()


def part_train(device: torch.device, cfg: dict[str, Any], budget: float) -> dict[str, Any]:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine: fixed shapes
    warmup, most = cfg["train_steps"]
    cases = [(c, b, bf16) for c, b in cfg["train"] for bf16 in (True, False)]
    stop = time.monotonic() + budget
    rows = []
    for index, (crop, batch, bf16) in enumerate(cases):
        row: dict[str, Any] = {"model": cfg["model"], "crop": crop, "batch": batch}
        row["precision"] = "bf16 autocast" if bf16 else "fp32"
        share = (stop - time.monotonic()) / (len(cases) - index)
        model: torch.nn.Module | None = None
        try:
            if share < 2:
                raise TimeoutError("no time left in the part's budget")
            model = engine_model(cfg["model"], device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            # The warm-up (cuDNN autotuning) takes part of the share; the timed steps half.
            times = timed(train_step_fn(model, device, crop, batch, bf16), warmup, most, share / 2)
            row.update(status="ok", steps=len(times), images_per_s=batch * len(times) / sum(times))
            row["step_ms_median"] = 1000 * statistics.median(times)
            if device.type == "cuda":
                row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        except Exception as exc:  # one case's failure (e.g. out of memory) is that row's only
            row.update(status="skipped", reason=f"{type(exc).__name__}: {exc}"[:500])
        finally:
            model = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    ratios = {}
    for crop, _ in cfg["train"]:
        got = {r["precision"]: r.get("images_per_s", 0.0) for r in rows if r["crop"] == crop}
        if got["fp32"] and got["bf16 autocast"]:
            ratios[str(crop)] = got["bf16 autocast"] / got["fp32"]
    return {"rows": rows, "bf16_over_fp32": ratios}


def part_predict(device: torch.device, cfg: dict[str, Any], budget: float) -> dict[str, Any]:
    from bitcore.predict import Predictor

    crop, (warmup, most) = cfg["predict_crop"], cfg["predict_calls"]
    torch.manual_seed(0)
    model = create_model(cfg["model"], NUM_CLASSES)
    classes = [f"class{i}" for i in range(NUM_CLASSES)]
    runtimes: dict[str, str | None] = {"torch": None, "onnxruntime": None}  # None: measure
    out: dict[str, Any] = {"providers": None, "runtimes": {}, "rows": []}
    # bitcore.devices.to_device: eager predictions upload through pinned memory on CUDA.
    out["uploads_pinned"] = uploads_pinned(device)
    try:
        import onnxruntime as ort

        out["providers"] = ort.get_available_providers()
        if device.type == "cuda" and "CUDAExecutionProvider" not in out["providers"]:
            runtimes["onnxruntime"] = "no CUDAExecutionProvider in this onnxruntime (-gpu build)"
    except ImportError as exc:
        runtimes["onnxruntime"] = f"onnxruntime not importable: {exc}"
    stop = time.monotonic() + budget
    for runtime, skip in runtimes.items():
        info: dict[str, Any] = {"status": "skipped", "reason": skip}
        out["runtimes"][runtime] = info
        if skip is not None:
            continue
        try:
            predictor = Predictor.from_model(
                model, classes, crop, device, model_name=cfg["model"], runtime=runtime
            )
            info.update(status="ok", reason=None, autocast=predictor.autocast)
            onnx = predictor._onnx
            if isinstance(onnx, OnnxRuntimeForward):
                info.update(session_providers=onnx.session.get_providers())
            if onnx is not None:
                info.update(load_check_max_diff=predictor.runtime_max_diff)
            for batch in cfg["predict_batches"]:
                inputs = torch.rand(batch, 3, crop, crop) * 2 - 1  # preprocessed, on the CPU
                share = max(0.5, (stop - time.monotonic()) / 8)

                def call(p: Predictor = predictor, x: torch.Tensor = inputs) -> None:
                    p.predict_tensor(x)  # returns CPU probabilities: synchronous

                times = timed(call, warmup, most, share)
                ms = sorted(1000 * t for t in times)
                out["rows"].append(
                    {
                        "runtime": runtime,
                        "batch": batch,
                        "calls": len(times),
                        "images_per_s": batch * len(times) / sum(times),
                        "p50_ms": statistics.median(ms),
                        "p99_ms": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
                    }
                )
        except Exception as exc:
            info.update(status="skipped", reason=f"{type(exc).__name__}: {exc}"[:500])
    return out


def rank_main(args: argparse.Namespace) -> None:
    """One DDP rank (a child process): time the engine's step under DDP, print a JSON line."""
    rank, world = args.ddp_rank, args.ddp_world
    cfg = QUICK if args.quick else FULL
    crop, batch, warmup, most = cfg["ddp"]
    cuda = args.device.startswith("cuda")
    if cuda:
        # One GPU: both ranks on it (NCCL decides whether it allows that).
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if cuda else {}
    dist.init_process_group(
        backend, init_method=args.ddp_init, rank=rank, world_size=world, **kwargs
    )
    try:
        model = engine_model(cfg["model"], device)
        ids = [device.index] if cuda else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        step = train_step_fn(net, device, crop, batch, uses_bf16_autocast(device))
        for _ in range(warmup):
            step()
        dist.barrier()
        began = time.perf_counter()
        for _ in range(most):
            step()
        seconds = time.perf_counter() - began
        result = {
            "rank": rank,
            "steps": most,
            "seconds": seconds,
            "images_per_s": most * batch / seconds,
        }
        print(json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


def run_ranks(
    children: Children, device: torch.device, quick: bool, world: int, seconds: float
) -> list[dict[str, Any]]:
    """Start `world` rank processes; their JSON results, or RuntimeError with the first
    failure (the other ranks are killed at once rather than left waiting at a collective)."""
    from bitcore.train.distributed import free_tcp_init_method

    base = [sys.executable, str(DRIVER), "--device", str(device), "--ddp-world", str(world)]
    base += ["--ddp-init", free_tcp_init_method()] + (["--quick"] if quick else [])
    stop, error, results = time.monotonic() + seconds, None, []
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(world)]
        stack.callback(children.kill)
        procs = children.procs = [
            subprocess.Popen(
                [*base, "--ddp-rank", str(r)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            for r, log in enumerate(logs)
        ]

        def log_of(rank: int) -> str:
            logs[rank].seek(0)
            return logs[rank].read()

        while error is None and any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                rank = failed[0]
                error = f"rank {rank} exit {procs[rank].returncode}: {_last_lines(log_of(rank))}"
            elif time.monotonic() > stop:
                error = f"{world} process(es) did not finish in {seconds:.0f} s"
            time.sleep(0.1)
        for rank, proc in enumerate(procs):
            if error is None and proc.returncode != 0:
                error = f"rank {rank} exit {proc.returncode}: {_last_lines(log_of(rank))}"
            if error is None:
                # The rank's result is its last JSON line (warnings may follow it).
                found = [s for s in log_of(rank).splitlines() if s.startswith('{"rank"')]
                results.append(json.loads(found[-1]))
    if error is not None:
        raise RuntimeError(error)
    return results


def part_ddp(
    children: Children, device: torch.device, quick: bool, budget: float
) -> dict[str, Any]:
    cfg = QUICK if quick else FULL
    crop, batch, _, steps = cfg["ddp"]
    out: dict[str, Any] = {"crop": crop, "per_process_batch": batch, "steps": steps}
    out["backend"] = "nccl" if device.type == "cuda" else "gloo"
    out["precision"] = "bf16 autocast" if uses_bf16_autocast(device) else "fp32"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        out["gpus"] = count
        if count < 2:
            out["note"] = "1 GPU: both processes share it, if NCCL allows that"
    began = time.monotonic()

    def ranks(world: int, seconds: float) -> list[dict[str, Any]]:
        try:
            return run_ranks(children, device, quick, world, seconds)
        except RuntimeError as exc:
            # The rendezvous port is picked free, then bound by rank 0: another process may
            # take it in between. Once more on a fresh port, then the error stands.
            if "address already in use" not in str(exc).lower():
                raise
            return run_ranks(children, device, quick, world, seconds)

    one = ranks(1, budget * 0.4)
    out["one_process_images_per_s"] = one[0]["images_per_s"]
    try:
        two = ranks(2, budget - (time.monotonic() - began))
    except RuntimeError as exc:
        # E.g. NCCL refusing two ranks on one GPU: the 1-process figure is kept.
        return {**out, "status": "skipped", "reason": f"2 processes: {exc}"[:1000]}
    out["two_process_images_per_s"] = sum(r["images_per_s"] for r in two)
    out["scaling_ratio"] = out["two_process_images_per_s"] / out["one_process_images_per_s"]
    return out


def part_serve(
    children: Children, device: torch.device, quick: bool, budget: float
) -> dict[str, Any]:
    script = ROOT / "benchmarks" / "serve_speed.py"
    args = (QUICK if quick else FULL)["serve"].split()
    command = [sys.executable, str(script), *args]
    env = {**os.environ, "BITSERVE_DEVICE": str(device)}
    runtime = os.environ.get("BITSERVE_PREDICT_RUNTIME")
    if runtime is None and device.type == "cuda":
        # The serving default, onnxruntime, runs on the CPU without a CUDA execution provider:
        # then eager on the GPU (whose bf16 answers serve_speed.py may refuse: its check
        # compares with fp32 within 1e-4; the error then says so).
        runtime = "onnxruntime" if _has_cuda_provider() else "torch"
    if runtime is not None:
        env["BITSERVE_PREDICT_RUNTIME"] = runtime
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    children.procs = [proc]
    try:
        out, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"serve_speed.py did not finish in {budget:.0f} s") from None
    finally:
        children.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"serve_speed.py exit {proc.returncode}: " + _last_lines(out))
    lines = [line for line in out.splitlines() if line.startswith("|")]
    header = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in lines[2:]
    ]
    command_line = " ".join(["python", "benchmarks/serve_speed.py", *args])
    return {"command": command_line, "server_runtime": runtime or "default", "rows": rows}


def _has_cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _last_lines(text: str, count: int = 6) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-count:])[-800:]
