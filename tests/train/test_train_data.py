"""Training data: documents and packing for pretraining, loss-masked conversations for fine-tuning."""
from __future__ import annotations

import json
import re

import pytest
import torch

from jneox.chat import SYSTEM, USER, Utterance, format_prompt
from jneox.train import data as data_module
from jneox.train.data import (IGNORE_INDEX, DataError, DataStats, Example, build_pretrain_data, build_sft_data,
                              collate, encode_conversation, jsonl_texts, pack_documents, parse_jsonl_line,
                              read_conversations, read_documents)

THREE_TURNS = [
    {"speaker": USER, "text": "日本で一番高い山は?"},
    {"speaker": SYSTEM, "text": "富士山です。"},
    {"speaker": USER, "text": "では\n二番目は?"},
    {"speaker": SYSTEM, "text": "北岳です。\n標高は3193mです。"},
    {"speaker": USER, "text": "ありがとう"},
    {"speaker": SYSTEM, "text": "どういたしまして。"},
]


def labelled_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for y in labels:
        if y != IGNORE_INDEX:
            current.append(y)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


# ---- the loss mask ---------------------------------------------------------------------------
def test_loss_covers_exactly_the_system_utterances_and_their_eos(tokenizer):
    ids, labels, dropped = encode_conversation(THREE_TURNS, tokenizer, max_len=512)
    assert dropped == 0 and len(ids) == len(labels)
    spans = labelled_spans(labels)
    answers = [t["text"] for t in THREE_TURNS if t["speaker"] == SYSTEM]
    assert [tokenizer.decode(s[:-1]) for s in spans] == answers
    assert all(s[-1] == tokenizer.eos_id for s in spans)
    assert sum(y != IGNORE_INDEX for y in labels) == sum(len(tokenizer.encode(a)) + 1 for a in answers)


def test_a_leading_system_greeting_is_a_target_too(tokenizer):
    turns = [Utterance(SYSTEM, "いらっしゃいませ"), *[Utterance(t["speaker"], t["text"]) for t in THREE_TURNS[:2]]]
    ids, labels, _ = encode_conversation(turns, tokenizer, max_len=512)
    assert [tokenizer.decode(s[:-1]) for s in labelled_spans(labels)] == ["いらっしゃいませ", "富士山です。"]
    assert ids == tokenizer.encode(format_prompt(turns, add_generation_prompt=False))


def test_labels_are_the_next_tokens_and_eos_is_never_an_input(tokenizer):
    """Labels are already shifted (the same convention as the pretraining targets)."""
    ids, labels, _ = encode_conversation(THREE_TURNS, tokenizer, max_len=512)
    for t, y in enumerate(labels):
        if y not in (IGNORE_INDEX, tokenizer.eos_id):
            assert ids[t + 1] == y
    assert tokenizer.eos_id not in ids


def test_every_answer_follows_exactly_the_prompt_inference_builds(tokenizer):
    ids, labels, _ = encode_conversation(THREE_TURNS, tokenizer, max_len=512)
    assert ids == tokenizer.encode(format_prompt(THREE_TURNS, add_generation_prompt=False))
    # the position whose target is an answer's first token ends the prompt inference feeds for that answer
    starts = [t for t in range(len(labels)) if labels[t] != IGNORE_INDEX and (t == 0 or labels[t - 1] == IGNORE_INDEX)]
    system_turns = [i for i, u in enumerate(THREE_TURNS) if u["speaker"] == SYSTEM]
    assert len(starts) == len(system_turns)
    for t, i in zip(starts, system_turns):
        prompt = format_prompt(THREE_TURNS[:i])  # ends with "<NL>システム: "
        assert ids[:t + 1] == tokenizer.encode(prompt)
        assert labels[t:t + len(tokenizer.encode(THREE_TURNS[i]["text"]))] == tokenizer.encode(THREE_TURNS[i]["text"])


