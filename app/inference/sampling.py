"""Next-token sampling: the settings, then repetition penalty, temperature, top-p and a draw, in Hugging Face's order.

`sample_next_tokens` follows the Hugging Face order and definitions: repetition penalty on every token
already in the row (prompt and response), then temperature, then top-p (nucleus), then a draw. It looks
only at the top of the distribution, widening where a row needs it, instead of sorting the vocabulary,
but the kept set is exactly the nucleus, so the distribution is the one specified.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    """How responses are sampled. Defaults are the PPO-max sampling settings of MOSS-RLHF."""

    max_new_tokens: int = 128  # long enough for a chat answer of a small model, short enough for CPU rollouts
    temperature: float = 0.8  # MOSS-RLHF PPO-max: slightly sharper than the raw policy
    top_p: float = 0.9  # MOSS-RLHF PPO-max: drop the 10% tail mass where degenerate tokens live
    repetition_penalty: float = 1.1  # MOSS-RLHF PPO-max: mild CTRL-style penalty against loops
    do_sample: bool = True  # False = greedy (argmax after the repetition penalty), for evaluation

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: Tensor, previous_tokens: Tensor, penalty: float) -> Tensor:
    """CTRL / Hugging Face repetition penalty, returned as a new tensor.

    Every token id present in a row of `previous_tokens` (B, T) gets its logit divided by `penalty` if
    positive and multiplied by it if negative, once, however often it occurred. Every entry of
    `previous_tokens` must be a real token of that row: pad a short row by repeating one of its tokens.
    """
    if penalty == 1.0 or previous_tokens.shape[-1] == 0:
        return logits.clone()
    seen = torch.gather(logits, 1, previous_tokens)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, previous_tokens, seen)


def top_p_candidates(probs: Tensor, top_p: float, first_k: int = 64) -> tuple[Tensor, Tensor]:
    """The nucleus of each row of `probs` (B, V): the smallest set of most likely tokens whose mass reaches `top_p`.

    Returns (weights, token_ids), both (B, k) with k >= the largest nucleus: the probabilities of the kept
    tokens, zero for the others (not renormalised; a draw normalises). Instead of sorting the whole
    vocabulary (what `generate` does, and most of its sampling time), it looks at the top `first_k`
    tokens and widens only while some row's nucleus is not inside them, so the kept set is exact.
    """
    vocab = probs.shape[-1]
    k = min(vocab, first_k)
    top, ids = probs.topk(k, dim=-1)  # sorted, largest first
    short = top.cumsum(-1)[:, -1] < top_p  # rows whose nucleus reaches past the first look
    if bool(short.any()) and k < vocab:
        rows = short.nonzero().squeeze(1)
        wide, wide_ids = _widen(probs[rows], top_p, k)
        # Covered rows keep their k entries and get zero-weight padding, which is never drawn.
        top = torch.cat([top, top.new_zeros(top.shape[0], wide.shape[1] - k)], dim=1)
        ids = torch.cat([ids, ids.new_zeros(ids.shape[0], wide.shape[1] - k)], dim=1)
        top[rows], ids[rows] = wide, wide_ids
    # A token is in the nucleus when the mass of the tokens ranked above it is still short of top_p;
    # the most likely token always is (its preceding mass is 0).
    keep = (top.cumsum(-1) - top) < top_p
    return top.masked_fill(~keep, 0.0), ids


def _widen(probs: Tensor, top_p: float, k: int) -> tuple[Tensor, Tensor]:
    """Top tokens of the few rows whose nucleus is wider than k, looking 8x wider until every row is covered."""
    vocab = probs.shape[-1]
    while True:
        k = min(vocab, k * 8)
        top, ids = probs.topk(k, dim=-1)
        if k == vocab or bool((top.cumsum(-1)[:, -1] >= top_p).all()):
            return top, ids


def sample_next_tokens(
    logits: Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    previous_tokens: Tensor | None = None,
) -> Tensor:
    """Pick the next token of each row from next-token `logits` (B, V); returns (B,) token ids.

    Order as in Hugging Face `generate`: repetition penalty over `previous_tokens` (B, T), then greedy
    argmax, or temperature, top-p and a draw from the renormalised kept probabilities using `generator`
    (the global RNG when None). `logits` is not modified.
    """
    return draw_next_tokens(logits, sampling, generator, previous_tokens)[0]


def draw_next_tokens(
    logits: Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    previous_tokens: Tensor | None = None,
    row_generators: list[torch.Generator] | None = None,
) -> tuple[Tensor, Tensor]:
    """`sample_next_tokens` and the log-probability (B,) of each picked token under the distribution it
    was drawn from: after the penalty, temperature and the renormalised nucleus; 0 for a greedy pick.

    PPO trains on the log-probs of the distribution that sampled; these let it check that it does.

    With `row_generators` (one per row, used instead of `generator`) each row draws from its own
    stream, once per call, looking only at its own logits: a row's token then depends on its own
    generator and distribution alone, not on which other rows share the batch.
    """
    scores = logits.float()
    if previous_tokens is not None and sampling.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, previous_tokens, sampling.repetition_penalty)
    if not sampling.do_sample:
        tokens = scores.argmax(-1)
        return tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    tempered = scores / sampling.temperature
    probs = torch.softmax(tempered, dim=-1)
    if row_generators is not None:
        return _draw_per_row(probs, tempered, sampling.top_p, row_generators)
    if sampling.top_p >= 1.0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        # log-softmax at the picked token, without a second (B, V) tensor
        picked = tempered.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        return tokens, picked - torch.logsumexp(tempered, dim=-1)
    weights, ids = top_p_candidates(probs, sampling.top_p)
    choice = torch.multinomial(weights, 1, generator=generator)
    kept = weights.gather(-1, choice).squeeze(-1)
    logprobs = torch.log(kept) - torch.log(weights.sum(-1))
    return ids.gather(-1, choice).squeeze(-1), logprobs


def _draw_per_row(
    probs: Tensor, tempered: Tensor, top_p: float, generators: list[torch.Generator]
) -> tuple[Tensor, Tensor]:
    """One draw per row, each from its own generator, by the exponential race `torch.multinomial`
    itself uses for one sample: token = argmax(p / q) with q ~ Exp(1), one q per vocabulary entry.

    Every draw consumes exactly V numbers from the row's stream, whatever the nucleus: a draw whose
    count depended on the nucleus's width (`top_p_candidates` widens when the top tokens fall short)
    would let a float-noise difference at the nucleus's edge shift every later draw of the row. The
    nucleus is found row by row too, so nothing depends on the other rows.
    """
    if len(generators) != probs.shape[0]:
        raise ValueError(f"{probs.shape[0]} rows but {len(generators)} row generators")
    tokens = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    logprobs = torch.empty(probs.shape[0], dtype=torch.float32, device=probs.device)
    for row, generator in enumerate(generators):
        race = torch.empty_like(probs[row]).exponential_(1.0, generator=generator)
        if top_p >= 1.0:
            token = (probs[row] / race).argmax()
            tokens[row] = token
            logprobs[row] = tempered[row, token] - torch.logsumexp(tempered[row], dim=-1)
            continue
        weights, ids = top_p_candidates(probs[row : row + 1], top_p)
        choice = (weights[0] / race[ids[0]]).argmax()
        tokens[row] = ids[0, choice]
        logprobs[row] = torch.log(weights[0, choice]) - torch.log(weights[0].sum())
    return tokens, logprobs
