"""Bradley-Terry reward model: loss maths, where the score is read, learning, resuming, publishing."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.common.files import sha256_folder
from app.common.reporting import MemoryReporter, RunCancelled
from workers.training.checkpoint import latest_checkpoint
from workers.training.data import Comparison, TokenCache, format_conversation, pack_sequences
from workers.training.lora import LoraSettings
from workers.training.reward import (
    REWARD_STATS_FILE,
    RewardConfig,
    build_reward_model,
    reward_loss,
    score,
    sequence_rewards,
    train_reward_model,
)

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "green",
    "table",
    "music",
    "paper",
    "light",
    "window",
    "garden",
    "yellow",
    "quiet",
    "simple",
]
MARKER = "certainly"


def marker_rankings(n_prompts: int, k: int = 3, seed: int = 0) -> list[Comparison]:
    """Each prompt has one ranking of k short responses; the one containing MARKER wins over the
    others (k-1 pairs per ranking). The marker sits at a random position, so the model has to find it."""
    rng = random.Random(seed)
    out: list[Comparison] = []
    for p in range(n_prompts):
        prompt = [{"role": "user", "content": f"Tell me about the {rng.choice(WORDS)} number {p}."}]
        words = rng.choices(WORDS, k=rng.randint(3, 6))
        words.insert(rng.randint(0, len(words)), MARKER)
        good = " ".join(words)
        for _ in range(k - 1):
            bad = " ".join(rng.choices(WORDS, k=rng.randint(3, 6)))
            out.append(Comparison(len(out), p, 1000 + p, prompt, good, bad, margin=1.0))
    return out


FAST = dict(
    learning_rate=1e-3,  # a tiny random model needs a large step to learn in a few dozen steps
    epochs=2,
    max_pairs_per_batch=8,
    eval_fraction=0.25,
    warmup_ratio=0.1,
    log_every=4,
    checkpoint_every=1000,
    device="cpu",
)


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    torch.manual_seed(0)
    model, tokenizer = build_reward_model(tiny_model_dir, RewardConfig(device="cpu"))
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# loss


def test_loss_matches_hand_computed_values():
    rc = torch.tensor([2.0, 0.0])
    rr = torch.tensor([0.0, 1.0])
    # d = [2, -1]; -log σ(2) = log(1 + e^-2) = 0.126928, -log σ(-1) = log(1 + e) = 1.313262
    assert reward_loss(rc, rr).item() == pytest.approx((0.126928 + 1.313262) / 2, abs=1e-6)
    # margin [0.5, 0]: d = [1.5, -1]; -log σ(1.5) = 0.201413
    margin = torch.tensor([0.5, 0.0])
    assert reward_loss(rc, rr, margin).item() == pytest.approx((0.201413 + 1.313262) / 2, abs=1e-6)
    # label smoothing 0.1: 0.9 * -log σ(d) + 0.1 * -log σ(-d); -log σ(-2) = 2.126928, -log σ(1) = 0.313262
    smoothed = ((0.9 * 0.126928 + 0.1 * 2.126928) + (0.9 * 1.313262 + 0.1 * 0.313262)) / 2
    assert reward_loss(rc, rr, label_smoothing=0.1).item() == pytest.approx(smoothed, abs=1e-6)
    # centering 0.01 * mean((rc + rr)^2) = 0.01 * mean([4, 1]) = 0.025
    plain = (0.126928 + 1.313262) / 2
    assert reward_loss(rc, rr, center_coef=0.01).item() == pytest.approx(plain + 0.025, abs=1e-6)


def test_loss_gradient_pushes_chosen_up_and_rejected_down():
    rc = torch.tensor([0.3], requires_grad=True)
    rr = torch.tensor([0.1], requires_grad=True)
    reward_loss(rc, rr).backward()
    # d/d rc of -log σ(rc - rr) = -(1 - σ(0.2)) = -0.450166
    assert rc.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert rr.grad.item() == pytest.approx(-rc.grad.item(), abs=1e-7)


# ---------------------------------------------------------------------------------------------
# where the score is read


PROMPT_A = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT_B = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
ITEMS = [
    (PROMPT_A, "Paris."),
    (PROMPT_A, "It is Paris, of course, the largest city of the country."),
    (PROMPT_B, "Blue"),
    (PROMPT_A, "Lyon"),
    (PROMPT_B, "\n\nred"),  # tokenizes across the prompt boundary: scored as a whole sequence
]


def _plain_scores(model, tokenizer, items):
    """transformers' own forward, one unpadded sequence at a time."""
    out = []
    for prompt, response in items:
        enc = tokenizer(
            format_conversation(tokenizer, prompt, response), return_tensors="pt", add_special_tokens=False
        )
        with torch.no_grad():
            out.append(model(**enc).logits[0, 0].item())
    return torch.tensor(out)


