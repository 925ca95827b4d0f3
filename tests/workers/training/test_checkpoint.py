"""Atomic checkpoints that restore a run exactly."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tests.distributed_harness import spawn_group
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


def _sharded_train_steps(model, optimizer, scheduler, n: int) -> None:
    # only the root forward's output: sharded parameters cannot meet plain tensors outside it
    ids = torch.randint(3, 1000, (2, 12))
    for _ in range(n):
        model(input_ids=ids).logits.square().mean().backward()
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


# ---------------------------------------------------------------------------------------------
# sharded checkpoints on two real processes


def _sharded_round_trip(model_dir, root, lora: bool) -> dict:
    from workers.training.distributed import current_group, is_sharded, shard_model
    from workers.training.lora import TrainableState

    group = current_group()

    def build():
        torch.manual_seed(0)
        config = RewardConfig(device="cpu", lora=LoraSettings(r=4) if lora else None)
        model, _ = build_reward_model(model_dir, config)
        shard_model(model, group)
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        optimizer = torch.optim.AdamW(list(trained.values()), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
        # LoRA runs checkpoint only what trains, through the same TrainableState PPO and DPO use
        return model, (TrainableState(trained) if lora else model), optimizer, scheduler

    model, saved_model, optimizer, scheduler = build()
    _sharded_train_steps(model, optimizer, scheduler, 2)
    torch.manual_seed(100 + group.rank)  # each rank has its own RNG stream
    path = save_checkpoint(root, 2, saved_model, optimizer, scheduler, {"position": 3})
    local = {n: p.to_local().clone() for n, p in model.named_parameters() if p.requires_grad}
    adam = {
        i: {k: (v.to_local() if is_sharded(v) else v).clone() for k, v in s.items()}
        for i, s in enumerate(optimizer.state.values())
    }
    expected_draw = torch.rand(2).tolist()

    _sharded_train_steps(model, optimizer, scheduler, 2)  # move on, then restore into a fresh sharded model
    fresh, fresh_saved, fresh_opt, fresh_sched = build()
    assert latest_checkpoint(root) == path
    extra = load_checkpoint(path, fresh_saved, fresh_opt, fresh_sched)
    draw_equal = torch.rand(2).tolist() == expected_draw
    lr_restored = fresh_sched.get_last_lr() == [1e-3 / 3]
    params_equal = all(
        torch.equal(p.to_local(), local[n]) for n, p in fresh.named_parameters() if p.requires_grad
    )
    state_equal, state_sharded = True, True
    for i, s in enumerate(fresh_opt.state.values()):
        for k, v in s.items():
            if k != "step":
                state_sharded &= is_sharded(v)
            state_equal &= torch.equal(v.to_local() if is_sharded(v) else v, adam[i][k])
    # the restored optimizer state must also step: a sharded parameter needs DTensor state
    _sharded_train_steps(fresh, fresh_opt, fresh_sched, 1)
    return {
        "rank": group.rank,
        "extra": extra,
        "files": sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()),
        "params_equal": params_equal,
        "state_equal": state_equal,
        "state_sharded": state_sharded,
        "draw_equal": draw_equal,
        "lr": lr_restored,
    }


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_write_and_restore_their_own_shards(tiny_model_dir, tmp_path, lora):
    results = spawn_group(_sharded_round_trip, 2, tiny_model_dir, tmp_path, lora)
    for result in results:
        assert result["extra"] == {"step": 2, "position": 3}
        assert result["params_equal"] and result["state_equal"] and result["state_sharded"], result
        assert result["draw_equal"] and result["lr"]
    files = results[0]["files"]
    assert "extra.json" in files and "scheduler.pt" in files
    assert {f for f in files if f.startswith("rank-")} == {
        f"rank-0000{r}/{name}" for r in (0, 1) for name in ("model.pt", "optimizer.pt", "rng.pt", "rng.json")
    }
    assert json.loads((tmp_path / "step-000002" / "extra.json").read_text())["world_size"] == 2


def test_resuming_with_another_number_of_processes_is_refused(tiny_model_dir, tmp_path):
    model, optimizer, scheduler = _setup(tiny_model_dir)
    path = save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {})
    message = spawn_group(_resume_with_model, 2, tiny_model_dir, path)[0]
    assert "written by 1 training process(es) and this run has 2" in message
    (path / "extra.json").write_text(json.dumps({"step": 1, "world_size": 2}))
    with pytest.raises(ValueError, match="written by 2 training process"):
        load_checkpoint(path, model, optimizer, scheduler)


def _resume_with_model(model_dir, path) -> str:
    from workers.training.distributed import current_group

    torch.manual_seed(0)
    model, _ = build_reward_model(model_dir, RewardConfig(device="cpu"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    try:
        load_checkpoint(path, model, optimizer, scheduler, current_group())
    except ValueError as exc:
        return str(exc)
    return "loaded"
