"""The arithmetic of PPO-max as pure tensor functions, so each piece can be checked by hand.

Shapes: `(batch, T)` tensors over response positions, with a float or bool `mask` of the same shape
that is 1 on real response tokens and 0 on padding. Nothing here touches a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the positions where `mask` is 1 (a zero mask gives 0, not NaN)."""
    mask = mask.to(values.dtype)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def share_of_mean(values: Tensor, mask: Tensor, count: float | Tensor | None) -> Tensor:
    """This batch's share of a mean over `count` masked positions (`masked_mean` when None).

    When several processes each hold part of a mini-batch, each divides its own sum by the token count
    of the whole mini-batch: the shares then add up, over the processes, to the one-process mean.
    """
    if count is None:
        return masked_mean(values, mask)
    return masked_sum(values, mask) / max(float(count), 1.0)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked positions; Bessel-corrected by default, as in MOSS/TRL whitening."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    count = mask.sum()
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked positions; padding comes back as 0.

    With `shift_mean=False` the mean is kept and only the scale changes.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = delta_t + gamma * lam * A_{t+1}; V past the last
    real token is 0 (the episode ends there). Returns (advantages, returns = advantages + values).
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        # Padding inside the tail must not carry advantage back into real tokens.
        running = running * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log p - log q per token: unbiased for KL(p||q) under samples from p, but can be negative."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = q/p: unbiased, always >= 0, lower variance (Schulman's note)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """KL(old || new) estimated with k3 on the old policy's samples, as MOSS logs `approx_kl`."""
    return masked_mean(kl_k3(old_logprobs, logprobs), mask)


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token reward: -kl_coef * kl on every response token, plus the sequence score on the last real token."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = last_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def last_index(mask: Tensor) -> Tensor:
    """Index of the last 1 in each row of a right-padded mask (0 for an empty row)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


@dataclass
class PolicyLoss:
    loss: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip: float,
    count: float | Tensor | None = None,
) -> PolicyLoss:
    """PPO's pessimistic surrogate: mean over tokens of max(-A r, -A clip(r, 1-eps, 1+eps)).

    With `count`, every returned value is this batch's share of the mean over `count` tokens
    (`share_of_mean`): a process holding part of a mini-batch passes the mini-batch's token count.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = share_of_mean(torch.maximum(unclipped, clipped), mask, count)
    with torch.no_grad():
        clip_fraction = share_of_mean((clipped > unclipped).to(logprobs.dtype), mask, count)
        kl = share_of_mean(kl_k3(old_logprobs, logprobs.detach()), mask, count)
        ratio_mean = share_of_mean(ratio.detach(), mask, count)
    return PolicyLoss(loss, clip_fraction, kl, ratio_mean)


@dataclass
class ValueLoss:
    loss: Tensor
    clip_fraction: Tensor


def clipped_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip: float,
    count: float | Tensor | None = None,
) -> ValueLoss:
    """0.5 * mean over tokens of max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2); `count`
    as in `clipped_policy_loss`."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * share_of_mean(torch.maximum(unclipped, clipped), mask, count)
    with torch.no_grad():
        clip_fraction = share_of_mean((clipped > unclipped).to(values.dtype), mask, count)
    return ValueLoss(loss, clip_fraction)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] without materialising the full log-softmax tensor."""
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) per position: logsumexp(z) - sum p z. Differentiable (the entropy
    bonus trains through it); pass detached logits for a metric."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


class RunningMoments:
    """Mean and std of every reward seen so far, merged batch by batch (Chan et al.'s parallel update).

    Starts at mean 0, std 1 so the first batch is scaled by its own spread; state is a plain dict for
    checkpoints.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.std = 1.0
        self.count = 1e-24

    def update(self, xs: Tensor) -> tuple[float, float]:
        """Fold a batch in; returns the batch's own (mean, std)."""
        xs = xs.detach().double().flatten()
        n = xs.numel()
        batch_mean = xs.mean().item()
        batch_var = xs.var(unbiased=False).item() if n > 1 else 0.0
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        # Unbiased std of everything seen, as MOSS reports it.
        self.std = math.sqrt(self.var * total / max(total - 1, 1e-12)) if total > 1 else 1.0
        self.count = total
        batch_std = math.sqrt(batch_var * n / (n - 1)) if n > 1 else 0.0
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.mean, self.var, self.std, self.count = (
            float(state["mean"]),
            float(state["var"]),
            float(state["std"]),
            float(state["count"]),
        )


def reward_affine(stats: dict[str, float] | None, running_std: float = 1.0) -> tuple[float, float]:
    """(scale, shift) of the map PPO puts a raw reward-model score through: z-score with the reward
    model's held-out mean/std (`stats`; None = no standardising), then divide by the running std.

    normalised = raw * scale + shift. The rollout standardises scores with it, and the critic's head,
    which starts as the reward model's, gets the same map folded in so its first values are on the
    scale of the rewards it must predict.
    """
    mean, std = (stats["mean"], max(float(stats["std"]), 1e-6)) if stats is not None else (0.0, 1.0)
    scale = 1.0 / (std * max(running_std, 1e-8))
    return scale, -float(mean) * scale


def scale_rewards(scores: Tensor, running: RunningMoments, clip: float | None) -> Tensor:
    """MOSS `reward_scale`: update the running stats, divide by the running std (the mean is left in,
    advantages are whitened later anyway), then clip to +-clip."""
    running.update(scores)
    scaled = scores / max(running.std, 1e-8)
    if clip:
        scaled = scaled.clamp(-clip, clip)
    return scaled


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams in one response that already occurred earlier in it (0 = no repetition)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)
