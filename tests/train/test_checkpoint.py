"""Checkpoints without pickle: the state-tree files round-trip exactly, a saved and restored run continues exactly
as the run itself would, and pickle checkpoints of earlier versions are refused, never loaded."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffusion_accel.testing import assert_pickle_free
from diffusion_accel.train import checkpoint, run_folder, state_tree
from diffusion_accel.train.data import DataCursor


def test_state_tree_round_trips_what_state_dicts_hold(tmp_path):
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3).t()}},  # int keys, a view
             "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "fused": None, "params": [0]}],
             "python": random.getstate(), "numpy": np.random.get_state(), "mask": torch.tensor([True, False]),
             "nan": float("nan"), "huge": 2**70, "name": "x"}
    state_tree.save(tmp_path, "s", state)
    back = state_tree.load(tmp_path, "s")
    assert back["state"][0]["step"] == 3.0 and torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["param_groups"] == state["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    assert back["python"] == state["python"] and np.isnan(back["nan"]) and back["huge"] == 2**70
    numpy_back = back["numpy"]
    assert numpy_back[0] == "MT19937" and numpy_back[1].dtype == np.uint32
    assert all(np.array_equal(a, b) for a, b in zip(numpy_back, state["numpy"], strict=True))
    assert torch.equal(back["mask"], state["mask"])
    assert_pickle_free(tmp_path)

    with pytest.raises(TypeError, match="cannot store function at 'lr_lambdas/0'.*no pickle"):
        state_tree.save(tmp_path, "bad", {"lr_lambdas": [lambda step: 1.0]})


class _Weights:
    """A recipe's non-module checkpoint object (like HarmoniCa's IEPO weights)."""

    def __init__(self):
        self.values = torch.ones(4)

    def state_dict(self):
        return {"values": self.values.clone()}

    def load_state_dict(self, state):
        self.values = state["values"].clone()


def _run(seed: int):
    """A prepared model, AdamW, a warm-up/decay LR schedule, the data cursor and two recipe objects (a target
    network and a plain object)."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=10)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    target = torch.nn.Linear(3, 1).requires_grad_(False)
    objects = [DataCursor(0), target, _Weights()]
    return accelerator, model, optimizer, schedule, objects


def _step(model, optimizer, schedule, objects) -> None:
    """One optimizer step that uses every global generator (dropout: torch; the batch: numpy and python)."""
    x = torch.from_numpy(np.random.rand(4, 3).astype(np.float32)) * random.random()
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    schedule.step()
    cursor, target, weights = objects
    cursor.step += 1
    with torch.no_grad():
        target.weight.lerp_(model[0].weight[:1], 0.1)
    weights.values = weights.values * 0.9


def _snapshot(model, optimizer, schedule, objects) -> dict:
    cursor, target, weights = objects
    return {"model": {k: v.clone() for k, v in model.state_dict().items()}, "lr": schedule.get_last_lr(),
            "optimizer": optimizer.state_dict()["state"], "cursor": cursor.step,
            "target": target.weight.clone(), "weights": weights.values.clone(),
            "rng": (torch.rand(2), np.random.rand(2), random.random())}


def _assert_same(a: dict, b: dict) -> None:
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["lr"] == b["lr"] and a["cursor"] == b["cursor"]
    for i, moments in a["optimizer"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["optimizer"][i][name]), (i, name)
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["weights"], b["weights"])
    assert torch.equal(a["rng"][0], b["rng"][0]) and np.array_equal(a["rng"][1], b["rng"][1])
    assert a["rng"][2] == b["rng"][2]


def test_resume_restores_every_object_and_continues_exactly(tmp_path):
    accelerator, *run = _run(seed=0)
    for _ in range(3):
        _step(*run)
    checkpoint.save(accelerator, tmp_path, run[-1])
    for _ in range(2):
        _step(*run)
    straight = _snapshot(*run)

    accelerator, *resumed = _run(seed=1)  # other initial weights and generators
    checkpoint.load(accelerator, tmp_path, resumed[-1])
    assert resumed[-1][0].step == 3 and resumed[2].get_last_lr() != straight["lr"]
    for _ in range(2):
        _step(*resumed)
    _assert_same(straight, _snapshot(*resumed))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accelerator.json", "custom_checkpoint_0.json", "custom_checkpoint_1.json",
        "custom_checkpoint_1.safetensors", "custom_checkpoint_2.json", "custom_checkpoint_2.safetensors",
        "model.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "random_states_0.json",
        "random_states_0.safetensors", "scheduler.json"]
    assert_pickle_free(tmp_path)

    accelerator, *other = _run(seed=0)
    with pytest.raises(ValueError, match=r"missing: \['custom_checkpoint_3'\].*resume with the flags"):
        checkpoint.load(accelerator, tmp_path, [*other[-1], _Weights()])


def test_pickle_checkpoints_of_earlier_versions_are_refused(tmp_path):
    old = run_folder.checkpoint_path(tmp_path, 4)
    old.mkdir()
    run_folder.write_state(old, "lcd", 4)
    (old / "model.safetensors").write_bytes(b"")
    torch.save({"state": {}}, old / "optimizer.bin")
    (old / "random_states_0.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(ValueError, match=r"optimizer.bin, random_states_0.pkl: neither safetensors nor JSON.*"
                                         r"unpickling a file can run code.*--overwrite_output_dir"):
        run_folder.resolve_resume(tmp_path, "latest", "lcd")


def test_sharded_training_is_refused_before_any_work():
    from accelerate.utils import DistributedType

    for kind in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ValueError, match="replicated state.*--multi_gpu"):
            checkpoint.check_supported(SimpleNamespace(distributed_type=kind))
    checkpoint.check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))
