"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from (chosen, rejected)
pairs directly, with the starting model as the reference and no reward model or sampling.

The reference model's log-probabilities of every answer are computed once, before training, with
the model the run starts from (with LoRA that is the model with its adapters off, which is the same
model), so no second copy of the weights is held during training. Logged under TRL's DPOTrainer
names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected`` (means over the step's pairs).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .finetune import check_adapter_out, start_fine_tuning
from .loop import Trainer, TrainConfig
from .preference import PairBatch, PairObjective, answer_logps, build_preference_data, collate_pairs

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from per-answer summed log-probabilities.

    With ``c = log π(chosen) - log π_ref(chosen)`` and ``r`` the same for the rejected answer:
    ``sigmoid`` is ``-(1 - ls) log σ(β (c - r)) - ls log σ(-β (c - r))`` (conservative DPO when the
    label smoothing ``ls > 0``); ``ipo`` is ``(c / n_c - r / n_r - 1 / 2β)²`` with ``n`` the answers'
    token counts (Azar et al. 2023, per-token as TRL does). The rewards are ``β c`` and ``β r``, detached.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        h = beta * (chosen_logratios - rejected_logratios)
        losses = -F.logsigmoid(h) * (1 - label_smoothing) - F.logsigmoid(-h) * label_smoothing
    else:
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs the answers' token counts")
        h = chosen_logratios / chosen_tokens.clamp(min=1) - rejected_logratios / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


class DPOObjective(PairObjective):
    """A step averages the DPO loss over its pairs; batches come from :func:`collate_pairs` with the
    reference log-probabilities attached."""

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown DPO loss {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label smoothing must be in [0, 0.5), got {label_smoothing}")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError("label smoothing applies to the sigmoid loss only")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def loss(self, call, batch):
        b = PairBatch.of(batch)
        logps, tokens = answer_logps(call(b.input_ids), b.labels)
        n = b.pairs
        chosen, rejected = logps[:n], logps[n:]
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, b.ref_chosen.to(logps.dtype),
                                                b.ref_rejected.to(logps.dtype), self.beta, self.loss_type,
                                                self.label_smoothing, tokens[:n], tokens[n:])
        w = b.weight.to(logps.dtype)
        metrics = {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
                   "rewards/accuracies": (chosen_r > rejected_r).to(w.dtype), "rewards/margins": chosen_r - rejected_r,
                   "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}
        return (losses * w).sum(), {k: (v * w).sum() for k, v in metrics.items()}


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list, pad_id: int, batch_size: int,
                    trainer: Trainer) -> list[tuple[float, float]]:
    """(chosen, rejected) log-probabilities of every pair under ``model`` as it is now, in the
    trainer's precision: the reference that DPO measures its log-ratios against."""
    model.to(trainer.device).eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        b = collate_pairs(pairs[start:start + batch_size], pad_id)
        with trainer.autocast():
            logits = model(b.input_ids.to(trainer.device))
        logps = answer_logps(logits, b.labels.to(trainer.device))[0].double().cpu()
        out += list(zip(logps[:b.pairs].tolist(), logps[b.pairs:].tolist()))
    return out


def dpo(model: str | os.PathLike, data: list[str], cfg: TrainConfig, *, val_data: list[str] | None = None,
        val_fraction: float = 0.05, max_len: int = 1024, epochs: float = 1.0, max_steps: int | None = None,
        lora_rank: int = 0, lora_alpha: float = 16.0, skip_bad_lines: bool = False, beta: float = 0.1,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0, save_adapter: str | os.PathLike | None = None) -> dict:
    """DPO from the checkpoint ``model`` on JSONL preference pairs (:mod:`jneox.train.preference`);
    writes ``cfg.out`` as a plain causal-LM checkpoint (``save_adapter``: and the LoRA adapters there,
    as a PEFT folder)."""
    check_adapter_out(save_adapter, lora_rank, cfg.overwrite)
    objective = DPOObjective(beta, loss_type, label_smoothing)

    def examples(tokenizer, max_len, trainer):
        return build_preference_data(data, tokenizer, max_len, val_paths=val_data, val_fraction=val_fraction,
                                     seed=cfg.seed, skip_bad_lines=skip_bad_lines)

    run = start_fine_tuning("dpo", model, cfg, max_len, examples, epochs, max_steps)
    trainer, net, train, val, pad = run.trainer, run.net, run.train, run.val, run.pad_id
    # before LoRA and before a resumed run's weights are loaded: the reference is the starting model
    trainer.print(f"dpo: reference log-probabilities of {len(train) + len(val)} pairs")
    ref_train = reference_logps(net, train, pad, cfg.batch_size, trainer)
    ref_val = reference_logps(net, val, pad, cfg.batch_size, trainer)
    frozen_weights = run.add_lora(lora_rank, lora_alpha)
    train_items = [(p, c, r) for p, (c, r) in zip(train, ref_train)]
    val_items = [(p, c, r) for p, (c, r) in zip(val, ref_val)]
    metrics = trainer.fit(net, train_items, val_items, lambda items: collate_pairs(items, pad),
                          tokenizer_file=run.tokenizer.path, objective=objective, frozen_weights=frozen_weights)
    run.save_adapter(save_adapter, lora_rank, lora_alpha)
    return metrics
