"""Where PPO's rollouts come from: an engine that samples responses from the current policy.

PPO needs one thing from generation: for each prompt, a response drawn from the policy's own
(tempered) distribution, with the log-prob of every token under that distribution, and row by row
reproducible from a seed. `RolloutEngine` is that contract; PPO picks an engine with
`PPOConfig.rollout_engine`:

- "builtin" (`BuiltinEngine`): the batched KV-cache generator of `app.inference`. In one process it
  generates with the training policy itself (no copy). When the policy is sharded over several
  processes (FSDP2) no process holds a whole policy to decode with, and decoding token by token
  through a sharded model would gather every layer's weights for every token; so each process keeps
  a plain, unsharded copy of the policy for generation, refreshed with the trained weights once per
  PPO step, before the rollout (`load_weights`).
- "vllm": `workers.training.vllm_engine.VLLMEngine`, imported only when chosen (vLLM is a large,
  GPU-only dependency that the rest of the project does not need).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from app.inference.generator import BatchedGenerator, Rollout
from app.inference.sampling import SamplingConfig
from workers.training.distributed import ProcessGroup

ENGINES = ("builtin", "vllm")


@runtime_checkable
class RolloutEngine(Protocol):
    """Samples PPO's rollouts from the current policy.

    `generate_ids(prompt_ids, sampling, row_seeds)` returns a `Rollout` (one entry per prompt, in the
    caller's order): `response_ids` (including the EOS token when one was emitted), `ended_with_eos`,
    `texts` (special tokens skipped) and `logprobs`, the log-prob of each response token under the
    distribution that drew it (`sampling`'s temperature applied; PPO samples without top-p or a
    repetition penalty). Row i draws from a stream seeded with `row_seeds[i]` only, so its response
    is a function of its prompt, its seed and the weights, whatever else is in the batch and however
    many processes share the rollout. (An engine that cannot honour this exactly must say so in its
    documentation: PPO's one- and many-process runs then differ by more than float noise.)

    `load_weights(state)` replaces the engine's weights: `state` is the whole, unsharded state dict of
    the causal LM under Hugging Face parameter names (`model.layers.0.self_attn.q_proj.weight`, ...),
    with LoRA adapters already merged in. PPO calls it on every process once per step, before the
    rollout, unless `shares_training_weights` is True (the engine reads the training policy's own
    parameters, so it is always current and there is nothing to load).

    The vLLM engine, `workers.training.vllm_engine.VLLMEngine`, is built by `make_rollout_engine` as
    `VLLMEngine(model_path=..., tokenizer=..., device=..., gpu_memory_utilization=..., dtype=...)`:
    `model_path` the policy folder PPO starts from (a Hugging Face causal-LM folder), `tokenizer` the
    policy's tokenizer (for `texts` and the EOS token), `device` this process's `torch.device`,
    `gpu_memory_utilization` the share of that GPU's memory the engine may take (the rest is the
    trainer's), `dtype` the `torch.dtype` to generate in.
    """

    shares_training_weights: bool

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, row_seeds: list[int]
    ) -> Rollout: ...

    def load_weights(self, state: dict[str, Tensor]) -> None: ...


class BuiltinEngine:
    """`BatchedGenerator` behind the engine contract, on the training policy itself or on a copy."""

    def __init__(
        self, model: nn.Module, tokenizer, device: torch.device, shares_training_weights: bool
    ) -> None:
        self.model = model
        self.shares_training_weights = shares_training_weights
        self.generator = BatchedGenerator(model, tokenizer, device)

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, row_seeds: list[int]
    ) -> Rollout:
        return self.generator.generate_ids(prompt_ids, sampling, row_seeds=row_seeds)

    @torch.no_grad()
    def load_weights(self, state: dict[str, Tensor]) -> None:
        if self.shares_training_weights:
            raise RuntimeError(
                "this engine generates with the training policy itself; there is nothing to load"
            )
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # A tied LM head is the embedding under another name; a state dict may carry one copy only.
        tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(
                f"the policy's weights do not fit the generation copy: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )


def load_generation_copy(model_path: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A plain, frozen copy of the policy folder for generation (weights replaced at each refresh)."""
    from transformers import AutoModelForCausalLM

    from workers.training.lora import disable_dropout, freeze

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).to(device)
    disable_dropout(model)
    return freeze(model)


def make_rollout_engine(
    name: str,
    *,
    policy: nn.Module | None,
    tokenizer,
    model_path: Path,
    device: torch.device,
    dtype: torch.dtype,
    group: ProcessGroup,
    gpu_memory_utilization: float = 0.3,
) -> RolloutEngine:
    """The engine called `name` ("builtin" or "vllm") for the policy `policy` loaded from `model_path`.

    `policy` is the training policy (the builtin engine generates with it in a group of one; None
    where it is not loaded yet, which only the other engines accept); `dtype` is what an engine with
    weights of its own generates in.
    """
    if name == "builtin":
        if not group.distributed:
            if policy is None:
                raise ValueError("the builtin engine of a single process generates with the policy: pass it")
            return BuiltinEngine(policy, tokenizer, device, shares_training_weights=True)
        copy = load_generation_copy(model_path, device, dtype)
        return BuiltinEngine(copy, tokenizer, device, shares_training_weights=False)
    if name == "vllm":
        try:
            importlib.import_module("vllm")
        except ImportError as exc:
            raise RuntimeError(
                "policy.rollout_engine is 'vllm' but vLLM is not installed in the trainer's environment: "
                "install it on the GPU hosts (pip install vllm), or set policy.rollout_engine to 'builtin'"
            ) from exc
        try:
            module = importlib.import_module("workers.training.vllm_engine")
        except ModuleNotFoundError as exc:
            if exc.name != "workers.training.vllm_engine":
                raise
            raise RuntimeError(
                "policy.rollout_engine is 'vllm' but this installation has no vLLM rollout engine "
                "(workers/training/vllm_engine.py); set policy.rollout_engine to 'builtin'"
            ) from exc
        return module.VLLMEngine(
            model_path=Path(model_path),
            tokenizer=tokenizer,
            device=device,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
        )
    raise ValueError(f"unknown rollout engine {name!r}; known: {', '.join(ENGINES)}")
