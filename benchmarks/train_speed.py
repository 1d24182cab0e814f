"""CPU training-step speed: jneox beside transformers' GPTNeoXForCausalLM, same config, batch and weights.

One training step is forward + token cross-entropy + backward + AdamW, exactly as jneox's loop does
it (fp32 weights; ``--bf16`` adds jneox rows under bf16 autocast). Every row runs in a fresh
process (so peak memory is its own) and the rows alternate over ``--rounds``; the table keeps each
row's best round, the usual way to read a shared, noisy machine.

    python benchmarks/train_speed.py                       # the ~30M "demo" shape, batch 4 x 256
    python benchmarks/train_speed.py --steps 5 --rounds 3 --bf16
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from procstat import peak_rss_mb, status_mb

ROWS = ["jneox", "transformers"]


def config_of(args):
    from jneox.config import ModelConfig

    return ModelConfig.from_name(args.preset, vocab_size=args.vocab_size)


def child(args) -> dict:
    """Build the row's model with the shared weights, then time ``args.steps`` training steps."""
    from jneox.checkpoint import hf_state_dict
    from jneox.model import GPTNeoX

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    base_rss = status_mb("VmRSS")
    base_rss = float("nan") if base_rss is None else base_rss
    config = config_of(args)
    model = GPTNeoX(config)
    model.init_weights(seed=0)
    impl, _, precision = args.child.partition(":")
    if impl == "transformers":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        hf_config = GPTNeoXConfig(**{k: v for k, v in config.to_hf().items() if k not in ("architectures", "model_type")})
        hf = GPTNeoXForCausalLM(hf_config)
        state = hf_state_dict(model)
        if "embed_out.weight" not in hf.state_dict():  # transformers 5 calls the head lm_head in memory
            state["lm_head.weight"] = state.pop("embed_out.weight")
        hf.load_state_dict(state, strict=True)
        del model
        model = hf

        def forward(x):
            return model(input_ids=x).logits
    else:
        forward = model
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)

    def step() -> float:
        with autocast:
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    first_loss = step()  # warm-up (allocations, optimizer state)
    for _ in range(args.warmup - 1):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t0) / args.steps
    return {"row": args.child, "tokens_per_s": args.batch_size * args.seq_len / seconds, "step_s": seconds,
            "peak_rss_mb": peak_rss_mb(), "base_rss_mb": base_rss, "first_loss": first_loss,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="demo", help="jneox.config preset (default: demo, ~35M parameters)")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads per process (default: PyTorch's choice)")
    p.add_argument("--bf16", action="store_true", help="also time jneox under bf16 autocast")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = ROWS + (["jneox:bf16"] if args.bf16 else [])
    best: dict[str, dict] = {}
    passthrough = [a for a in sys.argv[1:] if a not in ("--bf16",)]
    for r in range(args.rounds):
        for row in rows:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", row],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{row} failed:\n{out.stderr}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"round {r + 1}: {row}: {result['tokens_per_s']:.0f} tok/s", file=sys.stderr)
            if row not in best or result["tokens_per_s"] > best[row]["tokens_per_s"]:
                best[row] = result
    c = config_of(args)
    print(f"training step (forward + backward + AdamW), {best['jneox']['params_m']:.1f}M parameters "
          f"(hidden {c.hidden_size}, {c.num_layers} layers, vocab {c.vocab_size}), batch {args.batch_size} x "
          f"{args.seq_len} tokens, torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.rounds}")
    print(f"| {'implementation':<26} | {'tokens/s':>9} | {'step (s)':>8} | {'peak RSS (MB)':>13} | {'first loss':>10} | {'vs transformers':>15} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 10}|{'-' * 15}|{'-' * 12}|{'-' * 17}|")
    ref = best["transformers"]["tokens_per_s"]
    for row in rows:
        b = best[row]
        name = {"jneox": "jneox (fp32)", "transformers": "transformers (fp32, sdpa)",
                "jneox:bf16": "jneox (bf16 autocast)"}[row]
        print(f"| {name:<26} | {b['tokens_per_s']:>9.0f} | {b['step_s']:>8.2f} | {b['peak_rss_mb']:>13.0f} | "
              f"{b['first_loss']:>10.4f} | {b['tokens_per_s'] / ref:>14.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(best, f, indent=2)


if __name__ == "__main__":
    main()