def test_score_equals_the_plain_forward_of_each_sequence(reward_model):
    model, tokenizer = reward_model
    got = score(model, tokenizer, [p for p, _ in ITEMS], [r for _, r in ITEMS], batch_size=4)
    assert torch.allclose(got, _plain_scores(model, tokenizer, ITEMS), atol=1e-5)


def test_prompt_sharing_changes_no_score(reward_model):
    model, tokenizer = reward_model
    cache = TokenCache(tokenizer, max_length=512)
    shared, index_shared = pack_sequences(ITEMS, cache, tokenizer.pad_token_id, share_prompt=True)
    plain, index_plain = pack_sequences(ITEMS, cache, tokenizer.pad_token_id, share_prompt=False)
    assert shared.num_tokens < plain.num_tokens
    with torch.no_grad():
        a = sequence_rewards(model, shared, torch.float32)[index_shared]
        b = sequence_rewards(model, plain, torch.float32)[index_plain]
    assert torch.allclose(a, b, atol=1e-5)


def test_transformers_picks_the_rightmost_non_pad_token_we_pick_the_last_real_one(reward_model):
    """SmolLM2 pads with its EOS <|im_end|>. With right padding, transformers' forward scores the
    rightmost token that is not the pad id: correct for our formatted texts (they end in "\\n"),
    one token early for a text that itself ends in <|im_end|> (e.g. after truncation). Our packing
    records the position of the last real token instead."""
    model, tokenizer = reward_model
    pad = tokenizer.pad_token_id
    assert pad == tokenizer.eos_token_id
    text_ids = tokenizer(format_conversation(tokenizer, *ITEMS[0]), add_special_tokens=False)["input_ids"]
    assert text_ids[-1] != pad and text_ids[-2] == pad  # "...<|im_end|>\n"
    ends_in_eos = text_ids[:-1]
    longer = text_ids + [17, 18, 19]
    width = len(longer)

    def right_pad(ids):
        return ids + [pad] * (width - len(ids)), [1] * len(ids) + [0] * (width - len(ids))

    rows = [right_pad(text_ids), right_pad(ends_in_eos), right_pad(longer)]
    input_ids = torch.tensor([r[0] for r in rows])
    attention = torch.tensor([r[1] for r in rows])
    with torch.no_grad():
        hf = model(input_ids=input_ids, attention_mask=attention).logits[:, 0]
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        at = lambda row, col: model.score(hidden[row, col]).item()  # noqa: E731
    assert hf[0].item() == pytest.approx(
        at(0, len(text_ids) - 1), abs=1e-5
    )  # padded: still the last real token
    assert hf[1].item() == pytest.approx(at(1, len(ends_in_eos) - 2), abs=1e-5)  # one early
    assert hf[1].item() != pytest.approx(at(1, len(ends_in_eos) - 1), abs=1e-5)

    # Our path, fed the same sequence ending in <|im_end|>, reads its last token.
    cache = TokenCache(tokenizer, max_length=512)
    batch, _ = pack_sequences([ITEMS[0]], cache, pad)
    assert batch.score_col.item() == len(text_ids) - 1
    batch.input_ids, batch.position_ids = batch.input_ids[:, :-1], batch.position_ids[:, :-1]
    batch.allowed = batch.allowed[:, :-1, :-1]
    batch.score_col -= 1
    with torch.no_grad():
        ours = sequence_rewards(model, batch, torch.float32).item()
    assert ours == pytest.approx(at(1, len(ends_in_eos) - 1), abs=1e-5)