# ---- truncation ------------------------------------------------------------------------------
def test_long_conversations_drop_whole_oldest_turns(tokenizer):
    last_two = tokenizer.encode(format_prompt(THREE_TURNS[2:], add_generation_prompt=False))
    ids, labels, dropped = encode_conversation(THREE_TURNS, tokenizer, max_len=len(last_two))
    assert dropped == 2 and ids == last_two
    assert [tokenizer.decode(s[:-1]) for s in labelled_spans(labels)] == [THREE_TURNS[3]["text"], THREE_TURNS[5]["text"]]
    ids, labels, dropped = encode_conversation(THREE_TURNS, tokenizer, max_len=len(last_two) - 1)
    assert dropped == 4 and ids == tokenizer.encode(format_prompt(THREE_TURNS[4:], add_generation_prompt=False))


def test_one_exchange_longer_than_max_len_is_cut_not_crashed(tokenizer):
    turns = [Utterance(USER, "山の名前を教えて"), Utterance(SYSTEM, "富士山、北岳、奥穂高岳、間ノ岳、槍ヶ岳。" * 5)]
    ids, labels, dropped = encode_conversation(turns, tokenizer, max_len=20)
    assert dropped == 0 and len(ids) == len(labels) == 20
    answer = tokenizer.encode(turns[1].text)
    kept = [y for y in labels if y != IGNORE_INDEX]
    assert kept and kept == answer[:len(kept)]  # the start of the answer, without </s>: it did not end there
    assert tokenizer.eos_id not in kept


# ---- conversations: shapes and errors --------------------------------------------------------
def test_card_shape_conversation_shape_and_messages_shape_agree(tmp_path):
    messages = {"messages": [{"role": "system", "content": "あなたは親切です"}]
                + [{"role": "user" if t["speaker"] == USER else "assistant", "content": t["text"]} for t in THREE_TURNS]
                + [{"role": "user", "content": "またね"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [THREE_TURNS, {"conversation": THREE_TURNS}, messages])
    stats = DataStats()
    convs = read_conversations([path], stats=stats)
    expected = [Utterance(t["speaker"], t["text"]) for t in THREE_TURNS]
    assert convs == [expected, expected, expected]
    assert stats.system_prompts_dropped == 1 and stats.trailing_user_turns_dropped == 1


@pytest.mark.parametrize("line, problem", [
    ('[{"speaker": "ユーザー", "text": "a"}, {"speaker": "システム", "text": "b"', "not valid JSON"),
    ('[{"speaker": "先生", "text": "a"}]', "unknown speaker"),
    ('{"messages": [{"role": "tool", "content": "a"}]}', "unknown role"),
    ('[]', "empty conversation"),
    ('[{"speaker": "ユーザー", "text": "a"}]', "no システム turn"),
    ('[{"speaker": "ユーザー", "text": "a"}, {"speaker": "システム", "text": 3}]', "must be a string"),
    ('[{"speaker": "ユーザー", "text": "a"}, {"speaker": "システム", "text": " "}]', "empty システム utterance"),
    ('{"text": "a"}', "expected a JSON array"),
])
def test_bad_conversation_lines_name_file_and_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "c.jsonl", [THREE_TURNS, "", line])
    with pytest.raises(DataError) as e:
        read_conversations([path])
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value)


def test_empty_conversation_file_names_the_file(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="^" + re.escape(f"{tmp_path / 'c.jsonl'}:1: the file is empty")):
        read_conversations([tmp_path / "c.jsonl"])
    with pytest.raises(DataError, match="no conversations"):
        read_conversations([tmp_path / "c.jsonl"], skip_bad_lines=True)


def test_skip_bad_lines_counts_and_keeps_the_good_ones(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ["{oops", THREE_TURNS, '[{"speaker": "先生", "text": "a"}]', THREE_TURNS])
    stats = DataStats()
    convs = read_conversations([path], skip_bad_lines=True, stats=stats)
    assert len(convs) == 2 and stats.skipped_lines == 2
    assert stats.skipped[0].startswith(f"{path}:1: ") and stats.skipped[1].startswith(f"{path}:3: ")
    assert "skipped 2 bad lines" in stats.summary()


