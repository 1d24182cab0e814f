"""CPU decode speed at the published 3.6B shape: jneox in every weight format beside its peers.

Builds a random-weight checkpoint of japanese-gpt-neox-3.6b's shape (``--layers`` shrinks the depth
for quick runs; every other dimension stays the published one), then runs each row in a fresh
process on the same 128-token prompt: load time, prefill time, batch-1 greedy decode speed, peak
RSS, and the fraction of the memory-bandwidth bound (bandwidth measured here, by this script).
Peers: transformers (bf16, fp32), CTranslate2 (int8, int8_bfloat16) and llama.cpp (BF16, Q8_0, Q4_0
GGUF files written by ``jneox export --format gguf``, run through llama-cpp-python with the token ids
fed directly) when installed; a missing peer is skipped with a note. CTranslate2's converter needs transformers < 5: give a folder with it
via ``--tf4`` (``pip install --target DIR "transformers<5"``).

Quantized rows also report accuracy against jneox fp32 on the same model: the relative error of
the logits and the agreement of greedy tokens, both teacher-forced over the fp32 greedy sequence.

    python benchmarks/decode_speed.py                 # full 36 layers (needs ~15 GB RAM, ~40 min)
    python benchmarks/decode_speed.py --layers 4      # a quick look

A row's runtime may name an instruction-set level, ``RUNTIME@LEVEL:FORMAT``, to see an older CPU's
paths on a newer one: ``jneox@avx2:int8`` builds jneox's kernels for AVX2 (``JNEOX_SIMD=avx2``) and
caps PyTorch's MKL and oneDNN at AVX2 too (``@avx512``: at AVX-512 without BF16, so that prompts take the
paths of an AVX-512 CPU without AVX512-BF16 and AMX); ``llama.cpp@avx2:q8_0`` runs the llama-cpp-python build
given by ``--llama-cpp avx2=DIR`` (a folder it was installed into with ``pip install --target``, e.g.
built with ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF ..."``). The memory
bandwidth is the machine's either way.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from procstat import peak_rss_mb

ROWS = ["jneox:float32", "jneox:bfloat16", "jneox:int8", "jneox:int4",
        "jneox-pytorch:float32", "jneox-pytorch:bfloat16", "jneox-pytorch:int8", "jneox-pytorch:int4",
        "transformers:bfloat16", "transformers:float32", "ctranslate2:int8", "ctranslate2:int8_bfloat16",
        "llama.cpp:bf16", "llama.cpp:q8_0", "llama.cpp:q4_0"]
# GGUF blocks of 32 weights carry their fp16 scale: 34 bytes (Q8_0), 18 bytes (Q4_0)
# what an AVX2-only CPU has, for PyTorch's own libraries (jneox's kernels take JNEOX_SIMD)
AVX2_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# an AVX-512 CPU without BF16 and AMX (jneox.quantize.native_bf16_matmul reads oneDNN's cap)
AVX512_ENV = {"MKL_ENABLE_INSTRUCTIONS": "AVX512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
CPU_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "amx_bf16", "amx_int8", "asimd", "sve")
BYTES_PER_WEIGHT = {"float32": 4, "bfloat16": 2, "int8": 1, "int8_bfloat16": 1, "int4": 0.5,
                    "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}


# ---- the parent: set-up, one child per row, the table --------------------------------------
def measure_bandwidth(gib: float = 4.0, repeats: int = 3) -> float:
    """Read bandwidth in GB/s: the fastest of a few reads of a ``gib`` GiB buffer with vector loads from
    this process's threads (jneox_read_bytes; a torch sum reads far slower than memory on some CPUs)."""
    from jneox import kernels

    lib = kernels.library()
    if lib is None:
        raise SystemExit("the bandwidth bound needs jneox's native kernels (a C compiler)")
    from jneox.quantize import huge_pages

    buf = torch.ones(int(gib * 2**30) + 64, dtype=torch.uint8)
    huge_pages(buf)  # on 2 MiB pages, as jneox's packed weights: 4 KiB pages read slower (a TLB miss each)
    start = -buf.data_ptr() % 64  # 64-byte aligned, whole lines
    return kernels.read_bandwidth(lib, buf[start : start + int(gib * 2**30)], torch.get_num_threads(), repeats)


