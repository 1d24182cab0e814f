#!/usr/bin/env python3
"""Copy-heavy conversations for speculative decoding: answers that quote a text given in the prompt.

The shipped demo model barely copies a passage when asked (prompt lookup accepted 0.06 extra tokens
per pass), so it cannot show what speculation gains where answers copy their context. This makes
conversations in the card's shape whose answers are spans of the prompt, from the システム answers
of the hand-written conversations (``data/conversations``) and, for training only, from the Japanese
messages of gettext catalogs (``--catalogs``):

- ``qa``: extractive QA as JSQuAD, over a longer context: three passages (the one that answers the
  question and two others, shuffled); the answer is the answering passage's first sentences, verbatim;
- ``repeat``: repeat a passage word for word;
- ``typo``: a passage with one or two characters changed; the answer is the passage as written.

The split is make_sft_data.py's (by a hash of a conversation's first question): ``train.jsonl`` is
built from training conversations only (and holds them too, so the model keeps chatting), while
``heldout.jsonl`` (copy tasks) and ``chat.jsonl`` (the first question alone) come from held-out
conversations, never trained on. ``benchmarks/speculative.py`` builds its held-out prompts with these functions.

    python recipes/demo/make_copy_data.py --out-dir DATA --catalogs /usr/share/locale/ja/LC_MESSAGES --chat-share 0.4
    jneox sft --model models/demo --data DATA/train.jsonl --val-data DATA/heldout.jsonl ...   (README: the run)
"""

from __future__ import annotations

import argparse
import gettext
import random
import re
import sys
from pathlib import Path

from jneox.chat import SYSTEM, USER, Utterance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faq_pairs import write_jsonl  # noqa: E402
from japanese import japanese_ratio  # noqa: E402
from make_sft_data import (  # noqa: E402
    DEFAULT_CONVERSATIONS,
    DEFAULT_HELDOUT_PERCENT,
    as_card_json,
    conversation_files,
    deduplicate,
    is_heldout,
    read_conversation_file,
)

TASKS = ("qa", "repeat", "typo")
QA_INSTRUCTION = "次の文脈から、質問の答えになる部分をそのまま抜き出してください。"
REPEAT_INSTRUCTION = "次の文章を一字一句そのまま繰り返してください。"
TYPO_INSTRUCTION = "次の文章の誤字を直して、全文を書き直してください。"
DISTRACTORS = 2  # other passages in a QA context: three passages, ~350-500 characters
KANA = "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん"


def sentences(text: str) -> list[str]:
    return [s for s in re.findall(r"[^。！？!?]+[。！？!?]?", text) if s.strip()]


def qa_pairs(conversations: list[list[Utterance]]) -> list[tuple[str, str]]:
    """(question, passage) for every user turn and the answer that follows it."""
    return [(c[i].text, c[i + 1].text) for c in conversations for i in range(0, len(c) - 1, 2)]


def with_typos(text: str, rng: random.Random) -> str | None:
    """``text`` with one or two kana replaced by other kana; None when it has too few kana."""
    places = [i for i, ch in enumerate(text) if ch in KANA]
    if len(places) < 8:
        return None
    chars = list(text)
    for i in rng.sample(places, rng.choice((1, 2))):
        chars[i] = rng.choice(KANA.replace(chars[i], ""))
    return "".join(chars)


def copy_conversation(task: str, question: str, passage: str, others: list[str],
                      rng: random.Random) -> list[Utterance] | None:
    """One copy task over ``passage`` (``others``: distractor passages for ``qa``), or None when
    the passage does not suit it."""
    if task == "qa":
        parts = sentences(passage)
        answer = "".join(parts[:2]) if len(parts) > 2 else "".join(parts[:1])
        context = [passage, *others]
        rng.shuffle(context)
        prompt = f"{QA_INSTRUCTION}\n文脈: {''.join(context)}\n質問: {question}"
    elif task == "repeat":
        answer, prompt = passage, f"{REPEAT_INSTRUCTION}\n{passage}"
    else:
        wrong = with_typos(passage, rng)
        if wrong is None:
            return None
        answer, prompt = passage, f"{TYPO_INSTRUCTION}\n{wrong}"
    if len(answer) < 10:
        return None
    return [Utterance(USER, prompt), Utterance(SYSTEM, answer)]


