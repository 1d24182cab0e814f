"""The GPU path, measured in one run: correctness, batch-1 decode, the server and training, one table.

On one CUDA GPU, with random weights of japanese-gpt-neox-3.6b's shape built on the GPU itself:

- correctness: jneox in bf16 (its CUDA-graph decoder) against transformers in fp32 on the same weights:
  greedy tokens, and the largest logit error along jneox's greedy sequence (teacher-forced);
- decode at batch 1 in bf16: tokens/s of jneox (plain loop, CUDA graph, torch.compile + CUDA graph) and
  of transformers ``generate`` (dynamic cache; static cache, which transformers compiles itself where it
  supports it), against the bound that reading the weights once per token sets (weight bytes / the
  device-to-device copy bandwidth measured here);
- the server: :class:`jneox.serve.scheduler.Engine` driven by 1, 8 and 32 client threads (no HTTP):
  aggregate tokens/s and time to first token;
- training at 2,048 tokens a sequence with activation checkpointing and bf16 autocast: LoRA (the frozen
  base in bf16, as ``jneox sft --lora-rank`` holds it on CUDA) and full fine-tuning (fp32 weights, fused
  AdamW): tokens/s, peak GPU memory, and MFU (model FLOPs: 6N + 12·L·d·T per token for full
  fine-tuning, 4N + 8·L·d·T for LoRA, whose frozen weights get no gradient; N the matmul parameters).
  A step is the one of ``jneox.train.loop.Trainer.fit`` (autocast forward, summed token loss, backward,
  gradient clipping, AdamW), without data loading or checkpoint writes.

Each measurement that fails prints its row as ``failed: <reason>`` and the run goes on; each section
has a time budget and skips what would not fit (``--budget`` seconds in all). The table goes to stdout
and to ``OUT/gpu_check.md`` (with ``OUT/gpu_check.json``).

The GPU machine has torch, transformers, peft, sentencepiece, safetensors and tokenizers but no
package index: ``--bundle`` (run here) copies the other third-party packages that the jneox modules
used here import into ``benchmarks/gpu_bundle/`` (ignored by git), which the run then appends to its
``sys.path``::

    python benchmarks/gpu_check.py --bundle                 # here, once
    python benchmarks/gpu_check.py --out "$OUT"             # there (carry benchmarks/gpu_bundle)
    python benchmarks/gpu_check.py --quick                  # the whole script on a tiny model, on the CPU

jneox's HTTP layer (FastAPI, uvicorn) is not needed: the Engine is imported without ``jneox.serve``'s
package module, which is what starts the app.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "benchmarks" / "gpu_bundle"
# what the GPU machine's image has (with their own dependencies): never bundled
IMAGE_HAS = {"torch", "torchgen", "functorch", "transformers", "peft", "sentencepiece", "safetensors", "tokenizers", "triton", "numpy",
             "tqdm", "huggingface_hub", "hf_xet", "yaml", "packaging", "filelock", "regex", "requests", "fsspec",
             "jinja2", "markupsafe", "networkx", "sympy", "mpmath", "typing_extensions", "certifi", "urllib3",
             "idna", "charset_normalizer", "nvidia", "setuptools", "pkg_resources", "_distutils_hack", "psutil",
             "accelerate", "jneox"}
# seconds past --budget after which the run writes its table and ends, whatever is still running
GRACE_S = 45
# the sections after set-up, in their order (the compiled decoders last: they take the longest to start)
SECTIONS = ("correctness", "decode", "server", "train", "compiled")
# the jneox modules this script uses
JNEOX_MODULES = ("jneox.checkpoint", "jneox.config", "jneox.cuda_graphs", "jneox.model", "jneox.sampling",
                 "jneox.tokenizer", "jneox.serve.scheduler", "jneox.train.loop", "jneox.train.lora")
# dense bf16 tensor-core peak (no sparsity) by the device name's marks, from the vendors' data sheets
PEAK_BF16 = [(("H100", "PCIe"), 756e12), (("H100", "NVL"), 835e12), (("H100",), 989e12), (("H200",), 989e12),
             (("H20",), 148e12), (("A100",), 312e12), (("L40S",), 362e12), (("L4",), 121e12)]

sys.path.insert(0, str(ROOT / "src"))
if BUNDLE.is_dir():
    sys.path.append(str(BUNDLE))  # after site-packages: what the machine has comes first

import torch  # noqa: E402


def import_jneox() -> types.SimpleNamespace:
    """The jneox modules of :data:`JNEOX_MODULES`, by their last name. ``jneox.serve``'s package module
    (the HTTP app: FastAPI, uvicorn, pydantic) is stood in for by a bare package of the same folder."""
    import jneox

    if "jneox.serve" not in sys.modules:
        serve = types.ModuleType("jneox.serve")
        serve.__path__ = [str(Path(jneox.__file__).parent / "serve")]
        sys.modules["jneox.serve"] = serve
    return types.SimpleNamespace(**{name.rpartition(".")[2]: importlib.import_module(name) for name in JNEOX_MODULES})


# ---- the bundle ----------------------------------------------------------------------------------
def imported_packages() -> list[str]:
    """Top-level third-party packages that importing the jneox modules loads (beyond torch's own)."""
    before = set(sys.modules)
    import_jneox()
    tops = {name.partition(".")[0] for name in set(sys.modules) - before}
    return sorted(t for t in tops if t not in sys.stdlib_module_names and not t.startswith("_") and t != "jneox")


def make_bundle(folder: Path) -> list[str]:
    """Copy the imported packages the GPU image lacks (and their dist-info) into ``folder``; their names."""
    out = subprocess.run([sys.executable, __file__, "--list-imports"], capture_output=True, text=True, check=True)
    names = [n for n in json.loads(out.stdout.strip().splitlines()[-1]) if n not in IMAGE_HAS]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    dists = importlib.metadata.packages_distributions()
    skip = shutil.ignore_patterns("__pycache__")
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise SystemExit(f"--bundle: {name} is imported but cannot be found")
        if spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                shutil.copytree(location, folder / name, ignore=skip, dirs_exist_ok=True)
        else:
            shutil.copy2(spec.origin, folder / Path(spec.origin).name)
        for dist_name in dists.get(name, []):
            path = getattr(importlib.metadata.distribution(dist_name), "_path", None)
            if path is not None and Path(path).is_dir():
                shutil.copytree(path, folder / Path(path).name, ignore=skip, dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"bundled {', '.join(names) or 'nothing'} into {folder} ({size / 2**20:.1f} MiB)")
    return names


# ---- running sections ------------------------------------------------------------------------------
class Run:
    """The table being built, the clock, and what the sections share (models, config, device)."""

    def __init__(self, args):
        self.args = args
        self.rows: list[dict] = []
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.section_deadline = self.deadline
        self.shared: dict = {}

    def left(self) -> float:
        """Seconds left to the current section (never past the whole run's)."""
        return min(self.section_deadline, self.deadline) - time.monotonic()

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", flush=True)

    def row(self, section: str, what: str, result: str, target: str = "") -> None:
        self.rows.append({"section": section, "what": what, "result": result, "target": target})
        self.log(f"{section} | {what} | {result}")

    def section(self, name: str, budget: float, fn) -> None:
        self.section_deadline = time.monotonic() + budget
        if self.deadline - time.monotonic() < 5:
            self.row(name, "(whole section)", "skipped: the run's time budget is spent")
            return
        self.log(f"--- {name} (budget {budget:.0f} s)")
        try:
            fn(self)
        except Exception as e:  # one section's failure is one row; the run goes on
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.row(name, "(section)", f"failed: {type(e).__name__}: {first}")
            traceback.print_exc()
        finally:
            free(self.device)

    def attempt(self, section: str, what: str, fn, target: str = "") -> object:
        """``fn()`` -> result text (or (text, value)); a failure becomes the row's text."""
        try:
            out = fn()
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.row(section, what, f"failed: {type(e).__name__}: {first}", target)
            traceback.print_exc()
            return None
        text, value = out if isinstance(out, tuple) else (out, None)
        self.row(section, what, text, target)
        return value

    @property
    def device(self) -> torch.device:
        return self.shared["device"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), best of ``repeats``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def build_model(jx, config, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A GPTNeoX with random weights drawn on ``device`` itself (fast for 3.6B): matrices N(0, 0.02),
    biases N(0, 0.02), norm weights 1 + N(0, 0.1). The same seed gives the same weights on a device."""
    model = jx.model.meta_model(config).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.to(dtype).eval()


def matmul_params(config) -> int:
    """Parameters that take part in a matrix multiply per token (every linear layer and the head)."""
    c = config
    d, f = c.hidden_size, c.intermediate_size
    return c.num_layers * (4 * d * d + 2 * d * f) + d * c.vocab_size


def weight_bytes(model) -> int:
    """Bytes a decode step reads of the weights: all but the embedding (one row of it)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embed."))


def peak_flops(args, device: torch.device) -> tuple[float | None, str]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12, f"{args.peak_tflops:g} TFLOP/s (--peak-tflops)"
    if device.type != "cuda":
        return None, "no peak known for a CPU"
    name = torch.cuda.get_device_name(device)
    for marks, peak in PEAK_BF16:
        if all(m in name for m in marks):
            return peak, f"{peak / 1e12:.0f} TFLOP/s bf16 dense ({name})"
    return None, f"no peak known for {name} (give --peak-tflops)"


def hf_model(jx, model, dtype: torch.dtype):
    """transformers' GPTNeoXForCausalLM with ``model``'s weights, in ``dtype``, on its device."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**{k: v for k, v in model.config.to_hf().items() if k != "architectures"})
    with torch.device(model.embed.weight.device):
        hf = GPTNeoXForCausalLM(config)
    names = set(hf.state_dict())
    state = {}
    for name, tensor in jx.checkpoint.hf_state_dict(model).items():
        if name not in names and name == "embed_out.weight":
            name = "lm_head.weight"  # transformers 5's name in memory
        state[name] = tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [n for n in missing if not n.endswith(("masked_bias", "attention.bias"))]
    if missing or unexpected:
        raise RuntimeError(f"weights do not match transformers' model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    hf = hf.to(dtype)
    hf.generation_config.eos_token_id = None  # random weights: generate the asked number of tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


# ---- sections ----------------------------------------------------------------------------------
def section_setup(run: Run) -> None:
    jx, device = run.shared["jx"], run.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    run.row("setup", "device", f"{name}; torch {torch.__version__}"
            f"{'; CUDA ' + str(torch.version.cuda) if device.type == 'cuda' else ''}")
    bw = copy_bandwidth(device, (2 << 30) if device.type == "cuda" else (64 << 20))
    run.shared["bandwidth"] = bw
    run.row("setup", "copy bandwidth (read + write)", f"{bw / 1e9:.0f} GB/s")
    t = time.perf_counter()
    model = build_model(jx, run.shared["config"], torch.bfloat16, device)
    sync(device)
    run.shared["model"] = model
    run.row("setup", "random bf16 model", f"{sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, "
            f"{weight_bytes(model) / 1e9:.2f} GB read per token ({time.perf_counter() - t:.1f} s to build)")


def greedy_static(jx, model, prompt: list[int], n: int, capture: bool | None = None, compile: bool = False,
                  decoder=None) -> tuple[list[int], list[torch.Tensor], object]:
    """``n`` greedy tokens after ``prompt`` on a StaticDecoder (fp32 logits of each), and the decoder."""
    decoder = decoder or jx.cuda_graphs.StaticDecoder(model, 1, len(prompt) + n, capture=capture, compile=compile)
    logits = decoder.prefill(prompt)
    tokens, all_logits = [], []
    for i in range(n):
        row = logits[0, -1].float()
        all_logits.append(row.clone())
        tokens.append(int(row.argmax()))
        if i < n - 1:
            logits = decoder.step([tokens[-1]], [len(prompt) + i])
    return tokens, all_logits, decoder


def greedy_rows(jx, model, prompts: list[list[int]], n: int, decoder=None):
    """``n`` greedy tokens for each of ``prompts`` (one row each, equal lengths) on one StaticDecoder."""
    p = len(prompts[0])
    decoder = decoder or jx.cuda_graphs.StaticDecoder(model, len(prompts), p + n)
    last = [int(decoder.prefill(prompt, row=i)[0, -1].argmax()) for i, prompt in enumerate(prompts)]
    for i in range(n - 1):
        last = decoder.step(last, [p + i] * len(prompts))[:, -1].argmax(-1).tolist()
    return decoder


def greedy_plain(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens with one eager forward pass per token (jneox's loop before CUDA graphs)."""
    device = model.embed.weight.device
    cache = model.new_cache(1, len(prompt) + n)
    logits = model(torch.tensor([prompt], device=device), input_pos=torch.arange(len(prompt), device=device),
                   last_only=True, cache=cache)
    tokens = []
    for i in range(n):
        tokens.append(int(logits[0, -1].argmax()))
        if i < n - 1:
            logits = model(torch.tensor([[tokens[-1]]], device=device),
                           input_pos=torch.tensor([len(prompt) + i], device=device), cache=cache)
    return tokens


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return [int(t) for t in torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed))]


