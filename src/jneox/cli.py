"""The ``jneox`` command: a thin layer over the library (every command is a few calls into jneox.*)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .checkpoint import OFFICIAL_MODEL  # (importing jneox imports torch and these modules anyway)
from .quantize import FORMATS
from .speculative import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS

DTYPES = (*FORMATS, "float16")  # the packed CPU formats, and float16 for plain PyTorch
OVERWRITE_HELP = ("replace OUT even if it is not a jneox checkpoint folder, deleting everything in it (without it, "
                  "OUT may be new, empty, or hold only a previous jneox checkpoint or run, which is replaced atomically)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="checkpoint folder (config.json, weights, spiece.model) or hub id, "
                                         "e.g. rinna/japanese-gpt-neox-3.6b-instruction-sft")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights: float32 (default), bfloat16, int8 or int4 run on jneox's CPU kernels; "
                        "float16 (and every dtype on --device cuda) runs plain PyTorch")
    p.add_argument("--device", default="cpu", help="cpu (default) or a torch device such as cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default: 0.7, the card's)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=128, help="default: 128, the card's")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (may be repeated)")
    _add_speculate_args(p)


def _add_speculate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", metavar="lookup|DRAFT", help="speculative decoding, same output, fewer passes: "
                   "'lookup' guesses tokens copied from the context; a folder or hub id names a smaller draft "
                   "model with the same tokenizer")
    p.add_argument("--draft-tokens", type=_at_least(1, hi=MAX_DRAFT_TOKENS), default=DEFAULT_DRAFT_TOKENS,
                   help=f"guesses checked per pass, 1 to {MAX_DRAFT_TOKENS} (default: {DEFAULT_DRAFT_TOKENS})")


def _params(args):
    from .generate import SamplingParams

    return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, stop=tuple(args.stop))


def _load(args, **options):
    """The model and tokenizer of --model (the demo model without it); ``options`` replace the
    load options that --dtype/--device give."""
    import torch

    from .checkpoint import CheckpointError, default_model, load
    from .errors import UsageError

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    target = args.model
    if target is None:
        target = default_model()
        if target is None:
            raise CheckpointError(f"no --model given. Pass a checkpoint folder or a hub id, e.g. "
                                  f"--model {OFFICIAL_MODEL}")
        print(f"jneox: no --model given: using the small demo model in {target} (a pipeline demo, not a useful "
              f"assistant); for the real one: --model {OFFICIAL_MODEL}", file=sys.stderr)
    return load(target, **(options or load_options(args.dtype, args.device)))


def _draft(args, tokenizer):
    """--speculate as a guesser for jneox.speculative; a draft model must share the target's tokenizer."""
    from .checkpoint import CheckpointError, load_tokenizer, resolve
    from .speculative import make_draft

    if args.speculate is None or args.speculate == "lookup":
        return make_draft(args.speculate, args.draft_tokens)
    try:
        folder = resolve(args.speculate)
    except CheckpointError as e:
        raise CheckpointError(f"--speculate {args.speculate}: {e}") from None
    if load_tokenizer(folder).path.read_bytes() != tokenizer.path.read_bytes():
        raise CheckpointError(f"--speculate {args.speculate}: its spiece.model differs from the model's; a draft "
                              f"model must use the same tokenizer")
    return make_draft(str(folder), args.draft_tokens, **load_options(args.dtype, args.device))


def load_options(dtype: str, device: str) -> dict:
    """--dtype/--device as arguments of jneox.load: packed kernels on CPU, plain PyTorch elsewhere."""
    from .checkpoint import CheckpointError

    if torch_device_is_cpu(device) and dtype != "float16":
        return {"weights": dtype, "device": device}
    if dtype in ("int8", "int4"):
        raise CheckpointError(f"--dtype {dtype} runs on jneox's CPU kernels only; use --device cpu")
    import torch

    return {"dtype": getattr(torch, dtype), "device": device}


def torch_device_is_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


