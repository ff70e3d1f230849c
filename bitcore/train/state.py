"""Training checkpoints: model + SGD momentum in safetensors, step and run identity in JSON.

No RNG state is stored: every random choice is keyed by (seed, step) (see `order`), so the
step number alone resumes the data order, augmentation and MixUp exactly.

Layout: <state_dir>/step-<NNNNNNNN>/{state.safetensors, state.json}. Each file is written
atomically (`bitcore.atomic`), the JSON last: a step directory without it is incomplete and
ignored, and the previous checkpoint is deleted only after the new one is complete, so a crash
leaves either the old or the new one.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bitcore.atomic import atomic_write, write_json_atomic

TENSORS_FILE = "state.safetensors"
META_FILE = "state.json"
PREFIX = "step-"
FORMAT = "bitserve-train-state"


class ResumeError(ValueError):
    """A checkpoint exists but belongs to a different run; the message says what differs."""


@dataclass(frozen=True)
class SavedState:
    step: int
    path: Path


def latest(state_dir: str | Path) -> SavedState | None:
    """The most advanced complete checkpoint, or None."""
    root = Path(state_dir)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        name = child.name
        complete = (child / TENSORS_FILE).is_file() and (child / META_FILE).is_file()
        if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() and complete:
            found.append(SavedState(int(name[len(PREFIX) :]), child))
    return max(found, key=lambda s: s.step) if found else None


def save(
    state_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: dict[str, Any],
) -> Path:
    """Write the state after `step` completed optimizer steps; keep only the newest one."""
    root = Path(state_dir)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    for index, slots in optim_state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{slot}"] = value.detach().cpu().contiguous()
    meta = {
        "format": FORMAT,
        "step": step,
        "fingerprint": fingerprint,
        "param_groups": optim_state["param_groups"],
        "saved_at": time.time(),
    }
    final = root / f"{PREFIX}{step:08d}"
    final.mkdir(exist_ok=True)
    # Saving the same step again (e.g. right after a resume): mark it incomplete first, so a
    # crash between the two writes cannot pair new tensors with the old JSON.
    (final / META_FILE).unlink(missing_ok=True)
    with atomic_write(final / TENSORS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(final / META_FILE, meta)  # last: its presence marks the step complete
    for child in root.iterdir():
        if child.name.startswith(PREFIX) and child != final:
            shutil.rmtree(child, ignore_errors=True)
    return final


def load(
    saved: SavedState,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    fingerprint: dict[str, Any],
) -> int:
    """Load a checkpoint into `model` and `optimizer` (strictly); returns its step."""
    meta = json.loads((saved.path / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ResumeError(f"{saved.path} is not a training checkpoint")
    if meta.get("fingerprint") != fingerprint:
        differs = sorted(
            k
            for k in set(fingerprint) | set(meta.get("fingerprint", {}))
            if fingerprint.get(k) != meta.get("fingerprint", {}).get(k)
        )
        raise ResumeError(
            f"checkpoint {saved.path} belongs to a different run (differs in {differs}); "
            "delete it or pass resume=False to start over"
        )
    tensors = _load_into_model(saved, model)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            slots.setdefault(int(index), {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
    return int(meta["step"])


def clear(state_dir: str | Path) -> None:
    shutil.rmtree(state_dir, ignore_errors=True)


def load_model(saved: SavedState, model: torch.nn.Module) -> None:
    """Only the model weights of a checkpoint (e.g. the final state written by DDP rank 0)."""
    _load_into_model(saved, model)


def _load_into_model(saved: SavedState, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Load the checkpoint's model weights strictly; returns all its tensors (on the model's
    device), optimizer slots included."""
    device = next(model.parameters()).device
    tensors = load_file(str(saved.path / TENSORS_FILE), device=str(device))
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state, strict=True)
    return tensors