# ---------------------------------------------------------------------------------------------
# training


def _published_accuracy(output_dir: Path, comparisons: list[Comparison]) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(output_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir))
    prompts = [c.prompt for c in comparisons]
    chosen = score(model, tokenizer, prompts, [c.chosen for c in comparisons])
    rejected = score(model, tokenizer, prompts, [c.rejected for c in comparisons])
    return (chosen > rejected).float().mean().item()


def test_tiny_model_learns_a_separable_preference(tiny_model_dir, tmp_path):
    from workers.training.data import split_by_prompt

    comparisons = marker_rankings(80)
    config = RewardConfig(**FAST)
    reporter = MemoryReporter()
    result = train_reward_model(
        tiny_model_dir, comparisons, tmp_path / "rm", tmp_path / "ckpt", config, reporter
    )

    assert result.metrics["val_accuracy"] >= 0.9
    losses = reporter.series("train_loss")
    assert losses[-1] < losses[0] * 0.5
    assert result.steps == reporter.progress_log[-1][0] == reporter.progress_log[-1][1]

    # the published folder is a complete, loadable reward model with its statistics
    out = tmp_path / "rm"
    assert result.sha256 == sha256_folder(out)
    stats = json.loads((out / REWARD_STATS_FILE).read_text())
    assert stats["mean"] == pytest.approx(result.metrics["reward_mean"])
    assert stats["std"] == pytest.approx(result.metrics["reward_std"]) and stats["std"] > 0
    _, held_out = split_by_prompt(comparisons, config.eval_fraction, config.seed)
    assert _published_accuracy(out, held_out) == pytest.approx(result.metrics["val_accuracy"])

    # the backbone itself was trained, not only the new head
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    trained = load_file(str(out / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[name], trained[name])

    # a retried task after publishing gets the same result without training again
    again = train_reward_model(tiny_model_dir, comparisons, out, tmp_path / "ckpt", config, MemoryReporter())
    assert again.sha256 == result.sha256 and again.steps == result.steps and again.metrics == result.metrics


class StopAfter(MemoryReporter):
    """Says stop once `step` steps are done: what a SIGKILL after that step looks like to the data."""

    def __init__(self, step: int):
        super().__init__()
        self.after = step

    def should_stop(self) -> bool:
        return bool(self.progress_log) and self.progress_log[-1][0] >= self.after


def _comparable(rows: dict) -> dict:
    return {key: value for key, value in rows.items() if key[1] != "examples_per_s"}  # wall clock


def test_a_killed_run_resumes_to_the_same_end(tiny_model_dir, tmp_path):
    comparisons = marker_rankings(40)
    config = RewardConfig(**{**FAST, "checkpoint_every": 5, "log_every": 2})
    reference = MemoryReporter()
    full = train_reward_model(
        tiny_model_dir, comparisons, tmp_path / "ref", tmp_path / "ref-ckpt", config, reference
    )
    assert full.steps > 12

    # killed right after the checkpoint of step 10: nothing after it was reported
    first = StopAfter(10)
    with pytest.raises(RunCancelled):
        train_reward_model(tiny_model_dir, comparisons, tmp_path / "rm", tmp_path / "ckpt", config, first)
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-000010"
    assert not (tmp_path / "rm").exists()
    resumed = MemoryReporter()
    result = train_reward_model(
        tiny_model_dir, comparisons, tmp_path / "rm", tmp_path / "ckpt", config, resumed
    )

    assert result.steps == full.steps
    assert resumed.progress_log[0][0] == 11  # went on from the checkpoint, did not start over
    assert not set(first.rows) & set(resumed.rows)  # no (step, name) reported twice
    assert _comparable({**first.rows, **resumed.rows}) == pytest.approx(_comparable(reference.rows), rel=1e-5)
    assert result.metrics == pytest.approx(full.metrics, rel=1e-5)
    assert [h["step"] for h in result.history] == [h["step"] for h in full.history]
    trained = load_file(str(tmp_path / "rm" / "model.safetensors"))
    expected = load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert all(torch.allclose(trained[k], expected[k], atol=1e-6) for k in expected)


def test_a_run_killed_between_checkpoints_repeats_only_identical_rows(tiny_model_dir, tmp_path):
    comparisons = marker_rankings(40)
    config = RewardConfig(**{**FAST, "epochs": 1, "checkpoint_every": 5, "log_every": 2})
    first = StopAfter(8)  # last checkpoint at 5; steps 6-8 are redone after the "kill"
    with pytest.raises(RunCancelled):
        train_reward_model(tiny_model_dir, comparisons, tmp_path / "rm", tmp_path / "ckpt", config, first)
    resumed = MemoryReporter()
    train_reward_model(tiny_model_dir, comparisons, tmp_path / "rm", tmp_path / "ckpt", config, resumed)
    repeated = set(first.rows) & set(resumed.rows)
    assert repeated and all(5 < step <= 8 for step, _ in repeated)
    # the reporter contract is idempotent per (step, name): the repeated rows carry the same values
    for key in repeated:
        if key[1] != "examples_per_s":
            assert resumed.rows[key] == pytest.approx(first.rows[key], rel=1e-6)


def test_cancel_stops_before_a_step_and_publishes_nothing(tiny_model_dir, tmp_path):
    reporter = MemoryReporter(stop=True)
    with pytest.raises(RunCancelled):
        train_reward_model(
            tiny_model_dir,
            marker_rankings(10),
            tmp_path / "rm",
            tmp_path / "ckpt",
            RewardConfig(**FAST),
            reporter,
        )
    assert not (tmp_path / "rm").exists() and reporter.rows == {}


def test_a_checkpoint_of_other_data_is_not_resumed(tiny_model_dir, tmp_path):
    config = RewardConfig(**{**FAST, "epochs": 1, "checkpoint_every": 2})
    with pytest.raises(RunCancelled):
        train_reward_model(
            tiny_model_dir, marker_rankings(20), tmp_path / "a", tmp_path / "ckpt", config, StopAfter(2)
        )
    with pytest.raises(ValueError, match="other data or settings"):
        train_reward_model(
            tiny_model_dir, marker_rankings(21), tmp_path / "b", tmp_path / "ckpt", config, MemoryReporter()
        )


def test_lora_trains_adapters_and_publishes_a_plain_model(tiny_model_dir, tmp_path):
    comparisons = marker_rankings(16)
    config = RewardConfig(**{**FAST, "epochs": 1, "lora": LoraSettings(r=4, alpha=8)})
    result = train_reward_model(
        tiny_model_dir, comparisons, tmp_path / "rm", tmp_path / "ckpt", config, MemoryReporter()
    )
    out = tmp_path / "rm"
    assert not (out / "adapter_config.json").exists()  # merged: PPO loads it like any reward model
    trained = load_file(str(out / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(base[name], trained[name])  # the merged LoRA delta
    assert torch.equal(base["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])  # frozen
    assert result.steps > 0 and math.isfinite(result.metrics["val_loss"])


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    cache_items = ITEMS[:4]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model, tokenizer = build_reward_model(
            tiny_model_dir, RewardConfig(device="cpu", gradient_checkpointing=checkpointing)
        )
        model.train()
        assert model.is_activation_checkpointing == checkpointing
        batch, _ = pack_sequences(cache_items, TokenCache(tokenizer, 512), tokenizer.pad_token_id)
        rewards = sequence_rewards(model, batch, torch.float32)
        reward_loss(rewards[:2], rewards[2:]).backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_autocast_path_trains(tiny_model_dir, tmp_path):
    """The CUDA default (bf16 autocast over fp32 master weights), exercised on the CPU."""
    config = RewardConfig(**{**FAST, "epochs": 1, "dtype": "bfloat16"})
    reporter = MemoryReporter()
    result = train_reward_model(
        tiny_model_dir, marker_rankings(16), tmp_path / "rm", tmp_path / "ckpt", config, reporter
    )
    assert all(math.isfinite(v) for v in reporter.series("train_loss"))
    trained = load_file(str(tmp_path / "rm" / "model.safetensors"))
    assert trained["score.weight"].dtype == torch.float32  # master weights stay fp32
    assert math.isfinite(result.metrics["val_loss"])
