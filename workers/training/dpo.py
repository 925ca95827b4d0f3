"""DPO (Rafailov et al. 2023): the cheap alternative to PPO on the same human comparisons.

Loss per pair, with h = [log pi(c) - log pi_ref(c)] - [log pi(r) - log pi_ref(r)] summed over the
response tokens: -log sigmoid(beta * h) (the "sigmoid" loss; label smoothing eps mixes in
-log sigmoid(-beta * h) for noisy labels, as in cDPO / robust DPO).

The reference is the base policy (`reference_path`), not the live policy a round starts from. Every
round re-fits all comparisons so far; with the live policy as reference each round would grant a
fresh beta-sized KL budget on top of the last one, so the policy could drift without bound over
rounds. Anchored to the base, every round optimises the same KL-regularised objective (with more data
each time), so the policy stays on the base's leash however many rounds run, and the comparisons
collected on older policies still count (training only on new ones would throw most human labels
away and still let the drift add up). The policy itself starts from the live weights, so a round
continues where the last one ended.

Reference log-probs are computed once, before the first update, for every pair (train and held-out),
with the reference model loaded, used and released (without `reference_path`, the starting weights
serve). The held-out split is by prompt (data.split_by_prompt). Checkpoints keep those reference
log-probs, so a resumed run needs no copy of the reference weights.

Under several training processes (workers/training/distributed.py) the same code runs on every rank:
the policy is sharded with FSDP2, each step's pairs are split over the ranks, the reference log-probs
and the held-out evaluation are split with the same number of forward passes per rank and gathered,
so every rank holds all of them, and rank 0 reports and publishes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.common.files import atomic_publish
from app.common.reporting import Reporter, RunCancelled
from workers.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from workers.training.config import Sharding, TrainerConfig
from workers.training.data import Comparison, format_conversation, format_prompt, split_by_prompt
from workers.training.distributed import (
    STRATEGIES,
    ProcessGroup,
    RankReporter,
    current_group,
    full_state_dict,
    grad_norm_value,
    shard_model,
)
from workers.training.lora import (
    LoraSettings,
    TrainableState,
    add_adapter,
    compute_context,
    disable_dropout,
    enable_gradient_checkpointing,
    freeze,
    pack,
    resolve_dtype,
    response_logprobs,
    return_freed_memory_to_os,
    save_policy_folder,
)
from workers.training.main_rank import on_main
from workers.training.ppo_math import masked_sum


@dataclass
class DPOConfig(TrainerConfig):
    beta: float = 0.1  # DPO paper / TRL default: how far the policy may move from the reference
    loss_type: str = "sigmoid"  # the original DPO loss
    label_smoothing: float = 0.0  # cDPO eps: assumed share of flipped labels; 0 = plain DPO
    learning_rate: float = 5e-6  # TRL's 1e-6 is tuned for 7B; a 135M model needs a few times more
    epochs: int = 2  # DPO overfits preferences fast; the paper trains 1-3 epochs
    batch_size: int = 8  # pairs per optimizer step
    max_length: int = 512  # tokens per prompt+response; long prompts keep their end
    warmup_ratio: float = 0.1  # linear warm-up, then linear decay to 0 (TRL/Trainer default shape)
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eval_fraction: float = 0.1  # held-out prompts for the chosen-over-rejected log-ratio
    eval_every: int = 50  # optimizer steps between held-out evaluations (also at start and end)
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    lora: LoraSettings | None = None  # None = full fine-tuning
    # Trade compute for activation memory (about one more forward pass per step): large models.
    gradient_checkpointing: bool = False
    # Under several training processes: "full_shard" (FSDP2 / ZeRO-3) or "shard_grad_op" (ZeRO-2).
    sharding: Sharding = "full_shard"


@dataclass
class DPOResult:
    policy_path: Path
    sha256: str
    steps_done: int
    final_metrics: dict[str, float]
    eval_before: dict[str, float]  # held-out metrics of the starting policy (empty without held-out pairs)
    eval_after: dict[str, float]
    resumed_from_step: int | None = None


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair sigmoid DPO loss and the implicit rewards beta * (log pi - log pi_ref) of both sides.

    Inputs are summed response log-probs, one per pair. Returns (losses, chosen_rewards, rejected_rewards).
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (chosen_ratio - rejected_ratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# --- data -------------------------------------------------------------------------------------


@dataclass
class _Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _split_tokens(
    tokenizer, prompt: list[dict], response: str, max_length: int, ended: bool = True
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one rendered conversation, split where the two stop agreeing.

    The response part of a finished answer includes the template's end-of-turn tokens, so DPO also
    teaches when to stop; that of an answer cut off at the length limit does not, so a preferred
    cut-off answer never teaches the policy to end mid-sentence.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    rendered = format_conversation(tokenizer, prompt, response, ended)
    full = tokenizer(rendered, add_special_tokens=False).input_ids
    common = 0
    for a, b in zip(prompt_ids, full, strict=False):
        if a != b:
            break
        common += 1
    head, tail = full[:common], full[common:]
    if len(head) + len(tail) > max_length:
        head = head[-(max_length // 2) :]
        tail = tail[: max_length - len(head)]
    return head, tail


def _encode(tokenizer, items: list[Comparison], max_length: int) -> list[_Pair]:
    pairs = []
    for c in items:
        prompt, chosen = _split_tokens(tokenizer, c.prompt, c.chosen, max_length, c.chosen_ended)
        prompt_r, rejected = _split_tokens(tokenizer, c.prompt, c.rejected, max_length, c.rejected_ended)
        # Both sides must condition on the same prompt tokens; differences come only from truncation.
        shared = min(len(prompt), len(prompt_r))
        pairs.append(_Pair(prompt[len(prompt) - shared :], chosen, rejected))
    return pairs


class SequenceLogps(nn.Module):
    """Summed response log-probs of each row as a module's forward. Sharded training calls this root
    module, so FSDP's root hooks gather the parameters outside the transformer blocks (embeddings,
    final norm, LM head)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, batch) -> Tensor:
        with compute_context(batch.input_ids.device, self.dtype):
            logps, _ = response_logprobs(self.model, batch)
        return masked_sum(logps, batch.response_mask, dim=1)


