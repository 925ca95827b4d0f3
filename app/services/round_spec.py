"""What a round is asked to do: its algorithm and every trainer setting, checked when it is asked.

`RoundSpec` is the one description of a round's settings. The API, the CLI (`--set policy.steps=4`)
and the admin form build one, so a misspelt or mistyped setting is refused with its dotted name
(`policy.lr_typo`) before the round starts; `start_round` stores it as JSON in `Round.config`; the
worker reads it back with `RoundSpec.model_validate` and hands each stage its section.

Each section mirrors a trainer's settings dataclass, field for field with the same defaults:
`reward` → RewardConfig, `policy` → PPOConfig or DPOConfig, `gate` → GateConfig, and inside them
LoRA → LoraSettings and sampling → SamplingConfig (PPO's rollouts: RolloutSampling). `processes`
belongs to no trainer: it says how many processes the reward and policy stages train on (the
worker's launcher, workers/runs/launcher.py, reads it). The reasons for every default are written
next to the dataclasses (workers/training/);
tests/app/services/test_round_spec.py fails when the two disagree.
The web process imports this module and must not load torch, hence the mirror instead of the
dataclasses themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

ALGORITHMS = ("ppo", "dpo")
SECTIONS = ("reward", "policy", "gate", "processes")


# Bounds a trainer would otherwise trip over minutes into a run (the dataclasses do not check them).
Count = Annotated[int, Field(ge=1)]  # how many of something: at least one
ZeroOrMore = Annotated[int, Field(ge=0)]  # warm-up steps or samples kept: none is fine
Positive = Annotated[float, Field(gt=0)]  # learning rates, step sizes, scales
NonNegative = Annotated[float, Field(ge=0)]  # coefficients and penalties: 0 switches them off
Fraction = Annotated[float, Field(ge=0, le=1)]  # shares and probabilities


# Mirrors of the trainers' named choices (workers/training/config.py).
Sharding = Literal["full_shard", "shard_grad_op"]
RolloutEngineName = Literal["builtin", "vllm"]


class Section(BaseModel):
    """A section of settings: a name it does not have is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class SamplingSection(Section):
    """Mirrors SamplingConfig: how responses are sampled."""

    max_new_tokens: Count = 128
    temperature: NonNegative = 0.8
    top_p: Annotated[float, Field(gt=0, le=1)] = 0.9
    repetition_penalty: Positive = 1.1
    do_sample: bool = True


class RolloutSection(Section):
    """Mirrors RolloutSampling: PPO samples from the distribution it trains on, so its rollouts have a
    temperature (applied to the policy, old and reference log-probs alike) but no top-p or penalty."""

    max_new_tokens: Count = 128
    temperature: Positive = 1.0


class LoraSection(Section):
    """Mirrors LoraSettings: LoRA adapters on a frozen base (a trainer's `lora`; null = full fine-tuning)."""

    r: Count = 16
    alpha: Count = 32
    dropout: Fraction = 0.0
    target_modules: str | list[str] = "all-linear"
    lr_scale: Positive = 10.0


class RewardSection(Section):
    """Mirrors RewardConfig: the reward model trained on the round's comparisons."""

    learning_rate: Positive = 1e-5
    epochs: Count = 1
    max_pairs_per_batch: Count = 24
    max_length: Count = 512
    warmup_ratio: Fraction = 0.03
    weight_decay: NonNegative = 0.0
    max_grad_norm: Positive = 1.0
    eval_fraction: Fraction = 0.1
    seed: int = 0
    use_margin: bool = False
    center_rewards_coefficient: NonNegative = 0.0
    label_smoothing: Fraction = 0.0
    checkpoint_every: Count = 50
    log_every: Count = 10
    share_prompt: bool = True
    gradient_checkpointing: bool = False
    lora: LoraSection | None = None
    dtype: str = "auto"
    device: str = "auto"
    above_chance_alpha: float | None = Field(0.05, gt=0, lt=1)
    sharding: Sharding = "full_shard"


