"""The tokenizer files transformers reads (``tokenizer.json``, ``tokenizer_config.json``) from a sentencepiece
unigram model, id for id.

transformers 5 loads rinna's ``spiece.model`` through its own T5 conversion, which prepends "▁",
collapses runs of spaces and maps characters outside the vocabulary to ``<unk>`` (see README,
Interop). The file written here reproduces sentencepiece instead, read from the model's own
normalizer and trainer specs:

- a Unigram model with sentencepiece's scores and byte fallback. sentencepiece never matches
  control, unknown, unused or byte pieces in text (they are not in its trie); ``tokenizers`` matches
  every vocabulary entry, so these get a score far below every real piece. (Renaming them out of
  reach does not work: byte fallback finds byte pieces by name, and an added special token takes the
  model's id of its name.) One difference remains, because ``tokenizers`` puts its unknown-character
  penalty below the lowest score: literal text such as "</s>" or "<0x41>" in which a character is
  outside the vocabulary becomes that one piece. Trained vocabularies hold "<", ">", "/" and the hex
  digits, so this needs a tiny vocabulary (measured: the tests' 643-piece one).
- ``split_special_tokens`` in tokenizer_config.json, so that transformers does not turn a literal
  "</s>" in text into the end-of-sequence id either (sentencepiece reads it as text).
- a normalizer with exactly sentencepiece's steps: its precompiled character map, its whitespace
  options (dummy prefix, removal of extra spaces) and " " -> "▁". Models that use jneox's ``<NL>``
  symbol also map ``\\r\\n`` and ``\\n`` to ``<NL>``, as :meth:`jneox.Tokenizer.encode` does.
- user-defined symbols (``<NL>``) as added tokens matched in the normalized text, which is what
  sentencepiece's forced match of user-defined symbols amounts to.
- no pre-tokenizer (a unigram lattice spans the whole text) and no post-processor: nothing (no
  ``</s>``) is added to the ids, as the card's ``add_special_tokens=False`` expects.
- a decoder that undoes all of it: ``<NL>`` -> ``\\n``, "▁" -> " ", byte pieces joined into UTF-8.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import tokenizers
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import AddedToken, Regex, decoders, models, normalizers

from .errors import CheckpointError
from .files import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_FILE, TOKENIZER_JSON, staged_file, write_json
from .tokenizer import NL, Tokenizer, TokenizerError

# below every piece's score, so that a path through a never-matched piece always loses: scores of
# trained pieces are log-probabilities above -100, and a literal "<0x41>" costs at most 6 pieces
_NEVER = -1.0e6
_SPACE = "\u2581"


def model_proto(spiece: Path):
    """The parsed ModelProto of a sentencepiece model file (pieces, trainer and normalizer specs)."""
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(spiece.read_bytes())
    except OSError as e:
        raise TokenizerError(f"{spiece}: cannot read ({e})") from None
    except Exception as e:  # protobuf's DecodeError
        raise TokenizerError(f"{spiece}: not a sentencepiece model ({e})") from None
    if not proto.pieces:
        raise TokenizerError(f"{spiece}: not a sentencepiece model (no pieces)")
    return proto


def build_tokenizer(spiece: str | os.PathLike):
    """A ``tokenizers.Tokenizer`` that gives sentencepiece's ids (and jneox's ``<NL>`` mapping) for ``spiece``."""
    spiece = Path(spiece)
    proto = model_proto(spiece)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    Piece = pb.ModelProto.SentencePiece
    if trainer.model_type != pb.TrainerSpec.UNIGRAM:
        kind = pb.TrainerSpec.ModelType.Name(trainer.model_type)
        raise TokenizerError(f"{spiece}: trainer_spec.model_type is {kind}; only UNIGRAM models are converted")
    if trainer.treat_whitespace_as_suffix:
        raise TokenizerError(f"{spiece}: trainer_spec.treat_whitespace_as_suffix is set; it is not supported")
    vocab, unk_id, user_defined = [], None, []
    for i, p in enumerate(proto.pieces):
        matched = p.type in (Piece.NORMAL, Piece.USER_DEFINED)
        vocab.append((p.piece, p.score if matched else _NEVER))
        if p.type == Piece.UNKNOWN:
            unk_id = i
        elif p.type == Piece.USER_DEFINED:
            user_defined.append(p.piece)
    if unk_id is None:
        raise TokenizerError(f"{spiece}: the model has no unknown piece")
    byte_fallback = any(p.type == Piece.BYTE for p in proto.pieces)

    tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=byte_fallback))
    steps = []
    if NL in user_defined:  # jneox's newline convention (Tokenizer.encode)
        steps += [normalizers.Replace("\r\n", NL), normalizers.Replace("\n", NL)]
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex("^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", _SPACE))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    tok.add_tokens([AddedToken(s, special=False, normalized=True) for s in user_defined])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (Piece.CONTROL, Piece.UNKNOWN)])
    steps = [decoders.Replace(NL, "\n")] if NL in user_defined else []
    steps += [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def special_tokens(spiece: str | os.PathLike) -> dict[str, str]:
    """bos/eos/unk/pad token strings of a sentencepiece model (by its ids), for tokenizer_config.json."""
    sp = Tokenizer(spiece).sp
    out = {}
    for key, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                   ("pad_token", sp.pad_id())):
        if 0 <= i < sp.GetPieceSize():
            out[key] = sp.IdToPiece(i)
    return out


def write_hf_tokenizer(folder: str | os.PathLike, spiece: str | os.PathLike | None = None) -> Path:
    """Write ``tokenizer.json`` into ``folder`` (from ``spiece`` or ``folder/spiece.model``) and point
    ``tokenizer_config.json`` at it, keeping the config's other fields (rinna's folder included).

    Afterwards transformers' ``AutoTokenizer.from_pretrained(folder)`` (with or without the card's
    ``use_fast=False``) loads a fast tokenizer that gives sentencepiece's ids. Each file is written
    to a temporary name and renamed, so an interrupted run leaves the old files intact.
    """
    folder = Path(folder)
    spiece = Path(spiece) if spiece is not None else folder / TOKENIZER_FILE
    if not spiece.is_file():
        raise TokenizerError(f"{folder}: {spiece.name} is missing (the sentencepiece model to convert)")
    tok = build_tokenizer(spiece)
    config_path = folder / TOKENIZER_CONFIG
    config = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: must hold a JSON object")
    # the generic fast class: transformers 4 and 5 load tokenizer.json as it is (a T5Tokenizer class would
    # rebuild its own normalizer); use_fast=False cannot pick a slow class that does not exist
    for stale in ("use_fast", "legacy", "extra_ids", "sp_model_kwargs", "add_prefix_space", "auto_map"):
        config.pop(stale, None)
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                   # a literal "</s>" in text is text to sentencepiece, not the end-of-sequence id
                   "split_special_tokens": True})
    for key, piece in special_tokens(spiece).items():
        config.setdefault(key, piece)
    _atomic_write(folder / TOKENIZER_JSON, tok.to_str(pretty=True) + "\n")
    _atomic_write(config_path, json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    return folder / TOKENIZER_JSON


def _atomic_write(path: Path, text: str) -> None:
    """A new file (also where ``path`` is a hard link into another folder), written atomically."""
    with staged_file(path) as partial:
        partial.write_text(text, encoding="utf-8")


def write_tokenizer_files(folder: Path, spiece: str | os.PathLike) -> None:
    """``spiece`` copied into the checkpoint folder ``folder`` with the tokenizer files transformers reads:
    first the slow sentencepiece tokenizer's config with the card's ``use_fast=False``, as rinna
    publishes it, then (:func:`write_hf_tokenizer`) ``tokenizer.json`` and the config pointed at it."""
    target = folder / TOKENIZER_FILE
    shutil.copyfile(spiece, target)
    # the special tokens by the names the copied spiece.model gives them (rinna's: [UNK], [PAD]; ours:
    # <unk>, <pad>), so transformers maps each to the right id
    try:
        special = special_tokens(target)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    write_json(folder / TOKENIZER_CONFIG, {
        "tokenizer_class": "T5Tokenizer", "use_fast": False, "do_lower_case": False, "extra_ids": 0,
        **special, "additional_special_tokens": [], "sp_model_kwargs": {},
    })
    write_json(folder / SPECIAL_TOKENS_MAP, special)
    write_hf_tokenizer(folder)