def _pair_logps(
    scorer: SequenceLogps, pairs: list[_Pair], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs (chosen, rejected) of each pair, in one forward over 2B rows."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    sums = scorer(pack(prompts, responses, pad_id).to(device))
    return sums[: len(pairs)], sums[len(pairs) :]


def _all_pair_logps(
    scorer: SequenceLogps,
    pairs: list[_Pair],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    group: ProcessGroup,
) -> tuple[list[float], list[float]]:
    """(chosen, rejected) log-probs of every pair, on every rank. The chunks of `batch_size` pairs are
    those one process scores; each rank scores its share of them, padded so every rank runs the same
    number of forwards (a sharded model gathers its parameters collectively in each), then all ranks
    exchange their scores."""
    starts = list(range(0, len(pairs), batch_size))
    per_rank = -(-len(starts) // group.world_size)
    scored: list[tuple[int, list[float], list[float]]] = []
    with torch.no_grad():
        for slot in range(group.rank * per_rank, (group.rank + 1) * per_rank):
            start = starts[slot] if slot < len(starts) else 0  # padding: score the first chunk, drop it
            c, r = _pair_logps(scorer, pairs[start : start + batch_size], pad_id, device)
            if slot < len(starts):
                scored.append((slot, c.tolist(), r.tolist()))
    chosen, rejected = [], []
    for _, c, r in sorted(item for part in group.gather_objects(scored) for item in part):
        chosen += c
        rejected += r
    return chosen, rejected


def _load_reference(reference_path, policy_path, tokenizer, device: torch.device, dtype: torch.dtype):
    """The frozen reference model, or None when it is the starting policy (then the model in training,
    before its first update, scores the pairs). Under several processes each rank holds a whole,
    unsharded copy: with no gradients its forwards need no collectives, so the ranks may score
    their shares independently."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if reference_path is None or Path(reference_path).resolve() == Path(policy_path).resolve():
        return None
    if AutoTokenizer.from_pretrained(str(reference_path)).get_vocab() != tokenizer.get_vocab():
        raise ValueError("the DPO reference must share the policy's tokenizer")
    reference = AutoModelForCausalLM.from_pretrained(str(reference_path), dtype=dtype).to(device)
    disable_dropout(reference)
    return freeze(reference)


# --- training ---------------------------------------------------------------------------------


def _load_policy(policy_path, config: DPOConfig, load_dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The policy to train (with its LoRA adapter when configured), trainable weights in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(policy_path), dtype=load_dtype).to(device)
    disable_dropout(model)
    model.eval()  # no dropout anywhere; gradients flow in eval mode all the same
    if config.lora is not None:
        model = add_adapter(freeze(model), config.lora, "policy")
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def _schedule(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def train_dpo(
    policy_path: str | Path,
    comparisons: list[Comparison],
    output_dir: str | Path,
    checkpoint_dir: str | Path,
    config: DPOConfig,
    reporter: Reporter,
    reference_path: str | Path | None = None,
) -> DPOResult:
    """Train the live policy on the comparisons with DPO and publish the new policy folder to `output_dir`.

    `reference_path` is the policy DPO's implicit reward is measured against: the base policy in a
    round (see the module docstring); None = the starting policy itself.
    """
    from transformers import AutoTokenizer

    if not comparisons:
        raise ValueError("DPO needs at least one comparison")
    if config.loss_type != "sigmoid":
        raise ValueError(f"unsupported DPO loss {config.loss_type!r}; only 'sigmoid' is implemented")
    if config.sharding not in STRATEGIES:
        raise ValueError(f"unknown sharding {config.sharding!r}; choose one of {', '.join(STRATEGIES)}")
    group = current_group()
    group.require_divisible(config.batch_size, "policy.batch_size")
    reporter = reporter if isinstance(reporter, RankReporter) else group.reporter(reporter)
    device = group.device(config.device)
    return_freed_memory_to_os(device)
    torch.manual_seed(config.seed)  # the same seed on every rank: the same adapter weights to shard
    tokenizer = AutoTokenizer.from_pretrained(str(policy_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    compute_dtype = resolve_dtype(config.dtype, device)
    # Full fine-tuning keeps float32 weights (bf16 would round small updates away) and autocasts the
    # maths; a frozen LoRA base can be held in the compute dtype.
    load_dtype = compute_dtype if config.lora is not None else torch.float32
    model = _load_policy(policy_path, config, load_dtype, device)
    lr = config.learning_rate * (config.lora.lr_scale if config.lora is not None else 1.0)
    # The scorer is the root FSDP module; the trainable parameters are taken after sharding, so the
    # optimizer and the checkpoint see the sharded ones.
    scorer = shard_model(SequenceLogps(model, compute_dtype), group, config.sharding)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    train_items, eval_items = split_by_prompt(comparisons, config.eval_fraction, config.seed)
    if not train_items:
        train_items, eval_items = list(comparisons), []
    train_pairs = _encode(tokenizer, train_items, config.max_length)
    eval_pairs = _encode(tokenizer, eval_items, config.max_length)
    steps_per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs

    optimizer = torch.optim.AdamW(
        list(trainable.values()), lr=lr, betas=config.adam_betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total_steps, config.warmup_ratio))
    state = TrainableState(trainable)
    pad_id = tokenizer.pad_token_id

    def all_logps(pairs: list[_Pair], by: SequenceLogps | None = None) -> tuple[list[float], list[float]]:
        return _all_pair_logps(
            by if by is not None else scorer, pairs, config.batch_size, pad_id, device, group
        )

    def evaluate() -> dict[str, float]:
        if not eval_pairs:
            return {}
        chosen, rejected = all_logps(eval_pairs)
        pc, pr = torch.tensor(chosen), torch.tensor(rejected)
        losses, rc, rr = dpo_loss(
            pc,
            pr,
            torch.tensor(ref["eval_c"]),
            torch.tensor(ref["eval_r"]),
            config.beta,
            config.label_smoothing,
        )
        return {
            "eval_logratio": (pc - pr).mean().item(),  # held-out log pi(chosen) - log pi(rejected)
            "eval_loss": losses.mean().item(),
            "eval_reward_accuracy": (rc > rr).float().mean().item(),
            "eval_reward_margin": (rc - rr).mean().item(),
        }

    start, resumed = 0, None
    last = latest_checkpoint(Path(checkpoint_dir))
    if last is not None:
        extra = load_checkpoint(last, state, optimizer, scheduler)
        ref, eval_before = extra["reference"], extra["eval_before"]
        start = resumed = int(extra["step"])
    else:
        # Score every pair with the reference before the first update.
        reference = _load_reference(reference_path, policy_path, tokenizer, device, compute_dtype)
        by = SequenceLogps(reference, compute_dtype) if reference is not None else None
        ref = {}
        ref["train_c"], ref["train_r"] = all_logps(train_pairs, by)
        ref["eval_c"], ref["eval_r"] = all_logps(eval_pairs, by)
        del by
        del reference
        eval_before = evaluate()
        if eval_before:
            reporter.metrics(0, eval_before)

    metrics: dict[str, float] = {}
    for step in range(start, total_steps):
        if reporter.should_stop():
            raise RunCancelled(f"cancelled before step {step + 1}")
        started = time.perf_counter()
        epoch, position = divmod(step, steps_per_epoch)
        order = list(range(len(train_pairs)))
        random.Random(config.seed * 7919 + epoch).shuffle(order)
        rows = order[position * config.batch_size : (position + 1) * config.batch_size]
        # This rank's share of the step's pairs. The last batch of an epoch can be short of one pair
        # per rank; a rank without pairs then scores a copy of one and weights it zero, because every
        # rank must run the forward and backward (parameters are gathered, gradients reduced together).
        local = group.shard(rows)
        weight = 1.0 if local else 0.0
        local = local or rows[:1]
        pc, pr = _pair_logps(scorer, [train_pairs[i] for i in local], pad_id, device)
        rc_ref = torch.tensor([ref["train_c"][i] for i in local], device=device)
        rr_ref = torch.tensor([ref["train_r"][i] for i in local], device=device)
        losses, rc, rr = dpo_loss(pc, pr, rc_ref, rr_ref, config.beta, config.label_smoothing)
        # FSDP averages gradients over ranks: the local mean times (local pairs * world / step pairs)
        # makes that average the gradient of the step's mean loss (a factor of exactly 1 for one process).
        scale = weight * len(local) * group.world_size / len(rows)
        optimizer.zero_grad(set_to_none=True)
        (losses.mean() * scale).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        # Every rank computes the metrics from the step's pairs in order, as one process does.
        keep = slice(None) if weight else slice(0, 0)
        losses, rc, rr = (group.cat(t.detach()[keep]) for t in (losses, rc, rr))
        metrics = {
            "loss": losses.mean().item(),
            "rewards_chosen": rc.mean().item(),
            "rewards_rejected": rr.mean().item(),
            "reward_accuracy": (rc > rr).float().mean().item(),
            "reward_margin": (rc - rr).mean().item(),
            "grad_norm": grad_norm_value(grad_norm),
            "lr": optimizer.param_groups[0]["lr"],
            # the slowest rank sets the pace
            "step_seconds": float(group.maximum(torch.tensor([time.perf_counter() - started]))[0]),
        }
        done = step + 1
        if done % config.eval_every == 0 or done == total_steps:
            metrics.update(evaluate())
        reporter.metrics(done, metrics)
        reporter.progress(done, total_steps, f"loss {metrics['loss']:.4f}")
        if done % config.checkpoint_every == 0 or done == total_steps:
            save_checkpoint(
                Path(checkpoint_dir),
                done,
                state,
                optimizer,
                scheduler,
                {"step": done, "reference": ref, "eval_before": eval_before},
            )

    eval_after = evaluate()
    adapter = "policy" if config.lora is not None else None
    if not group.distributed:
        sha = atomic_publish(
            lambda folder: save_policy_folder(model, tokenizer, folder, adapter), Path(output_dir)
        )
    else:
        sha = _publish_from_main(policy_path, config, model, load_dtype, tokenizer, Path(output_dir), group)
    return DPOResult(Path(output_dir), sha, total_steps, metrics, eval_before, eval_after, resumed)


def _publish_from_main(
    policy_path,
    config: DPOConfig,
    model: nn.Module,
    load_dtype: torch.dtype,
    tokenizer,
    output_dir: Path,
    group: ProcessGroup,
) -> str:
    """Gather the whole trained weights (a collective), let rank 0 load them into a plain copy of the
    policy on the CPU and publish it (LoRA merged); every rank returns the folder's hash."""
    weights = full_state_dict(model, group)

    def publish() -> str:
        plain = _load_policy(policy_path, config, load_dtype, torch.device("cpu"))
        plain.load_state_dict(weights)  # copies into the plain model: tied weights stay tied
        adapter = "policy" if config.lora is not None else None
        return atomic_publish(
            lambda folder: save_policy_folder(plain, tokenizer, folder, adapter), output_dir
        )

    return on_main(group, publish)