def cmd_chat(args) -> int:
    from .chat import ChatSession

    params = _params(args)
    model, tokenizer = _load(args)
    session = ChatSession(model, tokenizer, params, draft=_draft(args, tokenizer))
    interactive = sys.stdin.isatty()
    if interactive:
        print("jneox chat: /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("ユーザー: " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        before = session.dropped_turns
        sys.stdout.write("システム: ")
        sys.stdout.flush()
        try:
            for piece in session.ask(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass  # stop this answer, keep chatting
        sys.stdout.write("\n")
        sys.stdout.flush()
        if session.dropped_turns > before:
            print(f"(the {session.dropped_turns - before} oldest turns no longer fit the context window "
                  f"and were dropped)", file=sys.stderr)


def cmd_generate(args) -> int:
    from .chat import format_prompt
    from .generate import stream

    text = sys.stdin.read() if args.text == "-" else args.text
    params = _params(args)
    model, tokenizer = _load(args)
    prompt = text if args.raw else format_prompt([{"speaker": "ユーザー", "text": text}])
    if not args.raw:
        from .chat import TURN_STOP
        params = params.with_(stop=(*params.stop, TURN_STOP))
    t0, n = time.perf_counter(), 0
    for piece in stream(model, tokenizer, prompt, params, draft=_draft(args, tokenizer)):
        n += 1
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.verbose:
        print(f"({time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    return 0


def cmd_quantize(args) -> int:
    from .checkpoint import check_replaceable, load_model, load_tokenizer, resolve, save_quantized

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
        from .export.tokenizer_json import export_hf

        out = export_hf(args.model, args.out)
        print(f"wrote tokenizer.json and tokenizer_config.json to {out}", file=sys.stderr)
    else:
        from .export.gguf import export_gguf

        if not args.out:
            from .errors import UsageError

            raise UsageError("--format gguf needs --out FILE.gguf")
        out = export_gguf(args.model, args.out, type=args.type, tokenizer=args.tokenizer, overwrite=args.overwrite)
        print(f"wrote {args.type} GGUF to {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return 0


# ---- training (issue 4) ----------------------------------------------------------------------
def _add_train_args(p: argparse.ArgumentParser, lr: float, min_lr: float, warmup: int, weight_decay: float) -> None:
    """The optimizer / eval / checkpoint / device flags shared by pretrain and sft."""
    p.add_argument("--out", required=True, help="output folder: HF checkpoint + trainer_state.pt + train_log.jsonl")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per process and micro-step (default: 8)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default: 1)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr:g})")
    p.add_argument("--min-lr", type=float, default=min_lr, help=f"end of the cosine decay (default: {min_lr:g})")
    p.add_argument("--warmup-steps", type=int, default=warmup, help=f"linear warm-up steps (default: {warmup})")
    p.add_argument("--weight-decay", type=float, default=weight_decay, help=f"AdamW weight decay (default: {weight_decay:g})")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0: off (default: 1.0)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evals (default: 100)")
    p.add_argument("--eval-batches", type=int, default=20, help="held-out batches per eval (default: 20)")
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints, which overwrite OUT (default: 500)")
    p.add_argument("--log-every", type=int, default=10, help="steps between log lines (default: 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda when available, default), cpu or cuda")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="bf16: autocast to bfloat16, fp32 weights (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT (an error if there is none)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP instead of DDP")
    p.add_argument("--report", action="store_true", help="draw the loss curves to OUT/loss.png at the end")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed data lines instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines still print)")


def _train_config(args):
    from .train.loop import TrainConfig

    return TrainConfig(out=args.out, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       min_lr=args.min_lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps or 1,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                       eval_batches=args.eval_batches, save_every=args.save_every, log_every=args.log_every,
                       seed=args.seed, device=args.device, precision=args.precision, save_dtype=args.save_dtype,
                       compile=args.compile, resume=args.resume, overwrite=args.overwrite, fsdp=args.fsdp, report=args.report,
                       progress=not args.no_progress)


def cmd_pretrain(args) -> int:
    from .train.pretrain import pretrain

    pretrain(args.model_config, args.tokenizer, args.data, _train_config(args), init=args.init,
             block_size=args.block_size, val_fraction=args.val_fraction, text_field=args.text_field,
             skip_bad_lines=args.skip_bad_lines)
    return 0


def cmd_sft(args) -> int:
    from .train.sft import sft

    sft(args.model, args.data, _train_config(args), **_finetune_kwargs(args))
    return 0


def _add_finetune_args(p: argparse.ArgumentParser, data_help: str, what: str, epochs: float, val: bool = True) -> None:
    """The flags of every command that fine-tunes a checkpoint: sft, reward, dpo, ppo (which has no held-out set)."""
    p.add_argument("--model", "-m", required=True, help="checkpoint folder or hub id to start from")
    p.add_argument("--data", nargs="+", required=True, help=data_help)
    if val:
        p.add_argument("--val-data", nargs="+", help=f"held-out {what} (default: --val-fraction of --data)")
        p.add_argument("--val-fraction", type=float, default=0.05, help="(default: 0.05)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per conversation; longer ones lose their oldest turns")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=epochs, help=f"passes over the data (default: {epochs:g})")
    length.add_argument("--max-steps", type=int, help="optimizer steps (instead of --epochs)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank, merged on save (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator (default: 16)")


