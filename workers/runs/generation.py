"""The generation run body: sample responses from a policy and turn them into ranking tasks.

On a worker, the engine that samples is a setting (`PREFLOOP_GENERATION_ENGINE`): the built-in batched
generator, or vLLM on a GPU host where it is installed (`auto` picks vLLM there). The web playground is
not a generation run and always uses the built-in generator.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings, get_settings
from app.data.db import session_factory
from app.data.models import Policy
from app.services.runs import execute
from app.services.tasks_pool import generate_tasks, load_builtin_generator

log = logging.getLogger(__name__)


def choose_generation_engine(setting: str, device: str, vllm_available: bool, cuda_available: bool) -> str:
    """ "builtin" or "vllm" for a generation run, given the setting and what this host has.

    `auto` takes vLLM only where it can run: the package is installed, a CUDA GPU is visible and the
    configured device is not the CPU. `vllm` asked for explicitly on a host without it is an error (a
    silent fallback would hide a misconfigured GPU host behind slow CPU generation).
    """
    wants_gpu = device == "auto" or device.startswith("cuda")
    usable = vllm_available and cuda_available and wants_gpu
    if setting == "builtin":
        return "builtin"
    if setting == "auto":
        return "vllm" if usable else "builtin"
    if setting == "vllm":
        if not usable:
            from workers.training.vllm_engine import VLLM_MISSING

            reason = "vllm is not installed" if not vllm_available else "no CUDA GPU is the device"
            raise RuntimeError(f"PREFLOOP_GENERATION_ENGINE=vllm but {reason} on this host; {VLLM_MISSING}")
        return "vllm"
    raise ValueError(f"unknown generation engine {setting!r}: use builtin, vllm or auto")


def generation_engine(settings: Settings) -> str:
    """The engine this host uses for generation runs (checks the host; imports torch)."""
    import torch

    from workers.training.vllm_engine import vllm_installed

    return choose_generation_engine(
        settings.generation_engine, settings.device, vllm_installed(), torch.cuda.is_available()
    )


class VLLMTaskGenerator:
    """The task pool's calls (`chat_prompt_ids`, `generate_ids(..., seed=)`) served by a VLLMEngine.

    vLLM holds one engine per process: the engine is built when first needed, and `loader` closes the
    other generators' engines first (an arena run samples two policy versions, one after the other).
    """

    def __init__(self, path: str, settings: Settings, loader: GeneratorLoader):
        from transformers import AutoTokenizer

        self.path, self.settings, self.loader = path, settings, loader
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.engine = None

    def chat_prompt_ids(self, conversation: list[dict]) -> list[int]:
        # As the built-in generator: the template writes the special tokens, the tokenizer adds none.
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate_ids(self, prompt_ids: list[list[int]], sampling, seed: int | None = None):
        if self.engine is None:
            from workers.training.vllm_engine import VLLMEngine

            self.loader.close(keep=self)
            self.engine = VLLMEngine(
                self.path, self.tokenizer, gpu_memory_utilization=self.settings.generation_vllm_gpu_memory
            )
        return self.engine.generate_ids(prompt_ids, sampling, row_seeds(seed, len(prompt_ids)))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def row_seeds(seed: int | None, rows: int) -> list[int]:
    """One seed per row, a function of the batch's seed (fresh ones when it has none)."""
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    return [rng.randrange(2**31) for _ in range(rows)]


class GeneratorLoader:
    """Loads a policy's generator with the configured engine and releases the vLLM engines at the end."""

    def __init__(self, settings: Settings):
        self.engine = generation_engine(settings)
        self.loaded: list[VLLMTaskGenerator] = []

    def __call__(self, policy: Policy, settings: Settings):
        if self.engine == "builtin":
            return load_builtin_generator(policy, settings)
        generator = VLLMTaskGenerator(policy.path, settings, self)
        self.loaded.append(generator)
        return generator

    def close(self, keep: VLLMTaskGenerator | None = None) -> None:
        """Close every vLLM engine this loader built (but `keep`'s)."""
        for generator in self.loaded:
            if generator is not keep:
                generator.close()


def run_generation(
    run_id: int, sessions: sessionmaker[Session] | None = None, settings: Settings | None = None
) -> str | None:
    """Execute a generation run row: claim it, generate, record the result.

    Returns the final status, or None when another delivery owns the run.
    """
    sessions = sessions or session_factory()

    def body(_run_id: int, config: dict[str, Any], reporter) -> dict[str, Any]:
        loader = GeneratorLoader(settings or get_settings())
        log.info("generation run %s samples with the %s engine", _run_id, loader.engine)
        try:
            result = generate_tasks(sessions, config, reporter, settings, load_generator=loader)
        finally:
            loader.close()
        return {**result, "engine": loader.engine}

    return execute(run_id, body, sessions)
