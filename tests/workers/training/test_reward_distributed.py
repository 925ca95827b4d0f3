"""Reward-model training on two real gloo processes is the single-process run: same per-step losses,
same final metrics, same published weights, and an interrupted two-process run resumes to the same end.

Tolerances: the two processes sum the same numbers in another order (each rank's share of a batch,
then the all-reduce), so results agree to float32 rounding, amplified a little by Adam over the
steps: losses and metrics within rel 1e-4 / abs 1e-5, published weights within abs 1e-4.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file

from app.common.files import sha256_folder
from app.common.reporting import MemoryReporter, RunCancelled
from tests.distributed_harness import spawn_group
from tests.workers.training.test_reward import StopAfter, marker_rankings
from workers.training.checkpoint import latest_checkpoint
from workers.training.data import group_batches, split_by_prompt
from workers.training.lora import LoraSettings
from workers.training.reward import REWARD_STATS_FILE, RewardConfig, train_reward_model

CONFIG = dict(
    learning_rate=1e-3,
    epochs=2,
    max_pairs_per_batch=4,  # two rankings of two pairs: one per rank, and a last batch of one ranking
    eval_fraction=0.25,
    warmup_ratio=0.1,
    log_every=1,
    checkpoint_every=1000,
    max_length=48,
    device="cpu",
)
RTOL, ATOL, WEIGHT_ATOL = 1e-4, 1e-5, 1e-4


def _comparisons():
    return marker_rankings(6)  # 12 comparisons in rankings of 2 pairs; 3 steps an epoch


def _comparable(rows: dict) -> dict:
    return {key: value for key, value in rows.items() if key[1] != "examples_per_s"}  # wall clock


def _train(model_dir, out, ckpt, config: dict, stop_after: int | None) -> dict:
    reporter = StopAfter(stop_after) if stop_after else MemoryReporter()
    try:
        result = train_reward_model(model_dir, _comparisons(), out, ckpt, RewardConfig(**config), reporter)
    except RunCancelled:
        return {"cancelled": True, "rows": reporter.rows, "progress": reporter.progress_log}
    return {
        "cancelled": False,
        "rows": reporter.rows,
        "progress": reporter.progress_log,
        "result": asdict(result),
    }


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rm-one")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = _train(tiny_model_dir, root / "rm", root / "ckpt", CONFIG, None)
    finally:
        torch.set_num_threads(before)
    return run, root / "rm"


def _max_abs(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) for k in b)


def test_the_data_splits_unevenly_over_two_processes():
    # what the comparisons below exercise: a step whose second rank has no ranking of its own
    train, val = split_by_prompt(_comparisons(), CONFIG["eval_fraction"], 0)
    batches = group_batches(train, CONFIG["max_pairs_per_batch"], 0, 0)
    assert [len({c.group_id for c in b}) for b in batches] == [2, 2, 1]
    assert val and len(group_batches(val, CONFIG["max_pairs_per_batch"], 0, 0)) % 2 == 1  # padded eval


def test_two_processes_train_the_same_reward_model_as_one(one_process, tiny_model_dir, tmp_path):
    single, single_out = one_process
    first, second = spawn_group(_train, 2, tiny_model_dir, tmp_path / "rm", tmp_path / "ckpt", CONFIG, None)

    # rank 0 reported every step; rank 1 reported nothing but returns the same result
    assert not second["rows"] and not second["progress"]
    assert first["result"] == second["result"]
    rows, reference = _comparable(first["rows"]), _comparable(single["rows"])
    assert rows.keys() == reference.keys()
    print("max abs difference of reported values:", _max_abs(rows, reference))
    assert rows == pytest.approx(reference, rel=RTOL, abs=ATOL)
    result, expected = first["result"], single["result"]
    assert result["steps"] == expected["steps"]
    assert result["metrics"] == pytest.approx(expected["metrics"], rel=RTOL, abs=ATOL)

    # one plain published folder, written by rank 0, with the same weights and statistics
    out = tmp_path / "rm"
    assert result["sha256"] == sha256_folder(out)
    assert not any(p.name.startswith("rank-") for p in out.iterdir())
    stats = json.loads((out / REWARD_STATS_FILE).read_text())
    assert stats["mean"] == pytest.approx(result["metrics"]["reward_mean"])
    trained, reference_weights = (
        load_file(str(out / "model.safetensors")),
        load_file(str(single_out / "model.safetensors")),
    )
    assert trained.keys() == reference_weights.keys()
    diff = max(float((trained[k] - reference_weights[k]).abs().max()) for k in trained)
    print("max abs difference of published weights:", diff)
    assert diff <= WEIGHT_ATOL


def test_an_interrupted_two_process_run_resumes_to_the_same_end(one_process, tiny_model_dir, tmp_path):
    single, _ = one_process
    config = {**CONFIG, "checkpoint_every": 2}
    args = (tiny_model_dir, tmp_path / "rm", tmp_path / "ckpt", config)
    first = spawn_group(_train, 2, *args, 3)  # stops before step 4: the checkpoint of step 2 stays
    assert all(run["cancelled"] for run in first)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-000002"
    assert json.loads((tmp_path / "ckpt" / "step-000002" / "extra.json").read_text())["world_size"] == 2
    assert not (tmp_path / "rm").exists()

    resumed = spawn_group(_train, 2, *args, None)
    assert resumed[0]["result"] == resumed[1]["result"]
    assert resumed[0]["progress"][0][0] == 3  # went on from the checkpoint
    result, expected = resumed[0]["result"], single["result"]
    assert result["steps"] == expected["steps"]
    assert result["metrics"] == pytest.approx(expected["metrics"], rel=RTOL, abs=ATOL)
    later = {k: v for k, v in _comparable(resumed[0]["rows"]).items()}
    assert later == pytest.approx(
        {k: v for k, v in _comparable(single["rows"]).items() if k[0] >= 3}, rel=RTOL, abs=ATOL
    )


def test_two_processes_train_the_same_lora_reward_model_as_one(tiny_model_dir, tmp_path):
    config = {**CONFIG, "epochs": 1, "lora": LoraSettings(r=4)}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _train(tiny_model_dir, tmp_path / "one", tmp_path / "one-ckpt", config, None)
    finally:
        torch.set_num_threads(before)
    first, _ = spawn_group(_train, 2, tiny_model_dir, tmp_path / "rm", tmp_path / "ckpt", config, None)
    assert _comparable(first["rows"]) == pytest.approx(_comparable(single["rows"]), rel=RTOL, abs=ATOL)
    assert first["result"]["metrics"] == pytest.approx(single["result"]["metrics"], rel=RTOL, abs=ATOL)
    # LoRA merged on publishing: a plain model with the same weights as one process publishes
    assert not (tmp_path / "rm" / "adapter_config.json").exists()
    trained, expected = (
        load_file(str(tmp_path / "rm" / "model.safetensors")),
        load_file(str(tmp_path / "one" / "model.safetensors")),
    )
    assert trained.keys() == expected.keys()
    diff = max(float((trained[k] - expected[k]).abs().max()) for k in trained)
    print("max abs difference of published LoRA-merged weights:", diff)
    assert diff <= WEIGHT_ATOL
