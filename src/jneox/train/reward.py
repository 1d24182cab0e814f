"""Reward models: the GPT-NeoX body with a scalar head read at the answer's last token, trained with
the Bradley-Terry loss ``-log σ(r_chosen - r_rejected - margin)`` on preference pairs.

jneox holds a reward model as a :class:`~jneox.model.GPTNeoX` whose ``lm_head`` is a (1, hidden) linear
without bias, so ``model(ids)[..., 0]`` is the score at every position; it is saved in the layout
transformers loads as ``GPTNeoXForSequenceClassification`` (``jneox.checkpoint.save_reward_model``).
The score is read at the last token of the answer (the input whose next token is ``</s>``), which
is the last non-padding token transformers reads, since batches are right-padded.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import write_reward_model
from ..hub import resolve
from ..loading import load_reward_model, load_tokenizer
from ..model import meta_model
from .data import DataStats, collate
from .finetune import pad_id, start_fine_tuning
from .loop import TrainConfig
from .preference import (PairBatch, PairObjective, PreferenceRecord, build_preference_data, collate_pairs,
                         encode_answer, last_answer_index, read_preferences)


def add_score_head(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace the LM head of ``model`` with a fresh (1, hidden) score head (normal, std 0.02 as transformers)."""
    hidden = model.config.hidden_size
    head = nn.Linear(hidden, 1, bias=False, device=model.embed.weight.device)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1, hidden, generator=torch.Generator().manual_seed(seed)) * 0.02)
    model.lm_head = head
    return model


def scores_at(model_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the score at the answer's last token, from the (B, T, 1) output of a reward model."""
    idx = last_answer_index(labels)
    return model_out[torch.arange(labels.shape[0], device=labels.device), idx, 0].float()


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry loss ``-log σ(r_c - r_r - margin)``."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


class RewardObjective(PairObjective):
    """A step averages the Bradley-Terry loss over its pairs; logs ``accuracy`` (chosen scored higher),
    ``margin`` (mean r_c - r_r) and the mean scores, as TRL's RewardTrainer does."""

    def loss(self, call, batch):
        b = PairBatch.of(batch)
        scores = scores_at(call(b.input_ids), b.labels)
        chosen, rejected = scores[:b.pairs], scores[b.pairs:]
        w = b.weight.to(scores.dtype)
        losses = reward_loss(chosen, rejected, b.margin.to(scores.dtype))
        metrics = {"accuracy": (chosen > rejected).to(w.dtype), "margin": (chosen - rejected).detach(),
                   "rewards/chosen": chosen.detach(), "rewards/rejected": rejected.detach()}
        return (losses * w).sum(), {k: (v * w).sum() for k, v in metrics.items()}

    def write_model(self, state, config, folder, tokenizer_file, dtype) -> None:
        shell = meta_model(config)
        shell.lm_head = nn.Linear(config.hidden_size, 1, bias=False, device="meta")
        shell.load_state_dict(state, assign=True)
        write_reward_model(shell, folder, tokenizer_file=tokenizer_file, dtype=dtype, pad_token_id=self.pad_token_id)

    def read_model(self, folder) -> dict:
        return load_reward_model(folder).state_dict()

    pad_token_id = 0


def reward(model: str | os.PathLike, data: list[str], cfg: TrainConfig, *, val_data: list[str] | None = None,
           val_fraction: float = 0.05, max_len: int = 1024, epochs: float = 1.0, max_steps: int | None = None,
           lora_rank: int = 0, lora_alpha: float = 16.0, skip_bad_lines: bool = False) -> dict:
    """Train a reward model from the causal-LM checkpoint ``model`` on JSONL preference pairs; writes
    ``cfg.out`` in transformers' ``GPTNeoXForSequenceClassification`` layout. Returns the last eval
    metrics (``eval_accuracy`` is the held-out pairwise accuracy)."""

    def examples(tokenizer, max_len, trainer):
        return build_preference_data(data, tokenizer, max_len, val_paths=val_data, val_fraction=val_fraction,
                                     seed=cfg.seed, skip_bad_lines=skip_bad_lines)

    run = start_fine_tuning("reward", model, cfg, max_len, examples, epochs, max_steps)
    frozen_weights = run.add_lora(lora_rank, lora_alpha)
    add_score_head(run.net, cfg.seed)  # after LoRA, so the new head trains with the adapters
    objective = RewardObjective()
    objective.pad_token_id = run.pad_id
    return run.trainer.fit(run.net, run.train, run.val, lambda items: collate_pairs(items, objective.pad_token_id),
                           tokenizer_file=run.tokenizer.path, objective=objective, frozen_weights=frozen_weights)


@torch.no_grad()
def score_answers(reward_model: nn.Module, tokenizer, records: Sequence[tuple], max_len: int | None = None,
                  batch_size: int = 8) -> list[float]:
    """The reward of each ``(prompt turns, answer)``, both encoded as ``jneox sft`` encodes a システム turn."""
    max_len = max_len or reward_model.config.max_position_embeddings
    device = reward_model.embed.weight.device
    examples = [encode_answer(prompt, answer, tokenizer, max_len) for prompt, answer in records]
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        ids, labels = collate(examples[start:start + batch_size], pad_id(tokenizer))
        out += scores_at(reward_model(ids.to(device)), labels.to(device)).tolist()
    return out


def score_file(reward_model: str | os.PathLike, data: list[str], out=None, max_len: int = 1024,
               batch_size: int = 8, skip_bad_lines: bool = False) -> dict:
    """``jneox score``: one JSON line per record of ``data`` with the scores of its answers. Preference
    pairs get ``score_chosen``/``score_rejected``; the summary holds the pairwise accuracy."""
    out = out or sys.stdout
    folder = resolve(reward_model)
    model, tokenizer = load_reward_model(folder), load_tokenizer(folder)
    records: list[PreferenceRecord] = read_preferences(data, skip_bad_lines, DataStats())
    chosen = score_answers(model, tokenizer, [(r.prompt, r.chosen) for r in records], max_len, batch_size)
    rejected = score_answers(model, tokenizer, [(r.prompt, r.rejected) for r in records], max_len, batch_size)
    for c, r in zip(chosen, rejected):
        out.write(json.dumps({"score_chosen": c, "score_rejected": r}) + "\n")
    return {"pairs": len(records), "accuracy": sum(c > r for c, r in zip(chosen, rejected)) / len(records),
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(records)}
