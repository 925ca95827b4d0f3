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
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from app.common.files import atomic_publish
from app.common.reporting import Reporter, RunCancelled
from workers.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from workers.training.config import TrainerConfig
from workers.training.data import Comparison, format_conversation, format_prompt, split_by_prompt
from workers.training.lora import (
    LoraSettings,
    TrainableState,
    add_adapter,
    compute_context,
    disable_dropout,
    freeze,
    pack,
    resolve_device,
    resolve_dtype,
    response_logprobs,
    return_freed_memory_to_os,
    save_policy_folder,
)
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
    tokenizer, prompt: list[dict], response: str, max_length: int
) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one rendered conversation, split where the two stop agreeing.

    The response part includes the template's end-of-turn tokens, so DPO also teaches when to stop.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids
    full = tokenizer(format_conversation(tokenizer, prompt, response), add_special_tokens=False).input_ids
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
        prompt, chosen = _split_tokens(tokenizer, c.prompt, c.chosen, max_length)
        prompt_r, rejected = _split_tokens(tokenizer, c.prompt, c.rejected, max_length)
        # Both sides must condition on the same prompt tokens; differences come only from truncation.
        shared = min(len(prompt), len(prompt_r))
        pairs.append(_Pair(prompt[len(prompt) - shared :], chosen, rejected))
    return pairs


def _pair_logps(
    model, pairs: list[_Pair], pad_id: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs (chosen, rejected) of each pair, in one forward over 2B rows."""
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = pack(prompts, responses, pad_id).to(device)
    with compute_context(device, dtype):
        logps, _ = response_logprobs(model, batch)
    sums = masked_sum(logps, batch.response_mask, dim=1)
    return sums[: len(pairs)], sums[len(pairs) :]


def _load_reference(reference_path, policy_path, tokenizer, device: torch.device, dtype: torch.dtype):
    """The frozen reference model, or None when it is the starting policy (then the model in training,
    before its first update, scores the pairs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if reference_path is None or Path(reference_path).resolve() == Path(policy_path).resolve():
        return None
    if AutoTokenizer.from_pretrained(str(reference_path)).get_vocab() != tokenizer.get_vocab():
        raise ValueError("the DPO reference must share the policy's tokenizer")
    reference = AutoModelForCausalLM.from_pretrained(str(reference_path), dtype=dtype).to(device)
    disable_dropout(reference)
    return freeze(reference)


# --- training ---------------------------------------------------------------------------------


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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not comparisons:
        raise ValueError("DPO needs at least one comparison")
    if config.loss_type != "sigmoid":
        raise ValueError(f"unsupported DPO loss {config.loss_type!r}; only 'sigmoid' is implemented")
    device = resolve_device(config.device)
    return_freed_memory_to_os(device)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(policy_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    compute_dtype = resolve_dtype(config.dtype, device)
    # Full fine-tuning keeps float32 weights (bf16 would round small updates away) and autocasts the
    # maths; a frozen LoRA base can be held in the compute dtype.
    load_dtype = compute_dtype if config.lora is not None else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(policy_path), dtype=load_dtype).to(device)
    disable_dropout(model)
    model.eval()  # no dropout anywhere; gradients flow in eval mode all the same
    lr = config.learning_rate
    if config.lora is not None:
        model = add_adapter(freeze(model), config.lora, "policy")
        lr *= config.lora.lr_scale
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for param in trainable.values():
        param.data = param.data.float()

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

    def all_logps(pairs: list[_Pair], scorer=None) -> tuple[list[float], list[float]]:
        scorer = scorer if scorer is not None else model
        chosen, rejected = [], []
        with torch.no_grad():
            for i in range(0, len(pairs), config.batch_size):
                c, r = _pair_logps(scorer, pairs[i : i + config.batch_size], pad_id, device, compute_dtype)
                chosen += c.tolist()
                rejected += r.tolist()
        return chosen, rejected

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
        ref = {}
        ref["train_c"], ref["train_r"] = all_logps(train_pairs, reference)
        ref["eval_c"], ref["eval_r"] = all_logps(eval_pairs, reference)
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
        pc, pr = _pair_logps(model, [train_pairs[i] for i in rows], pad_id, device, compute_dtype)
        rc_ref = torch.tensor([ref["train_c"][i] for i in rows], device=device)
        rr_ref = torch.tensor([ref["train_r"][i] for i in rows], device=device)
        losses, rc, rr = dpo_loss(pc, pr, rc_ref, rr_ref, config.beta, config.label_smoothing)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        metrics = {
            "loss": loss.item(),
            "rewards_chosen": rc.mean().item(),
            "rewards_rejected": rr.mean().item(),
            "reward_accuracy": (rc > rr).float().mean().item(),
            "reward_margin": (rc - rr).mean().item(),
            "grad_norm": grad_norm.item(),
            "lr": optimizer.param_groups[0]["lr"],
            "step_seconds": time.perf_counter() - started,
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

    def build(folder: Path) -> None:
        save_policy_folder(model, tokenizer, folder, adapter="policy" if config.lora is not None else None)

    sha = atomic_publish(build, Path(output_dir))
    return DPOResult(Path(output_dir), sha, total_steps, metrics, eval_before, eval_after, resumed)
