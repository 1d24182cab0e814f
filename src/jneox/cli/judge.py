"""``jneox eval --task judge``: its flags (one block, added to the eval parser) and the command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from ..evaluate.judge import (API_KEY_VARIABLES, CANDIDATE_KEY_VARIABLES, DEFAULT_RETRIES, DEFAULT_TIMEOUT, MODES,
                              ChatEndpoint, JudgeRun, api_key, format_report, local_candidate, remote_candidate,
                              run_judge, write_chart)
from ..evaluate.questions import read_questions
from ..sampling import SamplingParams
from ..loading import load, load_options, model_or_default
from .args import MAX_NEW_TOKENS, at_least, load_from_args

URL_PREFIXES = ("http://", "https://")


def add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judged generation (--task judge; --data: an MT-Bench question.jsonl, ELYZA-tasks-100 "
                             "CSV/JSONL or Rakuda questions)")
    g.add_argument("--judge-url", help="the judge: an OpenAI-compatible base URL, e.g. https://api.openai.com/v1 "
                                       f"(API key from ${API_KEY_VARIABLES[0]} or ${API_KEY_VARIABLES[1]})")
    g.add_argument("--judge-model", help="the judge's model name, sent with each request")
    g.add_argument("--judge-mode", choices=MODES, default="single",
                   help="single: a score per answer (MT-Bench 1-10, ELYZA 1-5); pair: every two candidates "
                        "compared, in both orders (default: single)")
    g.add_argument("--judge-retries", type=at_least(0), default=DEFAULT_RETRIES,
                   help=f"asks again after an unreadable verdict, then counts a failure (default: {DEFAULT_RETRIES})")
    g.add_argument("--judge-max-tokens", type=at_least(1), help="the judge's max_tokens (default: the server's)")
    g.add_argument("--judge-timeout", type=at_least(1, float), default=DEFAULT_TIMEOUT,
                   help=f"seconds per request (default: {DEFAULT_TIMEOUT:g})")
    g.add_argument("--candidate", action="append", default=[], metavar="NAME=MODEL",
                   help="a model under test (may be repeated): a checkpoint folder or hub id run here (as "
                        "--dtype/--device say), or an http(s) URL of an OpenAI-compatible server")
    g.add_argument("--candidate-url", action="append", default=[],
                   help="an OpenAI-compatible server under test (may be repeated; key from "
                        f"${CANDIDATE_KEY_VARIABLES[0]} or ${CANDIDATE_KEY_VARIABLES[1]})")
    g.add_argument("--candidate-model", action="append", default=[],
                   help="the model name sent to each --candidate-url, in the same order (default: jneox)")
    g.add_argument("--greedy", action="store_true", help="candidates answer greedily (default: the card's sampling)")
    g.add_argument("--answer-max-tokens", type=at_least(1), default=MAX_NEW_TOKENS,
                   help=f"tokens per candidate answer (default: {MAX_NEW_TOKENS}, the card's)")


def cmd_judge(args) -> int:
    if not args.judge_url or not args.judge_model:
        raise UsageError("--task judge needs --judge-url and --judge-model")
    if len(args.data) != 1:
        raise UsageError(f"--task judge reads one question file, got {len(args.data)}")
    if args.candidate_model and len(args.candidate_model) != len(args.candidate_url):
        raise UsageError(f"{len(args.candidate_model)} --candidate-model for {len(args.candidate_url)} --candidate-url")
    questions = read_questions(args.data[0])
    questions = questions[: args.limit] if args.limit else questions
    params = SamplingParams(temperature=0.0 if args.greedy else SamplingParams.temperature,
                            max_new_tokens=args.answer_max_tokens)
    candidates = []
    if args.model is not None or not (args.candidate or args.candidate_url):
        source = str(model_or_default(args.model))
        candidates.append(local_candidate(Path(source).name or source, source, lambda: load_from_args(args), params))
    for spec in args.candidate:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise UsageError(f"--candidate must be NAME=MODEL, got {spec!r}")
        if source.startswith(URL_PREFIXES):
            candidates.append(remote_candidate(name, _candidate_endpoint(args, source, "jneox"), params))
        else:
            options = load_options(args.dtype, args.device)
            candidates.append(local_candidate(name, source, lambda s=source, o=options: load(s, **o), params))
    for k, url in enumerate(args.candidate_url):
        model = args.candidate_model[k] if args.candidate_model else "jneox"
        candidates.append(remote_candidate(f"{model}@{url}", _candidate_endpoint(args, url, model), params))
    judge = ChatEndpoint(args.judge_url, args.judge_model, key=api_key(API_KEY_VARIABLES), timeout=args.judge_timeout)
    run = JudgeRun(questions, candidates, judge, mode=args.judge_mode, retries=args.judge_retries,
                   judge_max_tokens=args.judge_max_tokens, seed=args.seed, data=str(args.data[0]),
                   decoding={"temperature": params.temperature, "max_new_tokens": params.max_new_tokens})
    result = run_judge(run, args.output, progress=not args.no_progress,
                       log=lambda text: print(text, file=sys.stderr))
    print(format_report(result))
    if args.output:
        print(f"wrote {args.output}", file=sys.stderr)
        chart = write_chart(result, Path(args.output).with_suffix(".png"))
        if chart:
            print(f"wrote {chart}", file=sys.stderr)
    return 0


def _candidate_endpoint(args, url: str, model: str) -> ChatEndpoint:
    return ChatEndpoint(url, model, key=api_key(CANDIDATE_KEY_VARIABLES), timeout=args.judge_timeout)
