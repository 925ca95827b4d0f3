"""Model plumbing shared by the PPO, DPO and evaluation code.

- device and dtype choice ("auto": CUDA + bf16 where available, else CPU + fp32),
- LoRA adapters (peft) on a frozen base, switching between adapters without losing trainability,
- the prompt/response token layout and per-token log-probs of responses,
- writing a plain Hugging Face policy folder (LoRA merged in) for the registry.

Token layout: prompts are left-padded to a common width P and responses right-padded to a common
width R, so response token j of every row sits in column P + j and the logits that predict it in
column P + j - 1. Only those R columns go through the LM head (`logits_to_keep`), which saves the
vocabulary projection over the prompt.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from workers.training.config import TrainerConfig
from workers.training.ppo_math import logprobs_from_logits


@dataclass
class LoraSettings(TrainerConfig):
    """LoRA on every linear layer of the transformer (not the embeddings or the LM head)."""

    r: int = 16  # rank 16 is the usual quality/size point for 0.1B-8B models
    alpha: int = 32  # alpha = 2r keeps the update scale independent of r
    dropout: float = 0.0  # PPO needs ratio = 1 at the start of each update; dropout would break that
    target_modules: str | list[str] = "all-linear"
    lr_scale: float = 10.0  # adapters start at zero and train few weights: conventionally ~10x the full lr


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow there and PPO ratios want precision); bf16 on GPUs that have it."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def compute_context(device: torch.device, dtype: torch.dtype):
    """Autocast forward passes to `dtype` unless it is float32 (then plain float32 maths)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def return_freed_memory_to_os(device: torch.device) -> None:
    """On CPU under glibc, hand large freed blocks back to the OS at once.

    glibc raises its mmap threshold each time a large block is freed, so after the first PPO step the
    activations of every forward pass land in the heap, which never shrinks: resident memory grows by
    about the size of one step's activations (2 GB for SmolLM2-135M at batch 8). A fixed threshold
    (setting it at all turns the adjustment off) keeps large tensors in their own mappings, returned on
    free. Process-wide, which suits a worker that runs one training job at a time; a no-op elsewhere.
    """
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes two forward passes of the same weights disagree, which PPO reads as a policy change."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def freeze(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    return model


def peft_config(settings: LoraSettings, modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        modules_to_save=modules_to_save,
    )


def add_adapter(
    model: nn.Module, settings: LoraSettings, name: str, modules_to_save: list[str] | None = None
):
    """Wrap `model` with a first adapter, or add another adapter to an existing PeftModel.

    The base weights stay frozen; the new adapter starts at zero (LoRA's B = 0), so the wrapped model
    computes exactly what the base computed.
    """
    from peft import PeftModel, get_peft_model

    config = peft_config(settings, modules_to_save)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        return model
    return get_peft_model(model, config, adapter_name=name)


def activate_adapter(model: nn.Module, name: str, trainable: Iterable[nn.Parameter]) -> None:
    """Make `name` the active adapter. peft also marks only that adapter trainable; we keep every
    parameter we optimise trainable, so a graph built under another adapter still gets its gradients."""
    model.set_adapter(name)
    for param in trainable:
        param.requires_grad_(True)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (LoRA layers are injected into it in place)."""
    from peft import PeftModel

    return model.base_model.model if isinstance(model, PeftModel) else model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations during the backward pass instead of keeping them
    from the forward pass: memory for activations drops from all blocks to about one, for roughly one
    more forward pass of compute. Non-reentrant checkpointing, which works with a frozen LoRA base
    (no input that requires grad) and inside FSDP2's hooks. Hugging Face checkpoints only in training
    mode, so the model is put in training mode, with every dropout (LoRA's included, added after the
    base's was turned off) set to zero, so that changes nothing else."""
    disable_dropout(model)
    inner = hf_model(model)
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its head (`model.model` for Llama-style models)."""
    inner = hf_model(model)
    return getattr(inner, inner.base_model_prefix)


# --- token layout -----------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """Left-padded prompts followed by right-padded responses (see the module docstring)."""

    input_ids: Tensor  # (B, P + R)
    attention_mask: Tensor  # (B, P + R)
    position_ids: Tensor  # (B, P + R): 0 at each row's first real token
    response_ids: Tensor  # (B, R)
    response_mask: Tensor  # (B, R) float, 1 on real response tokens
    prompt_width: int  # P

    @property
    def response_width(self) -> int:
        return self.response_ids.shape[1]

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.response_ids.to(device),
            self.response_mask.to(device),
            self.prompt_width,
        )

    def select(self, rows: Tensor | list[int]) -> TokenBatch:
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return TokenBatch(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.position_ids[rows],
            self.response_ids[rows],
            self.response_mask[rows],
            self.prompt_width,
        )


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> TokenBatch:
    """Lay out prompt/response pairs for one forward pass; empty responses keep a masked pad column."""
    width_p = max(len(p) for p in prompts)
    width_r = max(1, max(len(r) for r in responses))
    rows, masks, resp_rows, resp_masks = [], [], [], []
    for prompt, response in zip(prompts, responses, strict=True):
        left = width_p - len(prompt)
        right = width_r - len(response)
        rows.append([pad_id] * left + list(prompt) + list(response) + [pad_id] * right)
        masks.append([0] * left + [1] * (len(prompt) + len(response)) + [0] * right)
        resp_rows.append(list(response) + [pad_id] * right)
        resp_masks.append([1.0] * len(response) + [0.0] * right)
    attention = torch.tensor(masks, dtype=torch.long)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return TokenBatch(
        input_ids=torch.tensor(rows, dtype=torch.long),
        attention_mask=attention,
        position_ids=positions,
        response_ids=torch.tensor(resp_rows, dtype=torch.long),
        response_mask=torch.tensor(resp_masks, dtype=torch.float32),
        prompt_width=width_p,
    )


def response_logits(model: nn.Module, batch: TokenBatch) -> Tensor:
    """Logits (B, R, V) that predict each response token, in float32."""
    width_r = batch.response_width
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=width_r + 1,
        use_cache=False,
    )
    # The kept columns are P-1 .. P+R-1; the last one predicts past the response and is dropped.
    return out.logits[:, :-1].float()


def response_logprobs(model: nn.Module, batch: TokenBatch, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(log-probs of the response tokens (B, R), their logits (B, R, V)), both at `temperature`.

    The logits are divided by the temperature the responses were sampled at, so the log-probs are those
    of the distribution that drew them (PPO's sampling contract); DPO scores at the raw 1.
    """
    logits = response_logits(model, batch)
    if temperature != 1.0:
        logits = logits / temperature
    return logprobs_from_logits(logits, batch.response_ids), logits


