"""The tokenizer files written beside a checkpoint name the pieces its spiece.model has."""
from __future__ import annotations

import json


from conftest import DATA
from jneox.checkpoint import save
from jneox.loading import load


# ---- tokenizer_config.json names the special tokens the spiece.model has -------------------
def test_tokenizer_config_uses_the_pieces_of_the_copied_spiece_model(tiny_checkpoint, tmp_path):
    """rinna's spiece.model calls its unknown and padding pieces [UNK] and [PAD]."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.Train(input=str(DATA / "ja_sample.txt"), model_prefix=str(tmp_path / "rinna"),
                                   vocab_size=600, character_coverage=0.98, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="<s>", eos_piece="</s>",
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "rinna.model"))
    model, _ = load(tiny_checkpoint)
    out = save(model, tmp_path / "out", tokenizer_file=tmp_path / "rinna.model")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = json.loads((out / "special_tokens_map.json").read_text(encoding="utf-8"))
    for kind, i in (("unk", sp.unk_id()), ("pad", sp.pad_id()), ("bos", sp.bos_id()), ("eos", sp.eos_id())):
        assert config[f"{kind}_token"] == special[f"{kind}_token"] == sp.id_to_piece(i), kind
    assert (config["unk_token"], config["pad_token"]) == ("[UNK]", "[PAD]")