def make_tokenizer(out: Path, vocab_size: int) -> Path:
    """A Unigram sentencepiece model with the card's options and exactly ``vocab_size`` pieces: trained
    small on the test text, then extended with filler pieces (needs the protobuf package)."""
    from jneox.tokenizer import Tokenizer, train_tokenizer

    text = Path(__file__).resolve().parents[1] / "tests" / "data" / "ja_sample.txt"
    path = train_tokenizer([text], out, 1000, overwrite=True)  # this script's own scratch folder
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:  # no protobuf: a smaller vocabulary serves every row but CTranslate2's converter
        print("note: protobuf is not installed; the tokenizer keeps 1,000 pieces", flush=True)
        return path
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    lowest = min(p.score for p in proto.pieces)
    for i in range(vocab_size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581filler{i}", lowest - 1 - i * 1e-3, pb.ModelProto.SentencePiece.NORMAL
    proto.trainer_spec.vocab_size = vocab_size
    path.write_bytes(proto.SerializeToString())
    assert Tokenizer(path).vocab_size == vocab_size
    return path


# where the random checkpoints live (--work of every benchmark that takes --layers)
BENCH_DIR = Path(os.environ.get("JNEOX_BENCH_DIR", "~/.cache/jneox/bench"))


def bench_checkpoint(work: Path, layers: int) -> Path:
    """The random ``layers``-layer checkpoint of the 3.6B shape in ``work``, made on first use: the one that
    every benchmark with ``--layers`` shares."""
    work = work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    return make_checkpoint(work / f"gpt-neox-3.6b-L{layers}", layers)


def make_checkpoint(folder: Path, layers: int) -> Path:
    from jneox.checkpoint import save
    from jneox.config import ModelConfig
    from jneox.model import GPTNeoX

    if (folder / "config.json").exists():
        return folder
    config = ModelConfig.from_name("japanese-gpt-neox-3.6b", num_layers=layers)
    print(f"making a random {config.num_parameters / 1e9:.2f}B-parameter checkpoint in {folder} ...", flush=True)
    with torch.device("meta"):
        model = GPTNeoX(config)
    gen = torch.Generator().manual_seed(0)
    for name, p in list(model.named_parameters()):
        if p.dim() == 1:
            value = torch.ones(p.shape) if "norm" in name and name.endswith("weight") else torch.zeros(p.shape)
        else:
            value = torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02)
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, torch.nn.Parameter(value.to(torch.bfloat16), requires_grad=False))
    spiece = make_tokenizer(folder.parent / f"{folder.name}-tokenizer", config.vocab_size)
    save(model, folder, tokenizer_file=spiece, max_shard_bytes=2 * 2**30)
    return folder


