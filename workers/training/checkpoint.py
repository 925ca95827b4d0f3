"""Atomic, resumable training state: save, find and restore a run's checkpoints.

A checkpoint is a folder `step-000123` holding everything a killed run needs to continue as if
nothing happened: weights (safetensors via `save_pretrained`; only the adapter for a LoRA
model), optimizer and scheduler state, the python/numpy/torch RNG states and a JSON `extra`
(data position, epoch, metrics so far). It is written into a temporary sibling, fsynced and
renamed into place, so a folder named `step-*` is always complete; a crash mid-write leaves
only a `tmp-*` folder that readers ignore and the next save removes.
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

KEEP_LAST = 2  # the newest can be the one a crash interrupted on a flaky disk; keep one more
_STEP_PREFIX = "step-"
_TMP_PREFIX = "tmp-"
_EXTRA = "extra.json"


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


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, scheduler, extra: dict) -> Path:
    """Write the full training state for `step` atomically; keep the last `KEEP_LAST`."""
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
        if final.exists():  # the same step saved again (a resumed final step): swap it out
            old = ckpt_root / f"{_TMP_PREFIX}old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoints(ckpt_root)[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint under ckpt_root, or None."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return None
    found = _checkpoints(ckpt_root)
    return found[-1] if found else None


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


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from `path`; return its `extra`."""
    path = Path(path)
    _load_weights(path / "model", model)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    tensor_rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    _set_rng_state(json.loads((path / "rng.json").read_text()), tensor_rng)
    extra = json.loads((path / _EXTRA).read_text())
    return extra
