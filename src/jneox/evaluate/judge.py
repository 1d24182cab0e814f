"""Judged generation (``jneox eval --task judge``): candidates answer a question file, an LLM judge grades them.

* Questions: :mod:`.questions` (MT-Bench's ``question.jsonl``, ELYZA-tasks-100, Rakuda).
* Candidates answer in-process through jneox (the card's prompt format and sampling, or greedy) or
  through any OpenAI-compatible ``/v1/chat/completions``; multi-turn questions are asked turn by turn.
* The judge is any OpenAI-compatible endpoint, asked with the published prompts (:mod:`.judge_prompts`):
  MT-Bench single-answer grading (every turn: single-v1 for the first, single-v1-multi-turn for the
  second, the ``math`` versions where the question has reference answers), ELYZA's 1-5 rubric, or
  pairwise (pair-v2), each pair judged in both orders: a win needs both orders to agree, else a tie.
  A reply whose verdict cannot be read strictly is asked again, up to ``retries`` times, then counted
  as a failure.
* Everything (answers, every judge reply) is kept in the results file, written after each step, so
  a rerun with the same ``--output`` answers and judges only what is missing.
* Reports: mean score per category with a seeded bootstrap 95% interval; win/tie/loss and
  Bradley-Terry ratings (Elo scale) for pairwise; a PNG chart beside the results file.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..chat import ChatSession
from ..errors import JneoxError, UsageError
from ..sampling import SamplingParams
from .judge_prompts import (ELYZA_RUBRIC, ELYZA_SCALE, MT_BENCH_SCALE, PAIR_MATH_V1, PAIR_MATH_V1_MULTI_TURN,
                            PAIR_V2, PAIR_V2_MULTI_TURN, SINGLE_MATH_V1, SINGLE_MATH_V1_MULTI_TURN, SINGLE_V1,
                            SINGLE_V1_MULTI_TURN, JudgePrompt, parse_bare_score, parse_rating, parse_verdict)
from .questions import Question
from .run import write_json_atomic

API_KEY_VARIABLES = ("JNEOX_JUDGE_API_KEY", "OPENAI_API_KEY")
CANDIDATE_KEY_VARIABLES = ("JNEOX_CANDIDATE_API_KEY", "OPENAI_API_KEY")
DEFAULT_RETRIES = 3
DEFAULT_TIMEOUT = 300.0
BOOTSTRAP_SAMPLES = 1000
ELO_SCALE, ELO_BASE = 400.0, 1000.0  # Chatbot Arena's: 400 points is a factor of 10 in the odds
TRANSIENT_HTTP = (408, 409, 429, 500, 502, 503, 504)
MODES = ("single", "pair")
RESULTS_TASK = "judge"


class JudgeError(JneoxError):
    """An endpoint that cannot be used (unreachable after retries, an answer that is not chat JSON)."""


# ---- endpoints ----------------------------------------------------------------------------------
def chat_url(base: str) -> str:
    """``/v1/chat/completions`` under an OpenAI base URL given with or without its ``/v1``."""
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"


def api_key(variables: Sequence[str]) -> str | None:
    """The first of ``variables`` set in the environment: keys never travel through flags (they would
    show in ``ps`` and shell history)."""
    return next((os.environ[v] for v in variables if os.environ.get(v)), None)


@dataclass
class ChatEndpoint:
    """One OpenAI-compatible chat completions endpoint, over the standard library's HTTP client."""

    url: str
    model: str
    key: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    attempts: int = 4  # tries for a transport error or a transient status, with doubling waits
    wait: float = 1.0

    def complete(self, messages: list[dict], **options) -> tuple[str | None, str | None]:
        """(reply text, None) or (None, error) for a request the server refused (a 4xx such as a prompt
        longer than its window: that item fails, the run goes on). Raises :class:`JudgeError` when the
        server cannot be reached or keeps failing."""
        body = json.dumps({"model": self.model, "messages": messages,
                           **{k: v for k, v in options.items() if v is not None}}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        url = chat_url(self.url)
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.wait * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=self.timeout) as r:
                    payload = r.read()
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code in TRANSIENT_HTTP:
                    problem = f"HTTP {e.code}: {detail}"
                    continue
                return None, f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                problem = str(getattr(e, "reason", e))
                continue
            try:
                message = json.loads(payload)["choices"][0]["message"]
                content = message.get("content")
            except (ValueError, KeyError, IndexError, TypeError):
                raise JudgeError(f"{url}: not an OpenAI chat completion: {payload[:200]!r}") from None
            return (content if isinstance(content, str) else ""), None
        raise JudgeError(f"{url}: no answer after {self.attempts} tries ({problem})")