def section_correctness(run: Run) -> None:
    jx, model, device = run.shared["jx"], run.shared["model"], run.device
    n = 8 if run.args.quick else 32
    prompt = prompt_ids(8 if run.args.quick else 32, run.shared["config"].vocab_size)
    with torch.inference_mode():
        tokens, logits, _ = greedy_static(jx, model, prompt, n)
        hf = hf_model(jx, model, torch.float32)
        ref = hf(torch.tensor([prompt + tokens[:-1]], device=device)).logits[0, len(prompt) - 1:].float()
        ours = torch.stack(logits)
        err = float((ours - ref).abs().max())
        agree = int((ref.argmax(-1) == torch.tensor(tokens, device=device)).sum())
        hf_tokens = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()
    same = next((i for i, (a, b) in enumerate(zip(tokens, hf_tokens)) if a != b), n)
    graph = "CUDA graph" if device.type == "cuda" else "static step, uncaptured"
    run.row("correctness", f"greedy tokens, jneox bf16 ({graph}) vs transformers fp32",
            f"{same}/{n} identical before the first difference; teacher-forced top-1 agreement {agree}/{n}",
            "all (bf16 rounding may flip a near-tie)")
    run.row("correctness", "max |logit error| along jneox's greedy sequence",
            f"{err:.3g} (transformers' logits: std {float(ref.std()):.3g}, max |.| {float(ref.abs().max()):.3g})",
            "bf16-sized")
    del hf


