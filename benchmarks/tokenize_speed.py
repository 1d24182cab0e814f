"""`jneox tokenize` speed per worker against sentencepiece's own encode, and its scaling with --workers.

Per worker: one worker's whole work on one 8 MB chunk of JSONL (read the bytes, parse the JSON,
encode, append </s>, convert to the token dtype, write the tokens and lengths to a file) against
sentencepiece's fastest single-process encode of the same documents already in memory: per-document
EncodeAsIds, and the batch encode into arrays on one thread given str or given UTF-8 bytes; the
reference of a round is the fastest of the three. The rounds run the four in a shuffled order, in CPU
time of this process (all of it on one thread), which other jobs on a shared machine disturb less than
wall time; the table gives the best round of each and the median of the per-round ratios. The
reference encodes the same objects every round, so its str input has its UTF-8 cached after the
first: that favours the reference.

Scaling: `tokenize_files` on the whole corpus with 1, 2, ... workers, each run in its own process,
wall time and the CPU time of the main process and of its workers.

    python benchmarks/tokenize_speed.py                  # 100 MB corpus, workers 1 and 2
    python benchmarks/tokenize_speed.py --megabytes 300 --workers 1 2 4
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from jneox.train import tokenize as tk

REPO = Path(__file__).resolve().parent.parent


def japanese_pieces(model_file: Path) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    out = []
    for i in range(sp.GetPieceSize()):
        piece = sp.IdToPiece(i).replace("\u2581", "")
        if piece and not sp.IsControl(i) and not sp.IsByte(i) and not sp.IsUnknown(i) and \
                all("\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff" for c in piece):
            out.append(piece)
    return out


def write_corpus(path: Path, gigabytes: float, model_file: Path, seed: int = 0) -> int:
    """A JSONL corpus of ``gigabytes`` (1e9 bytes); returns the documents written. Cached by size."""
    target = int(gigabytes * 1e9)
    if path.exists() and path.stat().st_size >= target:
        return sum(1 for _ in open(path, "rb"))
    rng = np.random.default_rng(seed)
    pieces = np.array(japanese_pieces(model_file))
    weights = 1.0 / np.arange(1, len(pieces) + 1)
    weights /= weights.sum()
    sentences = []
    for _ in range(20000):
        n = rng.integers(5, 26)
        sentences.append("".join(pieces[rng.choice(len(pieces), n, p=weights)]) + rng.choice(["。", "、", "!", "?"]))
    pool = []
    for _ in range(20000):
        k = rng.integers(3, 41)
        parts = [sentences[j] for j in rng.integers(0, len(sentences), k)]
        text = "".join(p + ("\n" if rng.random() < 0.1 else "") for p in parts)
        pool.append((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
    written, docs = 0, 0
    with open(path, "wb") as f:
        while written < target:
            for j in rng.integers(0, len(pool), 10000):
                f.write(pool[j])
                written += len(pool[j])
                docs += 1
                if written >= target:
                    break
    return docs


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "amx_tile") if f in flags) or "none"


def per_worker(corpus: Path, model_file: Path, rounds: int, megabytes: int = 8) -> dict:
    chunk = tk.plan_chunks([str(corpus)], megabytes << 20)[0]
    tk._init_worker(str(model_file))
    tok = tk._tokenizer
    texts = [tok._with_nl(t) for t in tk._texts(chunk, "text")[0]]  # what sentencepiece is given: same ids
    utf8 = [t.encode("utf-8") for t in texts]
    sp = tok.sp

    def pipeline():
        r = tk.encode_chunk(chunk, "text", "uint16")
        with tempfile.TemporaryFile() as f:
            f.write(r.tokens)
            f.write(r.lengths.astype("<i4"))

    runs = {"jneox worker": pipeline,
            "sentencepiece EncodeAsIds": lambda: [sp.EncodeAsIds(t) for t in texts],
            "sentencepiece batch (str)": lambda: sp.encode(texts, out_type="numpy", num_threads=1),
            "sentencepiece batch (bytes)": lambda: sp.encode(utf8, out_type="numpy", num_threads=1)}
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k in random.sample(list(runs), len(runs)):
            t0 = time.process_time()
            runs[k]()
            times[k].append(time.process_time() - t0)
    t = {k: np.array(v) for k, v in times.items()}
    ref = np.minimum.reduce([v for k, v in t.items() if k != "jneox worker"])
    return {"MB": chunk.size / 1e6, "times": t, "reference": ref,
            "best ratio": ref.min() / t["jneox worker"].min(), "median ratio": float(np.median(ref / t["jneox worker"]))}


def one_run(corpus: str, model_file: str, out: str, workers: int) -> None:
    """Child mode: tokenize the corpus, print wall time and CPU time (main process, workers)."""
    def cpu(who):
        r = resource.getrusage(who)
        return r.ru_utime + r.ru_stime
    me, kids, t0 = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    tk.tokenize_files([corpus], model_file, out, workers=workers, overwrite=True, progress=False)
    wall = time.perf_counter() - t0  # the workers are joined by now: their CPU time is counted
    print(json.dumps({"wall_s": wall, "main_cpu_s": cpu(resource.RUSAGE_SELF) - me,
                      "workers_cpu_s": cpu(resource.RUSAGE_CHILDREN) - kids}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megabytes", type=float, default=100, help="corpus size for the scaling rows (default: 100)")
    p.add_argument("--rounds", type=int, default=9, help="rounds of the per-worker comparison (default: 9)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    p.add_argument("--tokenizer", type=Path, default=REPO / "models" / "demo" / "spiece.model")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "jneox_data_scale")
    p.add_argument("--one-run", nargs=4, metavar=("CORPUS", "MODEL", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_run:
        c, m, o, w = args.one_run
        return one_run(c, m, o, int(w))
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    sample = args.dir / "corpus_0.01GB.jsonl"
    write_corpus(sample, 0.01, args.tokenizer)
    r = per_worker(sample, args.tokenizer, args.rounds)
    print(f"\nper worker, one {r['MB']:.1f} MB chunk, CPU time, {args.rounds} shuffled rounds:\n")
    print("| what | best (ms) | median (ms) | MB/s (best) |")
    print("|---|---|---|---|")
    for k, v in r["times"].items():
        print(f"| {k} | {v.min() * 1e3:.1f} | {np.median(v) * 1e3:.1f} | {r['MB'] / v.min():.1f} |")
    print(f"\njneox worker / sentencepiece's fastest: {r['best ratio']:.1%} (best rounds), "
          f"{r['median ratio']:.1%} (median of the per-round ratios); load average {os.getloadavg()[0]:.2f}\n", flush=True)

    corpus = args.dir / f"corpus_{args.megabytes / 1000:g}GB.jsonl"
    write_corpus(corpus, args.megabytes / 1000, args.tokenizer)
    mb = corpus.stat().st_size / 1e6
    rows = []
    for w in args.workers:
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--one-run", str(corpus), str(args.tokenizer),
                              str(args.dir / f"speed_w{w}"), str(w)], check=True, capture_output=True, text=True)
        rows.append({"workers": w, "load": load, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    print(f"\nscaling, {mb:.0f} MB of JSONL:\n")
    print("| workers | wall (s) | MB/s | speed-up | CPU main / workers (s) | load average before |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['wall_s']:.1f} | {mb / row['wall_s']:.1f} | {rows[0]['wall_s'] / row['wall_s']:.2f}x "
              f"| {row['main_cpu_s']:.1f} / {row['workers_cpu_s']:.1f} | {row['load']:.2f} |")
    for w in args.workers:
        for suffix in (".bin", ".idx"):
            Path(f"{args.dir / f'speed_w{w}'}{suffix}").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
