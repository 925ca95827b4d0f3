"""The shared base of the trainers' settings dataclasses: built from plain JSON data and back.

A run row stores its trainer's settings as JSON; `from_dict` turns that back into the dataclass,
refusing names the dataclass does not have, building nested settings (LoRA, sampling) from their
dicts and JSON lists into tuples where a field is a tuple.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Self

# How a trainer shards its models over several training processes (workers/training/distributed.py):
# full_shard is ZeRO-3, shard_grad_op ZeRO-2. One process ignores it.
Sharding = Literal["full_shard", "shard_grad_op"]
# Who draws PPO's rollouts (workers/training/rollout_engines.py).
RolloutEngineName = Literal["builtin", "vllm"]


class TrainerConfig:
    """Base of RewardConfig, PPOConfig, DPOConfig, GateConfig and LoraSettings (each a @dataclass)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        return build_dataclass(cls, data)


def build_dataclass(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls(**data)` for a dataclass, with nested dataclasses and tuples converted from JSON values.

    An unknown name is a ValueError that lists the names `cls` has, so a typo is easy to fix.
    """
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} settings: {', '.join(unknown)}; known: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{name: _from_json(hints[name], value) for name, value in data.items()})


def _from_json(annotation: Any, value: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        # Only `X | None` needs converting; a union of plain types (str | list[str]) takes the value as is.
        return _from_json(options[0], value) if len(options) == 1 else value
    if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
        return build_dataclass(annotation, value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value