def timed(device: torch.device, fn) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def decode_setup(run: Run):
    """(model, prompt, new tokens, bound in tok/s) for the decode sections; the bf16 model is built again
    if training took its memory."""
    jx, device, args = run.shared["jx"], run.device, run.args
    if "model" not in run.shared:
        run.shared["model"] = build_model(jx, run.shared["config"], torch.bfloat16, device)
    model = run.shared["model"]
    n = 16 if args.quick else args.decode_tokens
    prompt = prompt_ids(8 if args.quick else 32, run.shared["config"].vocab_size, seed=1)
    return model, prompt, n, run.shared["bandwidth"] / weight_bytes(model)


def measure_decode(run: Run, section: str, name: str, go, n: int, bound: float, needs: float = 0.0,
                   skip: str | None = None, target: str = "") -> None:
    """Row ``name``: ``go()`` makes ``n`` tokens; run once to warm up (capture, compile), then timed."""
    device = run.device
    if skip:
        run.row(section, name, f"skipped: {skip}", target)
        return
    if run.left() < needs:
        run.row(section, name, f"skipped: {run.left():.0f} s left of the section's budget, needs ~{needs:.0f}", target)
        return

    def go_and_time():
        with torch.no_grad():  # not inference_mode: torch.compile may not mutate inference tensors in place
            warm = timed(device, go)
            seconds = timed(device, go)
        if "batch" not in name:  # batch 1: the rows compared in the ratio
            run.shared.setdefault("decode", {})[name] = n / seconds
        return (f"{n / seconds:.1f} tok/s, {1e3 * seconds / n:.2f} ms/token, {n / seconds / bound:.0%} of the bound "
                f"(first run {warm:.1f} s)", n / seconds)

    run.attempt(section, name, go_and_time, target)


