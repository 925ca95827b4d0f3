"""PPO rollouts and task-pool responses sampled by vLLM on GPU hosts where it is installed.

`VLLMEngine` is a rollout engine: `generate_ids(prompt_ids, sampling, row_seeds) -> Rollout` and
`load_weights(state)`, the same two calls as the built-in batched generator behind the PPO trainer.
PPO builds it as `VLLMEngine(model_path, tokenizer, device=..., gpu_memory_utilization=..., dtype=...)`
(the rank's CUDA device, the share of its memory the engine may take, a torch or vLLM dtype name).
It needs a CUDA GPU and the `vllm` package; everything else in this module (the sampling mapping, the
output conversion, the weight-name handling) is plain Python and runs anywhere.

Why colocated, not a separate vLLM server: for the model sizes one GPU trains here (0.5B-8B with FSDP
or LoRA), a vLLM instance in the training process, on the training GPU, costs a slice of that GPU's
memory while it samples and almost nothing while it sleeps (`LLM(enable_sleep_mode=True)`: `sleep()`
frees the KV cache and moves the weights to host memory, `wake_up()` brings them back). A server would
need GPUs of its own that sit idle while the trainer steps, and every policy update would travel over
the network to it. The trainer instead hands the updated weights to the in-process model runner's
`load_weights` after each update, the "colocate" layout of TRL's vLLM integration and of OpenRLHF's
hybrid engine. Each training rank runs its own engine on its own GPU (tensor parallel size 1) and
samples its own share of the prompts.

The sampling contract. PPO's old, new and reference log-probs must be those of the distribution that
drew each token. vLLM by default reports log-probs of the raw model distribution, before repetition
penalty, temperature and top-p; the engine is therefore built with
`logprobs_mode="processed_logprobs"` (vLLM 0.10 or later), which reports them after those steps, the
distribution the token was drawn from. Greedy picks get log-prob 0, as in the built-in generator.

Prompts go in as token ids (`TokensPrompt`), one `SamplingParams` per row with the row's own seed, so
a row's random stream depends on its seed alone. Its logits are another matter: vLLM's kernels are not
batch-invariant by default (the split of a matmul or of attention depends on the batch), so the same
row in a different batch can differ by float noise and, rarely, by a token. PPO on one process and on
several therefore agree only statistically with this engine, not token for token as with the built-in
one.

A row ended with EOS when vLLM reports `finish_reason == "stop"`: no stop strings are passed, so a stop
is always a stop token, which vLLM keeps as the last token of the response (as `Rollout` expects).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from app.inference.generator import Rollout
from app.inference.sampling import SamplingConfig

# `logprobs_mode` arrived in vLLM 0.10; earlier versions would report raw-distribution log-probs.
MIN_VLLM_VERSION = (0, 10, 0)

VLLM_MISSING = (
    "the vLLM rollout engine needs the `vllm` package on a host with a CUDA GPU: install it there "
    "(`pip install 'vllm>=0.10'`), or use the built-in generator (PREFLOOP_GENERATION_ENGINE=builtin)"
)

# Wrappers that FSDP, activation checkpointing, torch.compile and peft put into parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_orig_mod.")
_PEFT_PREFIX = "base_model.model."


def vllm_installed() -> bool:
    """Whether the `vllm` package can be imported here (without importing it)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> Any:
    """Import vllm, or raise an ImportError that says what to do; refuse versions without `logprobs_mode`."""
    if not vllm_installed():
        raise ImportError(VLLM_MISSING)
    import vllm

    version = _version_tuple(getattr(vllm, "__version__", "0"))
    if version < MIN_VLLM_VERSION:
        raise ImportError(
            f"vLLM {vllm.__version__} reports log-probs of the raw model distribution only; the PPO sampling "
            f"contract needs `logprobs_mode` (vLLM {'.'.join(map(str, MIN_VLLM_VERSION))} or later): upgrade vllm"
        )
    return vllm


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def sampling_params_kwargs(sampling: SamplingConfig, seed: int) -> dict[str, Any]:
    """The `vllm.SamplingParams` keyword arguments for one row sampled with `sampling` and `seed`.

    One sample per prompt (n=1; callers repeat prompts), the row's own seed, and `logprobs=0`: vLLM then
    returns the log-prob of the sampled token only. Detokenizing is left to the caller's tokenizer, so
    texts are decoded exactly as the built-in generator decodes them.
    """
    kwargs: dict[str, Any] = {
        "n": 1,
        "max_tokens": sampling.max_new_tokens,
        "repetition_penalty": sampling.repetition_penalty,
        "seed": int(seed),
        "logprobs": 0,
        "detokenize": False,
    }
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
    else:
        # vLLM samples greedily at temperature 0 (argmax after the penalty, like the built-in generator).
        kwargs.update(temperature=0.0, top_p=1.0)
    return kwargs


