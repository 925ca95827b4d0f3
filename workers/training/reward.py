"""Bradley-Terry reward model: a one-label head on the policy backbone, trained on human comparisons.

Read top to bottom: config → loss → model → forward on packed batches → evaluation → training
loop (resumable) → publishing → `score` for PPO and evaluation.

Why it is faster than a plain pairwise trainer (see benchmarks/reward_training.py):
* every distinct response of a batch is scored once, however many pairs it appears in (a
  ranking of K=4 responses is 6 pairs but 4 sequences), because pairs of one ranking share a batch;
* responses to the same prompt sit in one row behind one copy of the prompt (data.py), so the
  prompt is encoded once per batch instead of once per sequence;
* rows are padded to the longest row of the batch and evaluation runs outside the training steps
  (TRL does both too, and also uses fused AdamW by default, so these bring no edge over it).
On independent pairs (one pair per prompt) only prompt sharing saves work: about a quarter of
the tokens at ~120-token sequences, partly paid back by the masked attention kernel.

Under torch.distributed (several processes, `workers/training/distributed.py`) the same code runs on
every rank: the model is sharded with FSDP2, each step's batch of whole rankings is split over the
ranks by ranking, each rank weights its loss so the averaged gradient is that of the whole batch,
evaluation is split with the same number of forward passes per rank and gathered, and rank 0 alone
reports and publishes.

Which checkpoint is published: the final weights. Held-out accuracy is noisy on a few hundred
pairs and picking the best of many evaluations overfits the held-out set (accuracy alone does
not pick the checkpoint); a single epoch with a decaying learning rate
ends where it should.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.common.files import atomic_publish, sha256_folder
from app.common.reporting import Reporter, RunCancelled
from workers.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from workers.training.config import Sharding, TrainerConfig
from workers.training.data import (
    Comparison,
    PackedBatch,
    TokenCache,
    group_batches,
    pack_comparisons,
    pack_sequences,
    prompt_key,
    split_by_prompt,
)
from workers.training.distributed import (
    STRATEGIES,
    ProcessGroup,
    RankReporter,
    current_group,
    full_state_dict,
    shard_model,
)
from workers.training.lora import LoraSettings
from workers.training.main_rank import on_main
from workers.training.significance import binomial_upper_tail

REWARD_STATS_FILE = "reward_stats.json"


@dataclass
class RewardConfig(TrainerConfig):
    """Settings of one reward-model run. Defaults follow InstructGPT (Ouyang et al. 2022, §C.2) and
    the reward-model recipe of MOSS-RLHF ("Secrets of RLHF", Part I/II), scaled to small models."""

    # 1e-5 suits ~100M-1B backbones fully fine-tuned (InstructGPT used 9e-6 for 6B; MOSS 5e-6 for 7B).
    learning_rate: float = 1e-5
    # One epoch: InstructGPT found reward models overfit after the first pass over the data.
    epochs: int = 1
    # Upper bound on pairs per step; whole rankings only, so four K=4 rankings (6 pairs each).
    max_pairs_per_batch: int = 24
    # Tokens of prompt + response; loop responses are short and memory grows with length.
    max_length: int = 512
    # A short warmup keeps the randomly initialised head from shaking the backbone early.
    warmup_ratio: float = 0.03
    # None of the recipes regularise a single-epoch fine-tune; pulling weights to zero is not wanted.
    weight_decay: float = 0.0
    # Global gradient-norm clip, as in every RLHF stage of the recipe.
    max_grad_norm: float = 1.0
    # Share of prompts (not pairs) held out for val accuracy/loss and the reward statistics.
    eval_fraction: float = 0.1
    # Seeds the head initialisation, the split and the data order.
    seed: int = 0
    # Subtract each comparison's margin inside the sigmoid (Llama 2); off: rank distance is noisy.
    use_margin: bool = False
    # Penalty on (r_chosen + r_rejected)^2 (Eisenstein et al. 2023; TRL suggests 0.01). Off: PPO
    # normalises rewards with the mean/std in reward_stats.json, so the offset is harmless.
    center_rewards_coefficient: float = 0.0
    # Share of each pair's loss put on the reversed preference; for noisy labels. Off by default.
    label_smoothing: float = 0.0
    # Steps between checkpoints (weights + optimizer + RNG + data position) for resuming.
    checkpoint_every: int = 50
    # Steps between train-metric reports (the reporter throttles writes further).
    log_every: int = 10
    # Pack responses to one prompt behind one prompt copy; off gives one padded row per response.
    share_prompt: bool = True
    # Trade compute for activation memory on long sequences or large models.
    gradient_checkpointing: bool = False
    # None trains the whole backbone. With LoRA the frozen base is kept in the compute dtype and the
    # adapters and the head learn at learning_rate * lora.lr_scale.
    lora: LoraSettings | None = None
    # "auto": bf16 autocast on CUDA (fp32 master weights), fp32 on CPU; or "float32"/"bfloat16".
    dtype: str = "auto"
    # "auto": CUDA when available, else CPU; or any torch device string.
    device: str = "auto"
    # A PPO round stops before its policy stage unless the held-out accuracy beats chance in a
    # one-sided binomial test at this level (workers/training/significance.py); None = no check.
    above_chance_alpha: float | None = 0.05
    # Under several training processes: "full_shard" (FSDP2 / ZeRO-3) or "shard_grad_op" (ZeRO-2:
    # parameters stay gathered from forward to backward). Ignored by a single process.
    sharding: Sharding = "full_shard"


@dataclass
class RewardResult:
    output_dir: Path
    steps: int
    # val_accuracy, val_loss, val_pairs, val_chance_p_value, reward_mean, reward_std (on val)
    metrics: dict[str, float]
    history: list[dict] = field(default_factory=list)  # every metrics call: {"step": s, name: value}
    sha256: str = ""  # of the published folder


# ---------------------------------------------------------------------------------------------
# loss


def reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Mean over pairs of -(1-ε) log σ(d) - ε log σ(-d), d = r_chosen - r_rejected - margin,
    plus center_coef * mean((r_chosen + r_rejected)^2)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-diff)
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# model


def _resolve_device(config: RewardConfig) -> torch.device:
    # Each training process takes its own GPU (the single process keeps the current one).
    return current_group().device(config.device)


def _compute_dtype(config: RewardConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }[config.dtype]


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _backbone_and_head(model):
    inner = model.get_base_model() if _is_peft(model) else model
    return getattr(inner, inner.base_model_prefix), inner.score


def build_reward_model(base_path: Path, config: RewardConfig):
    """A one-label sequence-classification model on the backbone at `base_path`, and its tokenizer.

    The score is read at the last real token of each sequence. transformers' own forward picks
    the rightmost token whose id differs from pad_token_id; SmolLM2 pads with its EOS
    (<|im_end|>), so a text ending in that token would be scored one token early. `score` and the
    trainer therefore gather the hidden state by position from the packing instead (see
    tests/workers/training/test_reward.py for both behaviours).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = _resolve_device(config)
    compute_dtype = _compute_dtype(config, device)
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"

    # Full fine-tuning keeps fp32 master weights (autocast does the bf16 maths); a frozen LoRA
    # base can live in the compute dtype and halve its memory.
    load_dtype = compute_dtype if config.lora is not None else torch.float32
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head is reported as "missing"; that is the point
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base_path), num_labels=1, dtype=load_dtype
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    model.config.reward_max_length = config.max_length
    # Dropout would add independent noise to the two scores of a pair; the recipes train without it.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,  # keeps the score head trainable (modules_to_save)
            r=config.lora.r,
            lora_alpha=config.lora.alpha,
            lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules,
        )
        model = get_peft_model(model, lora)
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    model.to(device)
    return model, tokenizer


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def sequence_rewards(model, batch: PackedBatch, compute_dtype: torch.dtype) -> torch.Tensor:
    """One forward pass over a packed batch → one fp32 reward per distinct sequence."""
    backbone, head = _backbone_and_head(model)
    device = batch.input_ids.device
    # Additive mask (0 = attend, min = blocked) works for both the sdpa and eager attention paths.
    mask = torch.zeros(batch.allowed.shape, dtype=compute_dtype, device=device)
    mask.masked_fill_(~batch.allowed, torch.finfo(compute_dtype).min)
    with _autocast(device, compute_dtype):
        hidden = backbone(
            input_ids=batch.input_ids,
            attention_mask=mask[:, None],
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        # Only the scored positions go through the head.
        rewards = head(hidden[batch.score_row, batch.score_col]).squeeze(-1)
    return rewards.float()


class RewardScorer(nn.Module):
    """The reward model with `sequence_rewards` as its forward. Sharded training calls this root
    module, so FSDP's root hooks gather the parameters outside the transformer blocks (embeddings,
    final norm, score head) that `sequence_rewards` reaches through submodules."""

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.compute_dtype = compute_dtype

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        # A fresh tensor, not a view of the head's output: FSDP hooks the backward of what the root
        # returns, and an in-place op on a view would drop that hook.
        return sequence_rewards(self.model, batch, self.compute_dtype).clone()


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(
    model,
    cache: TokenCache,
    comparisons: list[Comparison],
    config: RewardConfig,
    compute_dtype: torch.dtype,
    group: ProcessGroup | None = None,
) -> dict[str, float]:
    """val_loss (the Bradley-Terry term, with margin when used), val_accuracy (r_chosen > r_rejected)
    over val_pairs pairs with its one-sided p-value against chance, and reward_mean / reward_std over
    the distinct responses.

    `model` is a reward model or its (possibly sharded) `RewardScorer`. Under several processes each
    rank scores its share of the chunks (padded, so every rank runs the same number of forwards, as
    sharded parameters require) and every rank gets the same metrics from the gathered scores, summed
    in the order one process would sum them."""
    group = group if group is not None else current_group()
    scorer = model if isinstance(model, RewardScorer) else RewardScorer(model, compute_dtype)
    was_training = scorer.training
    scorer.eval()
    device = next(scorer.parameters()).device
    pad_id = scorer.model.config.pad_token_id
    chunks = group_batches(comparisons, config.max_pairs_per_batch, config.seed, epoch=0)
    per_rank = -(-len(chunks) // group.world_size)
    mine = range(group.rank * per_rank, (group.rank + 1) * per_rank)
    scored: list[tuple[int, list[float], list[float], list[float]]] = []  # (chunk, rc, rr, margin)
    try:
        for index in mine:
            # A rank past the last chunk scores the first one again and drops it: it must still run
            # the forward the others run.
            chunk = chunks[index] if index < len(chunks) else chunks[0]
            batch = pack_comparisons(chunk, cache, pad_id, config.share_prompt, config.use_margin).to(device)
            rewards = scorer(batch)
            if index < len(chunks):
                rc, rr = rewards[batch.chosen_index], rewards[batch.rejected_index]
                scored.append((index, rc.tolist(), rr.tolist(), batch.margin.tolist()))
    finally:
        scorer.train(was_training)
    scored = sorted(item for part in group.gather_objects(scored) for item in part)
    loss_sum, correct, pairs = 0.0, 0.0, 0
    distinct: dict[tuple[str, str], float] = {}
    for index, rc_list, rr_list, margin in scored:
        rc, rr = torch.tensor(rc_list), torch.tensor(rr_list)
        loss_sum += float(-F.logsigmoid(rc - rr - torch.tensor(margin)).sum())
        correct += float((rc > rr).sum())
        pairs += len(rc_list)
        for c, a, b in zip(chunks[index], rc_list, rr_list, strict=True):
            distinct[(prompt_key(c.prompt), c.chosen)] = a
            distinct[(prompt_key(c.prompt), c.rejected)] = b
    values = np.array(list(distinct.values()), dtype=np.float64)
    return {
        "val_loss": loss_sum / max(pairs, 1),
        "val_accuracy": correct / max(pairs, 1),
        "val_pairs": pairs,
        "val_chance_p_value": binomial_upper_tail(round(correct), pairs),
        "reward_mean": float(values.mean()) if values.size else 0.0,
        "reward_std": float(values.std()) if values.size > 1 else 1.0,
    }


# ---------------------------------------------------------------------------------------------
# training


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _make_optimizer(
    model, config: RewardConfig, device: torch.device, fused: bool = True
) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            # Norm scales and biases are not decayed (they are not "weights" that overfit).
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    lr = config.learning_rate * (config.lora.lr_scale if config.lora is not None else 1.0)
    # Fused AdamW: one kernel over all parameters, fewer temporaries than the foreach path.
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=fused and device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def _linear_warmup_decay(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _fingerprint(train: list[Comparison], val: list[Comparison], config: RewardConfig) -> str:
    """What a checkpoint must match to be resumed: the data and every setting that shapes the run."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(c.comparison_id for c in train)).encode())
    digest.update(json.dumps(sorted(c.comparison_id for c in val)).encode())
    shaping = {
        k: v
        for k, v in asdict(config).items()
        # the sharding strategy changes memory and communication, not the result
        if k not in ("checkpoint_every", "log_every", "device", "above_chance_alpha", "sharding")
    }
    digest.update(json.dumps(shaping, sort_keys=True).encode())
    return digest.hexdigest()


@dataclass
class _Window:
    """Train metrics accumulated since the last report (saved in checkpoints, so a resumed run
    reports the same averages as an uninterrupted one)."""

    loss: float = 0.0
    correct: float = 0.0
    pairs: int = 0
    steps: int = 0
    seconds: float = 0.0


def _rankings(chunk: list[Comparison]) -> list[list[Comparison]]:
    """The whole rankings of a batch (group_batches keeps each ranking's pairs together, in order)."""
    rankings: list[list[Comparison]] = []
    for comparison in chunk:
        if rankings and rankings[-1][0].group_id == comparison.group_id:
            rankings[-1].append(comparison)
        else:
            rankings.append([comparison])
    return rankings


def train_reward_model(
    base_path: Path,
    comparisons: list[Comparison],
    output_dir: Path,
    checkpoint_dir: Path,
    config: RewardConfig,
    reporter: Reporter,
) -> RewardResult:
    """Train on `comparisons`, publish model + tokenizer + reward_stats.json to `output_dir`.

    Resumes from the newest checkpoint in `checkpoint_dir` when there is one (same data position,
    RNG and optimizer state), so a killed run ends at the same step with the same metrics. When
    `output_dir` already holds a finished publication (a retry after the publish), that result
    is returned without training again. With no held-out prompt (tiny data) there is no
    val_loss/val_accuracy, and the reward statistics come from the training responses.
    The checkpoints stay in `checkpoint_dir`; the caller removes them once the result is recorded.

    Under several training processes every rank calls it with the same arguments and gets the same
    result; rank 0 reports and publishes.
    """
    output_dir, checkpoint_dir = Path(output_dir), Path(checkpoint_dir)
    group = current_group()
    if config.sharding not in STRATEGIES:
        raise ValueError(f"unknown sharding {config.sharding!r}; choose one of {', '.join(STRATEGIES)}")
    reporter = reporter if isinstance(reporter, RankReporter) else group.reporter(reporter)
    if on_main(group, output_dir.exists):
        return on_main(group, lambda: _published_result(output_dir))

    device = _resolve_device(config)
    compute_dtype = _compute_dtype(config, device)
    _seed_everything(config.seed)  # the same seed everywhere: every rank builds the same weights to shard
    train, val = split_by_prompt(comparisons, config.eval_fraction, config.seed)
    if not train:
        raise ValueError("no training comparisons (all prompts were held out or the list is empty)")

    model, tokenizer = build_reward_model(base_path, config)
    # The scorer is the root FSDP module; `model` inside it holds the (now sharded) parameters.
    scorer = shard_model(RewardScorer(model, compute_dtype), group, config.sharding)
    scorer.train()
    cache = TokenCache(tokenizer, config.max_length)
    pad_id = tokenizer.pad_token_id
    epochs = [group_batches(train, config.max_pairs_per_batch, config.seed, e) for e in range(config.epochs)]
    total_steps = sum(len(b) for b in epochs)
    # The fused kernel takes plain tensors only; sharded parameters are DTensors.
    optimizer = _make_optimizer(model, config, device, fused=not group.distributed)
    warmup = math.ceil(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_warmup_decay(warmup, total_steps))
    fingerprint = _fingerprint(train, val, config)

    step, history, window, last_eval = 0, [], _Window(), {}
    checkpoint = latest_checkpoint(checkpoint_dir)
    if checkpoint is not None:
        extra = load_checkpoint(checkpoint, model, optimizer, scheduler)
        if extra.get("fingerprint") != fingerprint:
            raise ValueError(f"{checkpoint} belongs to a run with other data or settings; not resuming")
        step, history, last_eval = extra["step"], extra["history"], extra["last_eval"]
        window = _Window(**extra["window"])

    def report(at_step: int, values: dict[str, float]) -> None:
        reporter.metrics(at_step, values)
        history.append({"step": at_step, **values})

    def checkpoint_now(epoch: int, batch_in_epoch: int) -> None:
        save_checkpoint(
            checkpoint_dir,
            step,
            model,
            optimizer,
            scheduler,
            {
                "fingerprint": fingerprint,
                "total_steps": total_steps,
                "epoch": epoch,  # data position, for people; resuming derives it from step
                "batch_in_epoch": batch_in_epoch,
                "history": history,
                "window": asdict(window),
                "last_eval": last_eval,
            },
        )

    params = [p for p in model.parameters() if p.requires_grad]
    first_step_of_epoch = 0
    for epoch, batches in enumerate(epochs):
        start = max(0, step - first_step_of_epoch)
        for index in range(start, len(batches)):
            if reporter.should_stop():
                raise RunCancelled(f"cancelled before step {step + 1} of {total_steps}")
            began = time.perf_counter()
            step_pairs = len(batches[index])
            local = [c for ranking in group.shard(_rankings(batches[index])) for c in ranking]
            # Every rank runs one forward and backward per step (the sharded parameters are gathered
            # and the gradients reduced collectively); a rank with no ranking of its own scores a
            # copy of one and weights it zero.
            weight = 1.0 if local else 0.0
            batch = pack_comparisons(
                local or batches[index][:1], cache, pad_id, config.share_prompt, config.use_margin
            )
            batch = batch.to(device)
            rewards = scorer(batch)
            rc, rr = rewards[batch.chosen_index], rewards[batch.rejected_index]
            loss = reward_loss(
                rc,
                rr,
                batch.margin if config.use_margin else None,
                config.label_smoothing,
                config.center_rewards_coefficient,
            )
            local_pairs = batch.num_pairs if local else 0
            # FSDP averages gradients over ranks, so the local sum scaled by world / global pairs gives
            # the gradient of the whole batch's mean loss (a factor of exactly 1 for one process).
            (loss * (weight * local_pairs * group.world_size / step_pairs)).backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            sums = torch.tensor(
                [loss.item() * local_pairs, float((rc > rr).sum()) * weight, float(local_pairs)],
                dtype=torch.float64,
            )
            loss_sum, correct, pairs = group.sum(sums).tolist()
            window.loss += loss_sum
            window.correct += correct
            window.pairs += int(pairs)
            window.steps += 1
            window.seconds += time.perf_counter() - began
            values: dict[str, float] = {}
            if step % config.log_every == 0 or step == total_steps:
                # the slowest rank sets the pace (and every rank records the same history)
                seconds = float(group.maximum(torch.tensor([window.seconds], dtype=torch.float64))[0])
                values = {
                    "train_loss": window.loss / window.pairs,
                    "train_accuracy": window.correct / window.pairs,
                    "lr": lr,
                    "examples_per_s": window.pairs / max(seconds, 1e-9),
                }
                window = _Window()
            if index == len(batches) - 1:  # end of an epoch: evaluate outside the timed steps
                last_eval = evaluate(scorer, cache, val or train, config, compute_dtype, group)
                if not val:  # no held-out prompts: the statistics still come from train
                    last_eval = {k: v for k, v in last_eval.items() if k.startswith("reward_")}
                values.update(last_eval)
            if values:
                report(step, values)
            reporter.progress(step, total_steps, f"epoch {epoch + 1}/{config.epochs}")
            if step % config.checkpoint_every == 0 or step == total_steps:
                checkpoint_now(epoch, index + 1)
        first_step_of_epoch += len(batches)

    stats = {
        "mean": last_eval["reward_mean"],
        "std": last_eval["reward_std"],
        "source": "val" if val else "train",
        "pairs": len(val) if val else len(train),
        "step": step,
        "max_length": config.max_length,
        "metrics": last_eval,
        "config": asdict(config),
    }
    if not group.distributed:
        sha = atomic_publish(lambda tmp: _write_model(tmp, model, tokenizer, stats, history), output_dir)
    else:
        # Gathering the whole weights is a collective; rank 0 then loads them into a plain copy of
        # the model (LoRA merged on write) and publishes it while the others wait for its hash.
        weights = full_state_dict(model, group)

        def publish() -> str:
            plain, _ = build_reward_model(base_path, replace(config, device="cpu"))
            plain.load_state_dict(weights, assign=True)  # assign: keep the trained dtypes
            return atomic_publish(lambda tmp: _write_model(tmp, plain, tokenizer, stats, history), output_dir)

        sha = on_main(group, publish)
        del weights
    return RewardResult(output_dir, step, dict(last_eval), history, sha)


def _write_model(folder: Path, model, tokenizer, stats: dict, history: list[dict]) -> None:
    to_save = model.merge_and_unload() if _is_peft(model) else model
    to_save.config.use_cache = True
    to_save.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / REWARD_STATS_FILE).write_text(json.dumps(stats, indent=1))
    (folder / "training_history.json").write_text(json.dumps(history))


def _published_result(output_dir: Path) -> RewardResult:
    stats_file = output_dir / REWARD_STATS_FILE
    if not stats_file.exists():
        raise FileExistsError(f"{output_dir} exists but is not a published reward model")
    stats = json.loads(stats_file.read_text())
    history_file = output_dir / "training_history.json"
    history = json.loads(history_file.read_text()) if history_file.exists() else []
    return RewardResult(output_dir, stats["step"], stats["metrics"], history, sha256_folder(output_dir))


# ---------------------------------------------------------------------------------------------
# scoring (PPO, evaluation)


@torch.no_grad()
def score(
    model, tokenizer, prompts: list[list[dict]], responses: list[str], batch_size: int = 16
) -> torch.Tensor:
    """Reward of each (prompt, response), as a float32 CPU tensor in input order.

    Responses to the same prompt inside a chunk of `batch_size` share one prompt copy, so PPO's
    K samples per prompt cost little more than K responses.
    """
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses must have the same length")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    compute_dtype = torch.bfloat16 if device.type == "cuda" else next(model.parameters()).dtype
    config = model.get_base_model().config if _is_peft(model) else model.config
    cache = TokenCache(tokenizer, int(getattr(config, "reward_max_length", 1024)))
    out: list[torch.Tensor] = []
    try:
        for start in range(0, len(prompts), batch_size):
            items = list(
                zip(prompts[start : start + batch_size], responses[start : start + batch_size], strict=True)
            )
            batch, item_to_seq = pack_sequences(items, cache, tokenizer.pad_token_id)
            rewards = sequence_rewards(model, batch.to(device), compute_dtype)
            out.append(rewards[torch.tensor(item_to_seq, device=device)].cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)