DECODE_TARGET = ">= 70% of the bound, >= 2x transformers"


def section_decode(run: Run) -> None:
    """Batch-1 decode without compilation: jneox's eager loop and CUDA graph, transformers' dynamic cache."""
    jx, device = run.shared["jx"], run.device
    model, prompt, n, bound = decode_setup(run)
    run.row("decode", "HBM bound (weight bytes / copy bandwidth)", f"{bound:.1f} tok/s")
    measure_decode(run, "decode", "jneox, eager loop", lambda: greedy_plain(model, prompt, n), n, bound)
    decoder = {}

    def graph():
        _, _, decoder["d"] = greedy_static(jx, model, prompt, n, decoder=decoder.get("d"))

    name = "jneox, CUDA graph (what generate uses on CUDA)" if device.type == "cuda" else "jneox, static step (uncaptured)"
    measure_decode(run, "decode", name, graph, n, bound, target=DECODE_TARGET)
    decoder.clear()
    rows = 8
    prompts = [prompt_ids(len(prompt), run.shared["config"].vocab_size, seed=10 + i) for i in range(rows)]

    def batch():
        decoder["b"] = greedy_rows(jx, model, prompts, n, decoder=decoder.get("b"))

    measure_decode(run, "decode", f"jneox, {name.partition(', ')[2]}, batch {rows}: tokens of all rows",
                   batch, n * rows, bound * rows)  # the weights are read once a step for all rows
    decoder.clear()
    hf = hf_model(jx, model, torch.bfloat16)
    ids = torch.tensor([prompt], device=device)
    measure_decode(run, "decode", "transformers generate, dynamic cache",
                   lambda: hf.generate(ids, max_new_tokens=n, do_sample=False), n, bound)
    hf.generation_config.disable_compile = True  # this row: the static cache alone
    measure_decode(run, "decode", "transformers generate, static cache (eager)",
                   lambda: hf.generate(ids, max_new_tokens=n, do_sample=False, cache_implementation="static"), n, bound)