class PPOSection(Section):
    """Mirrors PPOConfig: PPO-max from the live policy against the round's reward model."""

    steps: Count = 200
    rollout_batch_size: Count = 32
    mini_batch_size: Count = 8
    ppo_epochs: Count = 1
    critic_warmup_steps: ZeroOrMore = 2
    learning_rate: Positive = 1e-5
    critic_learning_rate: Positive = 3e-5
    adam_betas: tuple[float, float] = (0.9, 0.95)
    policy_adam_eps: Positive = 1e-6
    critic_adam_eps: Positive = 1e-8
    lr_warmup_updates: ZeroOrMore = 10
    max_grad_norm: Positive = 1.0
    kl_coef: NonNegative = 0.02
    reward_scaling: bool = True
    reward_clip: float | None = 10.0
    missing_eos_penalty: float | None = 1.0
    use_reward_stats: bool = True
    gamma: Fraction = 1.0
    lam: Fraction = 0.95
    whiten_advantages: bool = True
    clip_ratio: Positive = 0.2
    clip_value: Positive = 0.2
    value_loss_coef: NonNegative = 1.0
    entropy_coef: NonNegative = 0.0
    ptx_coef: NonNegative = 0.0
    ptx_batch_size: Count = 4
    ptx_max_tokens: Count = 512
    sampling: RolloutSection = Field(default_factory=RolloutSection)
    max_prompt_tokens: Count = 512
    forward_batch_size: Count = 16
    guard_max_kl: float | None = 20.0
    guard_max_length_ratio: float | None = 2.5
    guard_length_headroom: float | None = 0.5
    guard_min_length_ratio: float | None = 0.3
    guard_max_mean_length: float | None = None
    guard_min_mean_length: float | None = None
    guard_min_eos_share: float | None = 0.2
    guard_max_repetition: float | None = 0.5
    guard_patience: Count = 3
    checkpoint_every: Count = 50
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    lora: LoraSection | None = None
    gradient_checkpointing: bool = False
    sharding: Sharding = "full_shard"
    rollout_engine: RolloutEngineName = "builtin"


class DPOSection(Section):
    """Mirrors DPOConfig: DPO from the live policy on the round's comparisons."""

    beta: Positive = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: Fraction = 0.0
    learning_rate: Positive = 5e-6
    epochs: Count = 2
    batch_size: Count = 8
    max_length: Count = 512
    warmup_ratio: Fraction = 0.1
    max_grad_norm: Positive = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: NonNegative = 0.0
    eval_fraction: Fraction = 0.1
    eval_every: Count = 50
    checkpoint_every: Count = 100
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    lora: LoraSection | None = None
    gradient_checkpointing: bool = False
    sharding: Sharding = "full_shard"


GATE_MODES = ("judge", "human")
INTERVALS = ("wilson", "bootstrap")


class GateSection(Section):
    """Mirrors GateConfig: the candidate against the live policy on held-out prompts, by a held-out judge."""

    mode: str = "judge"
    judge_share: Annotated[float, Field(gt=0, lt=1)] = 0.5
    prompts: int | None = Field(default=None, ge=1)
    samples_per_prompt: Count = 4
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    at_training_length: bool = True
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    interval: str = "wilson"
    min_win_rate: float | None = 0.5
    min_score_delta: float | None = None
    max_kl: float | None = 25.0
    max_kl_to_base: float | None = 40.0
    max_length_ratio: float | None = 2.0
    min_length_ratio: float | None = 0.5
    min_eos_share: float | None = None
    max_eos_share_drop: float | None = 0.1
    samples: ZeroOrMore = 5
    arena_prompts: Count = 48
    arena_min_votes: Count = 20
    arena_max_votes: Count = 200

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        if value not in GATE_MODES:
            raise ValueError(f"must be one of {', '.join(GATE_MODES)}")
        return value

    @field_validator("interval")
    @classmethod
    def _known_interval(cls, value: str) -> str:
        if value not in INTERVALS:
            raise ValueError(f"must be one of {', '.join(INTERVALS)}")
        return value