def convert_ct2(ckpt: Path, out: Path, tf4: Path | None) -> str | None:
    """Convert the checkpoint with CTranslate2's own converter; None, or why it could not be done."""
    if (out / "model.bin").exists():
        return None
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return "ctranslate2 is not installed"
    if tf4 is None or not tf4.is_dir():
        return "no transformers<5 folder for the converter (--tf4)"
    env = {**os.environ, "PYTHONPATH": f"{tf4}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    code = "from ctranslate2.converters.transformers import main; main()"
    cmd = [sys.executable, "-c", code, "--model", str(ckpt), "--output_dir", str(out), "--quantization", "int8",
           "--low_cpu_mem_usage", "--force"]
    print("converting for CTranslate2 ...", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        return "conversion failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    return None


def export_llama_cpp(ckpt: Path, work: Path, layers: int, rows: list[str]) -> str | None:
    """GGUF files of the checkpoint for the llama.cpp rows; None, or why they cannot run."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (README: Interop)"
    from jneox.export.gguf import export_gguf

    for row in rows:
        path = work / f"gguf-L{layers}-{row.split(':')[1]}.gguf"
        if not path.exists():
            print(f"writing {path.name} ...", flush=True)
            export_gguf(ckpt, path, row.split(":")[1])
    return None


def run_child(row: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", row, "--ckpt", str(args.ckpt), "--prompt-tokens",
           str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--batch-sizes", args.batch_sizes,
           "--batch-steps", str(args.batch_steps), "--prefill-repeats", str(args.prefill_repeats), *extra]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"running {row} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(row, args))
    if proc.returncode:
        return {"row": row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_env(row: str, args) -> dict:
    """The environment of a row's process: its instruction-set level (``RUNTIME@LEVEL``), and for
    jneox-pytorch, jneox without its native kernels (no C compiler, or JNEOX_KERNELS=0)."""
    env = dict(os.environ)
    runtime = row.split(":")[0]
    runtime, _, level = runtime.partition("@")
    if runtime == "jneox-pytorch":
        env["JNEOX_KERNELS"] = "0"
    if level and runtime.startswith("jneox"):
        env["JNEOX_SIMD"] = level
        if level in ("avx2", "portable"):
            env.update(AVX2_ENV)
        elif level == "avx512":
            env.update(AVX512_ENV)
    elif level and runtime == "llama.cpp":
        folder = dict(b.split("=", 1) for b in args.llama_cpp).get(level)
        if folder is None:
            raise SystemExit(f"{row}: no --llama-cpp {level}=DIR given")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (folder, env.get("PYTHONPATH")) if p)
    return env


def cpu_description() -> str:
    """The CPU's model name and the instruction-set flags that decide the kernel paths."""
    from jneox import kernels

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            name = next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    lib = kernels.library()
    level = "none (PyTorch ops)" if lib is None else str(kernels.simd_level(lib))
    have = [f for f in CPU_FLAGS if kernels.cpu_has(f)]
    return f"{name}, {os.cpu_count()} cores; flags: {' '.join(have) or 'none of ' + ', '.join(CPU_FLAGS)}; " \
           f"jneox kernel level {level}"


def weight_bytes_per_token(row: str, config) -> float:
    """Bytes one decode step must read: every linear weight (+ scales), not the input embedding."""
    runtime, fmt = row.split(":")
    linear = config.num_parameters - config.vocab_size * config.hidden_size  # minus embed_in
    scales = 0.0
    if fmt in ("int8", "int8_bfloat16"):
        scales = 4 * (config.num_layers * (3 + 1 + 4 + 1) * config.hidden_size + config.vocab_size)
    elif fmt == "int4":
        scales = 2 * linear / 64
    return linear * BYTES_PER_WEIGHT[fmt] + scales


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--prefill-repeats", type=int, default=3,
                   help="time the prompt this many times and report the fastest (default: 3)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1,4,16", help="batch sizes for jneox bf16/int8 aggregate decode")
    p.add_argument("--batch-steps", type=int, default=16, help="decode steps per batch-size measurement")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--work", type=Path, default=BENCH_DIR)
    p.add_argument("--tf4", type=Path, help="folder with transformers<5 for CTranslate2's converter")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--llama-cpp", action="append", default=[], metavar="LEVEL=DIR",
                   help="a llama-cpp-python build for the llama.cpp@LEVEL rows (repeatable)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--save-reference", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ct2", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args)))
        return

    from jneox.loading import load_config

    work = args.work.expanduser()
    work.mkdir(parents=True, exist_ok=True)
    bandwidth = measure_bandwidth()
    print(f"read bandwidth: {bandwidth:.1f} GB/s (4 GiB, vector loads, {torch.get_num_threads()} threads)", flush=True)
    args.ckpt = bench_checkpoint(work, args.layers)
    config = load_config(args.ckpt)
    rows = [r for r in args.rows.split(",") if r]
    results, notes = [], []
    # the fp32 greedy sequence depends on the prompt's and the answer's lengths: one file for each
    reference = work / f"reference-L{args.layers}-P{args.prompt_tokens}-N{args.new_tokens}.pt"
    ct2_dir = work / f"ct2-int8-L{args.layers}"
    if any(r.startswith("ctranslate2") for r in rows):
        why = convert_ct2(args.ckpt, ct2_dir, args.tf4)
        if why:
            notes.append(f"CTranslate2 rows skipped: {why}")
            rows = [r for r in rows if not r.startswith("ctranslate2")]
    llama_rows = [r for r in rows if r.startswith("llama.cpp")]
    if llama_rows:
        why = export_llama_cpp(args.ckpt, work, args.layers, llama_rows)
        if why:
            notes.append(f"llama.cpp rows skipped: {why}")
            rows = [r for r in rows if r not in llama_rows]
    if "jneox:float32" in rows:  # the reference runs first
        rows.remove("jneox:float32")
        rows.insert(0, "jneox:float32")
    for row in rows:
        runtime = row.split(":")[0].partition("@")[0]
        extra = []
        if row == "jneox:float32":
            extra = ["--save-reference", str(reference)]
        if runtime in ("jneox", "jneox-pytorch", "llama.cpp") and reference.exists() and row != "jneox:float32":
            extra = ["--reference", str(reference)]
        if runtime == "llama.cpp":
            extra += ["--gguf", str(work / f"gguf-L{args.layers}-{row.split(':')[1]}.gguf")]
        elif runtime == "ctranslate2":
            extra = ["--ct2", str(ct2_dir)]
        res = run_child(row, args, extra)
        if "error" in res:
            notes.append(f"{row} skipped: {res['error']}")
            continue
        bound = bandwidth * 1e9 / weight_bytes_per_token(row, config)
        res["bound_tps"], res["of_bound"] = bound, res["decode_tps"] / bound
        results.append(res)
    cpu = cpu_description()
    print_table(results, notes, args, bandwidth, config, cpu)
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu, "bandwidth_gbs": bandwidth, "layers": args.layers, "rows": results,
                                         "notes": notes}, indent=2))