def section_compiled(run: Run) -> None:
    """Batch-1 decode with torch.compile (slow to start: last, in the time left): jneox's compiled step
    captured as a CUDA graph, transformers' static cache with the compilation its generate does itself."""
    jx, device, args = run.shared["jx"], run.device, run.args
    model, prompt, n, bound = decode_setup(run)
    skip = None if device.type == "cuda" and not args.quick else "needs CUDA (and not --quick)"
    decoder = {}

    def compiled():
        _, _, decoder["d"] = greedy_static(jx, model, prompt, n, decoder=decoder.get("d"), compile=True)

    measure_decode(run, "compiled", "jneox, torch.compile + CUDA graph", compiled, n, bound, needs=100, skip=skip,
                   target=DECODE_TARGET)
    decoder.clear()
    free(device)
    hf = hf_model(jx, model, torch.bfloat16)
    ids = torch.tensor([prompt], device=device)
    hf.generation_config.disable_compile = False
    measure_decode(run, "compiled", "transformers generate, static cache + its own torch.compile",
                   lambda: hf.generate(ids, max_new_tokens=n, do_sample=False, cache_implementation="static"),
                   n, bound, needs=100, skip=skip)
    hf = None  # its memory back before the ratio row
    results = run.shared.get("decode", {})
    ours = max((v for k, v in results.items() if k.startswith("jneox")), default=None)
    theirs = max((v for k, v in results.items() if k.startswith("transformers")), default=None)
    if ours and theirs:
        run.row("compiled", "jneox's best / transformers' best (both sections)",
                f"{ours / theirs:.2f}x; jneox at {ours / bound:.0%} of the bound", ">= 2x; >= 70%")


