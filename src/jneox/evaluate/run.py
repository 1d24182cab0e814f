"""Running a task: prompts, scoring or generation, metrics, per-sample records, results JSON, a table."""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from ..files import staged_file
from ..generate import generate_tokens
from ..sampling import SamplingParams
from ..train.data import DataError, read_conversations, read_documents
from . import metrics
from .chat import RULES, evaluate_chat
from .score import rolling_nll, score_ids, tqdm_progress
from .tasks import TASKS, Doc, FewshotSampler, Task, get_task, harness_decode


def evaluate(model, tokenizer, task: str | Task, data: str | os.PathLike | Sequence, *, num_fewshot: int | None = None,
             fewshot_data: str | os.PathLike | None = None, seed: int = 42, limit: int | None = None,
             batch_rows: int = 16, text_field: str = "text", stride: int | None = None, progress: bool = False) -> dict:
    """Evaluate ``model`` on one task and return ``{"task", "metrics", "config", "samples"}``.

    ``task``: a name of :data:`~jneox.evaluate.tasks.TASKS` (the harness's ``jnli-1.1-0.4`` and the
    like, or a short name), a custom task's YAML spec (or a :class:`Task`), perplexity (``data``:
    text or JSONL files) or chat (``data``: JSONL conversations). A harness task's documents are
    shuffled with ``random.Random(seed)`` and the first ``limit`` kept; few-shot examples come from
    ``fewshot_data`` drawn from that same generator, as the jp-stable harness does (``num_fewshot``
    defaults to rinna's setting for the task when ``fewshot_data`` is given, else 0).
    """
    if task == "perplexity":
        return evaluate_perplexity(model, tokenizer, data, text_field=text_field, stride=stride, limit=limit,
                                   batch_rows=batch_rows)
    if task == "chat":
        conversations = read_conversations(data)[:limit] if limit else read_conversations(data)
        bar, step = tqdm_progress(2 * len(conversations), "chat", progress)
        result = evaluate_chat(model, tokenizer, conversations, seed=seed, progress=step)
        if bar:
            bar.close()
        samples = {k: result[k].pop("answers") for k in ("greedy", "sampling")}
        flat = {"response_perplexity": result["response_perplexity"],
                **{f"{k}_{m}": result[k][m] for k in ("greedy", "sampling") for m in ("compliant", *RULES)}}
        return {"task": "chat", "metrics": flat, "config": {"data": _paths(data), "seed": seed, "limit": limit,
                                                            "response_tokens": result["response_tokens"]},
                "samples": [dict(decoding=k, **a) for k, answers in samples.items() for a in answers]}
    requested = task
    task = get_task(task) if not isinstance(task, Task) else task
    name = str(requested) if str(requested) in TASKS else task.name  # a harness.sh name stays as given
    docs = [d for path in ([data] if isinstance(data, (str, os.PathLike)) else data) for d in task.read(path)]
    if num_fewshot is None:
        num_fewshot = task.default_fewshot if fewshot_data else 0
    if num_fewshot and not task.has_fewshot:
        raise UsageError(f"{name} is zero-shot (its source has no training split): use --num-fewshot 0")
    if num_fewshot and not fewshot_data:
        raise UsageError(f"{name}: {num_fewshot}-shot needs --fewshot-data (the training split), or use "
                         f"--num-fewshot 0")
    rnd = random.Random(seed)
    rnd.shuffle(docs)
    docs = docs[:limit] if limit else docs
    sampler = FewshotSampler(task, task.read(fewshot_data) if num_fewshot else [], rnd)
    contexts = [task.context(d, sampler.draw(num_fewshot)) for d in docs]
    config = {"data": _paths(data), "fewshot_data": str(fewshot_data) if fewshot_data else None,
              "num_fewshot": num_fewshot, "seed": seed, "limit": limit, "documents": len(docs)}
    if task.kind == "generation":
        samples, scores = _generate_answers(model, tokenizer, task, docs, contexts, progress)
        return {"task": name, "metrics": scores, "config": config, "samples": samples}
    pairs = []
    for doc, context in zip(docs, contexts):
        for ctx, choice in task.requests(doc, context):
            # an empty context is </s>, the harness's end-of-text context
            pairs.append((task.encode(tokenizer, ctx) if ctx else [tokenizer.eos_id], task.encode(tokenizer, choice)))
    bar, step = tqdm_progress(len(pairs), name, progress)
    lls = score_ids(model, pairs, batch_rows=batch_rows, progress=step)
    if bar:
        bar.close()
    samples = []
    start = 0
    for doc, context in zip(docs, contexts):
        ll = lls[start : start + len(doc.choices)]
        start += len(doc.choices)
        pred, pred_norm = metrics.choice_predictions(ll, doc.choices)
        samples.append({"source": doc.source, "id": doc.id, "context": context, "choices": doc.choices,
                        "loglikelihoods": ll, "prediction": pred, "prediction_norm": pred_norm, "gold": doc.gold})
    return {"task": name, "metrics": task.choice_metrics(samples), "config": config, "samples": samples}


