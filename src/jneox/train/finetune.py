"""The start every fine-tuning run shares (SFT, reward models, DPO, PPO): the trainer, the checkpoint
the run starts from, its examples and the run's length; then LoRA adapters, added when the run is
ready for them (DPO and PPO first take their reference from the model as it starts)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..adapters import save_adapter
from ..files import STATE_FILE, check_replaceable
from ..hub import resolve
from ..loading import load_model, load_tokenizer
from ..errors import UsageError
from ..model import GPTNeoX
from ..tokenizer import Tokenizer
from .lora import apply_lora, cast_frozen
from .loop import Trainer, TrainConfig


def pad_id(tokenizer: Tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad piece, else ``</s>``."""
    return tokenizer.pad_id if tokenizer.pad_id >= 0 else tokenizer.eos_id


def set_length(trainer: Trainer, n_items: int, epochs: float, max_steps: int | None) -> None:
    """``cfg.max_steps``: ``max_steps``, or ``epochs`` passes over ``n_items`` at the run's global batch."""
    cfg = trainer.cfg
    if max_steps is None:
        per_step = cfg.batch_size * trainer.dist.world_size * cfg.grad_accum
        cfg.max_steps = max(1, math.ceil(epochs * n_items / per_step))
    else:
        cfg.max_steps = max_steps


def add_lora(trainer: Trainer, net: nn.Module, rank: int, alpha: float, model: str | os.PathLike | None = None,
             frozen_dtype: torch.dtype | None = None) -> Callable[[], dict] | None:
    """Wrap ``net``'s linears with LoRA adapters (nothing when ``rank`` is 0). ``frozen_dtype`` stores the
    frozen base in that dtype (default: bfloat16 on CUDA under bf16 autocast without FSDP, half the
    memory; else float32); then checkpoints must be merged against the original weights, which the
    returned function reads again from ``model`` (for ``Trainer.fit(frozen_weights=...)``; else None)."""
    if not rank:
        return None
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
        return load_model(model, dtype=torch.float32).state_dict()

    return frozen_weights


def check_adapter_out(folder: str | os.PathLike | None, rank: int, overwrite: bool) -> None:
    """Before a run: ``--save-adapter folder`` needs LoRA, and a folder it may write (not after hours of training)."""
    if folder is None:
        return
    if not rank:
        raise UsageError("--save-adapter writes LoRA adapters: give --lora-rank too")
    check_replaceable(folder, overwrite)


@dataclass
class FineTuning:
    """A fine-tuning run, set up: its trainer, the starting model (fp32) and tokenizer, ``max_len``
    (capped at the model's window) and the training and held-out items."""

    trainer: Trainer
    tokenizer: Tokenizer
    net: GPTNeoX
    max_len: int
    train: list
    val: list
    start: str | os.PathLike  # the checkpoint the run starts from

    @property
    def pad_id(self) -> int:
        return pad_id(self.tokenizer)

    def add_lora(self, rank: int, alpha: float, frozen_dtype: torch.dtype | None = None,
                 reread_base: bool = True) -> Callable[[], dict] | None:
        """:func:`add_lora` on the run's model; ``reread_base=False``: the run cannot read the starting
        checkpoint again for its checkpoints, so the frozen base stays in float32."""
        return add_lora(self.trainer, self.net, rank, alpha, self.start if reread_base else None, frozen_dtype)

    def save_adapter(self, folder: str | os.PathLike | None, rank: int, alpha: float) -> None:
        """After the run: the LoRA adapters of its final checkpoint (OUT's trainer state holds them, gathered
        from every process) as a PEFT adapter folder, for ``jneox serve --lora`` and PEFT; OUT stays the
        merged checkpoint. Nothing for ``folder`` None."""
        if folder is None or not self.trainer.is_main:
            return
        state = torch.load(self.trainer.out / STATE_FILE, map_location="cpu", weights_only=True)
        path = save_adapter(folder, state["lora"], rank, alpha, base_model=self.start,
                            overwrite=self.trainer.cfg.overwrite)
        self.trainer.print(f"saved the LoRA adapters to {path} (PEFT format)")


def start_fine_tuning(kind: str, model: str | os.PathLike, cfg: TrainConfig, max_len: int,
                      examples: Callable[[Tokenizer, int, Trainer], tuple[list, list]], epochs: float,
                      max_steps: int | None, items_per_pass: Callable[[list], int] = len) -> FineTuning:
    """The trainer for a run of ``kind``, the checkpoint ``model`` (folder or hub id) loaded in fp32, its
    examples (``examples(tokenizer, max_len, trainer) -> (train, val)``) and the run's length (``max_steps``,
    or ``epochs`` passes over ``items_per_pass(train)`` items)."""
    trainer = Trainer(cfg, kind)
    folder = resolve(model)
    tokenizer = load_tokenizer(folder)
    net = load_model(folder, dtype=torch.float32)
    max_len = min(max_len, net.config.max_position_embeddings)
    train, val = examples(tokenizer, max_len, trainer)
    set_length(trainer, items_per_pass(train), epochs, max_steps)
    return FineTuning(trainer, tokenizer, net, max_len, train, val, model)