def copy_conversations(conversations: list[list[Utterance]], per_pair: int, seed: int) -> list[list[Utterance]]:
    """``per_pair`` copy tasks (of different kinds) for each question–answer pair of ``conversations``;
    distractors come from the same conversations, so held-out text stays held out."""
    rng = random.Random(seed)
    pairs = [(q, p) for q, p in qa_pairs(conversations) if 60 <= len(p) <= 300]
    out = []
    for index, (question, passage) in enumerate(pairs):
        others = [pairs[j][1] for j in rng.sample([j for j in range(len(pairs)) if j != index], DISTRACTORS)]
        for task in rng.sample(TASKS, per_pair):
            conv = copy_conversation(task, question, passage, others, rng)
            if conv is not None:
                out.append(conv)
    rng.shuffle(out)
    return out


def catalog_passages(folder: Path, seed: int) -> list[str]:
    """Passages of 60-300 characters joined from the Japanese messages of the gettext catalogs
    (``*.mo``) in ``folder``: text the demo model never saw, so that copying it is learned as copying
    rather than recalled (its own SFT answers it knows by heart after 12 epochs)."""
    messages = set()
    for path in sorted(folder.glob("*.mo")):
        with open(path, "rb") as handle:
            try:
                catalog = gettext.GNUTranslations(handle)._catalog
            except (OSError, UnicodeDecodeError):
                continue
        for key, text in catalog.items():
            if key and isinstance(text, str) and len(text) >= 12 and not re.search(r"[%{}\n\\<>]", text) \
                    and japanese_ratio(text) >= 0.6:
                messages.add(text if text.endswith(("。", "！", "？")) else text + "。")
    rng = random.Random(seed)
    pool, passages, current = sorted(messages), [], ""
    rng.shuffle(pool)
    for text in pool:
        current += text
        if len(current) >= 60 + rng.randrange(200):
            if len(current) <= 300:
                passages.append(current)
            current = ""
    return passages


def catalog_conversations(passages: list[str], count: int, seed: int) -> list[list[Utterance]]:
    """``count`` repeat, typo and quote tasks over ``passages`` (quote: the sentence of the passage
    that starts with the given words, JSQuAD-like extraction without a question)."""
    rng = random.Random(seed)
    out = []
    for passage in passages:
        if len(out) >= count:
            break
        task = rng.choice(("repeat", "typo", "quote"))
        if task == "quote":
            parts = sentences(passage)
            answer = rng.choice(parts)
            if len(parts) < 2 or len(answer) < 10:
                continue
            out.append([Utterance(USER, f"次の文脈から、「{answer[:6]}」で始まる文をそのまま抜き出してください。\n文脈: {passage}"),
                        Utterance(SYSTEM, answer)])
        else:
            conv = copy_conversation(task, "", passage, [], rng)
            if conv is not None:
                out.append(conv)
    return out


def scrambled_conversations(passages: list[str], count: int, seed: int) -> list[list[Utterance]]:
    """``count`` repeat tasks over ``passages`` cut into pieces of 1-4 characters and shuffled: real
    characters in an order no language model predicts, so that only copying lowers the loss."""
    rng = random.Random(seed)
    out = []
    for passage in passages[:count]:
        pieces, i = [], 0
        while i < len(passage):
            n = rng.randint(1, 4)
            pieces.append(passage[i:i + n])
            i += n
        rng.shuffle(pieces)
        text = "".join(pieces)
        out.append([Utterance(USER, f"{REPEAT_INSTRUCTION}\n{text}"), Utterance(SYSTEM, text)])
    return out