# ---- candidates ---------------------------------------------------------------------------------
@dataclass
class Candidate:
    """A model under test: ``answer(turns, seed)`` returns its answer to each user turn in order."""

    name: str
    source: str  # what the results file records: a folder, hub id or URL (+ model name)
    answer: Callable[[Sequence[str], int], list[str]]


def local_candidate(name: str, source: str, load: Callable[[], tuple], params: SamplingParams) -> Candidate:
    """A model run in this process, asked in the card's format (:class:`jneox.chat.ChatSession`: history
    kept, a new ``ユーザー:`` turn stops the answer, the oldest turns dropped if the window is full).
    ``load()`` returns (model, tokenizer); it is called on the first answer only, so a resumed run whose
    answers are all cached loads nothing."""
    loaded: list = []

    def answer(turns: Sequence[str], seed: int) -> list[str]:
        if not loaded:
            loaded.extend(load())
        session = ChatSession(loaded[0], loaded[1], params.with_(seed=seed))
        return ["".join(session.ask(turn)).strip() for turn in turns]

    return Candidate(name, source, answer)


def remote_candidate(name: str, endpoint: ChatEndpoint, params: SamplingParams) -> Candidate:
    def answer(turns: Sequence[str], seed: int) -> list[str]:
        messages, out = [], []
        for turn in turns:
            messages.append({"role": "user", "content": turn})
            text, error = endpoint.complete(messages, temperature=params.temperature,
                                            max_tokens=params.max_new_tokens, seed=seed)
            if text is None:
                raise JudgeError(f"candidate {name} ({endpoint.url}): {error}")
            out.append(text.strip())
            messages.append({"role": "assistant", "content": out[-1]})
        return out

    return Candidate(name, f"{endpoint.url} model={endpoint.model}", answer)


# ---- judging ------------------------------------------------------------------------------------
def single_prompt(q: Question, turn: int) -> JudgePrompt:
    if q.shape == "elyza":
        return ELYZA_RUBRIC
    if turn == 0:
        return SINGLE_MATH_V1 if q.references else SINGLE_V1
    return SINGLE_MATH_V1_MULTI_TURN if q.references else SINGLE_V1_MULTI_TURN


def pair_prompt(q: Question, turn: int) -> JudgePrompt:
    if turn == 0:
        return PAIR_MATH_V1 if q.references else PAIR_V2
    return PAIR_MATH_V1_MULTI_TURN if q.references else PAIR_V2_MULTI_TURN


def judged_turns(q: Question) -> range:
    """MT-Bench grades the first two turns (its prompts have slots for two); ELYZA and Rakuda have one."""
    return range(min(len(q.turns), 2))


def _refs(q: Question) -> dict:
    refs = list(q.references) + [""] * (2 - len(q.references))
    return {"ref_answer_1": refs[0], "ref_answer_2": refs[1]}


def single_messages(q: Question, answers: Sequence[str], turn: int) -> tuple[JudgePrompt, list[dict]]:
    prompt = single_prompt(q, turn)
    fields = {"question": q.turns[0], "answer": answers[0], "eval_aspect": q.eval_aspect or "", **_refs(q)}
    if turn == 1:
        fields.update(question_1=q.turns[0], question_2=q.turns[1], answer_1=answers[0], answer_2=answers[1])
    return prompt, prompt.messages(**fields)


def pair_messages(q: Question, answers_a: Sequence[str], answers_b: Sequence[str], turn: int):
    prompt = pair_prompt(q, turn)
    fields = {"question": q.turns[0], "answer_a": answers_a[0], "answer_b": answers_b[0], **_refs(q)}
    if turn == 1:
        fields.update(question_1=q.turns[0], question_2=q.turns[1], answer_a_1=answers_a[0],
                      answer_a_2=answers_a[1], answer_b_1=answers_b[0], answer_b_2=answers_b[1])
    return prompt, prompt.messages(**fields)


