"""Forward backends for decoding: prompts and new tokens in, next-token logits out, each with its own KV cache.

- `LlamaDecoder`, a fast path for Llama-architecture models (SmolLM2, Llama 2/3, also under peft
  LoRA): a pre-allocated KV cache written in place, grouped-query attention without repeating K/V, the
  LM head on the last position only, a prefill that runs a prefix shared by all prompts (the chat
  template's system turn) and duplicated prompts once, and decode-step matmuls on the projections of
  `projections` (MKL-packed on x86 CPUs).
- `HFDecoder`, the model's own forward with its own cache, for every other causal LM.

A decoder reads the model's weights when it is built, once per generation call, so updates made between
calls (PPO) are always seen; nothing is cached across calls.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from app.inference.projections import Projection, linear_parts, mkl_packing_available


class Decoder(Protocol):
    """What the decoding loop needs from a backend; rows are prompts, columns are cache positions."""

    def prefill(self, input_ids: Tensor, valid: Tensor, positions: Tensor, shared: int = 0) -> Tensor:
        """Fill the cache with the left-padded prompts; returns their next-token logits (B, V)."""

    def step(self, tokens: Tensor, positions: Tensor, column: int) -> Tensor:
        """Feed one token per row at cache `column`; returns the next-token logits (B, V)."""

    def keep_rows(self, rows: Tensor) -> bool:
        """Drop every other row from the batch; False when the backend can't."""


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers are injected into it in place)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class HFDecoder:
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
        # `shared` is always 0 here: the generator lays out a shared prefix only for the fast path.
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


@dataclass
class _Layer:
    input_norm: Tensor
    post_norm: Tensor
    qkv: Projection
    out: Projection
    gate_up: Projection
    down: Projection
    scale: float


class LlamaDecoder:
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
        if type(inner.model.embed_tokens) is not nn.Embedding or linear_parts(inner.lm_head) is None:
            return False
        for layer in inner.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
            projections += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
            if any(linear_parts(p) is None for p in projections):
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
            packed = mkl_packing_available(device, dtype)
        pack = batch if packed else None
        self.layers = []
        for layer in backbone.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    input_norm=layer.input_layernorm.weight,
                    post_norm=layer.post_attention_layernorm.weight,
                    qkv=Projection([attn.q_proj, attn.k_proj, attn.v_proj], pack),
                    out=Projection([attn.o_proj], pack),
                    gate_up=Projection([mlp.gate_proj, mlp.up_proj], pack),
                    down=Projection([mlp.down_proj], pack),
                    scale=attn.scaling,
                )
            )
        self.lm_head = Projection([inner.lm_head], pack)
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
