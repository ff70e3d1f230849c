"""bitcore.train.state: checkpoints written file by file, the JSON last as the completion mark."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bitcore.models import create_model
from bitcore.train import state


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = create_model("tiny-R10x0.25", 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_save_keeps_the_newest_complete_step_readable(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(seed=0)
    state.save(tmp_path, 1, model, optimizer, {"run": "a"})
    final = state.save(tmp_path, 2, model, optimizer, {"run": "a"})
    assert final == tmp_path / "step-00000002"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
    assert sorted(p.name for p in final.iterdir()) == ["state.json", "state.safetensors"]
    assert [p.stat().st_mode & 0o777 for p in final.iterdir()] == [0o600, 0o600]
    assert state.latest(tmp_path) == state.SavedState(2, final)


def test_a_step_without_its_json_is_incomplete(tmp_path: Path) -> None:
    model, optimizer = _model_and_optimizer(seed=0)
    first = state.save(tmp_path, 1, model, optimizer, {})
    crashed = tmp_path / "step-00000002"  # as if the process died before writing its JSON
    crashed.mkdir()
    shutil.copy(first / "state.safetensors", crashed / "state.safetensors")
    assert state.latest(tmp_path) == state.SavedState(1, first)


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    first, optimizer = _model_and_optimizer(seed=0)
    state.save(tmp_path, 3, first, optimizer, {})
    second, optimizer = _model_and_optimizer(seed=1)
    state.save(tmp_path, 3, second, optimizer, {})
    saved = state.latest(tmp_path)
    assert saved == state.SavedState(3, tmp_path / "step-00000003")
    check, check_optimizer = _model_and_optimizer(seed=2)
    assert state.load(saved, check, check_optimizer, {}) == 3
    for name, tensor in check.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
