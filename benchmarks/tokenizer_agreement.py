"""How exactly each tokenizer reproduces sentencepiece's ids: a table for README's Interop section.

Reference: :meth:`jneox.Tokenizer.encode` (sentencepiece itself, ``\\n`` written as ``<NL>``). Rows:

- jneox ``tokenizer.json``, loaded by transformers' ``AutoTokenizer.from_pretrained(DIR)``, fed raw text;
- transformers' own conversion of a folder shaped like rinna's (``spiece.model`` + a ``T5Tokenizer``
  ``tokenizer_config.json``, loaded with the card's ``use_fast=False``), fed text with ``<NL>`` already
  in place (as the card tells users to do);
- llama.cpp's UGM ("t5") and SPM ("llama") tokenizers reading jneox's GGUF vocabulary (through
  ``llama-cpp-python``, skipped with a note when it is not installed), fed the same ``<NL>`` text.

Texts: the adversarial strings of ``tests/data/tokenizer_adversarial.json``, then every non-empty
line of the corpus files (``.txt``, ``.jsonl`` string values, ``.html`` text, ``.gz`` man pages),
then each whole file as one multi-line text. Decode is counted as identical when the row's
decoding of the reference ids equals jneox's decoding.

    python benchmarks/tokenizer_agreement.py --spiece models/demo/spiece.model \\
        --corpus tests/data/ja_sample.txt recipes/demo/data /usr/share/doc/debian-reference-ja
"""
from __future__ import annotations

import argparse
import gzip
import html.parser
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADVERSARIAL = ROOT / "tests" / "data" / "tokenizer_adversarial.json"


class _Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def read_document(path: Path) -> str:
    """The text of one corpus file (markup stripped from HTML; JSONL as its string values, one per line)."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if path.suffix == ".jsonl":
        return "\n".join(s for line in text.splitlines() if line.strip() for s in _strings(json.loads(line)))
    if ".htm" in path.name:
        p = _Text()
        p.feed(text)
        return "".join(p.parts)
    return text


def corpus(paths: list[str], max_files: int) -> list[Path]:
    files = []
    for p in map(Path, paths):
        found = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        files += [f for f in found if f.suffix in (".txt", ".jsonl", ".html", ".gz") or ".htm" in f.name]
    return files[:max_files] if max_files else files


def nl(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", "<NL>")


def is_tie(ref, got: list[int], want: list[int]) -> bool:
    """Whether ``got`` is another segmentation of the same text with the same total score as
    sentencepiece's: an exact tie, which sentencepiece breaks by the rounding of its float32 sums
    (measured: its pick always has the larger float32 sum), the others with float64 sums."""
    if any(i >= ref.vocab_size for i in got) or ref.decode(got) != ref.decode(want):
        return False
    score = lambda ids: sum(ref.sp.GetScore(i) for i in ids)  # noqa: E731
    return abs(score(got) - score(want)) < 1e-6 * max(1.0, abs(score(want)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spiece", default=str(ROOT / "models" / "demo" / "spiece.model"))
    ap.add_argument("--corpus", nargs="*", default=[str(ROOT / "tests" / "data" / "ja_sample.txt")])
    ap.add_argument("--max-files", type=int, default=0, help="at most this many corpus files (0: all)")
    ap.add_argument("--show", type=int, default=3, help="print this many differing texts per row")
    args = ap.parse_args(argv)

    import jneox
    from jneox.export.gguf import export_gguf
    from jneox.hf_tokenizer import write_hf_tokenizer
    from transformers import AutoTokenizer

    ref = jneox.Tokenizer(args.spiece)
    strings = json.loads(ADVERSARIAL.read_text(encoding="utf-8"))
    docs = [read_document(f) for f in corpus(args.corpus, args.max_files)]
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    groups = {"strings": strings, "corpus lines": lines, "corpus files": docs}
    print(f"spiece: {args.spiece} ({ref.vocab_size} pieces); {len(strings)} strings, {len(lines)} lines "
          f"({sum(map(len, lines)):,} characters) and {len(docs)} files", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="tokagree."))
    fast_dir, t5_dir = tmp / "fast", tmp / "t5"
    for d in (fast_dir, t5_dir):
        d.mkdir()
        (d / "spiece.model").write_bytes(Path(args.spiece).read_bytes())
    write_hf_tokenizer(fast_dir)
    (t5_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "use_fast": False, "extra_ids": 0, "do_lower_case": False,
         "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}))
    fast = AutoTokenizer.from_pretrained(fast_dir)
    t5 = AutoTokenizer.from_pretrained(t5_dir, use_fast=False)
    rows = {
        "jneox tokenizer.json (transformers AutoTokenizer)":
            (lambda s: fast.encode(s, add_special_tokens=False), lambda ids: fast.decode(ids), False),
        "transformers' T5 conversion of spiece.model (use_fast=False)":
            (lambda s: t5.encode(nl(s), add_special_tokens=False), lambda ids: t5.decode(ids), True),
    }
    try:
        import llama_cpp
    except ImportError:
        print("note: llama-cpp-python is not installed: no llama.cpp rows", flush=True)
    else:
        model_dir = tmp / "tiny"
        cfg = jneox.ModelConfig(vocab_size=ref.vocab_size, hidden_size=64, num_layers=1, num_heads=4,
                                intermediate_size=128, max_position_embeddings=64)
        jneox.save(jneox.GPTNeoX(cfg), model_dir, tokenizer_file=args.spiece)
        for kind, label in (("ugm", "UGM (t5)"), ("spm", "SPM (llama)")):
            gguf_file = export_gguf(model_dir, tmp / f"{kind}.gguf", "f16", tokenizer=kind)
            llm = llama_cpp.Llama(str(gguf_file), vocab_only=True, verbose=False)
            rows[f"llama.cpp {label}, GGUF vocabulary"] = (
                lambda s, llm=llm: llm.tokenize(nl(s).encode("utf-8"), add_bos=False, special=False) if s else [],
                lambda ids, llm=llm: llm.detokenize(ids).decode("utf-8", errors="replace"), True)

    print("\n| tokenizer | " + " | ".join(f"{g} ({len(t)})" for g, t in groups.items()) + " | decode |")
    print("|---|" + "---|" * (len(groups) + 1))
    for name, (encode, decode, nl_text) in rows.items():
        cells, shown, dec_ok, dec_n = [], 0, 0, 0
        for group, texts in groups.items():
            same = ties = 0
            for s in texts:
                want = ref.encode(s)
                expect = ref.decode(want)
                dec_ok += decode(want) == (nl(expect) if nl_text else expect)
                dec_n += 1
                got = encode(s)
                if got == want:
                    same += 1
                    continue
                ties += is_tie(ref, got, want)
                if shown < args.show:
                    shown += 1
                    print(f"  {name}: {s[:40]!r}: {got[:10]} != {want[:10]}", file=sys.stderr)
            cells.append(f"{same}/{len(texts)}" + (f" ({ties} of {len(texts) - same} ties)" if ties else ""))
        print(f"| {name} | " + " | ".join(cells) + f" | {dec_ok}/{dec_n} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
