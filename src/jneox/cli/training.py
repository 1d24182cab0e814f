"""The training commands: ``jneox pretrain``, ``sft``, ``reward``, ``dpo``, ``ppo``, ``score``, ``train-report``
``train-tokenizer`` and ``tokenize``."""
from __future__ import annotations

import argparse
import sys
import time

from ..chat import SYSTEM
from ..errors import UsageError
from ..files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LOG_FILE, REPORT_FILE, STATE_FILE, TOKENIZER_FILE
from ..tokenizer import Tokenizer, train_tokenizer
from ..train.data import DataStats, read_documents
from ..train.dpo import dpo
from ..train.loop import TrainConfig
from ..train.ppo import PPOConfig, ppo
from ..train.pretrain import pretrain
from ..train.report import plot_log
from ..train.reward import reward, score_file
from ..train.sft import sft
from ..train.tokenize import CHUNK_BYTES, HFStream, tokenize_files
from .args import OVERWRITE_HELP


def add_train_args(p: argparse.ArgumentParser, lr: float, min_lr: float, warmup: int, weight_decay: float) -> None:
    """The optimizer / eval / checkpoint / device flags shared by pretrain and sft."""
    p.add_argument("--out", required=True, help=f"output folder: HF checkpoint + {STATE_FILE} + {LOG_FILE}")
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
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing: recompute each block in the backward pass (less memory, "
                        "about a third more compute)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT (an error if there is none)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the model with FSDP instead of DDP")
    p.add_argument("--report", action="store_true", help=f"draw the loss curves to OUT/{REPORT_FILE} at the end")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed data lines instead of stopping")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (log lines still print)")


def train_config(args):
    return TrainConfig(out=args.out, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       min_lr=args.min_lr, warmup_steps=args.warmup_steps, max_steps=args.max_steps or 1,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                       eval_batches=args.eval_batches, save_every=args.save_every, log_every=args.log_every,
                       seed=args.seed, device=args.device, precision=args.precision, save_dtype=args.save_dtype,
                       compile=args.compile, grad_checkpointing=args.grad_checkpointing, resume=args.resume,
                       overwrite=args.overwrite, fsdp=args.fsdp, report=args.report,
                       progress=not args.no_progress)


def cmd_pretrain(args) -> int:
    pretrain(args.model_config, args.tokenizer, args.data, train_config(args), init=args.init,
             block_size=args.block_size, val_fraction=args.val_fraction, text_field=args.text_field,
             skip_bad_lines=args.skip_bad_lines)
    return 0


def cmd_sft(args) -> int:
    sft(args.model, args.data, train_config(args), save_adapter=args.save_adapter, **finetune_kwargs(args))
    return 0


def add_finetune_args(p: argparse.ArgumentParser, data_help: str, what: str, epochs: float, val: bool = True) -> None:
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


def add_save_adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-adapter", metavar="DIR",
                   help="with --lora-rank: also write the LoRA adapters to DIR as a PEFT adapter folder "
                        f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) for `jneox serve --lora` and PEFT; OUT stays "
                        "the merged checkpoint")


def finetune_kwargs(args) -> dict:
    return dict(val_data=args.val_data, val_fraction=args.val_fraction, max_len=args.max_len, epochs=args.epochs,
                max_steps=args.max_steps, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                skip_bad_lines=args.skip_bad_lines)


def cmd_reward(args) -> int:
    metrics = reward(args.model, args.data, train_config(args), **finetune_kwargs(args))
    if "eval_accuracy" in metrics:
        print(f"held-out pairwise accuracy {metrics['eval_accuracy']:.3f}", file=sys.stderr)
    return 0


def cmd_dpo(args) -> int:
    dpo(args.model, args.data, train_config(args), beta=args.beta, loss_type=args.loss_type,
        label_smoothing=args.label_smoothing, save_adapter=args.save_adapter, **finetune_kwargs(args))
    return 0


def cmd_ppo(args) -> int:
    ppo_cfg = PPOConfig(kl_coef=args.kl_coef, ppo_epochs=args.ppo_epochs, cliprange=args.cliprange,
                        vf_coef=args.vf_coef, gamma=args.gamma, lam=args.lam,
                        missing_eos_penalty=args.missing_eos_penalty, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens)
    ppo(args.model, args.reward_model, args.data, train_config(args), ppo_cfg, max_len=args.max_len,
        epochs=args.epochs, max_steps=args.max_steps, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        skip_bad_lines=args.skip_bad_lines)
    return 0


def cmd_score(args) -> int:
    summary = score_file(args.reward_model, args.data, max_len=args.max_len, batch_size=args.batch_size,
                         skip_bad_lines=args.skip_bad_lines)
    print(f"{summary['pairs']} pairs: accuracy {summary['accuracy']:.3f}, mean margin {summary['mean_margin']:.3f}",
          file=sys.stderr)
    return 0


