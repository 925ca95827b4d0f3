"""The fast decoder's linear layers: a plain or peft LoRA projection read in place, optionally MKL-packed.

A projection is read as its base weight plus the active LoRA adapters, exactly what peft's forward adds
on the fly, so the fast path decodes a LoRA policy with the adapters' current values; a layer type it
does not know reads as None and the generator falls back to the model's own forward. On x86 CPUs the
decode-step matmuls run on MKL-packed copies of the weights (fused QKV and gate/up), which suit the
skinny (batch x hidden) inputs of a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LinearParts:
    """What a bias-free linear layer computes right now: x W^T + sum over adapters of (x A^T) B^T * scale."""

    weight: Tensor
    adapters: list[tuple[Tensor, Tensor, float]]

    def merged(self) -> Tensor:
        weight = self.weight
        for a, b, scale in self.adapters:
            weight = weight + (b @ a) * scale
        return weight


def linear_parts(module: nn.Module) -> LinearParts | None:
    """Read a projection without copying it, or None when the fast path does not know the layer type.

    Plain `nn.Linear`, or a peft LoRA layer: its base weight plus the active adapters, exactly what its
    forward adds on the fly (nothing when the adapters are merged into the base or disabled).
    """
    if type(module) is nn.Linear:
        return LinearParts(module.weight, []) if module.bias is None else None
    # Imported here rather than at the top: peft takes seconds to load, and a plain model (what serving
    # loads) has only `nn.Linear` projections, so it never gets this far.
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear):
        return None
    base = module.base_layer
    if type(base) is not nn.Linear or base.bias is not None or module.fan_in_fan_out:
        return None
    if module.disable_adapters:
        # peft's forward would unmerge a merged adapter first; leave that to the generic path.
        return None if module.merged else LinearParts(base.weight, [])
    if module.merged:
        return LinearParts(base.weight, [])
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False):
            return None  # DoRA and friends change the forward, not just the weight
        adapters.append((module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name]))
    return LinearParts(base.weight, adapters)


def mkl_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether MKL's packed GEMM can hold the weights: an x86 CPU build with MKL, float32."""
    return (
        device.type == "cpu"
        and dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


class Projection:
    """One projection, or several side by side (their outputs concatenated).

    Always usable in plain form: the layers' own tensors, no copy, adapters applied unmerged like peft.
    With `pack_rows` (x86 CPU, float32) it also holds the current weights, adapters merged in and
    concatenated, laid out for MKL's packed GEMM, used for inputs of exactly that many rows: a decode
    step multiplies each weight by a skinny (batch x hidden) input, where plain sgemm spends much of its
    time re-packing the weight on every call. The packed copy is made once per decoding call.
    """

    def __init__(self, modules: list[nn.Module], pack_rows: int | None):
        self.parts = [linear_parts(m) for m in modules]
        self.rows = pack_rows
        self.packed = None
        if pack_rows:
            merged = [p.merged() for p in self.parts]
            weight = torch.cat(merged) if len(merged) > 1 else merged[0]
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, pack_rows)
            # The packed call reads only the shape of its "original weight" argument (which it would use
            # for other row counts; those never reach it), so a zero-stride stand-in spares a second copy.
            self.shape = weight.new_zeros(1, 1).expand(weight.shape)

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None and x.shape[0] == self.rows:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.shape, None, self.rows)
        outputs = []
        for part in self.parts:
            y = F.linear(x, part.weight)
            for a, b, scale in part.adapters:
                # Adapters may be float32 over a half-precision base (LoRA keeps its trainable weights
                # in full precision); compute them in their own dtype and add the result back, like peft.
                delta = F.linear(F.linear(x.to(a.dtype), a), b) * scale
                y = y + delta.to(y.dtype)
            outputs.append(y)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