# ---- documents: shapes and errors ------------------------------------------------------------
def test_read_documents_text_files_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("一行目\n二行目\n", encoding="utf-8")
    path = write_jsonl(tmp_path / "b.jsonl", [{"body": "文書1"}, {"body": "文書2\nの続き"}])
    assert list(read_documents([tmp_path / "a.txt", path], text_field="body")) == ["一行目\n二行目\n", "文書1", "文書2\nの続き"]


@pytest.mark.parametrize("name, content, where, problem", [
    ("d.jsonl", b'{"text": "ok"}\n{"text": 5}\n', 2, "must be a string"),
    ("d.jsonl", b'{"text": "ok"}\n\n{"body": "x"}\n', 3, "no 'text' field"),
    ("d.jsonl", b'{"text": "ok"}\n["x"]\n', 2, "expected a JSON object"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "x\n', 2, "not valid JSON"),
    ("d.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', 2, "invalid UTF-8"),
    ("d.jsonl", b"\n \n", 1, "the file is empty"),
    ("d.txt", b"", 1, "the file is empty"),
    ("d.txt", b"good line\nsecond\nbad \xe3\x81 byte\n", 3, "invalid UTF-8"),
])
def test_bad_documents_name_file_and_line(tmp_path, name, content, where, problem):
    (tmp_path / name).write_bytes(content)
    good = tmp_path / "good.txt"
    good.write_text("本文", encoding="utf-8")
    with pytest.raises(DataError) as e:
        list(read_documents([good, tmp_path / name]))
    assert str(e.value).startswith(f"{tmp_path / name}:{where}: ") and problem in str(e.value)
    stats = DataStats()
    assert list(read_documents([good, tmp_path / name], skip_bad_lines=True, stats=stats))[0] == "本文"
    assert stats.skipped_lines == 1


def test_no_documents_at_all_is_an_error(tmp_path):
    (tmp_path / "e.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no documents"):
        list(read_documents([tmp_path / "e.txt"], skip_bad_lines=True))
    with pytest.raises(DataError, match="no such file"):  # a missing file is not a bad line: never skipped
        list(read_documents([tmp_path / "e.txt", tmp_path / "missing.txt"], skip_bad_lines=True))


# ---- packing and the held-out split ----------------------------------------------------------
def test_pack_joins_documents_with_eos_and_drops_only_the_remainder():
    eos = 3
    assert pack_documents([[5, 6, 7], [8, 9]], block_size=2, eos_id=eos).tolist() == [[5, 6, 7], [3, 8, 9]]
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(4, 100, (int(n),), generator=g).tolist() for n in torch.randint(1, 40, (30,), generator=g)]
    stream = [t for d in docs for t in d + [eos]]
    blocks = pack_documents(docs, block_size=16, eos_id=eos)
    assert blocks.dtype == torch.long and blocks.shape == (len(stream) // 17, 17)
    assert blocks.flatten().tolist() == stream[:blocks.numel()] and len(stream) - blocks.numel() < 17


class DigitTokenizer:
    """Document ``"i"`` becomes ``[i] * length``: every token says which document it came from."""
    eos_id = 3

    def __init__(self, length: int = 7):
        self.length = length

    def encode(self, text: str) -> list[int]:
        return [int(text)] * self.length


def test_held_out_split_is_by_document_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": str(i)} for i in range(10, 60)])
    train, val = build_pretrain_data([path], DigitTokenizer(), block_size=6, val_fraction=0.1, seed=1)
    again = build_pretrain_data([path], DigitTokenizer(), block_size=6, val_fraction=0.1, seed=1)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    train_docs, val_docs = set(train.unique().tolist()) - {3}, set(val.unique().tolist()) - {3}
    assert train_docs.isdisjoint(val_docs) and len(val_docs) == 5
    assert train_docs | val_docs == set(range(10, 60))  # 8 tokens a document, rows of 7: nothing else lost
    other = build_pretrain_data([path], DigitTokenizer(), block_size=6, val_fraction=0.1, seed=2)[1]
    assert set(other.unique().tolist()) - {3} != val_docs


def test_two_documents_still_hold_one_out_and_one_document_holds_out_its_last_blocks(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "11"}, {"text": "12"}])
    train, val = build_pretrain_data([path], DigitTokenizer(), block_size=3, val_fraction=0.01)
    assert len(train) == len(val) == 2
    assert sorted([set(train.unique().tolist()), set(val.unique().tolist())], key=max) == [{3, 11}, {3, 12}]
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "11"}])
    train, val = build_pretrain_data([one], DigitTokenizer(length=39), block_size=9, val_fraction=0.25)
    assert train.shape == (3, 10) and val.shape == (1, 10)