def section_server(run: Run) -> None:
    jx, model, args = run.shared["jx"], run.shared["model"], run.args
    sample = ROOT / "tests" / "data" / "ja_sample.txt"
    tmp = tempfile.mkdtemp(prefix="gpu_check_")  # the tokenizer's file, for the section's length
    tokenizer = jx.tokenizer.Tokenizer(jx.tokenizer.train_tokenizer([sample], tmp, 1000))
    clients_list = [1, 2, 4] if args.quick else [1, 8, 32]
    new_tokens = 8 if args.quick else 64
    engine = jx.scheduler.Engine(model, tokenizer, max_batch=max(clients_list), max_queue=2 * max(clients_list),
                                 prefix_cache_mb=0).start()
    params = jx.sampling.SamplingParams(temperature=0, max_new_tokens=new_tokens)
    try:
        def one_round(clients: int) -> tuple[float, int, list[float]]:
            done = threading.Barrier(clients + 1)
            ttft, tokens = [], []
            lock = threading.Lock()

            def client(i: int):
                start, first = time.monotonic(), None
                finished = threading.Event()

                def on_event(ev):
                    nonlocal first
                    if first is None and (ev.text or ev.final):
                        first = time.monotonic()
                    if ev.final:
                        with lock:
                            tokens.append(ev.completion_tokens if ev.error is None else 0)
                        finished.set()

                engine.submit(prompt_ids(32, tokenizer.vocab_size, seed=100 + i), params, on_event)
                finished.wait(120)
                with lock:
                    ttft.append((first or time.monotonic()) - start)
                done.wait()

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
            t = time.monotonic()
            for th in threads:
                th.start()
            done.wait()
            return time.monotonic() - t, sum(tokens), ttft

        one_round(1)  # warm-up
        for clients in clients_list:
            if run.left() < 10:
                run.row("server", f"{clients} clients", f"skipped: {run.left():.0f} s left of the section's budget")
                continue

            def go(clients=clients):
                seconds, tokens, ttft = one_round(clients)
                return (f"{tokens / seconds:.1f} tok/s aggregate ({tokens} tokens in {seconds:.1f} s); TTFT p50 "
                        f"{1e3 * statistics.median(ttft):.0f} ms, max {1e3 * max(ttft):.0f} ms")

            run.attempt("server", f"{clients} clients x 1 request of {new_tokens} tokens (Engine, greedy)", go)
    finally:
        engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def section_train(run: Run) -> None:
    jx, device, args = run.shared["jx"], run.device, run.args
    run.shared.pop("model", None)  # the bf16 inference model: its memory goes to training
    free(device)
    config = run.shared["config"]
    seq = 64 if args.quick else args.train_tokens
    batch = args.train_batch
    steps = 2 if args.quick else 4
    n = matmul_params(config)
    peak, peak_note = peak_flops(args, device)
    attn = config.num_layers * config.hidden_size * seq
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as jneox's trainer sets it

    def train_fitting(lora: bool):
        """:func:`train` at ``--train-batch`` sequences, halved while the GPU runs out of memory."""
        b = batch
        while True:
            try:
                return train(lora, b)
            except torch.cuda.OutOfMemoryError:
                if b == 1:
                    raise
            free(device)  # out of the except block: the failed try's frames, and their tensors, are gone
            run.log(f"out of GPU memory at batch {b}: trying {b // 2}")
            b //= 2

    def train(lora: bool, batch: int):
        model = build_model(jx, config, torch.float32, device)
        if lora:
            jx.lora.apply_lora(model, 16, 32.0)
            if device.type == "cuda":
                jx.lora.cast_frozen(model, torch.bfloat16)
        jx.loop.checkpoint_blocks(model)
        model.train()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = jx.loop.TrainConfig(out=tmp, lr=1e-4, weight_decay=0.0 if lora else 0.1, grad_checkpointing=True)
        optimizer = jx.loop.build_optimizer(model, cfg, device)
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device, generator=gen)

        def step():
            with autocast:
                loss = jx.loop.token_loss_sum(model(x[:, :-1]), x[:, 1:]) / (batch * seq)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm = timed(device, step)  # allocates the optimizer's state
        if warm * (steps + 1) > run.left():
            raise RuntimeError(f"one step took {warm:.1f} s: {steps} more do not fit the {run.left():.0f} s left")
        seconds = timed(device, lambda: [step() for _ in range(steps)])
        tok_s = batch * seq * steps / seconds
        flops = (4 * n + 8 * attn) if lora else (6 * n + 12 * attn)
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.type == "cuda" else "(CPU)"
        mfu = f"MFU {tok_s * flops / peak:.0%}" if peak else f"MFU n/a ({peak_note})"
        model = optimizer = None  # the memory back before the next row (the step closure holds them)
        return f"batch {batch}: {tok_s:,.0f} tok/s ({1e3 * seconds / steps:.0f} ms/step), {mem}, {mfu}"

    shape = f"{seq}-token sequences, activation checkpointing, bf16 autocast"
    frozen = "frozen base in bf16" if device.type == "cuda" else "frozen base in fp32 off CUDA"
    run.attempt("train", f"LoRA r16 SFT step ({shape}; {frozen})", lambda: train_fitting(True))
    free(device)
    run.attempt("train", f"full fine-tuning step ({shape}; fp32 weights, AdamW fused on CUDA)", lambda: train_fitting(False),
                ">= 40% MFU" if not args.quick else "")
    run.row("train", "MFU peak used", peak_note)


