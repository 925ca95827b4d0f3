"""Batched generation with a KV cache: PPO rollouts, responses for ranking tasks, the playground stream.

One decoding loop serves all three callers. Prompts are padded on the left so that every row's next
token lands in the same cache column; a row that emits EOS stops contributing tokens while the others go
on, until all rows are done or `max_new_tokens` is reached, and stopped rows leave the batch once they
are a quarter of it. Next-token logits come from a decoder (`decoders`: the Llama fast path where the
model allows it, the model's own forward otherwise); tokens are picked by `sampling`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from app.inference.decoders import Decoder, HFDecoder, LlamaDecoder
from app.inference.sampling import SamplingConfig, draw_next_tokens


@dataclass
class Rollout:
    """What `generate_ids` returns: one entry per prompt, in the caller's order."""

    prompt_ids: list[list[int]]  # unpadded prompt tokens, one list per sample
    response_ids: list[list[int]]  # unpadded generated tokens, includes the EOS token if it was emitted
    ended_with_eos: list[bool]
    texts: list[str]  # decoded responses, special tokens skipped
    # log-prob of each response token under the distribution that drew it (penalty, temperature and
    # nucleus applied; 0 for greedy picks), aligned with response_ids
    logprobs: list[list[float]]


def _common_prefix_length(prompts: list[list[int]]) -> int:
    first = prompts[0]
    length = min(len(p) for p in prompts)
    for other in prompts[1:]:
        length = next((i for i in range(length) if other[i] != first[i]), length)
    return length


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration; every module's training flag is restored after."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in flags:
            module.training = training