def short_conversations(passages: list[str], count: int, rng: random.Random) -> list[list[Utterance]]:
    """``count`` repeat tasks over spans of 15-60 characters of ``passages``, half of them scrambled
    (:func:`scrambled_conversations`). The demo model did not start to copy from the full-length
    tasks (held-out answer loss 5.6 -> 4.7 in 200 steps, its greedy "repeat" unrelated to the
    passage, also with scrambled full passages mixed in); on these short ones its training loss fell
    from ~4.5 to ~2 between steps 150 and 250, the known sudden onset of copying."""
    out = []
    for _ in range(count):
        passage = rng.choice(passages)
        n = rng.randint(15, 60)
        start = rng.randrange(0, max(1, len(passage) - n))
        text = passage[start:start + n]
        if rng.random() < 0.5:
            text = scrambled_conversations([text], 1, rng.randrange(10**6))[0][1].text
        out.append([Utterance(USER, f"{REPEAT_INSTRUCTION}\n{text}"), Utterance(SYSTEM, text)])
    return out


def split(files: list[Path], heldout_percent: int = DEFAULT_HELDOUT_PERCENT):
    """(training, held-out) hand-written conversations, split exactly as for the demo model's SFT."""
    conversations = deduplicate([c for f in files for c in read_conversation_file(f)])
    return ([c for c in conversations if not is_heldout(c, heldout_percent)],
            [c for c in conversations if is_heldout(c, heldout_percent)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=Path, nargs="+", default=[DEFAULT_CONVERSATIONS])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--per-pair", type=int, default=1, choices=(1, 2, 3),
                        help="copy tasks made from each training question-answer pair (default: 1)")
    parser.add_argument("--catalogs", type=Path,
                        help="a folder of Japanese gettext catalogs (*.mo, e.g. /usr/share/locale/ja/LC_MESSAGES): "
                             "repeat, typo and quote tasks over their messages join the training data")
    parser.add_argument("--short", type=int, default=0,
                        help="also write short.jsonl: this many repeat tasks over short spans of the training passages "
                             "(and catalog messages), half scrambled, and a quarter of the training conversations: the "
                             "first stage that makes the demo model start copying (default: 0, no file)")
    parser.add_argument("--chat-share", type=float, default=1.0,
                        help="share of the training conversations mixed in to keep the model chatting (default: 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, heldout = split(conversation_files(args.conversations))
    copies = copy_conversations(train, args.per_pair, args.seed)
    if args.catalogs:
        passages = catalog_passages(args.catalogs, args.seed)
        if not passages:
            parser.error(f"--catalogs {args.catalogs}: no Japanese messages in *.mo files there")
        copies += catalog_conversations(passages, len(copies), args.seed)
    else:
        passages = []
    if args.short:
        rng = random.Random(args.seed + 7)
        short = short_conversations([p for _, p in qa_pairs(train) if len(p) >= 30] + passages, args.short, rng)
        short += rng.sample(train, len(train) // 4)
        rng.shuffle(short)
        write_jsonl([as_card_json(c) for c in short], args.out_dir / "short.jsonl")
    mixed = copies + random.Random(args.seed).sample(train, int(len(train) * args.chat_share))
    random.Random(args.seed).shuffle(mixed)
    write_jsonl([as_card_json(c) for c in mixed], args.out_dir / "train.jsonl")
    write_jsonl([as_card_json(c) for c in copy_conversations(heldout, 1, args.seed + 1)], args.out_dir / "heldout.jsonl")
    write_jsonl([as_card_json(c[:2]) for c in heldout], args.out_dir / "chat.jsonl")
    print(f"{len(copies)} copy tasks + {len(mixed) - len(copies)} conversations -> {args.out_dir / 'train.jsonl'}; "
          f"held out: {len(heldout)} conversations -> heldout.jsonl (copy tasks), chat.jsonl")


if __name__ == "__main__":
    main()
