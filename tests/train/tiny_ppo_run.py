"""A tiny PPO run on a toy reward, for the PPO test; run as a script so that it can be SIGKILLed.

usage: tiny_ppo_run.py CHECKPOINT OUT [--kill-at-rollout N] [--resume] [--fsdp]
The toy reward is 1 when the answer contains TOKEN, a token the starting model (the tests' tiny
checkpoint) samples in about a quarter of its answers. --kill-at-rollout N sends SIGKILL to this
process when the N-th rollout asks for its rewards: no cleanup, as a crash or the OOM killer.
Under torchrun each rank also appends its rewards to OUT-rewards-RANK.jsonl, one line per rollout.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

from jneox.train.loop import TrainConfig
from jneox.train.ppo import PPOConfig, ppo

PROMPTS = ["日本で一番高い山は?", "こんにちは", "水の沸点は?", "おすすめの本は?", "今日の天気は?", "猫と犬はどちらが好き?"]
BATCH = 6  # every prompt in every rollout
TOKEN = 410
STEPS, PPO_EPOCHS, SAVE_EVERY = 12, 2, 5


def run(checkpoint, out, kill_at_rollout: int | None = None, resume: bool = False, fsdp: bool = False) -> dict:
    out, rank = Path(out), os.environ.get("RANK")
    data = out.parent / f"{out.name}-prompts-{rank or 0}.jsonl"  # one per rank: none reads another's half-written
    data.write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in PROMPTS), encoding="utf-8")
    given = []

    def reward(prompt_ids, answer_ids):
        if kill_at_rollout is not None and len(given) >= (kill_at_rollout - 1) * BATCH:  # a rollout asks for BATCH
            os.kill(os.getpid(), signal.SIGKILL)
        given.append(float(TOKEN in answer_ids))
        if rank is not None and len(given) % BATCH == 0:
            with open(out.parent / f"{out.name}-rewards-{rank}.jsonl", "a") as f:
                f.write(json.dumps(given[-BATCH:]) + "\n")
        return given[-1]

    cfg = TrainConfig(out=str(out), batch_size=BATCH, lr=1e-3, min_lr=1e-3, warmup_steps=1, max_steps=STEPS,
                      eval_every=0, save_every=SAVE_EVERY, log_every=1, device="cpu", resume=resume, progress=False,
                      fsdp=fsdp)
    return ppo(checkpoint, reward, [str(data)], cfg,
               PPOConfig(kl_coef=0.05, ppo_epochs=PPO_EPOCHS, max_new_tokens=8, missing_eos_penalty=0.0),
               max_len=64, max_steps=STEPS)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--kill-at-rollout", type=int)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    args = p.parse_args()
    run(args.checkpoint, args.out, args.kill_at_rollout, args.resume, args.fsdp)
