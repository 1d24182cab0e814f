"""torchrun set-up with PyTorch's own engine: process group, DDP / FSDP wrapping, full state dicts.

The same script runs alone or under ``torchrun --nproc-per-node N``: torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``, and we pick NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from ..loading import torch_device
from ..model import Block


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch_device(device)


def setup(device: torch.device) -> tuple[Dist, torch.device]:
    """Join the torchrun process group (if launched by torchrun) and return it with this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank), device


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum a few numbers over all ranks (loss sums, token counts), in float64."""
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_ranks(flag: bool, d: Dist, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (a collective: every rank must ask)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj, d: Dist) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (a collective)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, d: Dist, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP (every rank holds the model) or FSDP2 ``fully_shard`` (each transformer block's parameters
    sharded over the ranks, gathered for its forward/backward: :func:`shard`) for a model that does not
    fit one device."""
    if not d.enabled:
        return model
    if fsdp:
        return shard(model)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(model: nn.Module) -> nn.Module:
    """FSDP2 ``fully_shard`` in place: one unit per transformer block, wherever it sits (PPO's
    policy-with-value-head holds the model one level down), and the rest (embedding, final norm, heads)
    in the root unit. Also for frozen models that every rank calls in step (PPO's reference and
    reward models), so that no rank holds a whole copy."""
    for block in [m for m in model.modules() if isinstance(m, Block)]:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module behind DDP and torch.compile (FSDP2 shards in place: nothing to unwrap)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Full (unsharded) model and optimizer state dicts on CPU, keyed by parameter names.

    A collective under FSDP: every rank must call it; rank 0 gets the tensors, the others empty
    dicts. Keying the optimizer by names (not positions) is what lets a run resume under a
    different wrapping.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    m = unwrap(model)
    model_state = get_model_state_dict(m, options=options)
    optim_state = get_optimizer_state_dict(m, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state (from :func:`full_state_dicts`) on every rank."""
    set_optimizer_state_dict(unwrap(model), optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))
