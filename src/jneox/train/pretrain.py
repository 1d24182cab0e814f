"""Causal-LM pretraining on raw text: every token of every packed block is a target."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from ..loading import load_model
from ..config import ModelConfig
from ..errors import UsageError
from ..files import STATE_FILE
from ..model import meta_model
from ..tokenizer import Tokenizer
from .corpus import data_changes, data_fingerprint, is_shard_data, shard_data
from .data import build_pretrain_data
from .loop import Trainer, TrainConfig


def resolve_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a folder holding ``spiece.model`` or from the file itself."""
    p = Path(path)
    return Tokenizer(p / "spiece.model" if p.is_dir() else p)


def model_config(name_or_file: str, tokenizer: Tokenizer) -> ModelConfig:
    """A preset name or a config.json, with the vocabulary and special ids of ``tokenizer``."""
    if name_or_file.endswith(".json") or Path(name_or_file).is_file():
        base = ModelConfig.from_file(name_or_file)
    else:
        base = ModelConfig.from_name(name_or_file)
    return replace(base, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                   eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id if tokenizer.pad_id >= 0 else None)


def collate_blocks(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``block_size + 1`` tokens -> (inputs, next-token targets)."""
    batch = torch.stack(rows)
    return batch[:, :-1], batch[:, 1:]


def pretrain(model_config_name: str, tokenizer_path: str | os.PathLike, data: list[str], cfg: TrainConfig, *,
             init: str | None = None, block_size: int = 512, val_fraction: float = 0.01, text_field: str = "text",
             skip_bad_lines: bool = False) -> dict:
    """Train a GPT-NeoX from scratch (or continue ``init``) on ``data``; writes ``cfg.out``. ``data``
    is indexed datasets (prefixes, folders, or a weighted blend, read through memory maps: see
    :mod:`jneox.train.corpus`) or text/JSONL files, tokenized in memory. Returns the last eval metrics."""
    trainer = Trainer(cfg, "pretrain")
    tokenizer = resolve_tokenizer(tokenizer_path)
    trainer.data_id = data_fingerprint(list(data), block_size, val_fraction, cfg.seed, tokenizer.path, text_field)
    if trainer.state is not None and "data" in trainer.state:
        changes = data_changes(trainer.state["data"], trainer.data_id)
        if changes:  # the position saved counts blocks of that data: on other data it means nothing
            raise UsageError(f"--resume: {trainer.out / STATE_FILE} was trained on other data: {'; '.join(changes)}; "
                             f"resume with the --data and options it was trained on, or start a new --out "
                             f"with --init {trainer.out}")
    if init is not None:
        model = load_model(init, dtype=torch.float32)
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UsageError(f"--init {init}: the model has {model.config.vocab_size} token embeddings, "
                             f"the tokenizer {tokenizer.vocab_size} pieces")
    else:
        config = model_config(model_config_name, tokenizer)
        model = meta_model(config)
        model = model.to_empty(device="cpu")
        model.init_weights(seed=cfg.seed)
    if block_size > model.config.max_position_embeddings:
        raise UsageError(f"--block-size {block_size} is longer than the model's {model.config.max_position_embeddings} positions")
    if is_shard_data(list(data)):
        train_blocks, val_blocks = shard_data(list(data), block_size, model.config.vocab_size,
                                              val_fraction=val_fraction, seed=cfg.seed)
    else:
        train_blocks, val_blocks = build_pretrain_data(data, tokenizer, block_size, val_fraction=val_fraction,
                                                       seed=cfg.seed, text_field=text_field,
                                                       skip_bad_lines=skip_bad_lines)
    return trainer.fit(model, train_blocks, val_blocks, collate_blocks, tokenizer_file=tokenizer.path)