def response_hidden(model: nn.Module, batch: TokenBatch) -> Tensor:
    """Last hidden states at the columns that predict the response tokens (B, R, H): the value positions."""
    out = backbone(model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    start = batch.prompt_width - 1
    return out.last_hidden_state[:, start : start + batch.response_width]


def prompt_token_ids(tokenizer, messages: list[dict], max_tokens: int | None = None) -> list[int]:
    """Chat-template a prompt with the assistant header open; keep the last `max_tokens` tokens."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[-max_tokens:]
    return ids


# --- export -------------------------------------------------------------------------------------


def save_policy_folder(model: nn.Module, tokenizer, dest: Path, adapter: str | None = None) -> None:
    """Write a plain causal-LM folder: LoRA adapters merged into the weights, no peft files.

    Merging mutates a PeftModel in place (it becomes the plain model), so call this last.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if adapter is not None:
            model.set_adapter(adapter)
        model = model.merge_and_unload(adapter_names=[adapter] if adapter else None)
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


def merged_causal_lm_state(
    state: dict[str, Tensor], settings: LoraSettings | None, adapter: str | None
) -> dict[str, Tensor]:
    """A causal LM's state dict with Hugging Face names and `adapter` merged in, from the state dict
    of the model as trained: a plain model (returned as it is) or a PeftModel (`base_model.model.*`).

    For a LoRA layer the merged weight is base + (alpha / r) * B @ A, what peft's `merge_and_unload`
    computes; other adapters on the same base (PPO's critic), and heads outside the causal LM, are
    left out. This is the form a separate generation copy of the policy loads after each step.
    """
    if settings is None:
        return dict(state)
    prefix = "base_model.model."
    scaling = settings.alpha / settings.r
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if not name.startswith(prefix) or ".lora_" in name or ".modules_to_save." in name:
            continue
        name = name[len(prefix) :]
        if name.endswith(".base_layer.weight"):
            module = name[: -len(".base_layer.weight")]
            a = state.get(f"{prefix}{module}.lora_A.{adapter}.weight")
            b = state.get(f"{prefix}{module}.lora_B.{adapter}.weight")
            if a is not None and b is not None:
                value = (value.float() + scaling * (b.float() @ a.float())).to(value.dtype)
            out[f"{module}.weight"] = value
        elif ".base_layer." in name:
            out[name.replace(".base_layer.", ".")] = value
        else:
            out[name.replace(".original_module.", ".")] = value
    return out


class TrainableState(nn.Module):
    """A module whose state dict is exactly the trained parameters (the same tensors, not copies).

    `checkpoint.save_checkpoint` saves it through `save_pretrained` and `load_checkpoint` restores it
    with `load_state_dict`, which writes into the live parameters, so one checkpoint format serves full
    fine-tuning (every policy/critic weight) and LoRA (adapters and heads only).
    """

    def __init__(self, named: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.params = nn.ParameterDict({name.replace(".", "__"): p for name, p in named.items()})

    def save_pretrained(self, folder: str, safe_serialization: bool = True) -> None:
        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(Path(folder) / "model.safetensors"))
