"""Peak memory of loading the 3.6B shape from its bf16 checkpoint in each packed weight format.

Every run is a fresh process that loads the random-weight checkpoint of ``decode_speed.py`` (bf16
safetensors, sharded, memory-mapped) with ``load_model(weights=FORMAT)``, then generates a few greedy
tokens from a short prompt. The table gives, per format, the peak resident set (VmHWM) over the
runs: min / median / max, against the bytes of the loaded model (packed weights, scales, biases,
norms and the bf16 input embedding). Beside it, sampled every 10 ms during the load: the peak of
the file-backed resident pages (RssFile: the checkpoint's mapped bf16 pages, plus the libraries)
and the process's resident set before loading (interpreter, PyTorch).

The page cache is not dropped between runs (that needs root and would slow everyone else sharing
the checkpoint): after the first run the file is cached. Cached pages count in a process's
resident set only while it maps them, so this changes load time, not the peak.

    python benchmarks/load_memory.py                       # int8 x3, int4 x2, bfloat16 x2, 36 layers
    python benchmarks/load_memory.py --layers 2 --formats int8:2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from decode_speed import BENCH_DIR, bench_checkpoint
from procstat import status_mb

DEFAULT_FORMATS = "int8:3,int4:2,bfloat16:2"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--formats", default=DEFAULT_FORMATS, help="FORMAT:RUNS,... (weight formats of load_model)")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--work", type=Path, default=BENCH_DIR)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, help="also write the runs here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.ckpt, args.child, args.new_tokens)))
        return
    ckpt = bench_checkpoint(args.work, args.layers)
    runs: dict[str, list[dict]] = {}
    for item in args.formats.split(","):
        fmt, _, n = item.partition(":")
        for i in range(int(n or 1)):
            cmd = [sys.executable, __file__, "--child", fmt, "--ckpt", str(ckpt), "--new-tokens", str(args.new_tokens)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{fmt} run {i + 1} failed:\n{proc.stderr.strip()}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{fmt} run {i + 1}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in r.items()), flush=True)
            runs.setdefault(fmt, []).append(r)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    print_table(runs, ckpt, args.layers)


def print_table(runs: dict[str, list[dict]], ckpt: Path, layers: int) -> None:
    file_gb = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 1e9
    print(f"\n{layers} layers, bf16 checkpoint {file_gb:.2f} GB, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; GB = 1e9 bytes\n")
    head = ["weights", "runs", "peak RSS GB min / median / max", "model GB", "max / model",
            "(max − before) / model", "peak RssFile GB", "RSS before load GB", "load s"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for fmt, rs in runs.items():
        peaks = [r["peak_gb"] for r in rs]
        model = rs[0]["model_gb"]
        cells = [fmt, str(len(rs)), f"{min(peaks):.2f} / {statistics.median(peaks):.2f} / {max(peaks):.2f}",
                 f"{model:.2f}", f"{max(peaks) / model:.2f}",
                 f"{max(r['peak_gb'] - r['before_gb'] for r in rs) / model:.2f}",
                 f"{max(r['peak_file_gb'] for r in rs):.2f}", f"{max(r['before_gb'] for r in rs):.2f}",
                 " / ".join(f"{r['load_s']:.0f}" for r in rs)]
        print("| " + " | ".join(cells) + " |")


@torch.inference_mode()
def child(ckpt: Path, fmt: str, new_tokens: int) -> dict:
    from jneox.loading import load_model
    from jneox.generate import generate_tokens
    from jneox.sampling import SamplingParams

    peak_file, loading = [0.0], [True]

    def sample() -> None:
        while loading[0]:
            peak_file[0] = max(peak_file[0], status_mb("RssFile") or 0.0)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    before = status_mb("VmRSS")
    sampler.start()
    t = time.perf_counter()
    model = load_model(ckpt, weights=fmt)
    load_s = time.perf_counter() - t
    loading[0] = False
    sampler.join()
    after_load = status_mb("VmRSS")
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    prompt = torch.randint(4, 1000, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    tokens = list(generate_tokens(model, prompt, SamplingParams(temperature=0, max_new_tokens=new_tokens)))
    return {"format": fmt, "load_s": load_s, "tokens": len(tokens), "model_gb": sum(tensors.values()) / 1e9,
            "peak_gb": status_mb("VmHWM") * 2**20 / 1e9, "before_gb": before * 2**20 / 1e9, "after_load_gb": after_load * 2**20 / 1e9,
            "peak_file_gb": peak_file[0] * 2**20 / 1e9, "after_load_file_gb": status_mb("RssFile") * 2**20 / 1e9}


if __name__ == "__main__":
    main()