class _Decoding:
    """One batched decoding run. Create it and call `advance()` under `_inference`; each call produces the
    next token of every row.

    Cache layout, one row per prompt: `shared` columns holding the prefix that every prompt starts with
    (0 unless the decoder can share it), then the rest of each prompt left-padded to a common width, then
    one column per new token. All rows write their next token to the same column; positions count real
    tokens only, so padding in between changes nothing.

    Rows that have stopped are dropped from the decoder's batch (and KV cache) once they are a quarter of
    it, so the steps that wait for the longest response get cheaper instead of carrying dead rows along.
    """

    def __init__(
        self,
        owner: BatchedGenerator,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        seed: int | None,
        row_seeds: list[int] | None = None,
    ):
        device = owner.device
        self.sampling = sampling
        self.batch = len(prompt_ids)
        fast = owner.fast_path_active()
        # Sharing a prefix needs at least two rows and leaves every row one token of its own to predict from.
        self.shared = _common_prefix_length(prompt_ids) if fast and self.batch > 1 else 0
        self.shared = min(self.shared, min(len(p) for p in prompt_ids) - 1)
        rest_width = max(len(p) for p in prompt_ids) - self.shared
        self.width = self.shared + rest_width
        total = self.width + sampling.max_new_tokens
        ids = torch.full((self.batch, self.width), owner.pad_token_id, dtype=torch.long)
        valid = torch.zeros(self.batch, self.width, dtype=torch.long)
        # Tokens the repetition penalty looks at; padding repeats the row's last prompt token.
        history = torch.empty(self.batch, total, dtype=torch.long)
        for row, prompt in enumerate(prompt_ids):
            pad = rest_width - (len(prompt) - self.shared)
            ids[row, : self.shared] = torch.tensor(prompt[: self.shared], dtype=torch.long)
            ids[row, self.shared + pad :] = torch.tensor(prompt[self.shared :], dtype=torch.long)
            valid[row, : self.shared] = 1
            valid[row, self.shared + pad :] = 1
            history[row, : self.width] = prompt[-1]
        history[:, : self.width] = torch.where(valid.bool(), ids, history[:, : self.width])
        self.input_ids, self.valid, self.history = ids.to(device), valid.to(device), history.to(device)
        self.positions = (self.valid.cumsum(-1) - 1).clamp(min=0)
        self.stop_ids = torch.tensor(list(owner.stop_token_ids), dtype=torch.long, device=device)
        self.pad_id = owner.pad_token_id
        self.finished = torch.zeros(self.batch, dtype=torch.bool, device=device)
        self.active = torch.arange(self.batch, device=device)  # original row of each decoder row
        self.rng = None
        if seed is not None:
            self.rng = torch.Generator(device=device)
            self.rng.manual_seed(seed)
        # One stream per row (by original row), drawn from only while that row is still going.
        self.row_rngs: list[torch.Generator] | None = None
        if row_seeds is not None:
            if len(row_seeds) != self.batch:
                raise ValueError(f"{self.batch} prompts but {len(row_seeds)} row seeds")
            self.row_rngs = [torch.Generator(device=device).manual_seed(int(s)) for s in row_seeds]
        self.decoder = owner._decoder(fast, self.batch, total, sampling.max_new_tokens)
        self.steps = 0
        self.last: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.steps >= self.sampling.max_new_tokens or bool(self.finished.all())

    def advance(self) -> tuple[Tensor, Tensor, Tensor]:
        """(tokens (B,), emitted (B,) bool, log-probs (B,)): the new token of each row, whether the row
        produced it, and its log-prob under the distribution it was drawn from (0 where not emitted)."""
        column = self.width + self.steps
        if self.last is None:
            logits = self.decoder.prefill(self.input_ids, self.valid, self.positions, self.shared)
            self.positions = self.positions[:, -1]
        else:
            self.positions = self.positions + 1
            logits = self.decoder.step(self.last, self.positions, column - 1)
        live = ~self.finished[self.active]
        if self.row_rngs is None:
            sampled, picked_logprobs = draw_next_tokens(
                logits, self.sampling, self.rng, self.history[:, :column]
            )
        else:
            sampled, picked_logprobs = self._draw_live_rows(logits, live, column)
        sampled = torch.where(live, sampled, torch.full_like(sampled, self.pad_id))
        picked_logprobs = torch.where(live, picked_logprobs, torch.zeros_like(picked_logprobs))
        # A stopped row is never sampled again, so its history column only has to hold a real token.
        self.history[:, column] = torch.where(live, sampled, self.history[:, column - 1])
        tokens = torch.full((self.batch,), self.pad_id, dtype=torch.long, device=sampled.device)
        emitted = torch.zeros(self.batch, dtype=torch.bool, device=sampled.device)
        logprobs = torch.zeros(self.batch, dtype=torch.float32, device=sampled.device)
        tokens[self.active], emitted[self.active], logprobs[self.active] = sampled, live, picked_logprobs
        if self.stop_ids.numel():
            self.finished |= emitted & torch.isin(tokens, self.stop_ids)
        self.last = sampled
        self.steps += 1
        self._drop_stopped_rows()
        return tokens, emitted, logprobs

    def _draw_live_rows(self, logits: Tensor, live: Tensor, column: int) -> tuple[Tensor, Tensor]:
        """Each row still going draws from its own stream; stopped rows draw nothing (their output is
        discarded), so a row consumes exactly one draw per token it emits, wherever it sits."""
        sampled = torch.full((logits.shape[0],), self.pad_id, dtype=torch.long, device=logits.device)
        picked = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)
        rows = live.nonzero().squeeze(1)
        if rows.numel():
            generators = [self.row_rngs[i] for i in self.active[rows].tolist()]
            tokens, logprobs = draw_next_tokens(
                logits[rows], self.sampling, None, self.history[rows, :column], row_generators=generators
            )
            sampled[rows], picked[rows] = tokens, logprobs
        return sampled, picked

    def _drop_stopped_rows(self) -> None:
        live = ~self.finished[self.active]
        rows, alive = live.numel(), int(live.sum())
        # Compacting copies the KV cache: worth it for a quarter of the batch and some steps still to go.
        if alive == 0 or alive > rows * 3 // 4 or self.sampling.max_new_tokens - self.steps < 8:
            return
        keep = live.nonzero().squeeze(1)
        if self.decoder.keep_rows(keep):
            self.active, self.history = self.active[keep], self.history[keep]
            self.positions, self.last = self.positions[keep], self.last[keep]


