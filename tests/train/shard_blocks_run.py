"""A tiny ``pretrain`` on indexed datasets that records which training blocks it reads (run as a script,
alone or under torchrun), for the resume and torchrun tests of tests/train/test_tokenize_shards.py.

usage: shard_blocks_run.py OUT RECORD TOKENIZER DATA... [--batch-size B] [--steps N] [--save-every K]
                           [--kill-at-fetch F] [--resume]
Every training block read appends ``{"rank", "item"}`` to RECORD-RANK.jsonl (flushed at once), where
``item`` is the block's index in the training set. --kill-at-fetch F sends SIGKILL to this process
when it is about to read its F-th training block: no cleanup, as a crash or the OOM killer.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from collections.abc import Sequence

from jneox.train import loop
from jneox.train.loop import TrainConfig
from jneox.train.pretrain import pretrain


class Recorded(Sequence):
    def __init__(self, items, path: str, rank: int, kill_at: int | None):
        self.items, self.rank, self.kill_at, self.fetches = items, rank, kill_at, 0
        self.file = open(path, "a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        self.fetches += 1
        if self.kill_at is not None and self.fetches >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.file.write(json.dumps({"rank": self.rank, "item": int(i),
                                    "first_tokens": self.items[i][:4].tolist()}) + "\n")
        self.file.flush()
        return self.items[i]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("record")
    p.add_argument("tokenizer")
    p.add_argument("data", nargs="+")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--kill-at-fetch", type=int)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    fit = loop.Trainer.fit

    def recording_fit(self, model, train_items, *rest, **kwargs):
        wrapped = Recorded(train_items, f"{args.record}-{rank}.jsonl", rank, args.kill_at_fetch)
        return fit(self, model, wrapped, *rest, **kwargs)

    loop.Trainer.fit = recording_fit
    cfg = TrainConfig(out=args.out, batch_size=args.batch_size, lr=1e-3, min_lr=1e-4, warmup_steps=2,
                      max_steps=args.steps, eval_every=0, eval_batches=1, save_every=args.save_every, log_every=1,
                      device="cpu", resume=args.resume, progress=False)
    pretrain("tiny", args.tokenizer, args.data, cfg, block_size=16, val_fraction=0.1)


if __name__ == "__main__":
    main()
