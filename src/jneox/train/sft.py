"""Supervised fine-tuning on conversations: only the システム utterances (and their ``</s>``) carry loss.

Examples are built by :mod:`jneox.train.data` with the formatting functions of :mod:`jneox.chat`,
so training sees exactly the prompts inference writes.
"""
from __future__ import annotations

import math
import os

import torch

from ..errors import UsageError
from .loop import Trainer, TrainConfig


def sft(model: str | os.PathLike, data: list[str], cfg: TrainConfig, *, val_data: list[str] | None = None,
        val_fraction: float = 0.05, max_len: int = 1024, epochs: float = 3.0, max_steps: int | None = None,
        lora_rank: int = 0, lora_alpha: float = 16.0, skip_bad_lines: bool = False,
        frozen_dtype: torch.dtype | None = None) -> dict:
    """Fine-tune the checkpoint ``model`` (folder or hub id) on JSONL conversations; writes ``cfg.out``.
    Without ``max_steps`` the run lasts ``epochs`` passes over the training conversations.
    ``frozen_dtype`` stores the frozen base of a LoRA run in that dtype (default: bfloat16 on CUDA
    under bf16 autocast without FSDP, else float32); checkpoints are merged against the original
    weights all the same."""
    from ..checkpoint import load_model, load_tokenizer, resolve
    from .data import build_sft_data, collate

    trainer = Trainer(cfg, "sft")
    folder = resolve(model)
    tokenizer = load_tokenizer(folder)
    net = load_model(folder, dtype=torch.float32)
    max_len = min(max_len, net.config.max_position_embeddings)
    train, val = build_sft_data(data, tokenizer, max_len, val_paths=val_data, val_fraction=val_fraction,
                                seed=cfg.seed, skip_bad_lines=skip_bad_lines)
    if not train:
        raise UsageError("no training conversations left after the held-out split")
    if max_steps is None:
        per_step = cfg.batch_size * trainer.dist.world_size * cfg.grad_accum
        cfg.max_steps = max(1, math.ceil(epochs * len(train) / per_step))
    else:
        cfg.max_steps = max_steps
    frozen_weights = None
    if lora_rank:
        from .lora import apply_lora, cast_frozen

        apply_lora(net, lora_rank, lora_alpha)
        if frozen_dtype is None and trainer.device.type == "cuda" and trainer.autocast_dtype == torch.bfloat16 \
                and not cfg.fsdp:
            frozen_dtype = torch.bfloat16  # the base in bf16 under bf16 autocast: half the memory (FSDP wants one dtype)
        if frozen_dtype not in (None, torch.float32):
            cast_frozen(net, frozen_dtype)

            def frozen_weights():  # checkpoints take the frozen tensors from the file, not their rounded copies
                return load_model(folder, dtype=torch.float32).state_dict()
    pad_id = tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id

    def collate_examples(examples):  # labels are already next-token targets, -100 outside システム turns
        return collate(examples, pad_id)

    return trainer.fit(net, train, val, collate_examples, tokenizer_file=tokenizer.path, frozen_weights=frozen_weights)
