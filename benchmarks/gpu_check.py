"""Issue 13's GPU check: one short run on one NVIDIA GPU, one results file.

    bash benchmarks/gpu_check.sh                       # the device machine: results in $OUT
    python benchmarks/gpu_check.py --out gpu-results   # the same, by hand
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/x   # the test's CPU mode

Parts, each with its own time budget, each recorded as "ok" or "skipped" with the reason (an
error in one part is caught and recorded; the next part still runs):

  train    BiT-M-R50x1 at 128 and 480 px, bf16 autocast vs fp32: images/s of the engine's
           model (bitcore.models.create_model, GN + WS, zero head), optimizer (SGD, the rule's
           momentum), channels_last and cudnn.benchmark, on synthetic tensors (throughput does
           not depend on values); warm-up steps untimed, torch.cuda.synchronize every step.
  predict  bitcore.predict.Predictor at batch 1/8/32 (128 px, 10 classes): images/s and
           p50/p99 latency of predict_tensor (upload, forward, softmax, copy back); eager, and
           ONNX Runtime when its CUDA execution provider exists (the providers are reported).
  ddp      the same training step under DistributedDataParallel (nccl; gloo on CPU) in 2
           processes vs 1, each process on its own per-process batch: the scaling ratio is the
           2-process images/s over the 1-process one. With one GPU both ranks share it, which
           NCCL normally refuses ("Duplicate GPU"): then the part is skipped with its error.
  serve    benchmarks/serve_speed.py over HTTP, shortened (batching off vs on, 1 and 16 in
           flight), its table parsed into the results.

A global limit (default 470 s, under the issue's 8 minutes) is kept two ways: a part starts
only with enough time left and gets at most what remains, and a watchdog thread writes the
results (status "timed_out"), kills a running child and exits 3 if the limit passes anyway.
Without a GPU (and no --device) nothing is measured: the script says so, writes a results file
with status "no_gpu" and exits 0. The parts themselves are in gpu_check_parts.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from gpu_check_parts import (  # noqa: E402  (benchmarks/ is sys.path[0] for a script)
    FULL,
    QUICK,
    Children,
    part_ddp,
    part_predict,
    part_serve,
    part_train,
    rank_main,
)

RESULTS_NAME = "gpu_check.json"
NO_GPU = "no GPU: torch.cuda.is_available() is False; nothing measured"
# (name, budget s, least time worth starting it with). Sum 470: the global limit.
PARTS = (("train", 150, 30), ("predict", 80, 20), ("ddp", 110, 40), ("serve", 130, 45))
RESERVE_S = 5.0  # kept back for writing the results


class Run:
    """The results document, written after every part (a crash or a kill keeps what was done)."""

    def __init__(self, out_dir: Path, limit_s: float, doc: dict[str, Any]) -> None:
        self.path = out_dir / RESULTS_NAME
        self.started = time.monotonic()
        self.deadline = self.started + limit_s
        self.doc = doc
        self.lock = threading.Lock()
        self.children = Children()
        self.finished = False

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        with self.lock:
            self.doc["elapsed_s"] = round(time.monotonic() - self.started, 1)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.doc, indent=2) + "\n", encoding="utf-8")
            tmp.replace(self.path)

    def watchdog(self) -> None:
        """At the deadline: kill the running child, write what there is, exit 3. An in-process
        part cannot be interrupted (a CUDA call does not raise on a signal), so exit it is."""
        time.sleep(max(0.0, self.left()))
        if self.finished:
            return
        try:
            self.children.kill()
            self.doc["status"] = "timed_out"
            for part in list(self.doc["parts"].values()):
                if part["status"] == "running":
                    part.update(status="skipped", reason="the global time limit passed during it")
            self.write()
            print(markdown(self.doc), flush=True)
            print(f"gpu_check: global limit passed; partial results in {self.path}", flush=True)
        finally:  # even if the main thread changed the document under us: stop
            os._exit(3)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            nccl=str(torch.cuda.nccl.version()),
            bf16=torch.cuda.is_bf16_supported(),
            cudnn_tf32=torch.backends.cudnn.allow_tf32,  # fp32 convolutions run as TF32
        )
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError as exc:
        env["onnxruntime"] = f"not importable: {exc}"
    return env


def markdown(doc: dict[str, Any]) -> str:
    """The results as markdown tables (what RESULTS.md quotes)."""
    env = doc["environment"]
    where = env.get("gpu", env["device"])
    lines = [f"GPU check: status {doc['status']}, {where}, torch {env['torch']}"]
    for name, part in doc["parts"].items():
        why = f" ({part['reason']})" if part.get("reason") else ""
        lines.append(f"\n### {name}: {part['status']}{why}")
        rows: list[dict[str, Any]] = part.get("rows") or []
        if name == "ddp" and part["status"] == "ok":
            fields = ["backend", "precision", "per_process_batch", "one_process_images_per_s"]
            fields += ["two_process_images_per_s", "scaling_ratio"]
            rows = [{k: part[k] for k in fields}]
        if name == "predict":
            lines.append(f"onnxruntime providers: {part.get('providers')}")
            for runtime, info in part.get("runtimes", {}).items():
                lines.append(f"- {runtime}: {info}")
        if rows:
            keys = list(dict.fromkeys(k for row in rows for k in row))
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|---" * len(keys) + "|")
            for row in rows:
                values = (row.get(k, "") for k in keys)
                cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in values]
                lines.append("| " + " | ".join(cells) + " |")
        if part.get("bf16_over_fp32"):
            lines.append(f"bf16 / fp32 images/s by crop: {part['bf16_over_fp32']}")
    return "\n".join(lines)


def run_part(name: str, run: Run, device: torch.device, quick: bool, budget: float) -> dict:
    cfg = QUICK if quick else FULL
    if name == "train":
        return part_train(device, cfg, budget)
    if name == "predict":
        return part_predict(device, cfg, budget)
    if name == "ddp":
        return part_ddp(run.children, device, quick, budget)
    return part_serve(run.children, device, quick, budget)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    names = [p[0] for p in PARTS]
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-results")
    parser.add_argument("--device", help="force a device (cpu: the test's mode); default: GPU")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (tests)")
    parser.add_argument("--limit", type=float, default=470.0, help="global limit, seconds")
    parser.add_argument("--parts", nargs="+", default=names, choices=names)
    parser.add_argument("--ddp-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-init", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ddp_rank is not None:
        rank_main(args)
        return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = torch.device(args.device or ("cuda" if gpu else "cpu"))
    doc: dict[str, Any] = {
        "script": "benchmarks/gpu_check.py",
        "argv": sys.argv[1:],
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "limit_s": args.limit,
        "environment": environment(device),
        "parts": {},
    }
    run = Run(out_dir, args.limit, doc)
    if args.device is None and not gpu:
        doc.update(status="no_gpu", reason=NO_GPU)
        run.write()
        print(f"gpu_check: {NO_GPU} (torch {torch.__version__}, CUDA build {torch.version.cuda})")
        print(f"gpu_check: wrote {run.path}")
        return 0
    doc["status"] = "running"
    threading.Thread(target=run.watchdog, daemon=True).start()
    print(f"gpu_check: {device}, limit {args.limit:.0f} s, results in {run.path}", flush=True)
    for name, own, least in PARTS:
        if name not in args.parts:
            continue
        budget = min(own, run.left() - RESERVE_S)
        part: dict[str, Any] = {"status": "running", "budget_s": round(budget, 1)}
        doc["parts"][name] = part
        began = time.monotonic()
        if budget < least and not args.quick:
            reason = f"only {budget:.0f} s left of the global limit; it needs {least}"
            part.update(status="skipped", reason=reason)
        else:
            try:
                # A part may report itself skipped with partial figures (ddp: 1 process only).
                part.update({"status": "ok", **run_part(name, run, device, args.quick, budget)})
            except Exception as exc:  # recorded; the next part still runs
                part.update(status="skipped", reason=f"{type(exc).__name__}: {exc}"[:1000])
        part["seconds"] = round(time.monotonic() - began, 1)
        print(f"gpu_check: {name} {part['status']} in {part['seconds']} s", flush=True)
        run.write()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    run.finished = True
    doc["status"] = "complete"
    run.write()
    print(markdown(doc))
    print(f"\ngpu_check: wrote {run.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