def rollout_from_outputs(
    prompt_ids: Sequence[Sequence[int]], outputs: Sequence[Any], tokenizer, greedy: bool = False
) -> Rollout:
    """Our `Rollout` from vLLM's `RequestOutput`s, one per prompt in the same order.

    Reads `outputs[i].outputs[0]`: `token_ids` (the response, with the stop token when it stopped),
    `logprobs` (a list with one `{token_id: Logprob}` per response token, the sampled token always among
    them) and `finish_reason` ("stop" for a stop token, "length" at `max_tokens`).
    """
    if len(outputs) != len(prompt_ids):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompt_ids)} prompts")
    responses: list[list[int]] = []
    logprobs: list[list[float]] = []
    ended: list[bool] = []
    for row, request in enumerate(outputs):
        completion = request.outputs[0]
        ids = [int(t) for t in completion.token_ids]
        if greedy:
            picked = [0.0] * len(ids)
        else:
            if completion.logprobs is None or len(completion.logprobs) != len(ids):
                raise ValueError(
                    f"row {row}: vLLM returned no log-prob for some response tokens; "
                    "request them with SamplingParams(logprobs=0)"
                )
            picked = [
                float(entry[token].logprob) for entry, token in zip(completion.logprobs, ids, strict=True)
            ]
        responses.append(ids)
        logprobs.append(picked)
        ended.append(bool(ids) and completion.finish_reason == "stop")
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True) if responses else []
    return Rollout(
        prompt_ids=[list(map(int, p)) for p in prompt_ids],
        response_ids=responses,
        ended_with_eos=ended,
        texts=list(texts),
        logprobs=logprobs,
    )


def vllm_weight_names(state: Mapping[str, Tensor]) -> Iterable[tuple[str, Tensor]]:
    """(name, tensor) pairs under the names vLLM's `load_weights` expects: Hugging Face parameter names.

    Strips what wrappers add (peft's `base_model.model.` and `.base_layer`, FSDP / checkpoint /
    torch.compile wrappers, peft's `modules_to_save.default.` copy) and drops the frozen originals of
    modules peft saves a copy of. LoRA factors must already be merged into the base weights: vLLM's
    model has no place for them, and dropping them silently would sample from the base policy.
    """
    for name, tensor in state.items():
        if "lora_A" in name or "lora_B" in name or "lora_embedding_" in name:
            raise ValueError(
                f"{name}: unmerged LoRA weights; merge the adapter into the base weights "
                "(peft `merge_and_unload()` or the trainer's merged full state dict) before loading into vLLM"
            )
        if ".original_module." in name:
            continue
        clean = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        clean = clean.replace("modules_to_save.default.", "")
        for part in _WRAPPER_PARTS:
            clean = clean.replace(part, "")
        yield clean, tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_dtype(dtype: str | torch.dtype) -> str:
    """vLLM's name for a dtype ("bfloat16", "float16", "float32"; strings pass through)."""
    if isinstance(dtype, torch.dtype):
        names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
        if dtype not in names:
            raise ValueError(f"vLLM cannot generate in {dtype}: use bfloat16, float16 or float32")
        return names[dtype]
    return dtype


