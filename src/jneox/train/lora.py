"""LoRA: a low-rank update ``W + (alpha / r) * B @ A`` on frozen linear layers.

Only ``A`` and ``B`` train, so a 3.6B model's optimizer state shrinks to a few MB and fits one
consumer GPU. The wrapped layer keeps the base ``weight`` and ``bias`` under their own names, so a
state dict stays name-compatible with a plain checkpoint; :func:`merge_lora_state` folds the
update into the weights when saving, and the saved folder is an ordinary checkpoint.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..model import LINEARS

TARGETS = LINEARS  # the linear layers of a GPT-NeoX block (attention qkv/proj, MLP fc/proj)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update; B starts at zero, so the wrapped
    model computes exactly what the base model does until the first step."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.scale = rank, alpha / rank
        self.enabled = True  # False: the base layer alone (see adapters_off)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return F.linear(x, self.weight, self.bias) + update * self.scale

    def delta(self) -> torch.Tensor:
        """The update as a dense matrix, in fp32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


def apply_lora(model: nn.Module, rank: int, alpha: float = 16.0, targets=TARGETS) -> list[str]:
    """Freeze every parameter of ``model`` and wrap its target linears with LoRA; returns their names."""
    if rank <= 0:
        raise UsageError(f"LoRA rank must be positive, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and any(full.endswith(t) for t in targets):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(full)
    if not wrapped:
        raise UsageError(f"no linear layer matches the LoRA targets {targets}")
    return wrapped


def lora_scales(model: nn.Module) -> dict[str, float]:
    """Module name -> scale of every LoRA layer (what :func:`merge_lora_state` needs besides the tensors)."""
    return {name: m.scale for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora_state(state: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """A plain state dict from one with ``*.lora_a`` / ``*.lora_b`` entries: each update is added to
    its ``*.weight`` (in fp32, then cast back to the weight's dtype) and the LoRA entries are dropped.
    Works on a gathered full state dict, so it serves DDP and FSDP alike."""
    merged = {k: v for k, v in state.items() if not k.endswith((".lora_a", ".lora_b"))}
    for module, scale in scales.items():
        a, b, w = state[f"{module}.lora_a"], state[f"{module}.lora_b"], state[f"{module}.weight"]
        merged[f"{module}.weight"] = (w.float() + (b.float() @ a.float()) * scale).to(w.dtype)
    return merged


def lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the LoRA entries of a state dict (what a resumed LoRA run needs besides the base model)."""
    return {k: v for k, v in state.items() if k.endswith((".lora_a", ".lora_b"))}


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the frozen (base) parameters in ``dtype``, e.g. bfloat16 on a GPU: halves the base model's
    memory, which is what lets a 3.6B model be LoRA-tuned on one consumer GPU. Adapters stay fp32."""
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run ``model`` as its base model inside the block (every LoRA update off): with LoRA, the
    reference model of DPO and PPO is the same weights without a second copy."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
