"""``jneox quantize``, ``jneox export`` and ``jneox eval``."""
from __future__ import annotations

import sys
import time

from ..checkpoint import save_quantized
from ..errors import UsageError
from ..evaluate import evaluate, format_table, write_json_atomic
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
        out = export_gguf(args.model, args.out, type=args.type, tokenizer=args.tokenizer)
        print(f"wrote {args.type} GGUF to {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    if args.task == "judge":
        return cmd_judge(args)
    model, tokenizer = load_from_args(args, eval_load_options(args.dtype, args.device))
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, args.task, args.data, num_fewshot=args.num_fewshot,
                      fewshot_data=args.fewshot_data, seed=args.seed, limit=args.limit, batch_rows=args.batch_rows,
                      text_field=args.text_field, stride=args.stride, progress=not args.no_progress)
    result["config"].update(model=str(model_or_default(args.model)), dtype=args.dtype,
                            seconds=round(time.perf_counter() - t0, 1))
    print(format_table([result]))
    if args.output:
        print(f"wrote {write_json_atomic(result, args.output)}", file=sys.stderr)
    return 0


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
    p.set_defaults(func=cmd_export)


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on JGLUE tasks (jp-stable harness prompts), perplexity, a YAML task or chat")
    p.add_argument("--task", required=True, help="jcommonsenseqa, jnli, marc_ja, jsquad (JGLUE's files), perplexity, "
                                                 "chat, or a .yaml spec of a multiple-choice task")
    p.add_argument("--data", nargs="+", required=True, help="the task's file (JGLUE: the validation split); perplexity: "
                                                             "text or JSONL files; chat: JSONL conversations")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default with --fewshot-data: rinna's 3, 3, 3, 2 "
                                                   "for jcommonsenseqa, jnli, marc_ja, jsquad; else 0)")
    p.add_argument("--fewshot-data", help="where few-shot examples come from (JGLUE: the training split)")
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
