"""CPU speed and memory of one DPO step: jneox beside TRL's DPOTrainer loss code, same pairs, batch,
weights and dtype (fp32).

A step is the policy's forward over the chosen and rejected rows, the DPO loss, backward and AdamW.
jneox reads the reference log-probabilities computed once before training (``jneox dpo`` does that),
so it holds one model. TRL rows run ``DPOTrainer._compute_loss`` (TRL's own step: its fused LM head
and, by default, a second frozen model for the reference, evaluated at every step) on
transformers' ``GPTNeoXForCausalLM``; ``trl (precomputed ref)`` is TRL with
``precompute_ref_log_probs`` (reference log-probs read from the batch, as jneox). Each row runs in
a fresh process (peak RSS is its own); rows alternate over ``--rounds``; the best round is kept.
The DPO trainer's data pipeline (tokenization, collation, accelerate) is not timed in either.

    python benchmarks/dpo_speed.py                    # the shipped demo's shape, 4 pairs of 128 + 64 tokens
    python benchmarks/dpo_speed.py --rounds 3 --steps 5
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import torch
from procstat import peak_rss_mb

ROWS = ["jneox", "trl", "trl:precomputed"]


def pairs_batch(args, vocab: int):
    """4 pairs: a shared prompt per pair, answers of ``--answer-len`` tokens (the last is </s>)."""
    from jneox.train.data import IGNORE_INDEX, Example
    from jneox.train.preference import PreferencePair

    g = torch.Generator().manual_seed(1)
    pairs = []
    for _ in range(args.pairs):
        prompt = torch.randint(4, vocab, (args.prompt_len,), generator=g).tolist()
        answers = [torch.randint(4, vocab, (args.answer_len - 1,), generator=g).tolist() + [3] for _ in range(2)]
        ex = [Example(prompt + a[:-1], [IGNORE_INDEX] * (len(prompt) - 1) + a) for a in answers]
        pairs.append(PreferencePair(*ex))
    return pairs


def child(args) -> dict:
    from jneox.config import ModelConfig
    from jneox.model import GPTNeoX
    from jneox.train.dpo import DPOObjective
    from jneox.train.preference import collate_pairs

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_name(args.preset, vocab_size=args.vocab_size)
    model = GPTNeoX(config)
    model.init_weights(seed=0)
    pairs = pairs_batch(args, config.vocab_size)
    batch = collate_pairs(pairs, pad_id=0)
    batch.ref_chosen = torch.full((args.pairs,), -900.0, dtype=torch.float64)
    batch.ref_rejected = torch.full((args.pairs,), -900.0, dtype=torch.float64)
    row = args.child
    if row == "jneox":
        objective = DPOObjective(beta=0.1)

        def loss_fn():
            loss, _ = objective.loss(model, batch)
            return loss / args.pairs
        params = model.parameters()
    else:
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
        from trl.trainer.dpo_trainer import DPOTrainer
        from trl.trainer.utils import add_fused_lm_head

        from jneox.checkpoint import hf_state_dict

        hf = GPTNeoXForCausalLM(GPTNeoXConfig(**{k: v for k, v in config.to_hf().items()
                                                 if k not in ("architectures", "model_type")}))
        state = hf_state_dict(model)
        if "embed_out.weight" not in hf.state_dict():
            state["lm_head.weight"] = state.pop("embed_out.weight")
        hf.load_state_dict(state, strict=True)
        del model
        precomputed = row == "trl:precomputed"
        ref = None if precomputed else copy.deepcopy(hf).eval().requires_grad_(False)
        for m in (hf, ref):
            if m is not None:
                add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
        from accelerate import Accelerator

        fake = SimpleNamespace(model=hf, ref_model=ref, accelerator=Accelerator(cpu=True), aux_loss_enabled=False,
                               ld_alpha=None, precompute_ref_logps=precomputed, f_divergence_type="reverse_kl",
                               use_weighting=False, loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1,
                               label_smoothing=0.0, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
                               _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
        ids = torch.cat([batch.input_ids, torch.zeros(2 * args.pairs, 1, dtype=torch.long)], dim=1)
        completion = torch.zeros_like(ids)
        for r in range(ids.shape[0]):
            labelled = (batch.labels[r] != -100).nonzero().flatten()
            ids[r, labelled + 1] = batch.labels[r, labelled]  # the answer tokens and </s> as TRL's rows hold them
            completion[r, labelled + 1] = 1
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion,
                  "ref_chosen_logps": batch.ref_chosen.float(), "ref_rejected_logps": batch.ref_rejected.float()}

        def loss_fn():
            return DPOTrainer._compute_loss(fake, hf, dict(inputs), return_outputs=False)
        model = hf
        params = hf.parameters()
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-6)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first = step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t0) / args.steps
    tokens = int(batch.input_ids.numel())
    return {"row": row, "tokens_per_s": tokens / seconds, "step_s": seconds, "peak_rss_mb": peak_rss_mb(),
            "first_loss": first, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo")
    p.add_argument("--vocab-size", type=int, default=6000, help="default: the shipped demo's 6,000 pieces")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int)
    p.add_argument("--json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    best: dict[str, dict] = {}
    for r in range(args.rounds):
        for row in ROWS:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", row], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{row} failed:\n{out.stderr}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}: {row}: {result['tokens_per_s']:.0f} tok/s", file=sys.stderr)
            if row not in best or result["tokens_per_s"] > best[row]["tokens_per_s"]:
                best[row] = result
    print(f"DPO step (policy forward over chosen + rejected, loss, backward, AdamW), {best['jneox']['params_m']:.1f}M "
          f"parameters ({args.preset} shape, vocab {args.vocab_size}), {args.pairs} pairs of {args.prompt_len} prompt + "
          f"{args.answer_len} answer tokens, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"best of {args.rounds}")
    print(f"| {'implementation':<40} | {'tokens/s':>9} | {'step (s)':>8} | {'peak RSS (MB)':>13} | {'first loss':>10} | {'vs TRL':>7} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 12}|{'-' * 9}|")
    ref = best["trl"]["tokens_per_s"]
    names = {"jneox": "jneox (reference log-probs precomputed)", "trl": "TRL DPOTrainer (reference model)",
             "trl:precomputed": "TRL (precompute_ref_log_probs)"}
    for row in ROWS:
        b = best[row]
        print(f"| {names[row]:<40} | {b['tokens_per_s']:>9.0f} | {b['step_s']:>8.2f} | {b['peak_rss_mb']:>13.0f} | "
              f"{b['first_loss']:>10.4f} | {b['tokens_per_s'] / ref:>6.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(best, f, indent=2)


if __name__ == "__main__":
    main()
