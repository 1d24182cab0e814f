"""Pretraining data at scale: `jneox tokenize` and `jneox pretrain` on synthetic Japanese corpora.

For each corpus size (GB of JSONL on disk) this writes the corpus, tokenizes it into an indexed
dataset, then times pretrain's first step on the shards and a resume. Every row runs as its own
process; its peak RSS is that of the whole process tree (the main process and its tokenizing
workers together), sampled every 50 ms. The smallest corpus is also trained from the JSONL itself
(the in-memory path) for comparison, and sentencepiece's own single-process encode of the same
documents (its batch encode of UTF-8 bytes, CPU time, taken right before and after each row) gives
the per-worker speed to compare with; benchmarks/tokenize_speed.py measures that ratio more closely.

    python benchmarks/data_scale.py --sizes 0.1 1 --workers 2          # the table in docs/performance.md
    python benchmarks/data_scale.py --sizes 0.1 10 --dir /big/disk     # 10 GB needs ~15 GB free

The corpus: documents of 3-40 sentences, each sentence 5-25 Japanese pieces of the tokenizer's
own vocabulary drawn with Zipf-like frequencies, so the text tokenizes like natural text (known
pieces, merges across boundaries) without shipping a corpus.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from jneox.tokenizer import Tokenizer
from tokenize_speed import cpu_flags, per_worker, write_corpus

REPO = Path(__file__).resolve().parent.parent
JNEOX = [sys.executable, "-m", "jneox"]


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, peak RSS and peak PSS (whole process tree, MB) of ``cmd``; raises if it fails. PSS
    counts a page shared by forked workers once in all, where the RSS sum counts it in each."""
    t0, cpu0, started = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    peak = peak_pss = 0.0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [p.memory_full_info() for p in [ps, *ps.children(recursive=True)]]
            peak = max(peak, sum(m.rss for m in tree) / 2**20)
            peak_pss = max(peak_pss, sum(m.pss for m in tree) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers too: each process waited for its own
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    return {"wall_s": time.perf_counter() - t0, "cpu_s": cpu, "started": started, "peak_rss_mb": peak, "peak_pss_mb": peak_pss, "output": out}


def sentencepiece_speed(corpus: Path, model_file: Path, megabytes: float = 10.0) -> float:
    """MB/s of sentencepiece's fastest single-process encode (its batch encode of UTF-8 bytes on one
    thread, see tokenize_speed.py), over the corpus's first documents, in CPU time."""
    tok = Tokenizer(model_file)
    texts, size = [], 0
    with open(corpus, "rb") as f:
        for line in f:
            texts.append(tok._with_nl(json.loads(line)["text"]).encode("utf-8"))
            size += len(line)
            if size >= megabytes * 1e6:
                break
    t0 = time.process_time()
    tok.sp.encode(texts, out_type="numpy", num_threads=1)
    return size / 1e6 / (time.process_time() - t0)


def pretrain_cmd(data: str, out: Path, steps: int, args, resume: bool = False) -> list[str]:
    return [*JNEOX, "pretrain", "--model-config", args.model_config, "--tokenizer", str(args.tokenizer),
            "--data", data, "--out", str(out), "--block-size", str(args.block_size), "--batch-size", "8",
            "--max-steps", str(steps), "--eval-every", "0", "--eval-batches", "1", "--save-every", "1",
            "--log-every", "1", "--device", "cpu", "--no-progress", "--overwrite", "--seed", "0",
            *(["--resume"] if resume else [])]


def to_step_s(out: Path, step: int, started: float) -> float:
    """Seconds from the command's start to the log line of ``step`` (its training done, before the save)."""
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [r["time"] for r in rows if r.get("step") == step and "tokens_per_s" in r][-1] - started


def train_tok_s(out: Path, median: bool = False) -> float:
    """The last step's training tokens/s, or the median over the steps after the first."""
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return float(np.median(speeds[1:])) if median else speeds[-1]


def pretrain_row(what: str, gb: float, data: str, out: Path, step: int, args, resume: bool = False) -> dict:
    """Pretrain on ``data`` into ``out`` up to ``step`` (``resume``: from the checkpoint there) as its own
    process; the table row (wall time, time to the step, tokens/s, peak memory), printed as it comes."""
    r = run(pretrain_cmd(data, out, step, args, resume=resume))
    row = {"what": what, "GB": gb, "wall_s": r["wall_s"], "to_step_s": to_step_s(out, step, r["started"]),
           "tokens/s": train_tok_s(out), "peak_rss_mb": r["peak_rss_mb"], "peak_pss_mb": r["peak_pss_mb"]}
    print(row, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=float, nargs="*", default=[0.1, 1.0, 10.0],
                   help="corpus sizes in GB (none: only the per-worker comparison)")
    p.add_argument("--rounds", type=int, default=9, help="rounds of the per-worker comparison (default: 9)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--tokenizer", type=Path, default=REPO / "models" / "demo" / "spiece.model")
    p.add_argument("--model-config", default="tiny")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dir", type=Path, default=Path("/tmp/jneox_data_scale"))
    p.add_argument("--keep", action="store_true", help="keep the corpora and shards")
    p.add_argument("--speed-steps", type=int, default=20,
                   help="steps of the training-speed rows, shards against the JSONL in memory (default: 20)")
    args = p.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    sample = args.dir / "corpus_0.01GB.jsonl"
    write_corpus(sample, 0.01, args.tokenizer)
    enc = per_worker(sample, args.tokenizer, args.rounds)
    print(f"CPU flags: {cpu_flags()}; per worker, CPU time, {args.rounds} shuffled rounds on one 8 MB chunk: jneox "
          f"(read, JSON, encode, </s>, convert, write) / sentencepiece's fastest encode of the same documents in "
          f"memory: {enc['best ratio']:.1%} (best rounds), {enc['median ratio']:.1%} (median of the per-round "
          f"ratios); benchmarks/tokenize_speed.py has the details", flush=True)
    rows = []
    for i, gb in enumerate(sorted(args.sizes)):
        corpus = args.dir / f"corpus_{gb:g}GB.jsonl"
        t0 = time.perf_counter()
        docs = write_corpus(corpus, gb, args.tokenizer)
        print(f"{gb:g} GB: {docs} documents written in {time.perf_counter() - t0:.0f} s", flush=True)
        mb = corpus.stat().st_size / 1e6
        worker_counts = [1, args.workers] if i == 0 and args.workers > 1 else [args.workers]
        for w in worker_counts:
            prefix = args.dir / f"shards_{gb:g}GB_w{w}"
            # the machine's load drifts: sentencepiece's speed is taken right before and after the row
            before = sentencepiece_speed(corpus, args.tokenizer)
            r = run([*JNEOX, "tokenize", "--data", str(corpus), "--tokenizer", str(args.tokenizer), "--out",
                     str(prefix), "--workers", str(w), "--overwrite", "--no-progress"])
            sp_speed = (before + sentencepiece_speed(corpus, args.tokenizer)) / 2
            tokens = int(r["output"].split(" tokens")[0].rsplit(" ", 1)[-1])
            inner = float(r["output"].split(" MB/s")[0].rsplit("(", 1)[-1])  # without the interpreter's start
            rows.append({"what": f"tokenize, {w} worker{'s' * (w > 1)}", "GB": gb, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                         "MB/s": mb / r["wall_s"], "inner MB/s": inner, "tokens/s": tokens / r["wall_s"],
                         "peak_rss_mb": r["peak_rss_mb"], "peak_pss_mb": r["peak_pss_mb"], "sp MB/s": sp_speed, "vs_sentencepiece": inner / w / sp_speed})
            print(rows[-1], flush=True)
        out = args.dir / f"run_{gb:g}GB"
        rows.append(pretrain_row("pretrain from shards, to step 1", gb, str(prefix), out, 1, args))
        rows.append(pretrain_row("pretrain --resume, to step 2", gb, str(prefix), out, 2, args, resume=True))
        if i == 0:
            rows.append(pretrain_row("pretrain from the JSONL (in memory), to step 1", gb, str(corpus),
                                     args.dir / f"run_{gb:g}GB_raw", 1, args))
            for what, data in (("from the shards", str(prefix)), ("from the JSONL (in memory)", str(corpus))):
                speed_out = args.dir / "run_speed"
                sp_run = run(pretrain_cmd(data, speed_out, args.speed_steps, args) + ["--save-every", "0"])
                rows.append({"what": f"pretrain {what}, median of steps 2-{args.speed_steps}", "GB": gb,
                             "wall_s": sp_run["wall_s"], "tokens/s": train_tok_s(speed_out, median=True),
                             "peak_rss_mb": sp_run["peak_rss_mb"], "peak_pss_mb": sp_run["peak_pss_mb"]})
                print(rows[-1], flush=True)
        if not args.keep:
            for f in args.dir.glob(f"shards_{gb:g}GB_w*"):
                f.unlink()
    print("\n| corpus | what | wall (s) | MB/s (wall / after start-up) | tokens/s | peak RSS (PSS) (MB) "
          "| per worker vs sentencepiece (its MB/s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        mbs = f"{r['MB/s']:.1f} / {r['inner MB/s']:.1f}" if "MB/s" in r else ""
        vs = f"{r['vs_sentencepiece']:.0%} ({r['sp MB/s']:.1f})" if "vs_sentencepiece" in r else ""
        wall = f"{r['wall_s']:.1f}" + (f" (CPU {r['cpu_s']:.1f})" if "cpu_s" in r else "") + \
            (f" (step done at {r['to_step_s']:.1f})" if "to_step_s" in r else "")
        print(f"| {r['GB']:g} GB | {r['what']} | {wall} | {mbs} | {r['tokens/s']:,.0f} | "
              f"{r['peak_rss_mb']:.0f} ({r['peak_pss_mb']:.0f}) | {vs} |")


if __name__ == "__main__":
    main()
