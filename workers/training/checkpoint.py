"""Atomic, resumable training state: save, find and restore a run's checkpoints.

A checkpoint is a folder `step-000123` holding everything a killed run needs to continue as if
nothing happened: weights (safetensors via `save_pretrained`; only the adapter for a LoRA
model), optimizer and scheduler state, the python/numpy/torch RNG states and a JSON `extra`
(data position, epoch, metrics so far). It is written into a temporary sibling, fsynced and
renamed into place, so a folder named `step-*` is always complete; a crash mid-write leaves
only a `tmp-*` folder that readers ignore and the next save removes.

Under torch.distributed (a group of more than one process, models sharded with FSDP2) a checkpoint
is sharded: every rank writes its own part into the same temporary folder (`rank-00003/`: its local
shards of the trained parameters, its optimizer state with sharded values as local tensors, its RNG
states), rank 0 adds the scheduler and `extra.json` (with `world_size`) and, once every rank has
written, renames the folder into place. All ranks must therefore see the same filesystem: on several
hosts the checkpoint folder lives on a shared DATA_DIR. A sharded checkpoint only fits the same
number of processes; resuming with another number is refused. Every function here is then a
collective: all ranks call it at the same point.

A process whose model is not sharded (a trainer that trains its own whole copy in each process,
checkpointing into a folder of its own) keeps the single-process format, whatever the group.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from app.common.files import fsync_dir, fsync_tree
from workers.training.distributed import ProcessGroup, current_group, is_sharded

KEEP_LAST = 2  # the newest can be the one a crash interrupted on a flaky disk; keep one more
_STEP_PREFIX = "step-"
_TMP_PREFIX = "tmp-"
_EXTRA = "extra.json"
_RANK_PREFIX = "rank-"


# ---------------------------------------------------------------------------------------------
# RNG state as JSON-safe data (so loading never needs pickle)


def _rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    return plain, tensors


def _set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ---------------------------------------------------------------------------------------------
# checkpoints


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _checkpoints(ckpt_root: Path) -> list[Path]:
    found = []
    for entry in ckpt_root.glob(f"{_STEP_PREFIX}*"):
        suffix = entry.name[len(_STEP_PREFIX) :]
        if entry.is_dir() and suffix.isdigit() and (entry / _EXTRA).exists():
            found.append(entry)
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX) :]))


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a complete, fsynced checkpoint folder to its `step-*` name, replacing one of the same
    step (a resumed final step saved again)."""
    if final.exists():
        old = final.parent / f"{_TMP_PREFIX}old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def save_checkpoint(
    ckpt_root: Path, step: int, model, optimizer, scheduler, extra: dict, group: ProcessGroup | None = None
) -> Path:
    """Write the full training state for `step` atomically; keep the last `KEEP_LAST`.

    With a group of several processes every rank calls it and each writes its shards (module docstring)."""
    group = _sharding_group(model, group)
    if group.distributed:
        return _save_sharded(Path(ckpt_root), step, model, optimizer, scheduler, extra, group)
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(f"{_TMP_PREFIX}*"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = ckpt_root / f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(str(tmp / "model"), safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        plain_rng, tensor_rng = _rng_state()
        torch.save(tensor_rng, tmp / "rng.pt")
        (tmp / "rng.json").write_text(json.dumps(plain_rng))
        (tmp / _EXTRA).write_text(json.dumps({"step": step, **extra}, indent=1))
        fsync_tree(tmp)
        final = ckpt_root / f"{_STEP_PREFIX}{step:06d}"
        _move_into_place(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(ckpt_root)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path, group: ProcessGroup | None = None) -> Path | None:
    """The newest complete checkpoint under ckpt_root, or None. When all ranks share ckpt_root, rank 0
    looks and tells the others, so every rank resumes from the same one even where a shared
    filesystem shows new entries late; ranks with folders of their own each look in theirs."""
    group = group if group is not None else current_group()
    root = Path(ckpt_root)

    def newest() -> str | None:
        listed = _checkpoints(root) if root.is_dir() else []
        return str(listed[-1]) if listed else None

    if not group.distributed or len(set(group.gather_objects(str(root)))) > 1:
        found = newest()
    else:
        found = group.broadcast_object(newest() if group.is_main else None)
    return Path(found) if found is not None else None


def _load_weights(folder: Path, model) -> None:
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        state = {}
        for file in sorted(folder.rglob("adapter_model.safetensors")):
            state.update(load_file(str(file)))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint has unexpected adapter keys: {result.unexpected_keys[:5]}")
        return
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # save_pretrained drops one copy of tied weights; everything else must be there.
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {real_missing[:5]}, unexpected {unexpected[:5]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def load_checkpoint(path: Path, model, optimizer, scheduler, group: ProcessGroup | None = None) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from `path`; return its `extra`.

    Refuses a checkpoint written by another number of processes (its shards would not fit)."""
    group = _sharding_group(model, group)
    path = Path(path)
    saved_world = int(json.loads((path / _EXTRA).read_text()).get("world_size", 1))
    if saved_world != group.world_size:
        raise ValueError(
            f"{path} was written by {saved_world} training process(es) and this run has {group.world_size}: "
            f"resume with {saved_world} process(es), or delete the checkpoints to start the stage over"
        )
    if group.distributed:
        return _load_sharded(path, model, optimizer, scheduler, group)
    _load_weights(path / "model", model)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    tensor_rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    _set_rng_state(json.loads((path / "rng.json").read_text()), tensor_rng)
    extra = json.loads((path / _EXTRA).read_text())
    return extra


# ---------------------------------------------------------------------------------------------
# sharded checkpoints (several processes)


def _sharding_group(model, group: ProcessGroup | None) -> ProcessGroup:
    """The group whose ranks share this model's checkpoints: the given (or current) group when the
    model is sharded over it, else this process alone."""
    group = group if group is not None else current_group()
    if group.distributed and any(is_sharded(p) for p in model.parameters()):
        return group
    return ProcessGroup()


def _rank_dir(folder: Path, rank: int) -> Path:
    return folder / f"{_RANK_PREFIX}{rank:05d}"


def _local(value):
    """A rank's own part of a possibly sharded tensor, detached, on the CPU."""
    if is_sharded(value):
        value = value.to_local()
    return value.detach().cpu().clone()  # clone: tied weights must not share storage in the file


def _trained_parameters(model) -> dict:
    """What a sharded checkpoint holds of the model: the parameters that train. Frozen ones (a LoRA
    base) never change, so the run rebuilds them from its base folder."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _local_optimizer_state(optimizer) -> dict:
    state = optimizer.state_dict()
    return {
        "state": {
            index: {key: _local(v) if isinstance(v, torch.Tensor) else v for key, v in entry.items()}
            for index, entry in state["state"].items()
        },
        "param_groups": state["param_groups"],
    }


def _save_sharded(
    ckpt_root: Path, step: int, model, optimizer, scheduler, extra: dict, group: ProcessGroup
) -> Path:
    name = None
    if group.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_root.glob(f"{_TMP_PREFIX}*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        name = f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}"
        (ckpt_root / name).mkdir()
    tmp = ckpt_root / group.broadcast_object(name)
    final = ckpt_root / f"{_STEP_PREFIX}{step:06d}"
    # Every rank writes its part; `any` then serves as the barrier and tells all ranks if one failed,
    # so none waits forever on a rank that gave up.
    error: BaseException | None = None
    try:
        own = _rank_dir(tmp, group.rank)
        own.mkdir()
        torch.save({n: _local(p) for n, p in _trained_parameters(model).items()}, own / "model.pt")
        torch.save(_local_optimizer_state(optimizer), own / "optimizer.pt")
        plain_rng, tensor_rng = _rng_state()
        torch.save(tensor_rng, own / "rng.pt")
        (own / "rng.json").write_text(json.dumps(plain_rng))
        fsync_tree(own)
    except Exception as exc:
        error = exc
    if group.any(error is not None):
        if group.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(
            f"a training process failed to write its part of checkpoint step {step}"
        ) from error
    if group.is_main:
        try:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            (tmp / _EXTRA).write_text(
                json.dumps({"step": step, **extra, "world_size": group.world_size}, indent=1)
            )
            fsync_tree(tmp)
            _move_into_place(tmp, final)
            for old in _checkpoints(ckpt_root)[:-KEEP_LAST]:
                shutil.rmtree(old, ignore_errors=True)
        except Exception as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            error = exc
    if group.any(error is not None):  # everyone returns once the checkpoint is in place
        raise RuntimeError(f"checkpoint step {step} could not be put in place") from error
    return final


def _load_sharded(path: Path, model, optimizer, scheduler, group: ProcessGroup) -> dict:
    from torch.distributed.tensor import DTensor

    own = _rank_dir(path, group.rank)
    saved = torch.load(own / "model.pt", map_location="cpu", weights_only=True)
    params = _trained_parameters(model)
    if set(saved) != set(params):
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            local = param.to_local() if is_sharded(param) else param
            local.copy_(saved[name])
    optimizer.load_state_dict(torch.load(own / "optimizer.pt", map_location="cpu", weights_only=True))
    # The optimizer state was saved as this rank's local tensors; give the sharded parameters their
    # DTensor state back (same mesh and placements as the parameter), as the optimizer step expects.
    for param, entry in optimizer.state.items():
        if not is_sharded(param):
            continue
        for key, value in entry.items():
            if (
                isinstance(value, torch.Tensor)
                and not is_sharded(value)
                and value.shape == param.to_local().shape
                and value.ndim
            ):
                entry[key] = DTensor.from_local(
                    value.to(param.to_local().device),
                    param.device_mesh,
                    param.placements,
                    run_check=False,
                    shape=param.shape,
                    stride=param.stride(),
                )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    tensor_rng = torch.load(own / "rng.pt", map_location="cpu", weights_only=True)
    _set_rng_state(json.loads((own / "rng.json").read_text()), tensor_rng)
    extra = json.loads((path / _EXTRA).read_text())
    extra.pop("world_size", None)
    return extra
