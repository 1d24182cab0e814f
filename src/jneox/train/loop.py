"""The training loop shared by ``pretrain`` and ``sft``: AdamW with warm-up and cosine decay,
gradient accumulation and clipping, bf16 autocast, periodic eval, metrics, and checkpoints that
resume exactly.

Data order is a pure function of (seed, position): sample ``p`` of the stream is item
``perm_e[p % n]`` of epoch ``e = p // n``, where ``perm_e`` is a seeded permutation. Each
micro-batch takes the next ``batch_size * world_size`` samples and rank ``r`` its ``r``-th
slice, so a run resumed at position ``p`` sees exactly the batches an uninterrupted run would,
and a 2-process run sees the same global batches as a 1-process run with twice the batch size.
The loss of a step is the mean over all its target tokens (all ranks, all micro-batches), so
padding and uneven SFT examples weigh the same however the batch is split.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..checkpoint import write_checkpoint
from ..files import (LOG_FILE, REPORT_FILE, STATE_FILE, check_replaceable, is_marked, output_folder, recover,
                     remove_stale_staging, staged_folder, write_marker)
from ..errors import JneoxError, UsageError
from ..loading import load_model
from ..model import Block, meta_model
from . import distributed
from .lora import lora_scales, lora_state, merge_lora_state
from .report import plot_log

IGNORE = -100
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

Collate = Callable[[list], tuple[torch.Tensor, torch.Tensor]]


class TrainError(JneoxError):
    """A run folder that cannot be resumed."""


@dataclass
class TrainConfig:
    out: str
    batch_size: int = 8  # per process; the global batch is batch_size * world_size * grad_accum
    grad_accum: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    max_steps: int = 1000
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0: off
    eval_every: int = 100  # 0: only at the start and the end
    eval_batches: int = 20
    save_every: int = 500  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str | None = None  # "fp32" | "bf16"; None: bf16 on a CUDA device that supports it, else fp32
    save_dtype: str = "float32"
    compile: bool = False
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass
    resume: bool = False
    overwrite: bool = False  # out may be a folder that is not a jneox run (everything in it is deleted)
    fsdp: bool = False
    report: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.precision not in (None, "fp32", "bf16"):
            raise UsageError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise UsageError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.min_lr > self.lr:
            raise UsageError(f"min-lr ({self.min_lr}) is larger than lr ({self.lr})")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for optimizer step ``step`` (0-based): linear warm-up, cosine to min_lr."""
    if step < cfg.warmup_steps:
        lr = cfg.lr * (step + 1) / cfg.warmup_steps
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        lr = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)
    return lr / cfg.lr if cfg.lr else 0.0


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the cross-entropy over the target tokens that are not ``-100``, in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


