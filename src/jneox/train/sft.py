"""Supervised fine-tuning on conversations: only the システム utterances (and their ``</s>``) carry loss.

Examples are built by :mod:`jneox.train.data` with the formatting functions of :mod:`jneox.chat`,
so training sees exactly the prompts inference writes.
"""
from __future__ import annotations

import os

import torch

from ..errors import UsageError
from .data import build_sft_data, collate
from .finetune import check_adapter_out, start_fine_tuning
from .loop import TrainConfig


def sft(model: str | os.PathLike, data: list[str], cfg: TrainConfig, *, val_data: list[str] | None = None,
        val_fraction: float = 0.05, max_len: int = 1024, epochs: float = 3.0, max_steps: int | None = None,
        lora_rank: int = 0, lora_alpha: float = 16.0, skip_bad_lines: bool = False,
        frozen_dtype: torch.dtype | None = None, save_adapter: str | os.PathLike | None = None) -> dict:
    """Fine-tune the checkpoint ``model`` (folder or hub id) on JSONL conversations; writes ``cfg.out``.
    Without ``max_steps`` the run lasts ``epochs`` passes over the training conversations.
    ``frozen_dtype``: see :func:`jneox.train.finetune.add_lora`; ``save_adapter``: also write the LoRA
    adapters there as a PEFT folder (:meth:`~jneox.train.finetune.FineTuning.save_adapter`)."""
    check_adapter_out(save_adapter, lora_rank, cfg.overwrite)

    def examples(tokenizer, max_len, trainer):
        train, val = build_sft_data(data, tokenizer, max_len, val_paths=val_data, val_fraction=val_fraction,
                                    seed=cfg.seed, skip_bad_lines=skip_bad_lines)
        if not train:
            raise UsageError("no training conversations left after the held-out split")
        return train, val

    run = start_fine_tuning("sft", model, cfg, max_len, examples, epochs, max_steps)
    frozen_weights = run.add_lora(lora_rank, lora_alpha, frozen_dtype)
    pad = run.pad_id

    def collate_examples(examples):  # labels are already next-token targets, -100 outside システム turns
        return collate(examples, pad)

    metrics = run.trainer.fit(run.net, run.train, run.val, collate_examples, tokenizer_file=run.tokenizer.path,
                              frozen_weights=frozen_weights)
    run.save_adapter(save_adapter, lora_rank, lora_alpha)
    return metrics