def print_table(results, notes, args, bandwidth, config, cpu: str) -> None:
    print(f"\n{cpu}")
    print(f"{config.num_layers} layers, hidden {config.hidden_size} ({config.num_parameters / 1e9:.2f}B parameters), "
          f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy, "
          f"{args.threads or torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s (a 4 GiB buffer, "
          f"vector loads), prefill: fastest of {args.prefill_repeats}")
    bounds = {fmt: bandwidth * 1e9 / weight_bytes_per_token(f"jneox:{fmt}", config)
              for fmt in ("float32", "bfloat16", "int8", "int4")}
    print("decode bound (every weight read once per token at that bandwidth): "
          + ", ".join(f"{fmt} {tps:.2f} tok/s" for fmt, tps in bounds.items()) + "\n")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    head = ["runtime", "weights", "load s", "prefill ms", "decode tok/s", "of bound", "peak RSS GB"]
    head += [f"batch {b} tok/s" for b in batch_sizes] + ["logits rel err", "greedy agree"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        runtime, fmt = r["row"].split(":")
        cells = [runtime, fmt, f"{r['load_s']:.1f}", f"{r['prefill_ms']:.0f}", f"{r['decode_tps']:.2f}",
                 f"{100 * r['of_bound']:.0f}%", f"{r['peak_rss_gb']:.1f}"]
        cells += [f"{r['batch_tps'][str(b)]:.1f}" if str(b) in r.get("batch_tps", {}) else "" for b in batch_sizes]
        cells += [f"{r['rel_err']:.3g}" if "rel_err" in r else "", f"{100 * r['agree']:.1f}%" if "agree" in r else ""]
        print("| " + " | ".join(cells) + " |")
    for n in notes:
        print(f"\nnote: {n}")


# ---- one row, in its own process -------------------------------------------------------------
def best_prefill_ms(run, repeats: int) -> tuple[float, list[float], object]:
    """Time ``run()`` (one whole prompt) ``repeats`` times: the fastest, all, the last result.

    The fastest, because on a shared CPU one prompt's time swings 1.5-2x: on this project's AMX
    machine the tile unit's throughput halved for seconds at a time (2.4 -> 1.05 TFLOP/s) while
    scalar code ran unchanged, so a single prompt measured the neighbours as much as the runtime."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = run()
        times.append((time.perf_counter() - t) * 1e3)
    return min(times), times, out


def prompt_ids(n: int, vocab: int) -> list[int]:
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(1234)).tolist()


# One whole prompt, each runtime as its prefill is timed here and in prefill_ab.py.
def jneox_prompt(model, ids: torch.Tensor, cache):
    # into the same cache each time, as the server reuses a slot. A fresh cache gets its pages at first
    # write (model._zeros): 36 layers x 128 tokens take 25,344 page faults (~3.5 us each here), as
    # transformers' first prompt pays for the fresh memory its allocator hands out; later ones reuse both
    return lambda: model(ids, input_pos=torch.arange(ids.shape[1]), last_only=True, cache=cache)


def transformers_prompt(model, ids: torch.Tensor):
    # the last token's logits only, as generate() asks for them (and as jneox's last_only)
    return lambda: model(ids, use_cache=True, logits_to_keep=1)


def ct2_prompt(gen, prompt: list[str]):
    return lambda: gen.generate_batch([prompt], max_length=1, sampling_topk=1, include_prompt_in_result=False)


def child(args) -> dict:
    runtime, fmt = args.child.split(":")
    runtime = runtime.partition("@")[0]
    fn = {"jneox": child_jneox, "jneox-pytorch": child_jneox, "transformers": child_transformers,
          "ctranslate2": child_ct2, "llama.cpp": child_llama_cpp}[runtime]
    res = fn(args, fmt)
    res.update(row=args.child, peak_rss_gb=peak_rss_mb() / 1024)
    return res


@torch.inference_mode()
def child_jneox(args, fmt: str) -> dict:
    from jneox.loading import load_model

    t = time.perf_counter()
    model = load_model(args.ckpt, weights=fmt)
    load_s = time.perf_counter() - t
    P, N = args.prompt_tokens, args.new_tokens
    ids = torch.tensor([prompt_ids(P, model.config.vocab_size)])
    cache = model.new_cache(1, P + N)
    model(ids[:, :8], input_pos=torch.arange(8), last_only=True, cache=cache)  # warm-up (kernel build and load)
    prefill_ms, prefill_all, logits = best_prefill_ms(jneox_prompt(model, ids, cache), args.prefill_repeats)
    tokens = [int(logits[0, -1].argmax())]
    t = time.perf_counter()
    for pos in range(P, P + N - 1):
        logits = model(torch.tensor([[tokens[-1]]]), input_pos=torch.tensor([pos]), cache=cache)
        tokens.append(int(logits[0, -1].argmax()))
    decode_tps = (N - 1) / (time.perf_counter() - t)
    res = {"load_s": load_s, "prefill_ms": prefill_ms, "prefill_all_ms": prefill_all, "decode_tps": decode_tps}
    if fmt in ("bfloat16", "int8"):
        res["batch_tps"] = batch_decode(model, [int(b) for b in args.batch_sizes.split(",")], args.batch_steps)
    seq = torch.tensor([prompt_ids(P, model.config.vocab_size) + tokens])
    if args.save_reference:  # teacher-forced logits of the fp32 greedy sequence, for the other rows
        torch.save({"seq": seq, "logits": model(seq)[0, P - 1: -1].float()}, args.save_reference)
    elif args.reference:
        ref = torch.load(args.reference)
        got = model(ref["seq"])[0, P - 1: -1].float()
        res["rel_err"] = float((got - ref["logits"]).norm() / ref["logits"].norm())
        res["agree"] = float((got.argmax(-1) == ref["logits"].argmax(-1)).float().mean())
    return res


def batch_decode(model, batch_sizes: list[int], steps: int) -> dict:
    """Aggregate tok/s of ``steps`` decode steps for B rows at once (8-token prompts: decode is measured)."""
    out = {}
    for b in batch_sizes:
        cache = model.new_cache(b, 8 + steps + 1)
        ids = torch.randint(4, 1000, (b, 8), generator=torch.Generator().manual_seed(b))
        logits = model(ids, input_pos=torch.arange(8), last_only=True, cache=cache)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for pos in range(8, 8 + steps):
            tok = model(tok, input_pos=torch.tensor([pos]), cache=cache)[:, -1].argmax(-1, keepdim=True)
        out[str(b)] = b * steps / (time.perf_counter() - t)
    return out


def child_transformers(args, fmt: str) -> dict:
    from transformers import GPTNeoXForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    t = time.perf_counter()
    model = GPTNeoXForCausalLM.from_pretrained(args.ckpt, dtype=getattr(torch, fmt)).eval()
    load_s = time.perf_counter() - t
    P, N = args.prompt_tokens, args.new_tokens
    ids = torch.tensor([prompt_ids(P, model.config.vocab_size)])
    with torch.inference_mode():
        model(ids[:, :8])
        prefill_ms, prefill_all, _ = best_prefill_ms(transformers_prompt(model, ids), args.prefill_repeats)
        clock = Clock()
        model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, streamer=clock, pad_token_id=0)
    first, last = clock.times[1], clock.times[-1]  # times[0] is the prompt itself
    return {"load_s": load_s, "prefill_ms": prefill_ms, "prefill_all_ms": prefill_all,
            "decode_tps": (len(clock.times) - 2) / (last - first)}


def child_ct2(args, fmt: str) -> dict:
    import ctranslate2

    from jneox.loading import load_tokenizer

    tok = load_tokenizer(args.ckpt)
    t = time.perf_counter()
    gen = ctranslate2.Generator(str(args.ct2), device="cpu", compute_type=fmt,
                                intra_threads=args.threads or torch.get_num_threads())
    load_s = time.perf_counter() - t
    P, N = args.prompt_tokens, args.new_tokens
    prompt = [tok.id_to_piece(i) for i in prompt_ids(P, tok.vocab_size)]
    gen.generate_batch([prompt[:8]], max_length=1, sampling_topk=1)  # warm-up
    prefill_ms, prefill_all, _ = best_prefill_ms(ct2_prompt(gen, prompt), args.prefill_repeats)
    times = []
    for _ in gen.generate_tokens(prompt, max_length=N, min_length=N, sampling_topk=1):
        times.append(time.perf_counter())
    return {"load_s": load_s, "prefill_ms": prefill_ms, "prefill_all_ms": prefill_all,
            "decode_tps": (len(times) - 1) / (times[-1] - times[0])}


def child_llama_cpp(args, fmt: str) -> dict:
    """llama.cpp through llama-cpp-python on jneox's GGUF export: token ids in, greedy ids out."""
    import llama_cpp
    import numpy as np

    P, N = args.prompt_tokens, args.new_tokens
    threads = args.threads or torch.get_num_threads()
    t = time.perf_counter()
    llm = llama_cpp.Llama(str(args.gguf), n_ctx=2 * P + N, n_batch=max(P, 8), n_threads=threads,
                          n_threads_batch=threads, logits_all=args.reference is not None, verbose=False)
    load_s = time.perf_counter() - t
    ids = prompt_ids(P, llm.n_vocab())
    llm.eval(ids[:8])  # warm-up

    def prompt():
        llm.reset()
        llm.eval(ids)

    prefill_ms, prefill_all, _ = best_prefill_ms(prompt, args.prefill_repeats)
    times = []
    # generate() finds the prompt already in the KV cache and evaluates only its last token again
    for _ in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        times.append(time.perf_counter())
        if len(times) == N:
            break
    res = {"load_s": load_s, "prefill_ms": prefill_ms, "prefill_all_ms": prefill_all,
            "decode_tps": (len(times) - 1) / (times[-1] - times[0])}
    if args.reference:
        ref = torch.load(args.reference)
        seq = ref["seq"][0].tolist()
        llm.reset()
        llm.eval(seq[: len(seq) - 1])
        got = torch.from_numpy(np.array(llm.scores[P - 1: len(seq) - 1], dtype=np.float32))
        res["rel_err"] = float((got - ref["logits"]).norm() / ref["logits"].norm())
        res["agree"] = float((got.argmax(-1) == ref["logits"].argmax(-1)).float().mean())
    return res


if __name__ == "__main__":
    main()
