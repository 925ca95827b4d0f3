"""Atomic checkpoints that restore a run exactly."""

from __future__ import annotations

import random

import numpy as np
import torch

from workers.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from workers.training.lora import LoraSettings
from workers.training.reward import RewardConfig, build_reward_model


def _setup(tiny_model_dir, **config):
    torch.manual_seed(0)
    model, _ = build_reward_model(tiny_model_dir, RewardConfig(device="cpu", **config))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _train_steps(model, optimizer, scheduler, n: int) -> None:
    ids = torch.randint(3, 1000, (2, 12))
    for _ in range(n):
        loss = model(input_ids=ids).logits.square().mean() + sum(
            p.square().mean() for p in model.parameters() if p.requires_grad
        )
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tiny_model_dir, tmp_path):
    model, optimizer, scheduler = _setup(tiny_model_dir)
    _train_steps(model, optimizer, scheduler, 2)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {"position": 7, "history": [1.5]})
    assert path.name == "step-000002"
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    adam = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    lr = scheduler.get_last_lr()
    expected_draws = _draws()

    # move everything on, then restore into a freshly built model
    _train_steps(model, optimizer, scheduler, 3)
    fresh, fresh_opt, fresh_sched = _setup(tiny_model_dir)
    assert any(not torch.equal(weights[k], v) for k, v in fresh.state_dict().items())
    extra = load_checkpoint(path, fresh, fresh_opt, fresh_sched)

    assert extra == {"step": 2, "position": 7, "history": [1.5]}
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for key, value in fresh_opt.state_dict()["state"][0].items():
        assert torch.equal(value, adam[key]), key
    assert fresh_sched.get_last_lr() == lr
    assert _draws() == expected_draws


def test_round_trip_with_lora_restores_adapter_and_head(tiny_model_dir, tmp_path):
    model, optimizer, scheduler = _setup(tiny_model_dir, lora=LoraSettings(r=4))
    _train_steps(model, optimizer, scheduler, 2)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any("score" in n for n in trained)
    path = save_checkpoint(tmp_path, 2, model, optimizer, scheduler, {})
    fresh, fresh_opt, fresh_sched = _setup(tiny_model_dir, lora=LoraSettings(r=4))
    load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    restored = dict(fresh.named_parameters())
    for name, value in trained.items():
        assert torch.equal(restored[name], value), name


def test_keeps_the_last_two_and_ignores_incomplete_folders(tiny_model_dir, tmp_path):
    model, optimizer, scheduler = _setup(tiny_model_dir)
    assert latest_checkpoint(tmp_path / "none") is None
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010", "step-000015"]
    # a crash mid-save leaves a temp folder; a step folder without its extra.json is not complete
    (tmp_path / "tmp-deadbeef").mkdir()
    (tmp_path / "step-000099").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000015"
    save_checkpoint(tmp_path, 20, model, optimizer, scheduler, {})
    assert not (tmp_path / "tmp-deadbeef").exists()
    assert latest_checkpoint(tmp_path).name == "step-000020"