def add_preference_parsers(sub) -> None:
    pairs = 'JSONL preference pairs {"prompt", "chosen", "rejected"} or HH-RLHF {"chosen", "rejected"} records'
    p = sub.add_parser("reward", help="train a reward model (Bradley-Terry) on preference pairs; "
                                      "saved as transformers' GPTNeoXForSequenceClassification")
    add_finetune_args(p, pairs + ' (optional "margin")', "pairs", epochs=1.0)
    add_train_args(p, lr=1e-5, min_lr=1e-6, warmup=10, weight_decay=0.0)
    p.set_defaults(func=cmd_reward)

    p = sub.add_parser("dpo", help="direct preference optimisation on preference pairs (reference log-probs "
                                   "computed once before training)")
    add_finetune_args(p, pairs, "pairs", epochs=1.0)
    p.add_argument("--beta", type=float, default=0.1, help="strength of the tie to the reference model (default: 0.1)")
    p.add_argument("--loss-type", choices=("sigmoid", "ipo"), default="sigmoid", help="(default: sigmoid, DPO's own)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed share of flipped labels, conservative DPO (sigmoid only; default: 0)")
    add_save_adapter_arg(p)
    add_train_args(p, lr=1e-6, min_lr=1e-7, warmup=10, weight_decay=0.0)
    p.set_defaults(func=cmd_dpo)

    C = PPOConfig  # the flags' defaults are the config's own
    p = sub.add_parser("ppo", help="PPO against a reward model, with a KL penalty to the starting model "
                                   "(rollouts sampled at the card's settings)")
    add_finetune_args(p, "JSONL prompts: preference pairs, {\"prompt\"} lines or conversations", "prompts", epochs=1.0, val=False)
    p.add_argument("--reward-model", required=True, help="a folder written by `jneox reward`")
    p.add_argument("--kl-coef", type=float, default=C.kl_coef, help=f"KL penalty per answer token (default: {C.kl_coef:g})")
    p.add_argument("--ppo-epochs", type=int, default=C.ppo_epochs,
                   help=f"optimizer steps on each rollout (default: {C.ppo_epochs})")
    p.add_argument("--cliprange", type=float, default=C.cliprange, help=f"PPO ratio clipping (default: {C.cliprange:g})")
    p.add_argument("--vf-coef", type=float, default=C.vf_coef, help=f"weight of the value loss (default: {C.vf_coef:g})")
    p.add_argument("--gamma", type=float, default=C.gamma, help=f"discount (default: {C.gamma:g})")
    p.add_argument("--lam", type=float, default=C.lam, help=f"GAE lambda (default: {C.lam:g})")
    p.add_argument("--missing-eos-penalty", type=float, default=C.missing_eos_penalty,
                   help=f"subtracted from the score of an answer that never reached </s> (default: {C.missing_eos_penalty:g})")
    p.add_argument("--temperature", type=float, default=C.temperature,
                   help=f"rollout sampling (default: {C.temperature:g}, the card's)")
    p.add_argument("--max-new-tokens", type=int, default=C.max_new_tokens,
                   help=f"rollout answer length (default: {C.max_new_tokens}, the card's)")
    add_train_args(p, lr=1e-6, min_lr=1e-7, warmup=10, weight_decay=0.0)
    p.set_defaults(func=cmd_ppo)

    p = sub.add_parser("score", help="score the answers of preference pairs with a reward model (JSON lines to stdout)")
    p.add_argument("--reward-model", required=True, help="a folder written by `jneox reward`")
    p.add_argument("--data", nargs="+", required=True, help=pairs)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip malformed data lines instead of stopping")
    p.set_defaults(func=cmd_score)


def cmd_train_report(args) -> int:
    print(plot_log(args.log, args.out))
    return 0