# ---- the table --------------------------------------------------------------------------------
def table(run: Run, command: str) -> str:
    device = run.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--quick)" if run.args.quick else "CPU"
    head = [f"GPU check on {name}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
            f"{time.monotonic() - run.start:.0f} s; command: `{command}`", "",
            "| section | measurement | result | target |", "|---|---|---|---|"]
    cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    return "\n".join(head + [f"| {r['section']} | {cell(r['what'])} | {cell(r['result'])} | {cell(r['target'])} |"
                             for r in run.rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny model, every section, in seconds (on the CPU without CUDA)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu_check"),
                   help="folder for gpu_check.md and gpu_check.json (default: $OUT, else out/gpu_check)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default: 450)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"which sections (default: {','.join(SECTIONS)})")
    p.add_argument("--decode-tokens", type=int, default=256, help="new tokens per decode measurement (default: 256)")
    p.add_argument("--train-tokens", type=int, default=2048, help="tokens per training sequence (default: 2048)")
    p.add_argument("--train-batch", type=int, default=4,
                   help="sequences per training step, halved while they do not fit (default: 4)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: known GPUs' own)")
    p.add_argument("--bundle", action="store_true", help=f"copy the packages the GPU image lacks into {BUNDLE.relative_to(ROOT)} and exit")
    p.add_argument("--list-imports", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.list_imports:
        print(json.dumps(imported_packages()))
        return 0
    if args.bundle:
        make_bundle(BUNDLE)
        return 0
    run = Run(args)
    command = "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    timer = threading.Timer(args.budget + GRACE_S, overtime, (run, command, Path(args.out)))
    timer.daemon = True
    timer.start()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run.shared.update(device=device)
    jx = import_jneox()
    config = jx.config.ModelConfig.from_name("tiny" if args.quick else "japanese-gpt-neox-3.6b")
    run.shared.update(jx=jx, config=config)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # transformers' fp32 reference in full fp32 (training sets it)
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {', '.join(sorted(unknown))}")
    budgets = {"correctness": 60, "decode": 60, "server": 60, "train": 90, "compiled": 300}
    scale = args.budget / 450.0
    run.section("setup", 60 * scale, section_setup)
    if "model" in run.shared:
        for name in SECTIONS:
            if name in chosen:
                run.section(name, budgets[name] * scale, globals()[f"section_{name}"])
    timer.cancel()
    write_outputs(run, command, Path(args.out))
    return 0


def write_outputs(run: Run, command: str, out: Path) -> None:
    """The table to stdout and ``out``; rows added meanwhile (by a section still running) are not lost
    to a half-written file: each file is written whole."""
    text = table(run, command.strip())
    print("\n" + text, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(text, encoding="utf-8")
    (out / "gpu_check.json").write_text(json.dumps({"rows": list(run.rows), "seconds": time.monotonic() - run.start},
                                                   ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"wrote {out / 'gpu_check.md'}", flush=True)


def overtime(run: Run, command: str, out: Path) -> None:
    """The run is past its budget by :data:`GRACE_S` (a compilation that would not end): write what
    there is, with a row saying so, and end the process."""
    run.row("run", "(whole run)", f"stopped: {time.monotonic() - run.start:.0f} s, past the --budget of "
            f"{run.args.budget:.0f} s; the rows above are complete")
    write_outputs(run, command, out)
    os._exit(0)

if __name__ == "__main__":
    sys.exit(main())