def test_too_little_text_for_one_block_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "11"}])
    with pytest.raises(DataError, match="too few for one block"):
        build_pretrain_data([path], DigitTokenizer(), block_size=64)


def test_pretrain_text_keeps_newlines_as_nl_and_ends_documents_with_eos(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("吾輩は猫である。\n名前はまだ無い。", encoding="utf-8")
    (tmp_path / "b.txt").write_text("どこで生まれたのか", encoding="utf-8")
    train, val = build_pretrain_data([tmp_path / "a.txt", tmp_path / "b.txt"], tokenizer, block_size=4, val_fraction=0)
    assert len(val) == 0
    stream = train.flatten().tolist()
    expected = tokenizer.encode("吾輩は猫である。\n名前はまだ無い。") + [tokenizer.eos_id] + tokenizer.encode("どこで生まれたのか") + [3]
    assert stream == expected[:len(stream)] and tokenizer.nl_id in stream


# ---- fine-tuning examples and batches --------------------------------------------------------
def test_build_sft_data_splits_by_conversation_and_reports_cuts(tmp_path, tokenizer):
    convs = [[{"speaker": USER, "text": f"質問{i}"}, {"speaker": SYSTEM, "text": f"答え{i}です。"}] for i in range(20)]
    path = write_jsonl(tmp_path / "c.jsonl", convs + [THREE_TURNS])
    stats = DataStats()
    train, val = build_sft_data([path], tokenizer, max_len=40, val_fraction=0.2, seed=0, stats=stats)
    assert len(train) == 17 and len(val) == 4 and all(len(e) <= 40 for e in train + val)
    again = build_sft_data([path], tokenizer, max_len=40, val_fraction=0.2, seed=0)
    assert [e.input_ids for e in val] == [e.input_ids for e in again[1]]
    texts = lambda examples: {tokenizer.decode(e.input_ids) for e in examples}  # noqa: E731
    assert texts(train).isdisjoint(texts(val))
    assert stats.dropped_turns > 0  # THREE_TURNS does not fit 40 tokens
    val_path = write_jsonl(tmp_path / "v.jsonl", convs[:3])
    train, val = build_sft_data([path], tokenizer, max_len=40, val_paths=[val_path])
    assert len(train) == 21 and len(val) == 3


def test_collate_pads_on_the_right_without_loss():
    batch = [Example([5, 6, 7], [IGNORE_INDEX, 7, 3]), Example([8], [3])]
    input_ids, labels = collate(batch, pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 7, 3], [3, IGNORE_INDEX, IGNORE_INDEX]]



# ---- jneox train-tokenizer -------------------------------------------------------------------
def test_train_tokenizer_cli_has_the_card_options(tmp_path, capsys):
    from jneox.cli import main
    from jneox.tokenizer import NL, Tokenizer
    from conftest import DATA

    word = "ジェイネオックス"  # only in the JSONL file: it must be part of the training text
    jsonl = write_jsonl(tmp_path / "extra.jsonl", [{"text": f"{word}は速い。\n{word}は小さい。"}] * 30)
    out = tmp_path / "tok"
    rc = main(["train-tokenizer", "--input", str(DATA / "ja_sample.txt"), jsonl, "--vocab-size", "1000",
               "--out", str(out), "--seed", "0"])
    assert rc == 0
    tok = Tokenizer(out / "spiece.model")
    printed = capsys.readouterr().out
    assert str(out / "spiece.model") in printed and f"vocab size {tok.vocab_size}" in printed
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert not tok.tokenize("吾輩は猫")[0].startswith("\u2581")  # no dummy prefix
    for text in ("吾輩は  猫\tである ", "𠮷野家 🍣", "一行目\n二行目"):
        assert tok.decode(tok.encode(text)) == text  # extra whitespace kept, byte fallback, newlines
        assert tok.unk_id not in tok.encode(text)
    assert tok.tokenize(NL) == [NL] and tok.encode("a\nb").count(tok.nl_id) == 1
    assert len(tok.tokenize(f"{word}は小さい")) < len(word)


