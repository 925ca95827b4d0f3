"""DPO on two real gloo processes is the single-process run: same per-step metrics, same held-out
results, same published policy, and an interrupted two-process run resumes to the same end.

Tolerances: the two processes add the same numbers in another order (each rank's share of a batch,
then the all-reduce of the gradients), so results agree to float32 rounding, amplified a little by
Adam over the steps: metrics within rel 1e-4 / abs 1e-5, published weights within abs 1e-4.
"""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from app.common.files import sha256_folder
from app.common.reporting import MemoryReporter, RunCancelled
from tests.distributed_harness import spawn_group
from tests.workers.training.test_dpo import StopAfter, comparisons, small_config, weights
from workers.training.checkpoint import latest_checkpoint
from workers.training.data import split_by_prompt
from workers.training.dpo import train_dpo
from workers.training.lora import LoraSettings

# 9 training pairs in steps of 4: the last step of an epoch has one pair, so one rank scores none
SETTINGS = dict(epochs=2, batch_size=4, eval_fraction=0.4, eval_every=2, max_length=48, device="cpu")
RTOL, ATOL, WEIGHT_ATOL = 1e-4, 1e-5, 1e-4


def _data():
    return comparisons(12)


def _comparable(rows: dict) -> dict:
    return {key: value for key, value in rows.items() if key[1] != "step_seconds"}  # wall clock


def _train(model_dir, out, ckpt, settings: dict, stop_after: int | None) -> dict:
    config = small_config(**settings)
    reporter = StopAfter(limit=stop_after) if stop_after is not None else MemoryReporter()
    try:
        result = train_dpo(model_dir, _data(), out, ckpt, config, reporter)
    except RunCancelled:
        return {"cancelled": True, "rows": reporter.rows}
    return {"cancelled": False, "rows": reporter.rows, "result": asdict(result)}


def _one_process(model_dir, root, settings: dict) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model_dir, root / "out", root / "ckpt", settings, None)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory):
    return _one_process(tiny_model_dir, tmp_path_factory.mktemp("dpo-one"), SETTINGS)


def _assert_same_run(run: dict, reference: dict, rows_from: int = 0) -> None:
    rows = _comparable(run["rows"])
    expected = {k: v for k, v in _comparable(reference["rows"]).items() if k[0] >= rows_from}
    assert rows.keys() == expected.keys()
    print("max abs difference of reported values:", max(abs(rows[k] - expected[k]) for k in expected))
    assert rows == pytest.approx(expected, rel=RTOL, abs=ATOL)
    result, ref = run["result"], reference["result"]
    assert result["steps_done"] == ref["steps_done"]
    for part in ("eval_before", "eval_after", "final_metrics"):
        assert _comparable_metrics(result[part]) == pytest.approx(
            _comparable_metrics(ref[part]), rel=RTOL, abs=ATOL
        ), part


def _comparable_metrics(values: dict) -> dict:
    return {k: v for k, v in values.items() if k != "step_seconds"}


def _assert_same_weights(folder, reference_folder) -> None:
    trained, expected = weights(folder), weights(reference_folder)
    assert trained.keys() == expected.keys()
    diff = max(float((trained[k] - expected[k]).abs().max()) for k in expected)
    print("max abs difference of published weights:", diff)
    assert diff <= WEIGHT_ATOL


def test_the_data_splits_unevenly_over_two_processes():
    train, held_out = split_by_prompt(_data(), SETTINGS["eval_fraction"], 0)
    assert len(train) % SETTINGS["batch_size"] == 1 and 0 < len(held_out) < SETTINGS["batch_size"]


def test_two_processes_train_the_same_policy_as_one(one_process, tiny_model_dir, tmp_path):
    first, second = spawn_group(
        _train, 2, tiny_model_dir, tmp_path / "out", tmp_path / "ckpt", SETTINGS, None
    )
    assert not second["rows"]  # rank 0 alone reports
    for key in ("policy_path", "sha256", "steps_done", "eval_before", "eval_after"):
        assert first["result"][key] == second["result"][key], key
    _assert_same_run(first, one_process)
    assert first["result"]["sha256"] == sha256_folder(tmp_path / "out")
    _assert_same_weights(tmp_path / "out", one_process["result"]["policy_path"])


def test_two_processes_train_the_same_lora_policy_as_one(tiny_model_dir, tmp_path):
    settings = {**SETTINGS, "epochs": 1, "lora": LoraSettings(r=4, alpha=8)}
    reference = _one_process(tiny_model_dir, tmp_path / "one", settings)
    first, _ = spawn_group(_train, 2, tiny_model_dir, tmp_path / "out", tmp_path / "ckpt", settings, None)
    _assert_same_run(first, reference)
    assert not (tmp_path / "out" / "adapter_config.json").exists()  # merged: a plain policy folder
    _assert_same_weights(tmp_path / "out", tmp_path / "one" / "out")


def test_an_interrupted_two_process_run_resumes_to_the_same_end(one_process, tiny_model_dir, tmp_path):
    settings = {**SETTINGS, "checkpoint_every": 2}
    args = (tiny_model_dir, tmp_path / "out", tmp_path / "ckpt", settings)
    first = spawn_group(_train, 2, *args, 3)  # stops before step 4; the checkpoint of step 2 stays
    assert all(run["cancelled"] for run in first)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-000002"
    assert not (tmp_path / "out").exists()

    resumed = spawn_group(_train, 2, *args, None)
    assert resumed[0]["result"]["resumed_from_step"] == resumed[1]["result"]["resumed_from_step"] == 2
    _assert_same_run(resumed[0], one_process, rows_from=3)
    _assert_same_weights(tmp_path / "out", one_process["result"]["policy_path"])
