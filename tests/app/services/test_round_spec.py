"""The round spec: it agrees with the trainers' dataclasses, names bad settings, and round-trips."""

from __future__ import annotations

import dataclasses
import functools
import operator
import subprocess
import sys
import types
import typing

import pytest
from pydantic import BaseModel, ValidationError

from app.inference.sampling import SamplingConfig
from app.services.round_spec import (
    SECTIONS,
    DPOSection,
    GateSection,
    LoraSection,
    PPOSection,
    RewardSection,
    RolloutSection,
    RoundSpec,
    SamplingSection,
    describe_problems,
    setting_fields,
    spec_from_settings,
)
from workers.training.dpo import DPOConfig
from workers.training.evaluation import GateConfig
from workers.training.lora import LoraSettings
from workers.training.ppo import PPOConfig, RolloutSampling
from workers.training.reward import RewardConfig

# Each spec section and the trainer dataclass it mirrors.
MIRRORS = [
    (SamplingSection, SamplingConfig),
    (RolloutSection, RolloutSampling),
    (LoraSection, LoraSettings),
    (RewardSection, RewardConfig),
    (PPOSection, PPOConfig),
    (DPOSection, DPOConfig),
    (GateSection, GateConfig),
]
SECTION_OF = {dataclass: section for section, dataclass in MIRRORS}


def _as_section_type(annotation):
    """A dataclass's field type with the nested dataclasses named by their spec sections."""
    if annotation in SECTION_OF:
        return SECTION_OF[annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, [_as_section_type(a) for a in typing.get_args(annotation)])
    return annotation


def _plain(value):
    """Defaults of either side as plain data: nested dataclasses and models become dicts."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value


@pytest.mark.parametrize("section, dataclass", MIRRORS, ids=[d.__name__ for _, d in MIRRORS])
def test_each_section_has_its_dataclass_fields_types_and_defaults(section, dataclass):
    fields = [f for f in dataclasses.fields(dataclass) if f.init]
    assert list(section.model_fields) == [f.name for f in fields], "same settings in the same order"
    hints = typing.get_type_hints(dataclass)
    trainer_defaults = dataclass()
    spec_defaults = section()
    for field in fields:
        assert section.model_fields[field.name].annotation == _as_section_type(hints[field.name]), field.name
        assert _plain(getattr(spec_defaults, field.name)) == _plain(getattr(trainer_defaults, field.name)), (
            field.name
        )


@pytest.mark.parametrize(
    "section, dataclass, changed",
    [
        (RewardSection, RewardConfig, {"learning_rate": 3e-5, "lora": {"r": 4}}),
        (PPOSection, PPOConfig, {"adam_betas": [0.8, 0.9], "sampling": {"max_new_tokens": 16}}),
        (DPOSection, DPOConfig, {"beta": 0.2, "lora": {"r": 8, "target_modules": ["q_proj"]}}),
        (GateSection, GateConfig, {"prompts": 8, "max_kl": None}),
    ],
)
def test_a_checked_section_builds_the_trainers_dataclass(section, dataclass, changed):
    built = dataclass.from_dict(section.model_validate(changed).model_dump())
    assert built == dataclass.from_dict(changed)
    assert dataclasses.asdict(built) == section.model_validate(changed).model_dump()


def test_the_trainers_dataclass_refuses_a_name_it_does_not_have():
    with pytest.raises(ValueError, match="unknown DPOConfig settings: lr; known: .*learning_rate"):
        DPOConfig.from_dict({"lr": 1e-5})


def test_a_bad_setting_is_named_by_its_dotted_path():
    cases = {
        "policy.lr_typo: Extra inputs are not permitted": {"algorithm": "ppo", "policy": {"lr_typo": 1}},
        "policy.lora.rank: Extra inputs are not permitted": {
            "algorithm": "dpo",
            "policy": {"lora": {"rank": 4}},
        },
        "reward.epochs: Input should be a valid integer": {"reward": {"epochs": "two"}},
        'processes.per_host: must be a whole number of at least 1, or "auto"': {"processes": {"per_host": 0}},
        "processes.hosts: Input should be greater than or equal to 1": {"processes": {"hosts": 0}},
        "algorithm must be 'ppo' or 'dpo'": {"algorithm": "sft"},
    }
    for expected, data in cases.items():
        with pytest.raises(ValidationError) as caught:
            RoundSpec.model_validate(data)
        assert describe_problems(caught.value).startswith(expected)


def test_a_stored_spec_reads_back_the_same():
    spec = spec_from_settings(
        "dpo",
        {
            "policy.learning_rate": "2e-6",
            "policy.lora.r": "8",
            "gate.max_kl": "null",
            "reward.dtype": "bfloat16",
        },
        auto_promote=False,
    )
    stored = spec.to_json()
    assert stored["algorithm"] == "dpo" and stored["auto_promote"] is False
    assert stored["policy"]["lora"] == {
        "r": 8,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": "all-linear",
        "lr_scale": 10.0,
    }
    assert RoundSpec.model_validate(stored) == spec
    assert RoundSpec.model_validate(stored).root.gate.max_kl is None


def test_a_round_without_an_algorithm_is_ppo_with_every_default():
    spec = RoundSpec.model_validate({})
    assert spec.algorithm == "ppo" and spec.root.auto_promote
    assert spec.root.policy == PPOSection() and spec.root.gate.sampling.max_new_tokens == 128


def test_a_setting_given_whole_and_by_parts_is_refused():
    with pytest.raises(ValueError, match="policy.lora.r: policy.lora is already set as a whole"):
        spec_from_settings("ppo", {"policy.lora": "null", "policy.lora.r": "4"})


@pytest.mark.parametrize("algorithm", ["ppo", "dpo"])
def test_setting_fields_list_every_leaf_setting_of_the_spec(algorithm):
    def leaves(data: dict, prefix: str) -> set[str]:
        out = set()
        for key, value in data.items():
            out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
        return out

    everything = RoundSpec.model_validate(
        {"algorithm": algorithm, "reward": {"lora": {}}, "policy": {"lora": {}}}
    )
    expected = leaves({k: everything.to_json()[k] for k in SECTIONS}, "")
    fields = setting_fields(algorithm)
    assert {f.name for f in fields} == expected
    by_name = {f.name: f for f in fields}
    assert by_name["gate.sampling.max_new_tokens"].default == "128"
    assert by_name["policy.lora.r"].group_off_by_default and by_name["policy.lora.r"].group == "policy.lora"
    assert by_name["gate.max_kl"].kind == "number or null"


def test_the_spec_loads_no_torch():
    code = "import sys, app.services.round_spec, app.services.promotion; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
