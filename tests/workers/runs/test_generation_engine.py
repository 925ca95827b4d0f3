"""Which engine samples a generation run: the setting, and what the host has."""

from __future__ import annotations

import pytest
import torch

from app.config import Settings
from workers.runs.generation import GeneratorLoader, choose_generation_engine, generation_engine, row_seeds
from workers.training.vllm_engine import vllm_installed


@pytest.mark.parametrize(
    ("setting", "device", "vllm", "cuda", "expected"),
    [
        ("auto", "auto", True, True, "vllm"),
        ("auto", "cuda:1", True, True, "vllm"),
        ("auto", "auto", False, True, "builtin"),  # GPU host without the package
        ("auto", "auto", True, False, "builtin"),  # package installed, no GPU visible
        ("auto", "cpu", True, True, "builtin"),  # the device setting says CPU: respected
        ("builtin", "auto", True, True, "builtin"),
        ("vllm", "cuda", True, True, "vllm"),
    ],
)
def test_the_engine_follows_the_setting_and_the_host(setting, device, vllm, cuda, expected):
    assert choose_generation_engine(setting, device, vllm, cuda) == expected


@pytest.mark.parametrize(
    ("vllm", "cuda", "device", "reason"),
    [
        (False, True, "auto", "vllm is not installed"),
        (True, False, "auto", "no CUDA GPU"),
        (True, True, "cpu", "no CUDA GPU"),
    ],
)
def test_vllm_asked_for_where_it_cannot_run_is_an_error_that_says_why(vllm, cuda, device, reason):
    with pytest.raises(RuntimeError, match=reason) as error:
        choose_generation_engine("vllm", device, vllm, cuda)
    assert "PREFLOOP_GENERATION_ENGINE=builtin" in str(error.value)


def test_an_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="builtin, vllm or auto"):
        choose_generation_engine("tgi", "auto", True, True)


def test_the_setting_is_validated_where_it_is_read():
    with pytest.raises(ValueError):
        Settings(generation_engine="tgi")


@pytest.mark.skipif(vllm_installed() and torch.cuda.is_available(), reason="a GPU host with vLLM")
def test_auto_falls_back_to_the_builtin_generator_on_this_host():
    assert Settings.model_fields["generation_engine"].default == "auto"
    settings = Settings(generation_engine="auto")
    assert generation_engine(settings) == "builtin"
    assert GeneratorLoader(settings).engine == "builtin"


def test_row_seeds_are_a_function_of_the_batch_seed_and_differ_across_rows():
    assert row_seeds(11, 4) == row_seeds(11, 4)
    assert len(set(row_seeds(11, 32))) == 32
    assert row_seeds(11, 4) != row_seeds(12, 4)
    assert len(row_seeds(None, 3)) == 3


def test_the_vllm_generator_builds_chat_prompts_exactly_as_the_builtin_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from app.inference.generator import BatchedGenerator
    from workers.runs.generation import VLLMTaskGenerator

    settings = Settings()
    ours = VLLMTaskGenerator(str(tiny_model_dir), settings, GeneratorLoader(settings))
    builtin = BatchedGenerator(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ours.tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    assert ours.chat_prompt_ids(chat) == builtin.chat_prompt_ids(chat)
    assert ours.engine is None  # no engine (and no GPU memory) until something is sampled


class _Engine:
    """Stands in for a VLLMEngine (which needs a GPU): records that it was closed."""

    closed = False

    def close(self):
        self.closed = True


def test_one_vllm_engine_lives_at_a_time_and_all_are_closed_at_the_end(tiny_model_dir):
    from workers.runs.generation import VLLMTaskGenerator

    settings = Settings()
    loader = GeneratorLoader(settings)
    first, second = (VLLMTaskGenerator(str(tiny_model_dir), settings, loader) for _ in range(2))
    loader.loaded += [first, second]
    first.engine, second.engine = _Engine(), _Engine()
    engines = first.engine, second.engine
    loader.close(keep=second)  # what building the second generator's engine does first
    assert engines[0].closed and first.engine is None
    assert not engines[1].closed and second.engine is engines[1]
    loader.close()  # the end of the run
    assert engines[1].closed and second.engine is None