class Objective:
    """What a training step minimises; this base class is next-token cross-entropy (pretrain, sft).

    A step's loss is ``sum(loss sums) / sum(counts)`` over all its micro-batches and ranks, so the
    unit of :meth:`count` (target tokens here, preference pairs for DPO) is what the step averages
    over. Other objectives (``jneox.train.dpo``, ``reward``, ``ppo``) override these methods.
    """

    per_token = True  # the loss is nats per token: eval also reports its perplexity

    def count(self, batch) -> float:
        """How many units (here target tokens) the loss sum of ``batch`` covers."""
        return float((batch[1] != IGNORE).sum())

    def loss(self, call: Callable, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the units, {metric name: its sum over the units}); ``call(x)`` runs the
        model under the trainer's autocast."""
        x, y = batch
        return token_loss_sum(call(x), y), {}

    def drop_rows(self, batch, keep: torch.Tensor):
        """``batch`` with the rows where ``keep`` is False weighing nothing (eval's wrap-around rows)."""
        x, y = batch
        y = y.clone()
        y[~keep] = IGNORE
        return x, y

    def prepare(self, step: int, batches: list, model: nn.Module) -> list:
        """The micro-batches step ``step`` trains on, made from the collated ones (PPO samples here)."""
        return batches

    def step_metrics(self) -> dict:
        """Figures of the last :meth:`prepare` to log with the step (e.g. PPO's rollout scores)."""
        return {}

    def state_dict(self, model_state: dict) -> dict:
        """What a resumed run needs besides the model and optimizer (tensors and plain values only).
        Called on every rank (it may gather from them); ``model_state`` is the full model state dict on
        rank 0. Only rank 0's answer is saved."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def write_model(self, state: dict, config, folder: Path, tokenizer_file, dtype: torch.dtype) -> None:
        """Write the (LoRA-merged, full) state dict's checkpoint files into ``folder`` (the checkpoint's
        staging folder): here a causal LM."""
        shell = meta_model(config)
        shell.load_state_dict(state, assign=True)
        if config.tie_word_embeddings:
            shell.lm_head.weight = shell.embed.weight
        write_checkpoint(shell, folder, tokenizer_file=tokenizer_file, dtype=dtype)

    def read_model(self, folder: Path) -> dict:
        """The state dict of a checkpoint that :meth:`write_model` wrote."""
        return load_model(folder, dtype=torch.float32).state_dict()


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: each transformer block of ``model`` keeps only its input for the
    backward pass and computes its activations again there. Memory for activations drops from every
    layer's to one layer's, for about a third more compute; the gradients are those of the plain
    model. Only the blocks' ``forward`` is replaced (on the instances), so parameter names, state dicts
    and inference (no grad: nothing to save) are unchanged."""
    for block in model.modules():
        if isinstance(block, Block) and not isinstance(block.forward, functools.partial):
            block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _to_device(batch, device: torch.device):
    return tuple(t.to(device, non_blocking=True) if torch.is_tensor(t) else t for t in batch)


class SampleOrder:
    """Sample ``p`` of an endless stream over ``n`` items, reshuffled every epoch from the seed."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise UsageError("no training examples")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._epoch, self._perm = -1, None

    def __call__(self, p: int) -> int:
        epoch, i = divmod(p, self.n)
        if not self.shuffle:
            return i
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            # a tensor, not a list, of 4 bytes a block where int32 holds every index (torch draws the
            # same permutation in either dtype): a memory-mapped corpus may have many millions of blocks
            dtype = torch.int32 if self.n < 2**31 else torch.int64
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen, dtype=dtype)
        return int(self._perm[i])


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases and norms), fused kernels on CUDA."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise UsageError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda" and not cfg.fsdp
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_state(path: Path) -> dict:
    """A ``trainer_state.pt`` read with ``weights_only=True``: tensors and plain Python values only
    (what :meth:`Trainer.save` writes; the config is stored as strings and numbers), so a planted
    file cannot run code when a run is resumed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"{path}: not a trainer state jneox can load safely ({first}); start the run again "
                         f"without --resume") from None
    missing = [k for k in ("step", "position", "optimizer", "scheduler", "rng", "global_batch") if k not in state] \
        if isinstance(state, dict) else ["(not a dict)"]
    if missing:
        raise TrainError(f"{path}: not a jneox trainer state (missing {', '.join(missing)})")
    return state