class ProcessesSection(Section):
    """How many processes the reward (and judge) and policy stages train on. One process trains
    inside the worker as it always did; more start under torchrun, one per device, each holding a
    shard of the models (FSDP2, as each trainer's `sharding` setting says), and meet at every step."""

    # Processes on each host: a number, or "auto" for what the worker's host offers
    # (PREFLOOP_TRAIN_PROCESSES_PER_HOST, by default one per CUDA device).
    per_host: int | Literal["auto"] = 1
    # Hosts the stage spans; more than one needs the worker's launcher prefix and rendezvous endpoint.
    hosts: Count = 1

    @field_validator("per_host", mode="before")
    @classmethod
    def _whole_number_or_auto(cls, value: Any) -> Any:
        # One message for every wrong value, instead of one per member of the union.
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise PydanticCustomError("per_host", 'must be a whole number of at least 1, or "auto"')


class PPORound(Section):
    """A round that trains the policy with PPO-max."""

    algorithm: Literal["ppo"] = "ppo"
    # False: a candidate that passes the gate waits for an admin to promote it.
    auto_promote: bool = True
    reward: RewardSection = Field(default_factory=RewardSection)
    policy: PPOSection = Field(default_factory=PPOSection)
    gate: GateSection = Field(default_factory=GateSection)
    processes: ProcessesSection = Field(default_factory=ProcessesSection)


class DPORound(Section):
    """A round that trains the policy with DPO."""

    algorithm: Literal["dpo"] = "dpo"
    auto_promote: bool = True
    reward: RewardSection = Field(default_factory=RewardSection)
    policy: DPOSection = Field(default_factory=DPOSection)
    gate: GateSection = Field(default_factory=GateSection)
    processes: ProcessesSection = Field(default_factory=ProcessesSection)


def _algorithm_of(data: Any) -> str | None:
    # A round without an algorithm is a PPO round, as it always was.
    if isinstance(data, Mapping):
        return data.get("algorithm", "ppo")
    return getattr(data, "algorithm", None)


RoundSettings = Annotated[
    Annotated[PPORound, Tag("ppo")] | Annotated[DPORound, Tag("dpo")],
    Discriminator(
        _algorithm_of,
        custom_error_type="algorithm",
        custom_error_message="algorithm must be 'ppo' or 'dpo'",
    ),
]


class RoundSpec(RootModel[RoundSettings]):
    """A round's algorithm and settings: a PPORound or a DPORound, told apart by `algorithm`."""

    @model_validator(mode="wrap")
    @classmethod
    def _name_fields_as_written(cls, data: Any, handler: Any) -> Any:
        # pydantic puts the algorithm tag in front of every error path (`ppo.policy.steps`); the
        # client wrote `policy.steps`, so that is the name its error must carry.
        try:
            return handler(data)
        except ValidationError as exc:
            problems = [
                {
                    "type": PydanticCustomError(error["type"], error["msg"]),
                    "loc": _without_tag(error["loc"]),
                    "input": error["input"],
                }
                for error in exc.errors()
            ]
            raise ValidationError.from_exception_data(exc.title, problems) from None

    @property
    def algorithm(self) -> str:
        return self.root.algorithm

    def to_json(self) -> dict[str, Any]:
        """Every setting, defaults included: what `Round.config` stores."""
        return self.model_dump(mode="json")


def _without_tag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    return loc[1:] if loc and loc[0] in ALGORITHMS else loc


