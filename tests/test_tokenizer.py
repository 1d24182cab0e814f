import pytest

from jneox.tokenizer import NL, Tokenizer, TokenizerError, train_tokenizer

OUT_OF_VOCAB = ["გამარჯობა", "😀👍🏽", "𠮷野家の齉", "Ελληνικά", "混合 text with 記号 ★☆ and tabs\t!"]


def test_special_ids_follow_rinna(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert [tokenizer.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tokenizer.id_to_piece(tokenizer.nl_id) == NL


def test_no_dummy_prefix(tokenizer):
    pieces = tokenizer.tokenize("吾輩は猫である")
    assert pieces[0] != "\u2581" and not pieces[0].startswith("\u2581")
    assert "".join(pieces) == "吾輩は猫である"


def test_no_bos_or_eos_added(tokenizer):
    ids = tokenizer.encode("吾輩は猫である")
    assert tokenizer.bos_id not in ids and tokenizer.eos_id not in ids


def test_whitespace_is_kept(tokenizer):
    text = " 吾輩は  猫である   "
    pieces = tokenizer.tokenize(text)
    assert pieces[0] == "\u2581"  # the leading space is a piece of its own, as in the card
    assert "".join(pieces).count("\u2581") == text.count(" ")
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", OUT_OF_VOCAB)
def test_out_of_vocabulary_text_uses_byte_pieces_not_unk(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids
    assert any(tokenizer.sp.IsByte(i) for i in ids)
    assert tokenizer.decode(ids) == text


def test_newlines_are_nl_symbols(tokenizer):
    ids = tokenizer.encode("一行目\n二行目\r\n三行目")
    assert ids.count(tokenizer.nl_id) == 2
    assert tokenizer.decode(ids) == "一行目\n二行目\n三行目"
    assert tokenizer.encode("一行目<NL>二行目") == tokenizer.encode("一行目\n二行目")


def test_decode_matches_sentencepiece(tokenizer, ja_text):
    for line in ja_text.splitlines() + OUT_OF_VOCAB + [" 吾輩は  猫である "]:
        ids = tokenizer.encode(line)
        assert tokenizer.decode(ids) == tokenizer.sp.DecodeIds(ids) == line


def test_decode_drops_control_tokens(tokenizer):
    ids = tokenizer.encode("こんにちは")
    assert tokenizer.decode([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id]) == "こんにちは"


@pytest.mark.parametrize("text", ["猫😀が გამარჯობა と言った。\n𠮷", "日本の首都は東京です。"])
def test_stream_decode_equals_one_shot_for_every_prefix(tokenizer, text):
    ids = tokenizer.encode(text)
    for n in range(len(ids) + 1):
        dec = tokenizer.stream_decoder()
        pushed = [dec.push(i) for i in ids[:n]]
        # a valid stream never shows a replacement character: incomplete bytes are held back
        assert all("\ufffd" not in p for p in pushed)
        assert "".join(pushed) + dec.flush() == tokenizer.decode(ids[:n])


def test_stream_never_splits_a_character(tokenizer):
    ids = tokenizer.encode("😀")  # four byte pieces
    assert len(ids) == 4
    dec = tokenizer.stream_decoder()
    assert [dec.push(i) for i in ids] == ["", "", "", "😀"]


def test_train_tokenizer_rejects_empty_input(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="no training text"):
        train_tokenizer([empty], tmp_path / "out", vocab_size=300)


def test_train_tokenizer_turns_newlines_into_nl(tmp_path, ja_text):
    sentences = [line + "\n" + line for line in ja_text.splitlines()]
    path = train_tokenizer(None, tmp_path, vocab_size=1000, sentences=sentences)
    tok = Tokenizer(path)
    assert tok.nl_id is not None and tok.vocab_size <= 1000


def test_bad_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer(tmp_path / "missing.model")


def test_encode_batch_is_encode_of_each_text(tokenizer, monkeypatch):
    texts = ["吾輩は猫である。\n名前はまだ無い。", "", "\r\n", *OUT_OF_VOCAB]
    want = [tokenizer.encode(t) for t in texts]
    got = tokenizer.encode_batch(texts)
    assert [a.dtype.name for a in got] == ["int32"] * len(texts)
    assert [a.tolist() for a in got] == want
    # a sentencepiece without the buffer encode gives the same arrays through its lists
    real = tokenizer.sp.encode

    def lists_only(texts, out_type=int, **kw):
        if out_type == "numpy":
            raise ValueError("unknown return_type=numpy")
        return real(texts, out_type=out_type, **kw)

    monkeypatch.setattr(tokenizer.sp, "encode", lists_only)
    got = tokenizer.encode_batch(texts)
    assert [a.dtype.name for a in got] == ["int32"] * len(texts) and [a.tolist() for a in got] == want