def read_reply(prompt: JudgePrompt, reply: str):
    if prompt.kind == "pair":
        return parse_verdict(reply)
    return parse_bare_score(reply, ELYZA_SCALE) if prompt is ELYZA_RUBRIC else parse_rating(reply, MT_BENCH_SCALE)


def ask_judge(judge: ChatEndpoint, prompt: JudgePrompt, messages: list[dict], retries: int,
              max_tokens: int | None) -> dict:
    """One judgement: ``{"prompt", "verdict" (score, "A"/"B"/"C" or None), "replies", "error"?}``. An
    unreadable reply is asked again (the same request) up to ``retries`` more times."""
    replies = []
    for _ in range(retries + 1):
        reply, error = judge.complete(messages, temperature=0, max_tokens=max_tokens)
        if reply is None:
            return {"prompt": prompt.name, "verdict": None, "replies": replies, "error": error}
        replies.append(reply)
        verdict = read_reply(prompt, reply)
        if verdict is not None:
            return {"prompt": prompt.name, "verdict": verdict, "replies": replies}
    return {"prompt": prompt.name, "verdict": None, "replies": replies}


def pair_outcome(first: str | None, second: str | None) -> str | None:
    """The winner of a pair judged twice: ``first`` with the pair's own order (model 1 as A), ``second``
    with the two swapped. "1", "2", "tie", or None when either verdict is missing. Two verdicts that
    disagree (position bias) are a tie, as FastChat counts them."""
    if first is None or second is None:
        return None
    one = {"A": "1", "B": "2", "C": "tie"}[first]
    two = {"A": "2", "B": "1", "C": "tie"}[second]
    return one if one == two else "tie"