def describe_problems(exc: ValidationError, prefix: str = "") -> str:
    """One line naming each bad setting by its dotted path: `policy.lr_typo: Extra inputs are not
    permitted`. `prefix` names the section `exc` came from when it is not a whole spec's."""
    problems = []
    for error in exc.errors():
        path = ".".join(str(part) for part in ((prefix,) if prefix else ()) + tuple(error["loc"]))
        problems.append(f"{path}: {error['msg']}" if path else error["msg"])
    return "; ".join(problems)


def spec_from_settings(
    algorithm: str, settings: Mapping[str, str], auto_promote: bool | None = None
) -> RoundSpec:
    """A RoundSpec from dotted names and text values (`policy.sampling.max_new_tokens` = "48").

    Values are read as JSON where they parse (numbers, true/false, null, lists), else as plain text,
    so `policy.dtype=bfloat16` needs no quotes. Raises ValueError for a name set twice over and
    ValidationError for a name or value the spec refuses.
    """
    data: dict[str, Any] = {"algorithm": algorithm}
    if auto_promote is not None:
        data["auto_promote"] = auto_promote
    for name, text in settings.items():
        *parents, leaf = name.split(".")
        node = data
        for depth, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"{name}: {'.'.join(parents[: depth + 1])} is already set as a whole")
            node = child
        if isinstance(node.get(leaf), dict):
            raise ValueError(f"{name}: its settings are already set one by one")
        node[leaf] = _json_or_text(text)
    return RoundSpec.model_validate(data)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---------------------------------------------------------------- the settings as a list


@dataclass(frozen=True)
class SettingField:
    """One setting as a form or a help text shows it."""

    name: str  # dotted: policy.sampling.max_new_tokens
    group: str  # the section it sits in: policy.sampling
    kind: str  # integer, number, true/false, text, list; "or null" when it may be switched off
    default: str  # typed back in this way: JSON, or plain text for text settings
    # The group is off (null) by default, like LoRA: setting any of its fields turns it on.
    group_off_by_default: bool = False


def setting_fields(algorithm: str) -> list[SettingField]:
    """Every setting of a round of this algorithm, section by section, with its type and default."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'ppo' or 'dpo', not {algorithm!r}")
    defaults = RoundSpec.model_validate({"algorithm": algorithm}).root
    return [
        field
        for section in SECTIONS
        for field in _fields_of(getattr(defaults, section), section, off_by_default=False)
    ]


def _fields_of(defaults: BaseModel, group: str, off_by_default: bool) -> Iterator[SettingField]:
    for name, field in type(defaults).model_fields.items():
        dotted = f"{group}.{name}"
        value = getattr(defaults, name)
        nested = _settings_model(field.annotation)
        if nested is not None:  # a section inside the section (sampling, LoRA)
            yield from _fields_of(value if value is not None else nested(), dotted, value is None)
            continue
        default = value if isinstance(value, str) else json.dumps(value)
        kind = " ".join([_kind(field.annotation), ", ".join(_bounds(field.metadata))]).strip()
        yield SettingField(dotted, group, kind, default, off_by_default)


def _settings_model(annotation: Any) -> type[BaseModel] | None:
    """The section model behind `annotation` (`LoraSection | None` → LoraSection), or None for a plain value."""
    if get_origin(annotation) in (Union, UnionType):
        models = [_settings_model(option) for option in get_args(annotation)]
        return next((model for model in models if model is not None), None)
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


_KINDS = {int: "integer", float: "number", bool: "true/false", str: "text"}


def _kind(annotation: Any) -> str:
    if get_origin(annotation) in (Union, UnionType):
        options = get_args(annotation)
        kind = " or ".join(_kind(option) for option in options if option is not NoneType)
        return f"{kind} or null" if NoneType in options else kind
    if get_origin(annotation) in (tuple, list):
        return "list"
    return _KINDS.get(annotation, "text")


def _bounds(metadata: list[Any]) -> list[str]:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return [
        f"{sign} {getattr(rule, name)}"
        for rule in metadata
        for name, sign in signs.items()
        if getattr(rule, name, None) is not None
    ]
