"""The trainers' view of torch.distributed: who am I, which share of the data is mine, and the few
collectives a data-parallel step needs. One process is the same code with a group of one.

A training stage runs as N processes started by `torchrun` (workers/training/launch.py), one per
device, over one host or several. Every process holds a shard of the trainable models (FSDP2,
`torch.distributed.fsdp.fully_shard`: per-parameter sharding, so frozen LoRA bases and trainable
adapters mix freely, and it runs on CPU with gloo as well as on GPUs with NCCL), takes an equal share
of each global batch and averages gradients with the others. Rank 0 alone talks to the outside world
(progress, metrics, publishing); `RankReporter` makes every rank agree on cancellation so they stop
at the same step and no collective is left waiting.

Why FSDP2 and not DeepSpeed ZeRO-3: it is part of torch (nothing more to install or to keep in step
with torch), it is what the same processes use on CPU in CI and on GPUs in production, and it composes
with LoRA and activation checkpointing without wrapping the model in an engine that owns the
optimizer. `strategy="shard_grad_op"` keeps parameters gathered between forward and backward
(ZeRO-2's trade: more memory, less communication); the default `full_shard` is ZeRO-3.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from app.common.reporting import Reporter
from workers.training.config import Sharding

T = TypeVar("T")

STRATEGIES: tuple[str, ...] = get_args(Sharding)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the training job. `world_size == 1` is the single-process path."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- devices ---------------------------------------------------------------------------------

    def device(self, configured: str = "auto") -> torch.device:
        """The device of this rank: its own GPU under `auto` when CUDA is there, else the CPU."""
        if configured == "auto":
            if torch.cuda.is_available():
                return torch.device(
                    "cuda", self.local_rank if self.distributed else torch.cuda.current_device()
                )
            return torch.device("cpu")
        device = torch.device(configured)
        if device.type == "cuda" and device.index is None and self.distributed:
            return torch.device("cuda", self.local_rank)
        return device

    # -- data ------------------------------------------------------------------------------------

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch. Shares differ by at most one item; use
        `require_divisible` first where every rank must run the same number of forward passes."""
        per, extra = divmod(len(items), self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return list(items[start : start + per + (1 if self.rank < extra else 0)])

    def require_divisible(self, count: int, what: str) -> None:
        if count % self.world_size:
            raise ValueError(
                f"{what} is {count}, which does not split evenly over {self.world_size} training processes: "
                f"make it a multiple of {self.world_size}"
            )

    # -- collectives (identity for a group of one) -----------------------------------------------

    def sum(self, tensor: Tensor) -> Tensor:
        """Element-wise sum over ranks (a new tensor; the input is left alone)."""
        out = tensor.clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def maximum(self, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (cancellation, guards)."""
        if not self.distributed:
            return bool(flag)
        return bool(self.maximum(torch.tensor([1.0 if flag else 0.0], device=self._collective_device()))[0])

    def cat(self, tensor: Tensor) -> Tensor:
        """Concatenate every rank's tensor along dim 0, in rank order (shapes may differ in dim 0)."""
        if not self.distributed:
            return tensor
        parts = self.gather_objects(tensor.detach().cpu())
        return torch.cat(parts).to(tensor.device)

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's picklable `obj`, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    # -- reporting ---------------------------------------------------------------------------------

    def reporter(self, reporter: Reporter) -> Reporter:
        return reporter if not self.distributed else RankReporter(reporter, self)


class RankReporter:
    """A reporter for one rank of a training job: rank 0 reports, the others stay quiet, and
    `should_stop` is a collective, so every rank must call it at the same point of the loop."""

    def __init__(self, inner: Reporter, group: ProcessGroup) -> None:
        self.inner, self.group = inner, group

    def progress(self, done: int, total: int, message: str = "") -> None:
        if self.group.is_main:
            self.inner.progress(done, total, message)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.group.is_main:
            self.inner.metrics(step, values)

    def should_stop(self) -> bool:
        return self.group.any(self.inner.should_stop() if self.group.is_main else False)


# ---------------------------------------------------------------------------------------------
# the current group


_current = ProcessGroup()


def current_group() -> ProcessGroup:
    """The group this process trains in (a group of one unless `join_from_environment` ran)."""
    return _current


def join_from_environment(timeout_s: float = 1800.0) -> ProcessGroup:
    """Initialise torch.distributed from the variables `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) and make it the current group. NCCL on GPUs, gloo on CPUs. Without WORLD_SIZE
    (or with 1) it is the single-process group and nothing is initialised."""
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _current = ProcessGroup()
        return _current
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    _current = ProcessGroup(world_size=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank)
    return _current


@contextmanager
def using_group(group: ProcessGroup) -> Iterator[ProcessGroup]:
    """Make `group` current for a block (tests that initialise torch.distributed themselves)."""
    global _current
    previous, _current = _current, group
    try:
        yield group
    finally:
        _current = previous


def leave() -> None:
    """Tear the process group down (end of a rank's job)."""
    global _current
    if dist.is_initialized():
        dist.destroy_process_group()
    _current = ProcessGroup()


# ---------------------------------------------------------------------------------------------
# sharding and gathering models


def _block_modules(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a Hugging Face model (its `_no_split_modules` classes), the
    natural FSDP units: each is gathered for its own forward and freed after."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, group: ProcessGroup, strategy: str = "full_shard") -> nn.Module:
    """Shard `model` over the group with FSDP2 (in place; returned for chaining). A group of one
    leaves the model as it is. Call the returned module's own `forward` (not a submodule's): the root's
    hooks gather the parameters that live outside the blocks."""
    if not group.distributed:
        return model
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    from torch.distributed.fsdp import fully_shard

    reshard = strategy == "full_shard"
    for block in _block_modules(model):
        fully_shard(block, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    return model


def is_sharded(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_state_dict(model: nn.Module, group: ProcessGroup) -> dict[str, Tensor]:
    """The whole, unsharded state dict on CPU. A collective: every rank calls it; every rank gets it
    (so each can refresh its own generation copy of the policy)."""
    state = model.state_dict()
    out: dict[str, Tensor] = {}
    for name, value in state.items():
        if is_sharded(value):
            value = value.full_tensor()
        out[name] = value.detach().cpu()
    return out


def grad_norm_value(norm: Tensor) -> float:
    """`clip_grad_norm_`'s result as a float (a replicated DTensor when the parameters are sharded)."""
    if is_sharded(norm):
        norm = norm.full_tensor()
    return float(norm)
