"""The model's sentencepiece tokenizer, used directly (no transformers, so no ``use_fast`` pitfall).

The card's tokenizer keeps whitespace exactly (no dummy prefix, no removal of extra spaces) and
decomposes unknown text into UTF-8 byte pieces (byte fallback), so nothing becomes ``<unk>``.
It has no newline: ``\\n`` is written as the ``<NL>`` symbol. :class:`Tokenizer` maps ``\\n`` to
``<NL>`` on encode and back on decode, and decodes through bytes so that a stream of ids never
emits half a UTF-8 character.
"""
from __future__ import annotations

import codecs
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from .errors import JneoxError
from .files import TOKENIZER_FILE, staged_file

NL = "<NL>"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenizerError(JneoxError):
    pass


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike):
        self.path = Path(model_file)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer model {self.path} does not exist")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path} is not a sentencepiece model: {e}") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id()
        self.nl_id = self.sp.PieceToId(NL) if self.sp.PieceToId(NL) != self.unk_id else None
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        """What id ``i`` contributes to the decoded UTF-8 byte stream."""
        if self.sp.IsByte(i):
            return bytes([int(_BYTE_PIECE.fullmatch(self.sp.IdToPiece(i)).group(1), 16)])
        if self.sp.IsControl(i):  # <s>, </s>, <pad>
            return b""
        if self.sp.IsUnknown(i):
            return " \u2047 ".encode()  # what sentencepiece itself prints for <unk>
        if i == self.nl_id:
            return b"\n"
        return self.sp.IdToPiece(i).replace("\u2581", " ").encode("utf-8")

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encode / decode ------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS is added (the card encodes with add_special_tokens=False).

        Newlines become ``<NL>``, as the card requires for every utterance.
        """
        return self.sp.EncodeAsIds(self._with_nl(text))

    def encode_batch(self, texts: list[str], eos: bool = False) -> list[np.ndarray]:
        """:meth:`encode` of each text as an int32 array, then ``</s>`` when ``eos``, in one call into
        sentencepiece on one thread (callers that want more run more processes). The arrays come from
        sentencepiece's buffer encode where it has one: no Python int per token."""
        return self._encode_prepared([self._with_nl(t) for t in texts], eos)

    @property
    def writes_nl(self) -> bool:
        """Whether encoding writes newlines as ``<NL>`` (the model has that symbol)."""
        return self.nl_id is not None

    def encode_utf8_batch(self, texts: list[bytes], eos: bool = False) -> list[np.ndarray]:
        """:meth:`encode_batch` of texts given as the UTF-8 bytes sentencepiece reads: newlines already
        written as ``<NL>`` (where :attr:`writes_nl`), as :mod:`jneox.kernels`' JSONL scanner writes them."""
        return self._encode_prepared(texts, eos)

    def _encode_prepared(self, texts: list, eos: bool) -> list[np.ndarray]:
        try:
            return self.sp.encode(texts, out_type="numpy", num_threads=1, add_eos=eos)
        except ValueError:  # a sentencepiece without out_type="numpy"
            return [np.asarray(ids, dtype=np.int32)
                    for ids in self.sp.encode(texts, out_type=int, num_threads=1, add_eos=eos)]

    def _with_nl(self, text: str) -> str:
        # the membership tests are one fast scan; most texts of a corpus need no rewrite or no \r one
        if self.nl_id is not None and "\n" in text:
            if "\r" in text:
                text = text.replace("\r\n", "\n")
            text = text.replace("\n", NL)
        return text

    def tokenize(self, text: str) -> list[str]:
        return [self.sp.IdToPiece(i) for i in self.encode(text)]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        table = self._bytes
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: control tokens dropped, ``<NL>`` as ``\\n``, byte pieces joined into UTF-8."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(i)


class StreamDecoder:
    """Turns ids into text one id at a time, holding back incomplete UTF-8 sequences.

    The concatenation of everything :meth:`push` and :meth:`flush` return equals
    ``tokenizer.decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._table = tokenizer._bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._table[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def train_tokenizer(
    input_files: Iterable[str | os.PathLike] | None,
    out_dir: str | os.PathLike,
    vocab_size: int = 32000,
    *,
    sentences: Iterable[str] | None = None,
    character_coverage: float = 0.9995,
    model_type: str = "unigram",
    normalization: str = "identity",
    input_sentence_size: int = 0,
    num_threads: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Train a sentencepiece model with the card's options and write ``out_dir/spiece.model``.

    Options as the card states: byte fallback, no dummy prefix, extra whitespace kept, ``<NL>`` as
    a user-defined symbol (newlines in the input become ``<NL>``), and the special ids of rinna's
    published tokenizer: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3. ``normalization``
    defaults to ``identity`` so that every text round-trips exactly; ``nmt_nfkc`` folds full-width
    ASCII and similar, at the price of exact round trips. ``input_sentence_size`` trains on a random
    sample of that many lines, drawn here with ``seed`` (sentencepiece's own sampling is not
    reproducible). An existing ``out_dir/spiece.model`` (say, a model folder's own tokenizer) is
    replaced only with ``overwrite=True``.
    """
    out = Path(out_dir)
    target = out / TOKENIZER_FILE
    if target.exists() and not overwrite:  # checked before the training, which can take minutes
        raise TokenizerError(f"{target}: already exists; give a new folder, or overwrite=True (--overwrite) "
                             "to replace it")
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for f in input_files or []:
        with open(f, encoding="utf-8") as fh:
            doc = fh.read()
        lines.extend(doc.replace("\r\n", "\n").split("\n"))
    if sentences is not None:
        # a multi-line sentence is one training sentence with <NL> inside, as the model will see it
        lines.extend(s.replace("\r\n", "\n").replace("\n", NL) for s in sentences)
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise TokenizerError("no training text: the input files and sentences are empty")
    if 0 < input_sentence_size < len(lines):
        lines = random.Random(seed).sample(lines, input_sentence_size)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefix = Path(tmp) / "spiece"
        try:
            spm.SentencePieceTrainer.Train(
                input=str(corpus),
                model_prefix=str(prefix),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                byte_fallback=True,
                add_dummy_prefix=False,
                remove_extra_whitespaces=False,
                split_digits=True,
                allow_whitespace_only_pieces=True,
                normalization_rule_name=normalization,
                user_defined_symbols=[NL],
                required_chars="\u2581",  # whitespace is always one piece, even if the corpus has few spaces
                pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
                num_threads=num_threads or os.cpu_count() or 1,
                hard_vocab_limit=False,
                minloglevel=2,
            )
        except RuntimeError as e:
            raise TokenizerError(f"sentencepiece training failed: {e}") from None
        with staged_file(target) as partial:  # not a rename from /tmp: it may be another file system
            partial.write_bytes(prefix.with_suffix(".model").read_bytes())
    return target