class BatchedGenerator:
    """Samples responses from a causal LM in batches with a KV cache.

    `model` may be any Hugging Face causal LM, also wrapped by peft; its weights may change between
    calls (PPO) and are read afresh each call. The model is used in eval mode under inference mode and
    its training flags are restored after. Generation stops at the tokenizer's EOS token.
    """

    # Larger requests run in chunks of similar prompt length: less padding, a bounded KV cache.
    max_batch_size = 64
    # Packing the fast path's weights costs what one or two dozen decode steps save; short runs skip it.
    min_tokens_to_pack = 32

    def __init__(self, model: nn.Module, tokenizer, device: str | torch.device | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        eos = tokenizer.eos_token_id
        self.stop_token_ids: tuple[int, ...] = () if eos is None else (int(eos),)
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = int(pad if pad is not None else (eos if eos is not None else 0))
        # The Llama fast path where the model allows it; False forces the generic path.
        self.use_fast_path = True
        # Fast-path weights: None = MKL-packed copies on x86 CPUs in float32, the model's own tensors elsewhere.
        self.fast_path_packed: bool | None = None

    def fast_path_active(self) -> bool:
        """Whether the next call will use the Llama fast path (it checks the model's layers now)."""
        return self.use_fast_path and LlamaDecoder.supports(self.model)

    def _decoder(self, fast: bool, batch: int, total_len: int, new_tokens: int) -> Decoder:
        if fast:
            packed = self.fast_path_packed
            if packed is None and new_tokens < self.min_tokens_to_pack:
                packed = False
            return LlamaDecoder(self.model, batch, total_len, self.device, packed)
        return HFDecoder(self.model, batch, total_len, self.device)

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        sampling: SamplingConfig,
        seed: int | None = None,
        row_seeds: list[int] | None = None,
    ) -> Rollout:
        """Sample one response per prompt (token ids in, token ids and texts out).

        `seed` seeds one stream for the whole call (the sample of a row then depends on the batch it
        is in). `row_seeds` (one per prompt, used instead of `seed`) gives every row a stream of its
        own: a row's response is then a function of its prompt, its seed and the weights only, the
        same whether it is generated alone, in a batch of any composition, or split over processes
        (up to float noise in the logits that a different batch shape can cause).
        """
        prompts = [list(map(int, p)) for p in prompt_ids]
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if row_seeds is not None and len(row_seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(row_seeds)} row seeds")
        responses: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        # Chunks of similar length waste less compute on padding; the order is restored below.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rng_seed = seed
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            steps = []
            with _inference(self.model):
                chunk_seeds = None if row_seeds is None else [row_seeds[i] for i in chunk]
                decoding = _Decoding(self, [prompts[i] for i in chunk], sampling, rng_seed, chunk_seeds)
                while not decoding.done:
                    steps.append(decoding.advance())
            tokens = torch.stack([t for t, _, _ in steps], 1).tolist()
            emitted = torch.stack([e for _, e, _ in steps], 1).tolist()
            picked = torch.stack([lp for _, _, lp in steps], 1).tolist()
            for row, index in enumerate(chunk):
                responses[index] = [t for t, e in zip(tokens[row], emitted[row], strict=True) if e]
                logprobs[index] = [lp for lp, e in zip(picked[row], emitted[row], strict=True) if e]
                ended[index] = bool(responses[index]) and responses[index][-1] in self.stop_token_ids
            if rng_seed is not None:
                rng_seed += 1  # a different stream per chunk, still a function of the caller's seed
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []
        return Rollout(
            prompt_ids=prompts,
            response_ids=responses,
            ended_with_eos=ended,
            texts=list(texts),
            logprobs=logprobs,
        )

    def chat_prompt_ids(self, conversation: list[dict]) -> list[int]:
        """Token ids of a conversation with the chat template and the assistant turn opened."""
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        # The template already writes the special tokens; the tokenizer must not add a second BOS.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_chat(
        self,
        conversations: list[list[dict]],
        sampling: SamplingConfig,
        num_return_sequences: int = 1,
        seed: int | None = None,
    ) -> list[list[str]]:
        """`num_return_sequences` sampled responses for each conversation, all in one batched run."""
        if num_return_sequences < 1:
            raise ValueError("num_return_sequences must be at least 1")
        prompts = [self.chat_prompt_ids(c) for c in conversations]
        repeated = [p for p in prompts for _ in range(num_return_sequences)]
        texts = self.generate_ids(repeated, sampling, seed).texts
        k = num_return_sequences
        return [texts[i * k : (i + 1) * k] for i in range(len(conversations))]

    def stream_chat(
        self, conversation: list[dict], sampling: SamplingConfig, seed: int | None = None
    ) -> Iterator[str]:
        """Yield the response's text in pieces as tokens arrive; the pieces join to the full response.

        The model is in eval/inference mode only while a token is computed, never across a `yield`, so the
        caller's code between pieces runs with its own autograd mode.
        """
        prompt = self.chat_prompt_ids(conversation)
        with _inference(self.model):
            decoding = _Decoding(self, [prompt], sampling, seed)
        tokens: list[int] = []
        shown = ""
        while not decoding.done:
            with _inference(self.model):
                token, _, _ = decoding.advance()
            token_id = int(token[0])
            if token_id in self.stop_token_ids:
                break
            tokens.append(token_id)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            # A multi-byte character split across tokens decodes to U+FFFD until its last byte arrives.
            if text.endswith("\ufffd") or not text.startswith(shown) or len(text) == len(shown):
                continue
            yield text[len(shown) :]
            shown = text
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text != shown and text.startswith(shown):
            yield text[len(shown) :]
