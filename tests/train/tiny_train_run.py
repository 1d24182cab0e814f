"""A tiny pretraining run for the resume and torchrun tests (run as a script, alone or under torchrun).

usage: tiny_train_run.py OUT [--batch-size B] [--grad-accum A] [--steps N] [--save-every K]
                             [--kill-at-step S] [--resume] [--fsdp] [--lora]
--kill-at-step S sends SIGKILL to this process when it starts preparing step S + 1: no cleanup,
no atexit, exactly what a crash or an OOM killer does.
"""
from __future__ import annotations

import argparse
import os
import signal

import torch

from jneox.config import ModelConfig
from jneox.model import GPTNeoX
from jneox.train.loop import Trainer, TrainConfig
from jneox.train.pretrain import collate_blocks

VOCAB, BLOCK = 64, 16


def tiny_blocks(n: int = 96, seed: int = 0) -> torch.Tensor:
    """Learnable rows: an arithmetic progression mod VOCAB with a random start and stride."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(BLOCK + 1)) % VOCAB


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args()

    config = ModelConfig.from_name("tiny", vocab_size=VOCAB, hidden_size=32, num_heads=2, intermediate_size=64,
                                   max_position_embeddings=BLOCK)
    cfg = TrainConfig(out=args.out, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=3e-3, min_lr=3e-4,
                      warmup_steps=3, max_steps=args.steps, eval_every=5, eval_batches=2, save_every=args.save_every,
                      log_every=1, device="cpu", resume=args.resume, fsdp=args.fsdp, progress=False)
    trainer = Trainer(cfg, "tiny")
    model = GPTNeoX(config)
    model.init_weights(seed=0)
    blocks = tiny_blocks()
    train, val = blocks[:80], blocks[80:]
    batches_per_step = args.grad_accum

    def collate(rows):
        collate.calls += 1
        if args.kill_at_step is not None and collate.calls > collate.train_calls_before_kill:
            os.kill(os.getpid(), signal.SIGKILL)
        return collate_blocks(rows)

    collate.calls = 0
    # eval at step 0 takes eval_batches collates, then every step takes grad_accum, evals at multiples of 5
    steps = args.kill_at_step or 0
    collate.train_calls_before_kill = cfg.eval_batches * (1 + steps // cfg.eval_every) + steps * batches_per_step
    trainer.fit(model, train, val, collate)


if __name__ == "__main__":
    main()
