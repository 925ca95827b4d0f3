"""Batched sampling with a KV cache: PPO rollouts, responses for ranking tasks, the playground stream.

One decoding loop serves all three callers. Prompts are padded on the left so that every row's next
token lands in the same cache column; a row that emits EOS stops contributing tokens while the others go
on, until all rows are done or `max_new_tokens` is reached, and stopped rows leave the batch once they
are a quarter of it.

Sampling (`sample_next_tokens`) follows the Hugging Face order and definitions: repetition penalty on
every token already in the row (prompt and response), then temperature, then top-p (nucleus), then a
draw. It looks only at the top of the distribution, widening where a row needs it, instead of sorting
the vocabulary, but the kept set is exactly the nucleus, so the distribution is the one specified.

Two forward backends produce next-token logits:

- `_LlamaDecoder`, a fast path for Llama-architecture models (SmolLM2, Llama 2/3, also under peft
  LoRA): a pre-allocated KV cache written in place, grouped-query attention without repeating K/V, the
  LM head on the last position only, a prefill that runs a prefix shared by all prompts (the chat
  template's system turn) and duplicated prompts once, and on x86 CPUs decode-step matmuls on
  MKL-packed copies of the weights (fused QKV and gate/up), which suit the skinny (batch x hidden)
  inputs of a decode step.
- `_HFDecoder`, the model's own forward with its own cache, for every other causal LM.

Weights are read from the model at the start of every call (LoRA adapters merged into the packed copy
or applied on the fly), so PPO's updates between calls are always seen; nothing is cached across calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --- configuration and results ------------------------------------------------------------------


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


@dataclass
class Rollout:
    prompt_ids: list[list[int]]  # unpadded prompt tokens, one list per sample
    response_ids: list[list[int]]  # unpadded generated tokens, includes the EOS token if it was emitted
    ended_with_eos: list[bool]
    texts: list[str]  # decoded responses, special tokens skipped


# --- sampling -----------------------------------------------------------------------------------


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
    scores = logits.float()
    if previous_tokens is not None and sampling.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, previous_tokens, sampling.repetition_penalty)
    if not sampling.do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores / sampling.temperature, dim=-1)
    if sampling.top_p >= 1.0:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    weights, ids = top_p_candidates(probs, sampling.top_p)
    choice = torch.multinomial(weights, 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)


# --- forward backends ---------------------------------------------------------------------------


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers are injected into it in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class _HFDecoder:
    """Any causal LM through its own forward and its own KV cache (the generic, always-correct path)."""

    def __init__(self, model: nn.Module, batch: int, total_len: int, device: torch.device):
        self.model = model
        params = inspect.signature(_unwrap_peft(model).forward).parameters
        # Only the last position's logits are needed; models that support it skip the rest of the LM head.
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.mask = torch.ones(batch, total_len, dtype=torch.long, device=device)
        self.length = 0
        self.cache = None

    def prefill(self, input_ids: Tensor, valid: Tensor, positions: Tensor, shared: int = 0) -> Tensor:
        # `shared` is always 0 here: _Decoding lays out a shared prefix only for the fast path.
        self.length = input_ids.shape[1]
        self.mask[:, : self.length] = valid
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.mask[:, : self.length],
            position_ids=positions,
            use_cache=True,
            **self.keep_last,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        self.length = column + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.mask[:, : self.length],
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return out.logits[:, -1]

    def keep_rows(self, rows: Tensor) -> bool:
        """Drop every other row from the batch; False when the model's cache type can't do that."""
        select = getattr(self.cache, "batch_select_indices", None)
        if select is None:
            return False
        select(rows)
        self.mask = self.mask[rows]
        return True


def _lora_linear_class() -> type | None:
    try:
        from peft.tuners.lora import Linear
    except ImportError:  # peft is a dependency, but the generator must not need it
        return None
    return Linear


@dataclass
class _LinearParts:
    """What a bias-free linear layer computes right now: x W^T + sum over adapters of (x A^T) B^T * scale."""

    weight: Tensor
    adapters: list[tuple[Tensor, Tensor, float]]

    def merged(self) -> Tensor:
        weight = self.weight
        for a, b, scale in self.adapters:
            weight = weight + (b @ a) * scale
        return weight


def _linear_parts(module: nn.Module) -> _LinearParts | None:
    """Read a projection without copying it, or None when the fast path does not know the layer type.

    Plain `nn.Linear`, or a peft LoRA layer: its base weight plus the active adapters, exactly what its
    forward adds on the fly (nothing when the adapters are merged into the base or disabled).
    """
    if type(module) is nn.Linear:
        return _LinearParts(module.weight, []) if module.bias is None else None
    lora_linear = _lora_linear_class()
    if lora_linear is None or not isinstance(module, lora_linear):
        return None
    base = module.base_layer
    if type(base) is not nn.Linear or base.bias is not None or module.fan_in_fan_out:
        return None
    if module.disable_adapters:
        # peft's forward would unmerge a merged adapter first; leave that to the generic path.
        return None if module.merged else _LinearParts(base.weight, [])
    if module.merged:
        return _LinearParts(base.weight, [])
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False):
            return None  # DoRA and friends change the forward, not just the weight
        adapters.append((module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
    return _LinearParts(base.weight, adapters)


def _mkl_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


class _Linear:
    """One projection, or several side by side (their outputs concatenated).

    Always usable in plain form: the layers' own tensors, no copy, adapters applied unmerged like peft.
    With `pack_rows` (x86 CPU, float32) it also holds the current weights, adapters merged in and
    concatenated, laid out for MKL's packed GEMM, used for inputs of exactly that many rows: a decode
    step multiplies each weight by a skinny (batch x hidden) input, where plain sgemm spends much of its
    time re-packing the weight on every call. The packed copy is made once per decoding call.
    """

    def __init__(self, modules: list[nn.Module], pack_rows: int | None):
        self.parts = [_linear_parts(m) for m in modules]
        self.rows = pack_rows
        self.packed = None
        if pack_rows:
            merged = [p.merged() for p in self.parts]
            weight = torch.cat(merged) if len(merged) > 1 else merged[0]
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, pack_rows)
            # The packed call reads only the shape of its "original weight" argument (which it would use
            # for other row counts; those never reach it), so a zero-stride stand-in spares a second copy.
            self.shape = weight.new_zeros(1, 1).expand(weight.shape)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None and x.shape[0] == self.rows:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.shape, None, self.rows)
        outputs = []
        for part in self.parts:
            y = F.linear(x, part.weight)
            for a, b, scale in part.adapters:
                # Adapters may be float32 over a half-precision base (LoRA keeps its trainable weights
                # in full precision); compute them in their own dtype and add the result back, like peft.
                delta = F.linear(F.linear(x.to(a.dtype), a), b) * scale
                y = y + delta.to(y.dtype)
            outputs.append(y)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


@dataclass
class _Layer:
    input_norm: Tensor
    post_norm: Tensor
    qkv: _Linear
    out: _Linear
    gate_up: _Linear
    down: _Linear
    scale: float


class _LlamaDecoder:
    """Llama-architecture forward for decoding, numerically the model's own computation.

    Differences from the transformers forward are in bookkeeping only: the K/V cache is pre-allocated for
    the whole call and written in place (no growing concatenation per step), Q/K/V and gate/up are one
    matmul each on CPU, grouped-query attention folds the query heads of a K/V head into one attention
    call instead of repeating K and V, and only the last position goes through the final norm and LM head.
    """

    @staticmethod
    def supports(model: nn.Module) -> bool:
        from transformers import LlamaForCausalLM

        inner = _unwrap_peft(model)
        if not isinstance(inner, LlamaForCausalLM):
            return False
        config = inner.config
        if (
            config.hidden_act != "silu"
            or getattr(config, "attention_bias", False)
            or getattr(config, "mlp_bias", False)
            or getattr(config, "pretraining_tp", 1) not in (None, 1)
        ):
            return False
        if type(inner.model.embed_tokens) is not nn.Embedding or _linear_parts(inner.lm_head) is None:
            return False
        for layer in inner.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            projections += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if any(_linear_parts(p) is None for p in projections):
                return False
        return True

    def __init__(
        self, model: nn.Module, batch: int, total_len: int, device: torch.device, packed: bool | None = None
    ):
        inner = _unwrap_peft(model)
        config, backbone = inner.config, inner.model
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        self.embed = backbone.embed_tokens.weight
        self.final_norm = backbone.norm.weight
        self.rotary = backbone.rotary_emb
        dtype = self.embed.dtype
        if packed is None:
            packed = _mkl_packing_available(device, dtype)
        pack = batch if packed else None
        self.layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    qkv=_Linear([attn.q_proj, attn.k_proj, attn.v_proj], pack),
                    out=_Linear([attn.o_proj], pack),
                    gate_up=_Linear([mlp.gate_proj, mlp.up_proj], pack),
                    down=_Linear([mlp.down_proj], pack),
                    scale=attn.scaling,
                )
            )
        self.lm_head = _Linear([inner.lm_head], pack)
        shape = (len(self.layers), batch, self.kv_heads, total_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.ones(batch, 1, 1, total_len, dtype=torch.bool, device=device)
        self.length = 0

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # Half precision: normalise in float32 and scale after casting back, like LlamaRMSNorm.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def _forward(
        self, input_ids: Tensor, positions: Tensor, mask: Tensor, start: int, row: int = 0
    ) -> Tensor:
        """Run `input_ids` (b, T) through cache rows [row, row + b) at columns [start, start + T).

        Attends to everything cached in those rows before `start`; returns the last position's logits.
        """
        batch, width = input_ids.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        end = start + width
        x = F.embedding(input_ids, self.embed)
        cos, sin = self.rotary(x, positions)
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads: (B, T, 1, D)
        half = dim // 2
        rows = batch * width
        for index, layer in enumerate(self.layers):
            h = self._norm(x, layer.input_norm).view(rows, -1)
            qkv = layer.qkv(h).view(batch, width, heads + 2 * kv_heads, dim)
            qk, v = qkv[:, :, : heads + kv_heads], qkv[:, :, heads + kv_heads :]
            # Rotary embedding on queries and keys together (rotate_half layout, as in transformers).
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            keys, values = self.keys[index, row : row + batch], self.values[index, row : row + batch]
            keys[:, :, start:end] = k.transpose(1, 2)
            values[:, :, start:end] = v.transpose(1, 2)
            keys, values = keys[:, :, :end], values[:, :, :end]
            if width == 1:
                # Query head h uses K/V head h // group, so the group's queries can share one call.
                q = q.reshape(batch, kv_heads, heads // kv_heads, dim)
                attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=layer.scale)
            else:
                group = heads // kv_heads
                attended = F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    keys.repeat_interleave(group, dim=1),
                    values.repeat_interleave(group, dim=1),
                    attn_mask=mask,
                    scale=layer.scale,
                ).transpose(1, 2)
            x = x + layer.out(attended.reshape(rows, heads * dim)).view(batch, width, -1)
            gate_up = layer.gate_up(self._norm(x, layer.post_norm).view(rows, -1))
            inner = gate_up.shape[-1] // 2
            x = x + layer.down(F.silu(gate_up[:, :inner]) * gate_up[:, inner:]).view(batch, width, -1)
        self.length = end
        return self.lm_head(self._norm(x[:, -1], self.final_norm))

    def prefill(self, input_ids: Tensor, valid: Tensor, positions: Tensor, shared: int = 0) -> Tensor:
        """Fill the cache with the prompts and return their next-token logits.

        Prefill is compute-bound, so it skips work that is plainly repeated or wasted: the first `shared`
        columns (a prefix every row has, such as the chat template's system turn) run once for one row
        and are copied to the others; rows whose remaining tokens are identical (K samples of one prompt)
        run once; and the distinct remainders run in groups of similar length, each only as wide as its
        longest member, instead of all padded to the longest prompt. Keys and values depend only on
        tokens and positions, so the copies are exact.
        """
        batch, width = input_ids.shape
        device = input_ids.device
        valid = valid.bool()
        self.key_valid[:, 0, 0, :width] = valid
        if shared:
            causal = torch.ones(shared, shared, dtype=torch.bool, device=device).tril()
            self._forward(input_ids[:1, :shared], positions[:1, :shared], causal, start=0)
            self.keys[:, 1:batch, :, :shared] = self.keys[:, :1, :, :shared]
            self.values[:, 1:batch, :, :shared] = self.values[:, :1, :, :shared]
        # Distinct remainders (a real token may equal the pad id, so validity is part of the identity),
        # longest first; distinct remainder d is computed in cache row d, then rows are put in place.
        rest = torch.cat([input_ids[:, shared:], valid[:, shared:].long()], dim=1).tolist()
        first_row: dict[tuple[int, ...], int] = {}
        for r, key in enumerate(rest):
            first_row.setdefault(tuple(key), r)
        lengths = valid[:, shared:].sum(1).tolist()
        distinct = sorted(first_row.values(), key=lambda r: -lengths[r])
        slot = {tuple(rest[r]): d for d, r in enumerate(distinct)}
        pieces, done = [], 0
        for count, span in _length_groups([lengths[r] for r in distinct]):
            rows = torch.tensor(distinct[done : done + count], device=device)
            lo = width - span  # the group's columns: its longest remainder, right-aligned like all rows
            ok = valid[rows]
            causal = torch.ones(span, span, dtype=torch.bool, device=device).tril()
            mask = torch.cat(
                [ok[:, None, None, :lo].expand(-1, 1, span, -1), causal & ok[:, None, None, lo:]], -1
            )
            # Padding queries see only themselves, so no softmax row is empty (that would give NaN).
            mask[..., lo:] |= torch.eye(span, dtype=torch.bool, device=device)
            pieces.append(self._forward(input_ids[rows, lo:], positions[rows, lo:], mask, start=lo, row=done))
            done += count
        self.length = width
        logits = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        order = [slot[tuple(key)] for key in rest]
        if order == list(range(batch)):
            return logits
        index = torch.tensor(order, device=device)
        self.keys[:, :batch, :, shared:width] = self.keys[:, index, :, shared:width]
        self.values[:, :batch, :, shared:width] = self.values[:, index, :, shared:width]
        return logits[index]

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        mask = self.key_valid[..., : column + 1]
        return self._forward(tokens[:, None], positions[:, None], mask, start=column)

    def keep_rows(self, rows: Tensor) -> bool:
        """Drop every other row from the batch; only the filled part of the cache is copied."""
        shape = list(self.keys.shape)
        shape[1] = rows.numel()
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = old.new_empty(shape)
            new[:, :, :, : self.length] = old[:, rows, :, : self.length]
            setattr(self, name, new)
        self.key_valid = self.key_valid[rows]
        return True


# --- the decoding loop --------------------------------------------------------------------------


def _length_groups(lengths: list[int], fill: float = 0.75) -> list[tuple[int, int]]:
    """Split lengths sorted longest first into runs (count, width) whose members are at least `fill` of the
    run's first: prefill padding stays under a quarter without a separate pass per length."""
    groups: list[tuple[int, int]] = []
    for length in lengths:
        if groups and length >= fill * groups[-1][1]:
            groups[-1] = (groups[-1][0] + 1, groups[-1][1])
        else:
            groups.append((1, length))
    return groups


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
        self.decoder = owner._decoder(fast, self.batch, total, sampling.max_new_tokens)
        self.steps = 0
        self.last: Tensor | None = None

    @property
    def done(self) -> bool:
        return self.steps >= self.sampling.max_new_tokens or bool(self.finished.all())

    def advance(self) -> tuple[Tensor, Tensor]:
        """(tokens (B,), emitted (B,) bool): the new token of each row and whether the row produced it."""
        column = self.width + self.steps
        if self.last is None:
            logits = self.decoder.prefill(self.input_ids, self.valid, self.positions, self.shared)
            self.positions = self.positions[:, -1]
        else:
            self.positions = self.positions + 1
            logits = self.decoder.step(self.last, self.positions, column - 1)
        sampled = sample_next_tokens(logits, self.sampling, self.rng, self.history[:, :column])
        live = ~self.finished[self.active]
        sampled = torch.where(live, sampled, torch.full_like(sampled, self.pad_id))
        # A stopped row is never sampled again, so its history column only has to hold a real token.
        self.history[:, column] = torch.where(live, sampled, self.history[:, column - 1])
        tokens = torch.full((self.batch,), self.pad_id, dtype=torch.long, device=sampled.device)
        emitted = torch.zeros(self.batch, dtype=torch.bool, device=sampled.device)
        tokens[self.active], emitted[self.active] = sampled, live
        if self.stop_ids.numel():
            self.finished |= emitted & torch.isin(tokens, self.stop_ids)
        self.last = sampled
        self.steps += 1
        self._drop_stopped_rows()
        return tokens, emitted

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
        return self.use_fast_path and _LlamaDecoder.supports(self.model)

    def _decoder(self, fast: bool, batch: int, total_len: int, new_tokens: int):
        if fast:
            packed = self.fast_path_packed
            if packed is None and new_tokens < self.min_tokens_to_pack:
                packed = False
            return _LlamaDecoder(self.model, batch, total_len, self.device, packed)
        return _HFDecoder(self.model, batch, total_len, self.device)

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, seed: int | None = None
    ) -> Rollout:
        """Sample one response per prompt (token ids in, token ids and texts out)."""
        prompts = [list(map(int, p)) for p in prompt_ids]
        if any(not p for p in prompts):
            raise ValueError("every prompt needs at least one token")
        responses: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        # Chunks of similar length waste less compute on padding; the order is restored below.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        rng_seed = seed
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start : start + self.max_batch_size]
            steps = []
            with _inference(self.model):
                decoding = _Decoding(self, [prompts[i] for i in chunk], sampling, rng_seed)
                while not decoding.done:
                    steps.append(decoding.advance())
            tokens = torch.stack([t for t, _ in steps], 1).tolist()
            emitted = torch.stack([e for _, e in steps], 1).tolist()
            for row, index in enumerate(chunk):
                responses[index] = [t for t, e in zip(tokens[row], emitted[row], strict=True) if e]
                ended[index] = bool(responses[index]) and responses[index][-1] in self.stop_token_ids
            if rng_seed is not None:
                rng_seed += 1  # a different stream per chunk, still a function of the caller's seed
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []
        return Rollout(prompt_ids=prompts, response_ids=responses, ended_with_eos=ended, texts=list(texts))

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
                token, _ = decoding.advance()
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