def evaluate_tasks(model, tokenizer, runs: Sequence[dict], *, seed: int = 42, limit: int | None = None,
                   batch_rows: int = 16, progress: bool = False) -> dict:
    """Several tasks in one results document, as the harness's ``--tasks a,b --num_fewshot 3,2`` run:
    ``runs`` holds per task ``{"task", "data", "fewshot_data", "num_fewshot"}`` (see :func:`evaluate`).
    Returns ``{"results": {task: metrics}, "versions": {task: version}, "config", "tasks": [each
    task's full result]}``."""
    done = []
    for run in runs:
        done.append(evaluate(model, tokenizer, run["task"], run["data"], num_fewshot=run.get("num_fewshot"),
                             fewshot_data=run.get("fewshot_data"), seed=seed, limit=limit, batch_rows=batch_rows,
                             progress=progress))
    versions = {}
    for run, result in zip(runs, done):
        task = run["task"] if isinstance(run["task"], Task) else get_task(run["task"])
        versions[result["task"]] = task.version
    return {"results": {r["task"]: r["metrics"] for r in done}, "versions": versions,
            "config": {"tasks": [r["task"] for r in done], "num_fewshot": [r["config"]["num_fewshot"] for r in done],
                       "seed": seed, "limit": limit},
            "tasks": done}


def _paths(data) -> list[str] | str:
    return [str(p) for p in data] if isinstance(data, (list, tuple)) else str(data)


def greedy_answer(model, tokenizer, task: Task, context: str, max_new_tokens: int) -> str:
    """What the harness's ``greedy_until`` returns: greedy tokens after ``context`` until the first
    stop string's last token (included) or ``max_new_tokens``, decoded as the harness's tokenizer
    decoded them, cut before the first occurrence of each stop string. The context keeps its last
    tokens if it would not fit with them (the harness keeps ``context[max_gen_toks - max_length:]``)."""
    window = model.config.max_position_embeddings
    ids = task.encode(tokenizer, context)[-(window - max_new_tokens):]
    # the slow T5Tokenizer reads "</s>" in text as the end-of-text id; sentencepiece alone would not
    stop = tokenizer.eos_id if task.until[0] == "</s>" else task.encode(tokenizer, task.until[0])[-1]
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    out = list(generate_tokens(model, ids, params, eos_id=stop, vocab_size=tokenizer.vocab_size))
    text = harness_decode(tokenizer, out)
    for term in task.until:
        text = text.split(term)[0]
    return text


def _generate_answers(model, tokenizer, task: Task, docs: Sequence[Doc], contexts: Sequence[str], progress: bool):
    task.check_tools()
    window = model.config.max_position_embeddings
    bar, step = tqdm_progress(len(docs), task.name, progress)
    samples = []
    for doc, context in zip(docs, contexts):
        budget = min(task.max_new_tokens(doc, tokenizer), window - 1)  # at least one context token stays
        context = task.fit(context, tokenizer, window - budget)
        text = greedy_answer(model, tokenizer, task, context, budget)
        samples.append({"source": doc.source, "id": doc.id, "context": context, "generated": text,
                        "references": doc.answers, **task.score(doc, text, tokenizer)})
        if step:
            step(1)
    if bar:
        bar.close()
    return samples, task.aggregate(samples)


def evaluate_perplexity(model, tokenizer, data, text_field: str = "text", stride: int | None = None,
                        limit: int | None = None, batch_rows: int = 8) -> dict:
    """Token perplexity, bits per UTF-8 byte and token count of text files or JSONL documents.

    Each document is scored on its own, its first token predicted after ``</s>`` (lm-eval's rolling
    log-likelihood with the end-of-text token as prefix); long ones in windows (see :func:`rolling_nll`).
    Bits per byte divides the summed NLL (in bits) by the documents' UTF-8 bytes, so models with
    different tokenizers compare.
    """
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    documents = list(read_documents(paths, text_field))
    documents = documents[:limit] if limit else documents
    total_nll, tokens, n_bytes, samples = 0.0, 0, 0, []
    for text in documents:
        ids = tokenizer.encode(text)
        if not ids:
            continue
        nll = rolling_nll(model, ids, tokenizer.eos_id, stride=stride, batch_rows=batch_rows)
        size = len(text.encode("utf-8"))
        total_nll, tokens, n_bytes = total_nll + nll, tokens + len(ids), n_bytes + size
        samples.append({"tokens": len(ids), "bytes": size, "nll": nll})
    if not tokens:
        raise DataError(_paths(data), None, "no text to score")
    scores = {"token_perplexity": math.exp(total_nll / tokens), "bits_per_byte": total_nll / math.log(2) / n_bytes,
              "tokens": tokens, "bytes": n_bytes, "documents": len(samples)}
    return {"task": "perplexity", "metrics": scores,
            "config": {"data": _paths(data), "text_field": text_field, "stride": stride, "limit": limit},
            "samples": samples}


# ---- output -------------------------------------------------------------------------------------
def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same folder and a rename:
    a reader never sees half a file, and an error leaves any previous file as it was."""
    with staged_file(path) as partial:
        with open(partial, "w", encoding="utf-8") as writer:
            json.dump(obj, writer, ensure_ascii=False, indent=1)
    return Path(path)


def format_table(results: Sequence[dict]) -> str:
    """One line per task and metric, as a Markdown table."""
    lines = ["| task | metric | value |", "|---|---|---|"]
    for r in results:
        for name, value in r["metrics"].items():
            shown = "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
            lines.append(f"| {r['task']} | {name} | {shown} |")
    return "\n".join(lines)
