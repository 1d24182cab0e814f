"""What several commands share: their flags, and turning those flags into library arguments."""
from __future__ import annotations

import argparse
import sys

import torch

from ..errors import UsageError
from ..sampling import SamplingParams
from ..hub import OFFICIAL_MODEL
from ..loading import generation_defaults, load, load_draft, load_options, model_or_default
from ..quantize import FORMATS
from ..speculative import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS

DTYPES = (*FORMATS, "float16")  # the packed CPU formats, and float16 for plain PyTorch
OVERWRITE_HELP = ("replace OUT even if it is not a jneox checkpoint folder, deleting everything in it (without it, "
                  "OUT may be new, empty, or hold only a previous jneox checkpoint or run, which is replaced atomically)")
# the card's sampling settings are SamplingParams' defaults
TEMPERATURE, MAX_NEW_TOKENS = SamplingParams.temperature, SamplingParams.max_new_tokens
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")  # SamplingParams' names


def at_least(lo: float, cast=int, hi: float | None = None):
    """An argparse type: ``cast(text)``, refused below ``lo`` (and above ``hi``, if given)."""
    def parse(text: str):
        v = cast(text)
        if not v >= lo or (hi is not None and not v <= hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}" if hi is None
                                             else f"must be {lo} to {hi}, got {text}")
        return v

    parse.__name__ = cast.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help=f"checkpoint folder (config.json, weights, spiece.model) or hub id, "
                                         f"e.g. {OFFICIAL_MODEL}")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="weights: float32 (default), bfloat16, int8 or int4 run on jneox's CPU kernels; "
                        "float16 (and every dtype on --device cuda) runs plain PyTorch")
    p.add_argument("--device", default="cpu", help="cpu (default) or a torch device such as cuda")
    p.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's choice)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    # no argparse defaults: a flag not given leaves the model's generation_config.json in charge
    p.add_argument("--temperature", type=float,
                   help=f"0 means greedy (default: the model's generation config, else {TEMPERATURE:g}, the card's)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off; default: as --temperature)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (1: off; default: as --temperature)")
    p.add_argument("--repetition-penalty", type=float, help="default: the model's generation config, else 1 (off)")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"default: the model's generation config, else {MAX_NEW_TOKENS}, the card's")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (may be repeated)")
    add_generation_config_arg(p)
    add_speculate_args(p)


def add_generation_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generation-config", metavar="PATH|none",
                   help="sampling defaults from this generation_config.json instead of the model's own; 'none': "
                        "ignore the model's (explicit sampling settings override either)")


def add_speculate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", metavar="lookup|DRAFT", help="speculative decoding, same output, fewer passes: "
                   "'lookup' guesses tokens copied from the context; a folder or hub id names a smaller draft "
                   "model with the same tokenizer")
    p.add_argument("--draft-tokens", type=at_least(1, hi=MAX_DRAFT_TOKENS), default=DEFAULT_DRAFT_TOKENS,
                   help=f"guesses checked per pass, 1 to {MAX_DRAFT_TOKENS} (default: {DEFAULT_DRAFT_TOKENS})")


def sampling_params(args, defaults: dict | None = None) -> SamplingParams:
    """The sampling flags given, else ``defaults`` (a model's generation config), else SamplingParams'."""
    given = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    return SamplingParams(**{**(defaults or {}), **given}, seed=args.seed, stop=tuple(args.stop))


def generation_defaults_from_args(args) -> dict:
    """The sampling defaults --generation-config (else the model's generation_config.json) gives."""
    return generation_defaults(model_or_default(args.model), args.generation_config)


def load_from_args(args, options: dict | None = None):
    """The model and tokenizer of --model (the demo model without it); ``options`` replace the load
    options that --dtype/--device give."""
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    target = model_or_default(args.model)
    if args.model is None:
        print(f"jneox: no --model given: using the small demo model in {target} (a pipeline demo, not a useful "
              f"assistant); for the real one: --model {OFFICIAL_MODEL}", file=sys.stderr)
    return load(target, **(options or load_options(args.dtype, args.device)))


def draft_from_args(args, tokenizer):
    """--speculate as a guesser for jneox.speculative (a draft model loaded as --dtype/--device say)."""
    options = {} if args.speculate in (None, "lookup") else load_options(args.dtype, args.device)
    return load_draft(args.speculate, tokenizer, args.draft_tokens, **options)
