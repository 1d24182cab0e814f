"""``jneox quantize``, ``jneox export`` and ``jneox eval``."""
from __future__ import annotations

import sys
import time

from ..checkpoint import save_quantized
from ..errors import UsageError
from ..evaluate import TASKS, evaluate, evaluate_tasks, format_table, get_task, write_json_atomic
from ..evaluate.tasks import split_file
from ..export.gguf import TOKENIZER_MODELS, TYPES, export_gguf
from ..export.tokenizer_json import export_hf
from ..files import TOKENIZER_CONFIG, TOKENIZER_JSON, check_replaceable
from ..hub import resolve
from ..loading import eval_load_options, load_model, load_tokenizer, model_or_default
from ..quantize import FORMATS
from .args import OVERWRITE_HELP, add_model_args, load_from_args
from .judge import add_judge_args, cmd_judge


def cmd_quantize(args) -> int:
    check_replaceable(args.out, args.overwrite)  # before minutes of loading
    folder = resolve(args.model)
    tokenizer = load_tokenizer(folder)
    t0 = time.perf_counter()
    model = load_model(folder, weights=args.dtype)
    out = save_quantized(model, args.out, tokenizer_file=tokenizer.path, overwrite=args.overwrite)
    print(f"wrote {args.dtype} checkpoint to {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_export(args) -> int:
    t0 = time.perf_counter()
    if args.format == "hf":
        out = export_hf(args.model, args.out)
        print(f"wrote {TOKENIZER_JSON} and {TOKENIZER_CONFIG} to {out}", file=sys.stderr)
    else:
        if not args.out:
            raise UsageError("--format gguf needs --out FILE.gguf")
        out = export_gguf(args.model, args.out, type=args.type, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"wrote {args.type} GGUF to {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    if args.task == "judge":
        return cmd_judge(args)
    # usage errors before minutes of loading
    runs = _eval_runs(args, args.tasks) if args.tasks else None
    if args.task and len(args.fewshot_data or []) > 1:
        raise UsageError("--task takes one --fewshot-data file")
    if runs is None and not args.data:
        _fewshot_count(args.num_fewshot)
        if not (args.data_dir and args.task in TASKS):
            raise UsageError(f"--task {args.task}: give --data FILE (or --data-dir DIR for a task of the harness)")
        runs = _eval_runs(args, args.task)
    model, tokenizer = load_from_args(args, eval_load_options(args.dtype, args.device))
    t0 = time.perf_counter()
    if args.task:
        run = runs[0] if runs else {"task": args.task, "data": args.data, "num_fewshot": _fewshot_count(args.num_fewshot),
                                    "fewshot_data": (args.fewshot_data or [None])[0]}
        result = evaluate(model, tokenizer, run["task"], run["data"], num_fewshot=run["num_fewshot"],
                          fewshot_data=run["fewshot_data"], seed=args.seed, limit=args.limit,
                          batch_rows=args.batch_rows, text_field=args.text_field, stride=args.stride,
                          progress=not args.no_progress)
        tables = [result]
    else:
        result = evaluate_tasks(model, tokenizer, runs, seed=args.seed, limit=args.limit, batch_rows=args.batch_rows,
                                progress=not args.no_progress)
        tables = result["tasks"]
    result["config"].update(model=str(model_or_default(args.model)), dtype=args.dtype,
                            seconds=round(time.perf_counter() - t0, 1))
    print(format_table(tables))
    if args.output:
        print(f"wrote {write_json_atomic(result, args.output)}", file=sys.stderr)
    return 0


def _fewshot_count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--num-fewshot {text!r}: expected a number (a comma list goes with --tasks)") from None


def _task_files(values, flag: str, names: list[str]) -> dict[str, str]:
    files = {}
    for value in values or []:
        task, sep, path = value.partition("=")
        if not sep or task not in names:
            raise UsageError(f"{flag} {value!r}: with --tasks, give TASK=FILE for one of {', '.join(names)}")
        files[task] = path
    return files


def _eval_runs(args, tasks: str) -> list[dict]:
    """The tasks of ``--tasks a,b --num-fewshot 3,2`` (a harness.sh line), each with its files."""
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    if not names:
        raise UsageError("--tasks: no task named")
    tasks = [get_task(n) for n in names]
    if args.num_fewshot is None:
        counts = [None] * len(names)
    else:
        try:
            counts = [int(c) for c in args.num_fewshot.split(",")]
        except ValueError:
            raise UsageError(f"--num-fewshot {args.num_fewshot!r}: expected numbers separated by commas") from None
        if len(counts) == 1:
            counts *= len(names)
        if len(counts) != len(names):
            raise UsageError(f"--num-fewshot has {len(counts)} numbers for {len(names)} tasks")
    data = _task_files(args.data, "--data", names)
    fewshot = _task_files(args.fewshot_data, "--fewshot-data", names)
    runs = []
    for name, task, k in zip(names, tasks, counts):
        if name not in data and not args.data_dir:
            raise UsageError(f"{name}: no data: give --data-dir DIR or --data {name}=FILE")
        path = data.get(name) or split_file(task, args.data_dir, task.split)
        shots = k if k is not None else (task.default_fewshot if task.has_fewshot else 0)
        train = fewshot.get(name) or (split_file(task, args.data_dir, "train") if shots and args.data_dir else None)
        runs.append({"task": name, "data": path, "fewshot_data": train, "num_fewshot": shots})
    return runs


def add_quantize_parser(sub) -> None:
    p = sub.add_parser("quantize", help="save a checkpoint packed as bfloat16/int8/int4, to load without conversion")
    p.add_argument("--model", "-m", required=True, help="float checkpoint folder or hub id")
    p.add_argument("--dtype", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_quantize)


def add_export_parser(sub) -> None:
    p = sub.add_parser("export", help=f"for other tools: {TOKENIZER_JSON} for transformers (hf) or a GGUF file for llama.cpp")
    p.add_argument("--format", required=True, choices=("hf", "gguf"))
    p.add_argument("--model", "-m", required=True, help="checkpoint folder or hub id")
    p.add_argument("--out", help="hf: a new folder (default: update --model in place); gguf: the .gguf file")
    p.add_argument("--type", default="f16", choices=TYPES, help="gguf weights (default: f16)")
    p.add_argument("--tokenizer", default="ugm", choices=tuple(TOKENIZER_MODELS),
                   help="llama.cpp tokenizer written into the gguf (default: ugm, the closer to sentencepiece)")
    p.add_argument("--overwrite", action="store_true", help="gguf: replace an existing --out that is not a GGUF file")
    p.set_defaults(func=cmd_export)


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on the jp-stable harness's Japanese tasks (JGLUE, JAQKET, XL-Sum, "
                                    "XWinograd, MGSM), perplexity, a YAML task or chat")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help=f"one task: {', '.join(TASKS)}, perplexity, chat, judge (LLM-judged answers), or a .yaml spec of a "
                                      "multiple-choice task")
    which.add_argument("--tasks", help="several tasks in one results JSON, comma-separated as in a harness.sh line "
                                       "(jcommonsenseqa-1.1-0.4,jnli-1.1-0.4,...)")
    p.add_argument("--data", nargs="+", help="--task: the task's file(s) (JGLUE: the validation split); perplexity: "
                                             "text or JSONL files; chat: JSONL conversations. --tasks: TASK=FILE "
                                             "for any task not found in --data-dir")
    p.add_argument("--data-dir", help="--tasks: a folder with one subfolder per task (its short name: jnli, "
                                      "jsquad, ...) holding the split files under their published names or as "
                                      "HF datasets JSON lines (validation.jsonl / test.jsonl, train.jsonl); "
                                      "see docs/evaluation.md")
    p.add_argument("--num-fewshot", help="few-shot examples; with --tasks a comma list, one per task (default with "
                                         "few-shot data: rinna's 3,3,3,2,1,1,0,5; else 0)")
    p.add_argument("--fewshot-data", nargs="+", help="where few-shot examples come from (the training split); "
                                                     "--tasks: TASK=FILE (default: train files in --data-dir)")
    p.add_argument("--seed", type=int, default=42, help="shuffles the documents and draws few-shot examples (default: 42, the harness's)")
    p.add_argument("--limit", type=int, help="evaluate only the first N (shuffled) documents")
    p.add_argument("--output", "-o", help="results JSON: metrics, and per sample the choices' log-likelihoods, "
                                          "prediction and gold (generation: text and references)")
    p.add_argument("--text-field", default="text", help="perplexity: the JSONL text field (default: text)")
    p.add_argument("--stride", type=int, help="perplexity: tokens a window advances for long documents (default: the window)")
    p.add_argument("--batch-rows", type=int, default=16, help="choices scored together (default: 16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_judge_args(p)
    p.set_defaults(func=cmd_eval)