def _finetune_kwargs(args) -> dict:
    return dict(val_data=args.val_data, val_fraction=args.val_fraction, max_len=args.max_len, epochs=args.epochs,
                max_steps=args.max_steps, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                skip_bad_lines=args.skip_bad_lines)


# ---- preference tuning (issue 12) -------------------------------------------------------------
def cmd_reward(args) -> int:
    from .train.reward import reward

    metrics = reward(args.model, args.data, _train_config(args), **_finetune_kwargs(args))
    if "eval_accuracy" in metrics:
        print(f"held-out pairwise accuracy {metrics['eval_accuracy']:.3f}", file=sys.stderr)
    return 0


def cmd_dpo(args) -> int:
    from .train.dpo import dpo

    dpo(args.model, args.data, _train_config(args), beta=args.beta, loss_type=args.loss_type,
        label_smoothing=args.label_smoothing, **_finetune_kwargs(args))
    return 0


def cmd_ppo(args) -> int:
    from .train.ppo import PPOConfig, ppo

    ppo_cfg = PPOConfig(kl_coef=args.kl_coef, ppo_epochs=args.ppo_epochs, cliprange=args.cliprange,
                        vf_coef=args.vf_coef, gamma=args.gamma, lam=args.lam,
                        missing_eos_penalty=args.missing_eos_penalty, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens)
    ppo(args.model, args.reward_model, args.data, _train_config(args), ppo_cfg, max_len=args.max_len,
        epochs=args.epochs, max_steps=args.max_steps, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        skip_bad_lines=args.skip_bad_lines)
    return 0


def cmd_score(args) -> int:
    from .train.reward import score_file

    summary = score_file(args.reward_model, args.data, max_len=args.max_len, batch_size=args.batch_size,
                         skip_bad_lines=args.skip_bad_lines)
    print(f"{summary['pairs']} pairs: accuracy {summary['accuracy']:.3f}, mean margin {summary['mean_margin']:.3f}",
          file=sys.stderr)
    return 0