def add_train_parsers(sub) -> None:
    p = sub.add_parser("pretrain", help="causal-LM training on raw text (UTF-8 text or JSONL) into an HF checkpoint")
    p.add_argument("--model-config", required=True, help="a preset (tiny, demo, japanese-gpt-neox-3.6b) or a config.json; "
                                                         "the vocabulary size always comes from the tokenizer")
    p.add_argument("--tokenizer", required=True, help=f"folder with {TOKENIZER_FILE}, or the file")
    p.add_argument("--data", nargs="+", required=True,
                   help="indexed datasets from `jneox tokenize` (PREFIX, PREFIX.idx or a folder of them; a blend: "
                        "WEIGHT PATH WEIGHT PATH...), or text files (one document each) and JSONL (one per line), "
                        "tokenized in memory")
    p.add_argument("--init", help="start from this checkpoint's weights instead of a random initialisation")
    p.add_argument("--block-size", type=int, default=512, help="tokens per training sequence (default: 512)")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for eval (default: 0.01)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    add_train_args(p, lr=6e-4, min_lr=6e-5, warmup=100, weight_decay=0.1)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help=f"supervised fine-tuning on JSONL conversations (loss on {SYSTEM} turns only)")
    add_finetune_args(p, "JSONL conversations (card shape or messages)", "conversations", epochs=3.0)
    add_save_adapter_arg(p)
    add_train_args(p, lr=1e-4, min_lr=1e-5, warmup=20, weight_decay=0.0)
    p.set_defaults(func=cmd_sft)
    add_preference_parsers(sub)

    p = sub.add_parser("train-report", help=f"draw the loss curves of a {LOG_FILE} to a PNG")
    p.add_argument("log", help=LOG_FILE)
    p.add_argument("--out", required=True, help="PNG file")
    p.set_defaults(func=cmd_train_report)


def cmd_train_tokenizer(args) -> int:
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


def cmd_tokenize(args) -> int:
    stream = None
    if args.hf_dataset is not None:
        stream = HFStream(args.hf_dataset, args.hf_config, args.hf_split,
                          tuple(args.hf_data_files) if args.hf_data_files else None)
    elif args.hf_config or args.hf_data_files:
        raise UsageError("--hf-config and --hf-data-files go with --hf-dataset")
    result = tokenize_files(args.data, args.tokenizer, args.out, workers=args.workers, text_field=args.text_field,
                            skip_bad_lines=args.skip_bad_lines, chunk_bytes=int(args.chunk_mb * (1 << 20)),
                            overwrite=args.overwrite, progress=not args.no_progress, stream=stream)
    if result.stats.summary():
        print(f"jneox: {result.stats.summary()}", file=sys.stderr)
    seconds = max(result.seconds, 1e-9)
    print(f"wrote {result.prefix}.bin/.idx: {result.documents} documents, {result.tokens} tokens "
          f"({result.input_bytes / seconds / 1e6:.1f} MB/s, {result.tokens / seconds:,.0f} tokens/s)")
    return 0


def add_tokenize_parser(sub) -> None:
    p = sub.add_parser("tokenize", help="tokenize a corpus once into an indexed dataset (.bin + .idx, the format of "
                                        "Megatron-LM and GPT-NeoX) for `jneox pretrain --data`")
    p.add_argument("--data", nargs="+", default=[], metavar="FILE",
                   help="UTF-8 text files (one document each), .jsonl (one per line) or saved Hugging Face datasets")
    p.add_argument("--hf-dataset", metavar="NAME",
                   help="also a dataset streamed by `datasets` (read after --data, never held whole): a hub name, "
                        "a loading script, or json/text/parquet with --hf-data-files")
    p.add_argument("--hf-config", help="the --hf-dataset's configuration (subset) name")
    p.add_argument("--hf-split", default="train", help="the --hf-dataset's split (default: train)")
    p.add_argument("--hf-data-files", nargs="+", metavar="FILE", help="the --hf-dataset's data files")
    p.add_argument("--tokenizer", required=True, help=f"folder with {TOKENIZER_FILE}, or the file")
    p.add_argument("--out", required=True, help="output prefix (PREFIX.bin, PREFIX.idx) or an existing folder "
                                                "(FOLDER/data.bin, FOLDER/data.idx)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default: 1)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines and dataset rows (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad lines instead of stopping")
    p.add_argument("--chunk-mb", type=float, default=CHUNK_BYTES / (1 << 20),
                   help=f"input per work unit and per resume point (default: {CHUNK_BYTES >> 20})")
    p.add_argument("--overwrite", action="store_true", help="replace existing output, or drop an unfinished run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tokenize)


def add_train_tokenizer_parser(sub) -> None:
    p = sub.add_parser("train-tokenizer", help="train a sentencepiece tokenizer with the card's options")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="UTF-8 text files, or .jsonl files with one document per line")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--out", required=True, help=f"output folder; {TOKENIZER_FILE} is written there")
    p.add_argument("--overwrite", action="store_true", help=f"replace an existing OUT/{TOKENIZER_FILE} (without it: an error)")
    p.add_argument("--input-sentence-size", type=int, default=0,
                   help="train on a random sample of this many lines (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of that sample (default: 0)")
    p.add_argument("--text-field", default="text", help="the text field of .jsonl lines (default: text)")
    p.add_argument("--skip-bad-lines", action="store_true", help="count and skip bad lines instead of stopping")
    p.set_defaults(func=cmd_train_tokenizer)
    add_tokenize_parser(sub)
