"""lm-evaluation-harness against `jneox serve`, with the prefix cache on and off.

lm-eval's ``local-completions`` model scores a multiple-choice task by sending each choice of a document
as a prompt of its own (the few-shot context, then the choice), asking for every prompt token's
log-probability (``echo``). A document's choices share its context, which the prefix cache computes
once. This runs one few-shot task (JCommonsenseQA, ``tests/data/eval/jcommonsenseqa*.jsonl``, in the
jp-stable harness's 0.4 prompt for rinna's instruction models, as ``jneox eval`` builds it: the
description, ``--shots`` examples of the train file, then the question with its choices listed) through
lm-eval itself against a server started here, once with ``--prefix-cache-mb`` and once with 0, and
prints the wall time of each run (after a warm-up request, and a one-document lm-eval run first) and whether every per-choice log-likelihood came out the same.

    python benchmarks/lm_eval_serve.py --layers 4 --dtype int8 --threads 1
    python benchmarks/lm_eval_serve.py --layers 36 --dtype int8 --threads 1
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from jneox.chat import NL, SYSTEM, USER

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import launch_server, one_request_warmup, server_counters  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "eval"


def task_config(shots: int) -> dict:
    """The task in lm-eval's own YAML shape (as a dict): the choices follow the context with no delimiter."""
    question = f"{USER}: 質問：{{{{question}}}}{NL}選択肢：{NL}" + NL.join(f"- {{{{choice{i}}}}}" for i in range(5))
    return {"task": "jneox_jcqa_fewshot", "dataset_path": "json",
            "description": f"{USER}: 与えられた選択肢の中から、最適な答えを選んでください。{NL}{SYSTEM}: 分かりました。{NL}",
            "dataset_kwargs": {"data_files": {"train": str(DATA / "jcommonsenseqa_train.jsonl"),
                                              "test": str(DATA / "jcommonsenseqa.jsonl")}},
            "training_split": "train", "test_split": "test", "fewshot_split": "train", "num_fewshot": shots,
            "output_type": "multiple_choice", "doc_to_text": f"{question}{NL}{SYSTEM}: ",
            "doc_to_choice": "{{[choice0, choice1, choice2, choice3, choice4]}}", "doc_to_target": "label",
            "target_delimiter": "", "fewshot_delimiter": NL,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def run(url: str, shots: int, window: int, limit: int | None = None) -> tuple[float, list, float]:
    """One lm-eval run (of the first ``limit`` documents): its wall time, every sample's per-choice
    log-likelihoods (by doc), the accuracy."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        task_manager=TaskManager(include_defaults=False), model="local-completions",
        model_args={"base_url": url + "/v1/completions", "model": "bench", "tokenizer_backend": "remote",
                    "max_length": window},
        tasks=[task_config(shots)], log_samples=True, bootstrap_iters=0, limit=limit)
    wall = time.perf_counter() - t0
    samples = sorted(results["samples"]["jneox_jcqa_fewshot"], key=lambda s: s["doc_id"])
    return wall, [[r[0] for r in s["filtered_resps"]] for s in samples], results["results"]["jneox_jcqa_fewshot"]["acc,none"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: random weights of the 3.6B shape, --layers)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", default="int8")
    p.add_argument("--threads", type=int)
    p.add_argument("--shots", type=int, default=3)
    p.add_argument("--prefix-cache-mb", type=float, default=2048)
    p.add_argument("--max-batch", type=int, default=4, help="the server's --max-batch (lm-eval sends one request at a time)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("JNEOX_BENCH_DIR", "~/.cache/jneox/bench")))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lm-eval-datasets-"))
    if args.model:
        model = args.model
    else:
        from decode_speed import bench_checkpoint  # here: the client side of this script never needs torch

        model = str(bench_checkpoint(args.work, args.layers))
    opts = ["--model", model, "--dtype", args.dtype, "--model-name", "bench", "--log-level", "warning",
            "--max-batch", str(args.max_batch)]
    opts += ["--threads", str(args.threads)] if args.threads else []
    rows = {}
    for mb in (0, args.prefix_cache_mb):
        proc, url = launch_server([*opts, "--prefix-cache-mb", f"{mb:g}"])
        try:
            window = httpx.get(url + "/v1/models", timeout=30).json()["data"][0].get("max_model_len", 2048)
            asyncio.run(one_request_warmup(url, {}))  # the server's first-call costs stay out of the timing
            if mb == 0:  # so do lm-eval's (imports, reading the data set): the uncached server is run first
                run(url, args.shots, window, limit=1)
            before = server_counters(url)
            rows[mb] = (*run(url, args.shots, window), before, server_counters(url))
        finally:
            proc.terminate()
            proc.wait(30)
    (t_on, on, acc_on, b_on, a_on), (t_off, off, acc_off, _, _) = rows[args.prefix_cache_mb], rows[0]
    queried = a_on["prefix_query_tokens"] - b_on["prefix_query_tokens"]
    hit = a_on["prefix_hit_tokens"] - b_on["prefix_hit_tokens"]
    what = args.model or f"random weights, 3.6B shape with {args.layers} layers"
    print(f"\nlm-eval local-completions against jneox serve ({what}, --dtype {args.dtype}, --threads "
          f"{args.threads or 'default'}); {len(on)} documents x 5 choices, {args.shots}-shot\n")
    print("| prefix cache | lm-eval wall time (s) | prompt tokens from the cache | acc | speed-up |")
    print("|---|---:|---:|---:|---:|")
    print(f"| off | {t_off:.1f} | - | {acc_off:.3f} | 1.0x |")
    print(f"| on ({args.prefix_cache_mb:g} MB) | {t_on:.1f} | {hit} of {queried} | {acc_on:.3f} | {t_off / t_on:.1f}x |")
    print(f"\nper-choice log-likelihoods identical with the cache on and off: {'yes' if on == off else 'NO'}")
    if on != off:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