def _add_preference_parsers(sub) -> None:
    pairs = 'JSONL preference pairs {"prompt", "chosen", "rejected"} or HH-RLHF {"chosen", "rejected"} records'
    p = sub.add_parser("reward", help="train a reward model (Bradley-Terry) on preference pairs; "
                                      "saved as transformers' GPTNeoXForSequenceClassification")
    _add_finetune_args(p, pairs + ' (optional "margin")', "pairs", epochs=1.0)
    _add_train_args(p, lr=1e-5, min_lr=1e-6, warmup=10, weight_decay=0.0)
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("dpo", help="direct preference optimisation on preference pairs (reference log-probs "
                                   "computed once before training)")
    _add_finetune_args(p, pairs, "pairs", epochs=1.0)
    p.add_argument("--beta", type=float, default=0.1, help="strength of the tie to the reference model (default: 0.1)")
    p.add_argument("--loss-type", choices=("sigmoid", "ipo"), default="sigmoid", help="(default: sigmoid, DPO's own)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed share of flipped labels, conservative DPO (sigmoid only; default: 0)")
    _add_train_args(p, lr=1e-6, min_lr=1e-7, warmup=10, weight_decay=0.0)
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("ppo", help="PPO against a reward model, with a KL penalty to the starting model "
                                   "(rollouts sampled at the card's settings)")
    _add_finetune_args(p, "JSONL prompts: preference pairs, {\"prompt\"} lines or conversations", "prompts", epochs=1.0, val=False)
    p.add_argument("--reward-model", required=True, help="a folder written by `jneox reward`")
    p.add_argument("--kl-coef", type=float, default=0.05, help="KL penalty per answer token (default: 0.05)")
    p.add_argument("--ppo-epochs", type=int, default=4, help="optimizer steps on each rollout (default: 4)")
    p.add_argument("--cliprange", type=float, default=0.2, help="PPO ratio clipping (default: 0.2)")
    p.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss (default: 0.1)")
    p.add_argument("--gamma", type=float, default=1.0, help="discount (default: 1)")
    p.add_argument("--lam", type=float, default=0.95, help="GAE lambda (default: 0.95)")
    p.add_argument("--missing-eos-penalty", type=float, default=1.0,
                   help="subtracted from the score of an answer that never reached </s> (default: 1)")
    p.add_argument("--temperature", type=float, default=0.7, help="rollout sampling (default: 0.7, the card's)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="rollout answer length (default: 128, the card's)")
    _add_train_args(p, lr=1e-6, min_lr=1e-7, warmup=10, weight_decay=0.0)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("score", help="score the answers of preference pairs with a reward model (JSON lines to stdout)")
    p.add_argument("--reward-model", required=True, help="a folder written by `jneox reward`")
    p.add_argument("--data", nargs="+", required=True, help=pairs)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed data lines instead of stopping")
    p.set_defaults(func=cmd_score)


def cmd_train_report(args) -> int:
    from .train.report import plot_log

    print(plot_log(args.log, args.out))
    return 0


def _add_train_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="causal-LM training on raw text (UTF-8 text or JSONL) into an HF checkpoint")
    p.add_argument("--model-config", required=True, help="a preset (tiny, demo, japanese-gpt-neox-3.6b) or a config.json; "
                                                         "the vocabulary size always comes from the tokenizer")
    p.add_argument("--tokenizer", required=True, help="folder with spiece.model, or the file")
    p.add_argument("--data", nargs="+", required=True, help="text files (one document each) or JSONL (one per line)")
    p.add_argument("--init", help="start from this checkpoint's weights instead of a random initialisation")
    p.add_argument("--block-size", type=int, default=512, help="tokens per training sequence (default: 512)")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for eval (default: 0.01)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    _add_train_args(p, lr=6e-4, min_lr=6e-5, warmup=100, weight_decay=0.1)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on JSONL conversations (loss on システム turns only)")
    _add_finetune_args(p, "JSONL conversations (card shape or messages)", "conversations", epochs=3.0)
    _add_train_args(p, lr=1e-4, min_lr=1e-5, warmup=20, weight_decay=0.0)
    p.set_defaults(func=cmd_sft)
    _add_preference_parsers(sub)

    p = sub.add_parser("train-report", help="draw the loss curves of a train_log.jsonl to a PNG")
    p.add_argument("log", help="train_log.jsonl")
    p.add_argument("--out", required=True, help="PNG file")
    p.set_defaults(func=cmd_train_report)


def cmd_train_tokenizer(args) -> int:
    from .tokenizer import Tokenizer, train_tokenizer
    from .train.data import DataStats, read_documents

    stats = DataStats()
    # one training sentence per line (sentencepiece skips overly long sentences); <NL> is a
    # user-defined piece, so a newline always encodes as that one piece whatever the corpus
    lines = (line for doc in read_documents(args.input, args.text_field, args.skip_bad_lines, stats)
             for line in doc.replace("\r\n", "\n").split("\n"))
    t0 = time.perf_counter()
    path = train_tokenizer(None, args.out, args.vocab_size, sentences=lines,
                           input_sentence_size=args.input_sentence_size, seed=args.seed, overwrite=args.overwrite)
    if stats.summary():
        print(f"jneox: {stats.summary()}", file=sys.stderr)
    tokenizer = Tokenizer(path)
    print(f"wrote {path} (vocab size {tokenizer.vocab_size}; {time.perf_counter() - t0:.1f} s)")
    if tokenizer.vocab_size < args.vocab_size:
        print(f"jneox: the text has too few distinct pieces for {args.vocab_size}: the vocabulary has "
              f"{tokenizer.vocab_size}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from pathlib import Path

    from .checkpoint import default_model
    from .serve import serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"jneox serve: warning: listening on {args.host} without --api-key: anyone who can reach it "
              f"can use it", file=sys.stderr)
    model, tokenizer = _load(args)
    draft = _draft(args, tokenizer)
    if args.model_name:
        model_id = args.model_name
    elif args.model:  # a folder by its name, a hub id as it is
        model_id = Path(args.model).name if Path(args.model).is_dir() else args.model
    else:
        model_id = Path(default_model() or "jneox").name
    serve(model, tokenizer, model_id=model_id, host=args.host, port=args.port, api_key=args.api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, log_level=args.log_level,
          allowed_hosts=args.allowed_host, cors_origins=args.cors_origin,
          request_timeout=args.request_timeout or None, shutdown_timeout=args.shutdown_timeout,
          default_max_tokens=args.default_max_tokens, draft=draft)
    return 0


def cmd_eval(args) -> int:
    import torch

    from .checkpoint import default_model
    from .evaluate import evaluate, format_table, write_json_atomic

    # float32 as plain PyTorch modules: scoring runs many rows at once, where MKL's matmul beat the
    # packed fp32 kernels (made for few-row decode) by 1.5x (demo model, 16 x 217 tokens, 1 thread)
    plain = args.dtype == "float32" and torch_device_is_cpu(args.device)
    model, tokenizer = _load(args, **({"dtype": torch.float32, "device": args.device} if plain else {}))
    t0 = time.perf_counter()
    result = evaluate(model, tokenizer, args.task, args.data, num_fewshot=args.num_fewshot,
                      fewshot_data=args.fewshot_data, seed=args.seed, limit=args.limit, batch_rows=args.batch_rows,
                      text_field=args.text_field, stride=args.stride, progress=not args.no_progress)
    result["config"].update(model=args.model or str(default_model()), dtype=args.dtype,
                            seconds=round(time.perf_counter() - t0, 1))
    print(format_table([result]))
    if args.output:
        print(f"wrote {write_json_atomic(result, args.output)}", file=sys.stderr)
    return 0


def _add_eval_parser(sub) -> None:
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
    _add_model_args(p)
    p.set_defaults(func=cmd_eval)


def _at_least(lo: float, cast=int, hi: float | None = None):
    """An argparse type: ``cast(text)``, refused below ``lo`` (and above ``hi``, if given)."""
    def parse(text: str):
        v = cast(text)
        if not v >= lo or (hi is not None and not v <= hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}" if hi is None
                                             else f"must be {lo} to {hi}, got {text}")
        return v

    parse.__name__ = cast.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jneox", description="Japanese GPT-NeoX instruction model: chat, generate, serve, quantize")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive, streaming, multi-turn chat (reads stdin lines when piped)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="answer one question (or continue a raw prompt with --raw)")
    p.add_argument("text", help="the question, or '-' to read it from stdin")
    p.add_argument("--raw", action="store_true", help="feed the text verbatim as the prompt, no conversation format")
    p.add_argument("--verbose", "-v", action="store_true")
    _add_model_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with batched decoding and a chat page at /")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("JNEOX_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* and the tokenizer endpoints "
                        "(default: $JNEOX_API_KEY, else no key)")
    p.add_argument("--max-batch", type=_at_least(1), default=8, help="requests decoded together (KV cache slots; default 8)")
    p.add_argument("--max-queue", type=_at_least(0), default=32,
                   help="requests that may wait for a slot; past that the server answers 429 (default 32)")
    p.add_argument("--model-name", help="the model id reported by /v1/models (default: --model)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="uvicorn's log level (info logs every request)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="also accept requests whose Host header is NAME (may be repeated; '*': any). By default "
                        "only the --host address (and localhost on loopback) is, which stops DNS rebinding")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://example.com; '*': any) call the API "
                        "(may be repeated; default: none)")
    p.add_argument("--request-timeout", type=_at_least(0, float), default=0, metavar="S",
                   help="end a request that has not finished after S seconds, queueing included (default 0: no limit)")
    p.add_argument("--shutdown-timeout", type=_at_least(0, float), default=30, metavar="S",
                   help="on SIGTERM/Ctrl-C, let accepted requests finish for up to S seconds (default 30)")
    p.add_argument("--default-max-tokens", type=_at_least(1), metavar="N",
                   help="longest answer when a request gives no max_tokens (default 512; never past the window)")
    _add_speculate_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="save a checkpoint packed as bfloat16/int8/int4, to load without conversion")
    p.add_argument("--model", "-m", required=True, help="float checkpoint folder or hub id")
    p.add_argument("--dtype", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="for other tools: tokenizer.json for transformers (hf) or a GGUF file for llama.cpp")
    p.add_argument("--format", required=True, choices=("hf", "gguf"))
    p.add_argument("--model", "-m", required=True, help="checkpoint folder or hub id")
    p.add_argument("--out", help="hf: a new folder (default: update --model in place); gguf: the .gguf file")
    p.add_argument("--type", default="f16", choices=("f16", "bf16", "q8_0", "q4_0"), help="gguf weights (default: f16)")
    p.add_argument("--tokenizer", default="ugm", choices=("ugm", "spm"),
                   help="llama.cpp tokenizer written into the gguf (default: ugm, the closer to sentencepiece)")
    p.add_argument("--overwrite", action="store_true", help="gguf: replace an existing --out that is not a GGUF file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("train-tokenizer", help="train a sentencepiece tokenizer with the card's options")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="UTF-8 text files, or .jsonl files with one document per line")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help="output folder; spiece.model is written there")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT/spiece.model (without it: an error)")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of this many lines (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of that sample (default: 0)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad lines instead of stopping")
    p.set_defaults(func=cmd_train_tokenizer)

    _add_train_parsers(sub)
    _add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import JneoxError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except JneoxError as e:  # bad input: one line; anything else is a bug and keeps its traceback
        print(f"jneox: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