def _cuda_device(device: str | torch.device | None) -> torch.device:
    """The CUDA device the engine runs on: the one given, else the current one."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the vLLM engine runs on a CUDA device, not {device}; {VLLM_MISSING}")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


# Set when this module made the process a torch.distributed world of one for vLLM (a worker's generation
# run); then closing an engine may tear that world down. A torchrun rank's world belongs to the trainer.
_OWN_WORLD_MARK = "PREFLOOP_VLLM_OWN_WORLD"


def _ensure_rank_environment(local_rank: int | None) -> None:
    """vLLM's in-process ("external_launcher") executor reads the torch.distributed variables; a process
    not started by torchrun is a world of one."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK=str(local_rank or 0), WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ[_OWN_WORLD_MARK] = "1"


class VLLMEngine:
    """A colocated vLLM instance that samples rollouts with our sampling contract (GPU host with vLLM).

    Between calls the engine sleeps (weights in host memory, no KV cache) so the trainer has the GPU;
    `generate_ids` wakes it, samples, and puts it back to sleep; `load_weights` wakes it, replaces the
    weights, drops the prefix cache (its keys and values came from the old weights) and sleeps again.
    One live engine per process: `close()` one before building the next. vLLM checks at start-up that
    `gpu_memory_utilization` of the GPU is free: build the engine before the trainer's models fill the
    device, or give it a share that fits beside them.
    """

    # The engine holds its own copy of the weights: PPO hands it the trained ones after each update.
    shares_training_weights = False

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer,
        *,
        gpu_memory_utilization: float = 0.3,
        dtype: str | torch.dtype = "bfloat16",
        max_model_len: int | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
    ):
        vllm = require_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError(f"no CUDA device is visible to this process; {VLLM_MISSING}")
        cuda = _cuda_device(device)
        _ensure_rank_environment(cuda.index)
        # vLLM builds its model on the current device; a rank's is the one torchrun gave it.
        torch.cuda.set_device(cuda)
        # The engine core in this process, not a child: `load_weights` hands it tensors by reference.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.tokenizer = tokenizer
        self.llm = vllm.LLM(
            model=str(model_path),
            tokenizer=str(model_path),
            dtype=vllm_dtype(dtype),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            # Sleep mode is what makes colocation work: the trainer gets the memory back between rollouts.
            enable_sleep_mode=True,
            # One engine per training rank, in the rank's own process: the weights reach it by reference.
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            # The sampling contract: log-probs after penalty, temperature and top-p (see the module docstring).
            logprobs_mode="processed_logprobs",
        )
        self._asleep = False
        self.sleep()

    def sleep(self) -> None:
        """Free the KV cache and move the weights to host memory (level 1: they come back on wake-up)."""
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, row_seeds: list[int]
    ) -> Rollout:
        """One response per prompt, row i drawn with seed row_seeds[i]; log-probs of the sampling distribution."""
        if len(row_seeds) != len(prompt_ids):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(prompt_ids)} prompts")
        if any(not p for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(map(int, p))) for p in prompt_ids]
        params = [SamplingParams(**sampling_params_kwargs(sampling, seed)) for seed in row_seeds]
        self.wake_up()
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            self.sleep()
        return rollout_from_outputs(prompt_ids, outputs, self.tokenizer, greedy=not sampling.do_sample)

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Replace the engine's weights with `state` (full Hugging Face names, LoRA merged)."""
        weights = list(vllm_weight_names(state))
        # Wake fully and sleep again rather than waking the weights alone: a level-1 sleep from a half-awake
        # engine is not a state vLLM promises to handle, and mapping the KV cache costs little.
        was_asleep = self._asleep
        self.wake_up()
        try:
            # In-process engine (external launcher): the callable runs here and the tensors are not copied.
            self.llm.apply_model(lambda model: model.load_weights(weights=weights))
            self.llm.reset_prefix_cache()
        finally:
            if was_asleep:
                self.sleep()

    def close(self) -> None:
        """Release the engine's GPU memory and vLLM's process-wide state, so another engine can follow."""
        import gc

        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        destroy_model_parallel()
        if os.environ.get(_OWN_WORLD_MARK):
            # The world of one vLLM initialised for itself; the next engine starts a fresh one.
            destroy_distributed_environment()
        gc.collect()
        torch.cuda.empty_cache()