class Trainer:
    """One training run writing to ``cfg.out``. Build it first (it joins the torchrun group and picks
    the device), then load the model and data, then :meth:`fit`."""

    def __init__(self, cfg: TrainConfig, kind: str = "train"):
        self.cfg, self.kind = cfg, kind
        self.dist, self.device = distributed.setup(distributed.resolve_device(cfg.device))
        self.out = output_folder(cfg.out)
        self.log_path = self.out / LOG_FILE
        precision = cfg.precision
        if precision is None:
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if self.is_main:  # before the model is loaded, and before the log is written into OUT
            recover(self.out)  # a save killed half-way through its renames: --resume must find it
            check_replaceable(self.out, cfg.overwrite, unmarked_ok=cfg.resume)
        self.state: dict | None = None
        self.data_id: dict | None = None  # what the data is, saved for a resume to compare (pretrain)
        if cfg.resume:
            path = self.out / STATE_FILE
            if not path.is_file():
                what = "the folder does not exist" if not self.out.exists() else f"it holds no {STATE_FILE}"
                raise TrainError(f"--resume: nothing to resume in {self.out} ({what}); start without --resume, "
                                 f"or give the --out of the run to continue")
            self.state = load_state(path)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def print(self, *args) -> None:
        if self.is_main:
            tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)

    def log(self, record: dict) -> None:
        if self.is_main:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    # ---- model restore -------------------------------------------------------------------
    def restore_model(self, model: nn.Module) -> None:
        """Load the weights of the checkpoint being resumed into ``model`` (before it is wrapped)."""
        if self.state is None:
            return
        if "lora" in self.state:
            missing = set(lora_state(model.state_dict())) ^ set(self.state["lora"])
            if missing:
                raise UsageError(f"{self.out / STATE_FILE}: LoRA layers differ from this run's ({len(missing)} names); "
                                 f"resume with the same --lora-rank")
            model.load_state_dict(self.state["lora"], strict=False)
        elif "model" in self.state:
            model.load_state_dict(self.state["model"])
        else:
            model.load_state_dict(self.objective.read_model(self.out))
        self.objective.load_state_dict(self.state.get("objective", {}))

    # ---- the run --------------------------------------------------------------------------
    def fit(self, model: nn.Module, train_items: Sequence, val_items: Sequence, collate: Collate,
            tokenizer_file: str | os.PathLike | None = None, shuffle: bool = True,
            frozen_weights: Callable[[], dict[str, torch.Tensor]] | None = None,
            objective: Objective | None = None) -> dict:
        """Train ``model`` (a :class:`jneox.model.GPTNeoX`, possibly with LoRA layers, on CPU in fp32)
        and return the last eval metrics. ``collate(items) -> (inputs, targets)`` with targets
        aligned to inputs and ``-100`` where no loss is wanted; another ``objective`` defines its
        own batches (their first element is the input ids). ``frozen_weights()`` returns the
        original values of the frozen parameters, where the model holds them rounded (a LoRA base
        cast to bf16): checkpoints are written from those, so frozen tensors stay exact."""
        cfg, d, device = self.cfg, self.dist, self.device
        self.objective = objective = objective or Objective()
        self.config = model.config
        self.tokenizer_file = tokenizer_file
        self.frozen_weights = frozen_weights
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not is_marked(self.out):  # the log is written into OUT before the first save
                write_marker(self.out)
            remove_stale_staging(self.out)  # left by a killed save
        self.restore_model(model)
        model.to(device)
        if cfg.grad_checkpointing:
            checkpoint_blocks(model)
        if cfg.fsdp and not d.enabled:
            self.print("--fsdp: a single process holds the whole model; FSDP is used only under torchrun")
        wrapped = distributed.wrap(model, d, device, cfg.fsdp)
        forward = torch.compile(wrapped) if cfg.compile else wrapped
        optimizer = build_optimizer(wrapped, cfg, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
        step, position = 0, 0
        if self.state is not None:
            s = self.state
            if s["global_batch"] != cfg.batch_size * d.world_size * cfg.grad_accum:
                self.print(f"warning: resuming with a global batch of {cfg.batch_size * d.world_size * cfg.grad_accum} "
                           f"samples, the checkpoint used {s['global_batch']}: the data order changes")
            distributed.load_optimizer_state(wrapped, optimizer, s["optimizer"])
            scheduler.load_state_dict(s["scheduler"])
            set_rng_state(s["rng"], device)
            step, position = s["step"], s["position"]
            self._truncate_log(step)
            self.print(f"resumed from {self.out} at step {step}")
        elif self.is_main and self.log_path.exists():
            self.log_path.unlink()
        distributed.barrier(d)

        order = SampleOrder(len(train_items), cfg.seed, shuffle)
        micro = cfg.batch_size * d.world_size  # samples per micro-batch, all ranks together
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.print(f"{self.kind}: {n_params / 1e6:.2f}M parameters ({n_train / 1e6:.2f}M trained), "
                   f"{len(train_items)} train / {len(val_items)} val examples, device {device}, "
                   f"{'bf16 autocast' if self.autocast_dtype else 'fp32'}"
                   f"{', activation checkpointing' if cfg.grad_checkpointing else ''}, world size {d.world_size}, "
                   f"global batch {micro * cfg.grad_accum}")
        metrics = {}
        if step == 0 and len(val_items):
            metrics = self.evaluate(forward, val_items, collate, step)
        bar = tqdm(total=cfg.max_steps, initial=step, desc=self.kind, disable=not (self.is_main and cfg.progress),
                   dynamic_ncols=True, file=sys.stderr)
        t_last, tokens_since = time.perf_counter(), 0
        while step < cfg.max_steps:
            batches = []
            for a in range(cfg.grad_accum):
                start = position + a * micro + d.rank * cfg.batch_size
                batches.append(collate([train_items[order(p)] for p in range(start, start + cfg.batch_size)]))
            batches = objective.prepare(step, [_to_device(b, device) for b in batches], wrapped)
            local_targets = sum(objective.count(b) for b in batches)
            n_targets = distributed.all_reduce_sum([float(local_targets)], d, device)[0]
            wrapped.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            metric_sums: dict[str, torch.Tensor] = {}
            for a, batch in enumerate(batches):
                sync = a == cfg.grad_accum - 1 or not (d.enabled and not cfg.fsdp)
                with (contextlib.nullcontext() if sync else wrapped.no_sync()):
                    loss, sums = objective.loss(self._autocast_call(forward), batch)
                    # DDP and FSDP average gradients over ranks: scale so the result is the global token mean
                    (loss * (d.world_size / max(n_targets, 1.0))).backward()
                loss_sum += loss.detach().double()
                for k, v in sums.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().double()
                tokens_since += batch[0].numel() * d.world_size
            # kept as a tensor until a log line needs it: no GPU sync on every step
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += micro * cfg.grad_accum
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                names = sorted(metric_sums)
                totals = distributed.all_reduce_sum([float(loss_sum)] + [float(metric_sums[k]) for k in names], d, device)
                loss_value = totals[0] / max(n_targets, 1.0)
                now = time.perf_counter()
                tok_s = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                self.print(f"step {step} loss {loss_value:.4f} lr {lr:.3e} tok/s {tok_s:.0f}")
                bar.set_postfix(loss=f"{loss_value:.3f}")
                self.log({"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tok_s,
                          "grad_norm": None if grad_norm is None else float(grad_norm),
                          **{k: v / max(n_targets, 1.0) for k, v in zip(names, totals[1:])},
                          **objective.step_metrics(), "time": time.time()})
            last = step == cfg.max_steps
            if len(val_items) and (last or (cfg.eval_every and step % cfg.eval_every == 0)):
                t0 = time.perf_counter()
                metrics = self.evaluate(forward, val_items, collate, step)
                t_last += time.perf_counter() - t0  # eval time is not training throughput
            if last or (cfg.save_every and step % cfg.save_every == 0):
                t0 = time.perf_counter()
                self.save(wrapped, optimizer, scheduler, step, position, final=last)
                t_last += time.perf_counter() - t0
        bar.close()
        distributed.barrier(d)
        return metrics

    def _autocast_call(self, forward: nn.Module) -> Callable:
        def call(*args, **kwargs):
            with self.autocast():
                return forward(*args, **kwargs)
        return call

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def evaluate(self, forward: nn.Module, val_items: Sequence, collate: Collate, step: int) -> dict:
        """Mean loss over the target tokens of the first ``eval_batches`` micro-batches of the held-out
        set (the same tokens at every eval), and its perplexity."""
        cfg, d = self.cfg, self.dist
        forward.eval()
        micro = cfg.batch_size * d.world_size
        n_batches = min(cfg.eval_batches, math.ceil(len(val_items) / micro))
        objective = self.objective
        loss_sum, n_targets, metric_sums = 0.0, 0.0, {}
        for b in range(n_batches):
            idx = [b * micro + d.rank * cfg.batch_size + j for j in range(cfg.batch_size)]
            # every rank runs every batch (FSDP gathers parameters collectively); rows past the end weigh 0
            batch = collate([val_items[i % len(val_items)] for i in idx])
            batch = _to_device(objective.drop_rows(batch, torch.tensor([i < len(val_items) for i in idx])), self.device)
            loss, sums = objective.loss(self._autocast_call(forward), batch)
            loss_sum += float(loss)
            n_targets += objective.count(batch)
            for k, v in sums.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v)
        names = sorted(metric_sums)
        totals = distributed.all_reduce_sum([loss_sum, n_targets] + [metric_sums[k] for k in names], d, self.device)
        loss_sum, n_targets = totals[:2]
        loss = loss_sum / max(n_targets, 1.0)
        extra = {f"eval_{k}": v / max(n_targets, 1.0) for k, v in zip(names, totals[2:])}
        if objective.per_token:
            extra = {"eval_ppl": math.exp(min(loss, 50.0)), **extra}
        self.print(f"eval step {step} loss {loss:.4f}" + "".join(f" {k.removeprefix('eval_')} {v:.4f}" for k, v in extra.items()))
        self.log({"step": step, "eval_loss": loss, **extra, "time": time.time()})
        return {"eval_loss": loss, **extra, "step": step}

    # ---- checkpoints -----------------------------------------------------------------------
    def save(self, model: nn.Module, optimizer, scheduler, step: int, position: int, final: bool = False) -> None:
        """Write OUT atomically: model files (HF layout, LoRA merged) + trainer_state.pt + the log, in a
        staging folder renamed over OUT, so a kill at any moment leaves a consistent checkpoint."""
        cfg = self.cfg
        model_state, optim_state = distributed.full_state_dicts(model, optimizer)  # collective under FSDP
        objective_state = self.objective.state_dict(model_state)  # may be a collective too
        if self.is_main:
            scales = lora_scales(distributed.unwrap(model))
            full = model_state
            if self.frozen_weights is not None:  # merge against the original weights, not their bf16 copies
                full = {**model_state, **{k: v for k, v in self.frozen_weights().items()
                                          if k in model_state and v.shape == model_state[k].shape}}
            plain = merge_lora_state(full, scales) if scales else full
            with staged_folder(self.out, cfg.overwrite) as staging:
                self.objective.write_model(plain, self.config, staging, self.tokenizer_file, SAVE_DTYPES[cfg.save_dtype])
                state = {"step": step, "position": position, "optimizer": optim_state,
                         "scheduler": scheduler.state_dict(), "rng": rng_state(self.device),
                         "global_batch": cfg.batch_size * self.dist.world_size * cfg.grad_accum,
                         "world_size": self.dist.world_size, "kind": self.kind,
                         "config": {k: v if isinstance(v, (bool, int, float, type(None))) else str(v)
                                    for k, v in asdict(cfg).items()},
                         "objective": objective_state}
                if self.data_id is not None:
                    state["data"] = self.data_id
                if scales:
                    state["lora"] = lora_state(model_state)  # the base comes from the original --model
                elif cfg.save_dtype != "float32":
                    state["model"] = model_state  # the fp32 weights, since the saved ones are rounded
                torch.save(state, staging / STATE_FILE)
                if self.log_path.exists():
                    shutil.copyfile(self.log_path, staging / LOG_FILE)
                if final and cfg.report:
                    plot_log(staging / LOG_FILE, staging / REPORT_FILE)
            self.print(f"saved step {step} to {self.out}")
        distributed.barrier(self.dist)

    def _truncate_log(self, step: int) -> None:
        """Drop log lines written after the checkpoint being resumed (a killed run wrote some)."""
        if not self.is_main or not self.log_path.exists():
            return
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.log_path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.log_path)
