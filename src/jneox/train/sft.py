"""Supervised fine-tuning on conversations: only the システム utterances (and their ``</s>``) carry loss.

Examples are built by :mod:`jneox.train.data` with the formatting functions of :mod:`jneox.chat`,
so training sees exactly the prompts inference writes.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..errors import UsageError
from .loop import Trainer, TrainConfig


def load_start(model: str | os.PathLike, max_len: int):
    """(tokenizer, fp32 model, max_len capped at the model's window) of the checkpoint a run starts from."""
    from ..hub import resolve
    from ..loading import load_model, load_tokenizer

    folder = resolve(model)
    tokenizer = load_tokenizer(folder)
    net = load_model(folder, dtype=torch.float32)
    return tokenizer, net, min(max_len, net.config.max_position_embeddings)


def set_length(trainer: Trainer, n_items: int, epochs: float, max_steps: int | None) -> None:
    """``cfg.max_steps``: ``max_steps``, or ``epochs`` passes over ``n_items`` at the run's global batch."""
    cfg = trainer.cfg
    if max_steps is None:
        per_step = cfg.batch_size * trainer.dist.world_size * cfg.grad_accum
        cfg.max_steps = max(1, math.ceil(epochs * n_items / per_step))
    else:
        cfg.max_steps = max_steps


def add_lora(trainer: Trainer, net: nn.Module, rank: int, alpha: float, model: str | os.PathLike | None = None,
             frozen_dtype: torch.dtype | None = None):
    """Wrap ``net``'s linears with LoRA adapters (nothing when ``rank`` is 0). ``frozen_dtype`` stores the
    frozen base in that dtype (default: bfloat16 on CUDA under bf16 autocast without FSDP, half the
    memory; else float32); then checkpoints must be merged against the original weights, which the
    returned function reads again from ``model`` (for ``Trainer.fit(frozen_weights=...)``; else None)."""
    if not rank:
        return None
    from .lora import apply_lora, cast_frozen

    apply_lora(net, rank, alpha)
    if frozen_dtype is None and trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16 \
            and not trainer.cfg.fsdp:
        frozen_dtype = torch.bfloat16  # FSDP wants one dtype
    if frozen_dtype in (None, torch.float32):
        return None
    if model is None:
        raise UsageError("a LoRA base held in a lower precision needs the checkpoint it came from (model=)")
    cast_frozen(net, frozen_dtype)

    def frozen_weights():  # checkpoints take the frozen tensors from the file, not their rounded copies
        from ..loading import load_model

        return load_model(model, dtype=torch.float32).state_dict()

    return frozen_weights


def pad_id(tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id


def sft(model: str | os.PathLike, data: list[str], cfg: TrainConfig, *, val_data: list[str] | None = None,
        val_fraction: float = 0.05, max_len: int = 1024, epochs: float = 3.0, max_steps: int | None = None,
        lora_rank: int = 0, lora_alpha: float = 16.0, skip_bad_lines: bool = False,
        frozen_dtype: torch.dtype | None = None) -> dict:
    """Fine-tune the checkpoint ``model`` (folder or hub id) on JSONL conversations; writes ``cfg.out``.
    Without ``max_steps`` the run lasts ``epochs`` passes over the training conversations.
    ``frozen_dtype``: see :func:`add_lora`."""
    from .data import build_sft_data, collate

    trainer = Trainer(cfg, "sft")
    tokenizer, net, max_len = load_start(model, max_len)
    train, val = build_sft_data(data, tokenizer, max_len, val_paths=val_data, val_fraction=val_fraction,
                                seed=cfg.seed, skip_bad_lines=skip_bad_lines)
    if not train:
        raise UsageError("no training conversations left after the held-out split")
    set_length(trainer, len(train), epochs, max_steps)
    frozen_weights = add_lora(trainer, net, lora_rank, lora_alpha, model, frozen_dtype)
    pad = pad_id(tokenizer)

    def collate_examples(examples):  # labels are already next-token targets, -100 outside システム turns
        return collate(examples, pad)

    return trainer.fit(net, train, val, collate_examples, tokenizer_file=tokenizer.path, frozen_weights=frozen_weights)
