"""The ``jneox`` command: a thin layer over the library. Each command is a parser and a few calls into
jneox.*, in one module per group: :mod:`.inference` (chat, generate, serve), :mod:`.training` (pretrain,
sft, reward, dpo, ppo, score, train-report, train-tokenizer) and :mod:`.tools` (quantize, export, eval);
the flags several share are in :mod:`.args`."""
from __future__ import annotations

import argparse
import sys

from ..errors import JneoxError
from . import inference, tools, training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jneox", description="Japanese GPT-NeoX instruction model: chat, generate, serve, quantize")
    sub = parser.add_subparsers(dest="command", required=True)
    inference.add_chat_parser(sub)
    inference.add_generate_parser(sub)
    inference.add_serve_parser(sub)
    tools.add_quantize_parser(sub)
    tools.add_export_parser(sub)
    training.add_train_tokenizer_parser(sub)
    training.add_train_parsers(sub)
    tools.add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
