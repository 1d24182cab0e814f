"""A tiny PPO run on a toy reward, for the PPO test (run as a script so that it can be SIGKILLed).

usage: tiny_ppo_run.py CHECKPOINT OUT [--kill-at-rollout N] [--resume]
The toy reward is 1 when the answer contains TOKEN, a token the starting model samples now and then.
--kill-at-rollout N sends SIGKILL to this process when the N-th rollout asks for its rewards.
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
TOKEN = 5  # the toy reward's token (set after a look at the starting model's samples)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--kill-at-rollout", type=int)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    data = out.parent / f"{out.name}-prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q}, ensure_ascii=False) + "\n" for q in PROMPTS), encoding="utf-8")
    def reward(prompt_ids, answer_ids, _state={"rows": 0}):
        _state["rows"] += 1  # rows of one rollout: the batch size; a new rollout every BATCH rows
        if args.kill_at_rollout is not None and _state["rows"] > (args.kill_at_rollout - 1) * BATCH:
            os.kill(os.getpid(), signal.SIGKILL)
        return float(TOKEN in answer_ids)

    cfg = TrainConfig(out=str(out), batch_size=BATCH, lr=3e-3, min_lr=3e-3, warmup_steps=1, max_steps=12,
                      eval_every=0, save_every=5, log_every=1, device="cpu", resume=args.resume, progress=False)
    ppo(args.checkpoint, reward, [str(data)], cfg,
        PPOConfig(kl_coef=0.05, ppo_epochs=2, max_new_tokens=8, missing_eos_penalty=0.0), max_len=64, max_steps=12)


if __name__ == "__main__":
    main()