def test_train_tokenizer_cli_seed_makes_the_vocabulary_reproducible(tmp_path, capsys):
    from jneox.cli import main
    from jneox.tokenizer import Tokenizer
    from conftest import DATA

    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": f"{i}番目の文です。\n{i * 7}個目の行。"} for i in range(40)])

    def vocab(out, seed=3):
        args = ["--input", str(DATA / "ja_sample.txt"), extra, "--vocab-size", "700", "--input-sentence-size", "101"]
        assert main(["train-tokenizer", *args, "--out", str(out), "--seed", str(seed)]) == 0
        sp = Tokenizer(out / "spiece.model").sp
        return [(sp.IdToPiece(i), sp.GetScore(i)) for i in range(sp.GetPieceSize())]

    assert vocab(tmp_path / "a") == vocab(tmp_path / "b") != vocab(tmp_path / "c", seed=4)


def test_train_tokenizer_cli_reports_bad_data_with_file_and_line(tmp_path, capsys):
    from jneox.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "よい行"}, "{broken"])
    assert main(["train-tokenizer", "--input", bad, "--vocab-size", "300", "--out", str(tmp_path / "t")]) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err


def test_train_tokenizer_cli_keeps_an_existing_tokenizer_unless_told(tmp_path, capsys):
    """--out at a model folder must not silently replace the model's own tokenizer."""
    from jneox.cli import main
    from conftest import DATA

    out = tmp_path / "model"
    out.mkdir()
    (out / "spiece.model").write_bytes(b"the model's own tokenizer")
    args = ["train-tokenizer", "--input", str(DATA / "ja_sample.txt"), "--vocab-size", "1000", "--out", str(out)]
    assert main(args) == 2
    assert f"{out / 'spiece.model'}: already exists" in capsys.readouterr().err
    assert (out / "spiece.model").read_bytes() == b"the model's own tokenizer"
    assert sorted(p.name for p in out.iterdir()) == ["spiece.model"]  # nothing written beside it
    assert main([*args, "--overwrite"]) == 0
    from jneox.tokenizer import Tokenizer
    tok = Tokenizer(out / "spiece.model")  # replaced by the trained one
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


JSONL_LINES = ['{"text": "吾輩は猫である。\\n名前はまだ無い。"}', '{"id": 3, "text": "a\\r\\nb\\t\\"c\\" \\\\n \\u00e9 \\ud83d\\ude00"}',
               '  {"text": "", "meta": {"x": [1, 2.5e3, null, true]}}\r', '{"text": "first", "text": "last"}']


@pytest.mark.skipif(data_module.orjson is None, reason="orjson is not installed: jsonl_texts always defers to json")
def test_jsonl_texts_reads_what_the_line_by_line_reading_does():
    raw = [line.encode("utf-8") for line in JSONL_LINES]
    want = [parse_jsonl_line("x.jsonl", i, line, "text") for i, line in enumerate(raw, start=1)]
    assert jsonl_texts(b"\n".join(raw) + b"\n", "text") == want
    assert jsonl_texts(b"\n".join(raw), "text") == want  # no newline after the last line
    assert jsonl_texts(b'{"body": "x"}\n', "body") == ["x"]


@pytest.mark.parametrize("line", [b"", b"   ", b'{"text": 5}', b'{"txt": "a"}', b'["text"]', b'"text"', b"{not json",
                                  b'{"text": "a", "x": NaN}', b'\xef\xbb\xbf{"text": "a"}', b'{"text": "\\ud800"}',
                                  b'{"text": "\xff"}', b'{"text": "a"} {"text": "b"}'])
def test_jsonl_texts_defers_every_line_json_might_read_otherwise(line):
    good = '{"text": "吾輩は猫である。"}'.encode("utf-8")
    assert jsonl_texts(b"\n".join([good, line, good]) + b"\n", "text") is None
