"""Record (or compare) the demo model's greedy tokens and logits in every weight format.

A refactor must leave these bits unchanged: run it with ``--out FILE`` before, and ``--check FILE``
after, on the same machine (kernel paths differ between CPU kinds, so the bits are per machine).

    python benchmarks/demo_outputs.py --out before.json
    python benchmarks/demo_outputs.py --check before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

import jneox
from jneox.export.gguf import export_gguf

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
PROMPTS = ("ユーザー: 日本の首都はどこですか？<NL>システム: ", "ユーザー: 猫と犬の違いを教えてください。<NL>システム: ")
NEW_TOKENS = 24


def record(model, tokenizer) -> dict:
    out = {}
    for i, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode(prompt)
        with torch.inference_mode():
            logits = model(torch.tensor([ids]))[0].float().contiguous()
        done = jneox.generate(model, tokenizer, prompt, jneox.SamplingParams(temperature=0.0,
                                                                             max_new_tokens=NEW_TOKENS))
        out[f"prompt{i}"] = {"tokens": list(done.token_ids),
                             "text": done.text,
                             "logits_sha256": hashlib.sha256(logits.numpy().tobytes()).hexdigest(),
                             "logits_sum": float(logits.double().sum())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--out", help="write the record here")
    g.add_argument("--check", help="compare with this record; exit 1 on any difference")
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {}
    for weights in ("float32", "bfloat16", "int8", "int4"):
        result[weights] = record(*jneox.load(DEMO, weights=weights))
    for dtype in ("float16",):
        result[dtype] = record(*jneox.load(DEMO, dtype=getattr(torch, dtype)))
    with tempfile.TemporaryDirectory() as tmp:
        qdir = Path(tmp) / "q"
        for fmt in ("bfloat16", "int8", "int4"):  # a saved quantized checkpoint loads to the same bits
            model, tok = jneox.load(DEMO, weights=fmt)
            from jneox.checkpoint import save_quantized
            save_quantized(model, qdir / fmt, tokenizer_file=tok.path)
            result[f"saved-{fmt}"] = record(*jneox.load(qdir / fmt))
        for gtype in ("f16", "bf16", "q8_0", "q4_0"):
            path = Path(tmp) / f"demo-{gtype}.gguf"
            export_gguf(DEMO, path, type=gtype)
            result[f"gguf-{gtype}"] = record(*jneox.load(path))
    if args.out:
        Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1))
        print(f"recorded {len(result)} formats to {args.out}")
        return 0
    before = json.loads(Path(args.check).read_text())
    bad = [k for k in before if before[k] != result.get(k)]
    for k in result:
        print(f"{k:16s} {'same' if before.get(k) == result[k] else 'DIFFERENT'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
