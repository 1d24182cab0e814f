"""Multiple-choice scoring speed: jneox.evaluate against lm-evaluation-harness's ``hf`` model.

Both score the same (context, choice) pairs of a JCommonsenseQA-shaped file with few-shot prompts
(the jp-stable 0.4 template) on the same checkpoint, on the CPU, in fp32:

- lm-eval: ``lm_eval.models.huggingface.HFLM`` over transformers' GPTNeoXForCausalLM, given the
  token ids directly (``HFLM._loglikelihood_tokens``, what its ``loglikelihood`` calls after
  encoding). transformers' tokenizer on a sentencepiece folder does not give sentencepiece's ids
  (it prepends "▁" and maps byte pieces to <unk>), so both sides get jneox's ids: context and choice encoded
  separately, as the harness encodes them;
- jneox: :func:`jneox.evaluate.score_ids` (each context once, choices from the KV cache; fp32
  modules, as ``jneox eval`` loads them).

It checks that the per-choice log-likelihoods agree and prints a table.

    python benchmarks/eval_speed.py                      # the demo model, 3-shot, 48 questions
    python benchmarks/eval_speed.py --hidden 1024 --layers 8   # a random model of that shape instead
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from jneox.loading import load
from jneox.evaluate import get_task, score_ids
from jneox.evaluate.tasks import FewshotSampler

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "eval"


def pairs_for(tokenizer, questions: int, shots: int, seed: int = 42):
    """(context ids, choice ids) of ``questions`` few-shot prompts built from the test task files."""
    task = get_task("jcommonsenseqa")
    docs = task.read(DATA / "jcommonsenseqa.jsonl")
    sampler = FewshotSampler(task, task.read(DATA / "jcommonsenseqa_train.jsonl"), random.Random(seed))
    pairs = []
    for q in range(questions):
        doc = docs[q % len(docs)]
        context = tokenizer.encode(task.context(doc, sampler.draw(shots)))
        pairs += [(context, tokenizer.encode(c)) for c in doc.choices]
    return pairs


def random_checkpoint(folder: Path, hidden: int, layers: int) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(vocab_size=6000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                           intermediate_size=4 * hidden, max_position_embeddings=2048, use_parallel_residual=False,
                           tie_word_embeddings=False, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    for name in ("spiece.model", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((REPO / "models" / "demo" / name).read_bytes())
    return folder


def lm_eval_scores(folder: Path, pairs, batch_size: int) -> list[float]:
    from lm_eval.models.huggingface import HFLM
    from transformers import GPTNeoXForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    hf = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # a stand-in tokenizer object: HFLM wants one, but is given token ids and never encodes here
    stand_in = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 3}, "<pad>")),
                                       eos_token="</s>", pad_token="<pad>")
    lm = HFLM(pretrained=hf, tokenizer=stand_in, batch_size=batch_size, device="cpu")
    requests = [(("", ""), list(c), list(x)) for c, x in pairs]
    return [ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "demo"), help="checkpoint folder (default: the demo model)")
    ap.add_argument("--hidden", type=int, help="instead: a random GPT-NeoX of this width (and --layers)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--questions", type=int, default=48)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size and jneox's rows per batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(Path(tmp), args.hidden, args.layers) if args.hidden else Path(args.model)
        model, tokenizer = load(folder)  # plain fp32 modules, as `jneox eval --dtype float32` loads them
        pairs = pairs_for(tokenizer, args.questions, args.shots)
        tokens = sum(len(c) + len(x) for c, x in pairs)
        score_ids(model, pairs[:10], batch_rows=args.batch_size)  # warm-up (kernels, allocator)
        t0 = time.perf_counter()
        ours = score_ids(model, pairs, batch_rows=args.batch_size)
        t_ours = time.perf_counter() - t0
        lm_eval_scores(folder, pairs[:10], args.batch_size)
        t0 = time.perf_counter()
        theirs = lm_eval_scores(folder, pairs, args.batch_size)
        t_theirs = time.perf_counter() - t0
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    same_argmax = sum(
        max(range(5), key=lambda i: ours[q * 5 + i]) == max(range(5), key=lambda i: theirs[q * 5 + i])
        for q in range(args.questions))
    shape = f"random {args.hidden}x{args.layers}" if args.hidden else Path(args.model).name
    print(f"model: {shape}; {args.questions} questions x 5 choices, {args.shots}-shot, {tokens} tokens of context+choice; "
          f"{args.threads} threads")
    print("| scorer | seconds | requests/s | speed-up |")
    print("|---|---|---|---|")
    print(f"| lm-eval hf (batch {args.batch_size}) | {t_theirs:.2f} | {len(pairs) / t_theirs:.1f} | 1.0x |")
    print(f"| jneox.evaluate (rows {args.batch_size}) | {t_ours:.2f} | {len(pairs) / t_ours:.1f} | {t_theirs / t_ours:.1f}x |")
    print(f"largest |difference| of a log-likelihood: {worst:.2e}; same choice picked: {same_argmax}/{args.questions}")


if __name__ == "__main__":
    main()