# ---- statistics ---------------------------------------------------------------------------------
def bootstrap_interval(values: Sequence[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: ``samples`` resamples with replacement, drawn with
    ``numpy.random.default_rng(seed).integers`` as one (samples, n) array."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    index = np.random.default_rng(seed).integers(0, x.size, size=(samples, x.size))
    means = x[index].mean(axis=1)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def bradley_terry(names: Sequence[str], games: Sequence[tuple[str, str, float]], prior: float = 0.0,
                  iterations: int = 10_000, tolerance: float = 1e-10) -> dict[str, float]:
    """Bradley-Terry strengths on the Elo scale (``1000 + 400 log10 p``, geometric mean 1000) by the
    MM algorithm (Hunter 2004). ``games``: (i, j, score of i: 1, 0.5 for a tie, 0). ``prior`` adds that
    many tied games between every two models, which keeps the estimate finite when a model never
    loses (with ``prior=0`` an undefeated model's rating does not converge)."""
    index = {n: k for k, n in enumerate(names)}
    m = len(names)
    wins = np.zeros((m, m))
    for a, b, score in games:
        wins[index[a], index[b]] += score
        wins[index[b], index[a]] += 1 - score
    if prior:
        wins += prior / 2 * (1 - np.eye(m))
    played = wins + wins.T
    p = np.ones(m)
    for _ in range(iterations):
        denominator = (played / (p[:, None] + p[None, :])).sum(axis=1)
        new = np.where(denominator > 0, wins.sum(axis=1) / np.where(denominator > 0, denominator, 1), p)
        new = new / np.exp(np.log(np.maximum(new, 1e-300)).mean())
        if np.max(np.abs(new - p)) < tolerance:
            p = new
            break
        p = new
    return {n: float(ELO_BASE + ELO_SCALE * math.log10(max(p[index[n]], 1e-300))) for n in names}


# ---- the run ------------------------------------------------------------------------------------
@dataclass
class JudgeRun:
    """Inputs of one run; see :func:`run_judge`."""

    questions: list[Question]
    candidates: list[Candidate]
    judge: ChatEndpoint
    mode: str = "single"
    retries: int = DEFAULT_RETRIES
    judge_max_tokens: int | None = None
    seed: int = 0
    data: str = ""
    decoding: dict = field(default_factory=dict)


def _load_previous(path: Path | None, run: JudgeRun) -> dict:
    if path is None or not path.exists():
        return {"answers": {}, "judgments": {}}
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot resume from it ({e}); use another --output") from None
    if not isinstance(previous, dict) or previous.get("task") != RESULTS_TASK:
        raise UsageError(f"{path}: not a judge results file; use another --output")
    sources = previous.get("config", {}).get("candidates", {})
    for c in run.candidates:
        if c.name in sources and sources[c.name] != c.source:
            raise UsageError(f"{path}: candidate {c.name} answered there as {sources[c.name]}, not {c.source}; "
                             f"give it another name or use another --output")
    return {"answers": previous.get("answers", {}), "judgments": previous.get("judgments", {})}


def run_judge(run: JudgeRun, output: str | os.PathLike | None = None, progress: bool = False,
              log=print) -> dict:
    """Answer (what is not cached), judge (what is not judged), and return the results dict, written to
    ``output`` after every step when given."""
    if run.mode not in MODES:
        raise UsageError(f"judge mode must be one of {MODES}, got {run.mode!r}")
    if run.mode == "pair" and len(run.candidates) < 2:
        raise UsageError("pairwise judging needs at least two candidates")
    if len({c.name for c in run.candidates}) != len(run.candidates):
        raise UsageError(f"candidate names must differ: {[c.name for c in run.candidates]}")
    if run.mode == "pair" and any(q.shape == "elyza" for q in run.questions):
        log("jneox: note: ELYZA-tasks-100 judged pairwise uses pair-v2 (ELYZA published a 1-5 rubric only)")
    path = Path(output) if output else None
    state = _load_previous(path, run)
    answers, judgments = state["answers"], state["judgments"]
    config = {"data": run.data, "mode": run.mode, "judge": {"url": run.judge.url, "model": run.judge.model},
              "retries": run.retries, "seed": run.seed, "decoding": run.decoding,
              "candidates": {c.name: c.source for c in run.candidates}}

    def save():
        if path is not None:
            write_json_atomic({"task": RESULTS_TASK, "config": config, "answers": answers,
                               "judgments": judgments}, path)

    for c in run.candidates:
        mine = answers.setdefault(c.name, {})
        for position, q in enumerate(run.questions):
            if q.id in mine:
                continue
            mine[q.id] = c.answer(q.turns, run.seed + position)
            save()
            if progress:
                log(f"answered {c.name} {q.id}")
    judge_name = run.judge.model
    for key, messages_for in _jobs(run, answers):
        if key in judgments and judgments[key].get("judge") == judge_name:
            continue
        prompt, messages = messages_for()
        judgments[key] = {"judge": judge_name, **ask_judge(run.judge, prompt, messages, run.retries,
                                                           run.judge_max_tokens)}
        save()
        if progress:
            log(f"judged {key}: {judgments[key]['verdict']}")
    result = {"task": RESULTS_TASK, "config": config, "metrics": summarize(run, judgments),
              "answers": answers, "judgments": judgments}
    if path is not None:
        write_json_atomic(result, path)
    return result


def _jobs(run: JudgeRun, answers: dict):
    """(results key, deferred (prompt, messages)) for every judgement the run needs."""
    for q in run.questions:
        for turn in judged_turns(q):
            if run.mode == "single":
                for c in run.candidates:
                    yield (f"single|{c.name}|{q.id}|{turn + 1}",
                           lambda q=q, c=c, turn=turn: single_messages(q, answers[c.name][q.id], turn))
            else:
                for a, b in itertools.combinations(run.candidates, 2):
                    for order, (x, y) in (("AB", (a, b)), ("BA", (b, a))):
                        yield (f"pair|{a.name}|{b.name}|{q.id}|{turn + 1}|{order}",
                               lambda q=q, x=x, y=y, turn=turn: pair_messages(q, answers[x.name][q.id],
                                                                              answers[y.name][q.id], turn))


def summarize(run: JudgeRun, judgments: dict) -> dict:
    """Single: per candidate, mean score per category and turn and overall, each with its bootstrap
    interval and count, and how many judgements failed. Pair: per pair win/tie/loss/failed, per model
    the same totals, and Bradley-Terry ratings."""
    if run.mode == "single":
        out = {}
        for c in run.candidates:
            groups: dict[str, list[float]] = {}
            failed = 0
            for q in run.questions:
                for turn in judged_turns(q):
                    verdict = judgments[f"single|{c.name}|{q.id}|{turn + 1}"]["verdict"]
                    if verdict is None:
                        failed += 1
                        continue
                    for group in ("all", f"category:{q.category}", f"turn:{turn + 1}"):
                        groups.setdefault(group, []).append(float(verdict))
            out[c.name] = {"failed": failed, **{g: _mean_with_interval(v, run.seed) for g, v in sorted(groups.items())}}
        return out
    names = [c.name for c in run.candidates]
    pairs, games = {}, []
    totals = {n: {"win": 0, "tie": 0, "loss": 0, "failed": 0} for n in names}
    for a, b in itertools.combinations(names, 2):
        counts = {"win": 0, "tie": 0, "loss": 0, "failed": 0}  # from a's side
        for q in run.questions:
            for turn in judged_turns(q):
                key = f"pair|{a}|{b}|{q.id}|{turn + 1}"
                outcome = pair_outcome(judgments[key + "|AB"]["verdict"], judgments[key + "|BA"]["verdict"])
                side = {"1": "win", "2": "loss", "tie": "tie", None: "failed"}[outcome]
                counts[side] += 1
                if outcome is not None:
                    games.append((a, b, {"1": 1.0, "2": 0.0, "tie": 0.5}[outcome]))
        pairs[f"{a} vs {b}"] = counts
        for k, v in counts.items():
            totals[a][k] += v
            totals[b][{"win": "loss", "loss": "win"}.get(k, k)] += v
    return {"pairs": pairs, "models": totals, "bradley_terry": bradley_terry(names, games, prior=1.0),
            "bradley_terry_prior_ties": 1.0}


def _mean_with_interval(values: Sequence[float], seed: int) -> dict:
    lo, hi = bootstrap_interval(values, seed)
    return {"mean": float(np.mean(values)), "ci95": [lo, hi], "n": len(values)}


# ---- reports ------------------------------------------------------------------------------------
def format_report(result: dict) -> str:
    metrics = result["metrics"]
    if result["config"]["mode"] == "single":
        lines = ["| candidate | group | mean | 95% CI | n |", "|---|---|---:|---|---:|"]
        for name, groups in metrics.items():
            for group, s in groups.items():
                if group != "failed":
                    lines.append(f"| {name} | {group} | {s['mean']:.2f} | {s['ci95'][0]:.2f}–{s['ci95'][1]:.2f} "
                                 f"| {s['n']} |")
            lines.append(f"| {name} | failed judgements | {groups['failed']} | | |")
        return "\n".join(lines)
    lines = ["| pair | win | tie | loss | failed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {p} | {c['win']} | {c['tie']} | {c['loss']} | {c['failed']} |" for p, c in metrics["pairs"].items()]
    lines += ["", "| model | win | tie | loss | failed | Bradley-Terry (Elo scale) |", "|---|---:|---:|---:|---:|---:|"]
    for name, c in metrics["models"].items():
        lines.append(f"| {name} | {c['win']} | {c['tie']} | {c['loss']} | {c['failed']} | "
                     f"{metrics['bradley_terry'][name]:.0f} |")
    return "\n".join(lines)


def write_chart(result: dict, path: str | os.PathLike) -> Path | None:
    """A PNG of the run: mean score per category with its interval (single), or win/tie/loss per pair.
    None (and a note) when matplotlib, an optional dependency (the ``train`` extra), is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("jneox: note: no chart: matplotlib is not installed (pip install 'jneox[train]')", file=sys.stderr)
        return None
    metrics = result["metrics"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if result["config"]["mode"] == "single":
        names = list(metrics)
        groups = sorted({g for m in metrics.values() for g in m if g not in ("failed",)})
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            xs = [i + k * width for i in range(len(groups))]
            stats = [metrics[name].get(g) for g in groups]
            means = [s["mean"] if s else 0 for s in stats]
            errors = [[s["mean"] - s["ci95"][0] if s else 0 for s in stats],
                      [s["ci95"][1] - s["mean"] if s else 0 for s in stats]]
            ax.bar(xs, means, width, yerr=errors, capsize=3, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(groups))], groups, rotation=30, ha="right")
        ax.set_ylabel("mean judge score (95% bootstrap interval)")
    else:
        labels = list(metrics["pairs"])
        bottom = np.zeros(len(labels))
        for side in ("win", "tie", "loss", "failed"):
            values = np.array([metrics["pairs"][p][side] for p in labels], dtype=float)
            ax.barh(labels, values, left=bottom, label=side)
            bottom += values
        ax.set_xlabel("judged turns (first model's win / tie / loss)")
    ax.set_title(f"judge: {result['config']['judge']['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
