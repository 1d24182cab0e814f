"""The demo model's recipe: corpus extraction, FAQ pairs, SFT data split, and the evaluation."""
from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "demo"
sys.path.insert(0, str(RECIPE))


def _load_recipe_module(name: str):
    """evaluate.py under a name of its own: a plain `import evaluate` could meet another package."""
    spec = importlib.util.spec_from_file_location(f"demo_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


demo_eval = _load_recipe_module("evaluate")
import faq_pairs  # noqa: E402
import make_corpus  # noqa: E402
import make_copy_data  # noqa: E402
import make_sft_data  # noqa: E402
from japanese import japanese_letter_ratio, japanese_ratio  # noqa: E402

from jneox.chat import SYSTEM, USER, Utterance  # noqa: E402


# ---------------------------------------------------------------------------
# What counts as Japanese, and the answer format rules


def test_japanese_letter_ratio_ignores_digits_punctuation_and_symbols():
    assert japanese_letter_ratio("1週間は168時間です。") == 1.0
    assert japanese_letter_ratio("3 × 8 = 24") == 0.0  # no letters at all
    assert japanese_letter_ratio("Pythonは言語です") == pytest.approx(5 / 11)
    assert japanese_letter_ratio("佐々木さん、〇時です") == 1.0  # 々 and 〇 are Japanese letters
    assert japanese_letter_ratio("안녕하세요 こんにちは") == pytest.approx(5 / 10)


def test_japanese_ratio_counts_kana_kanji_punctuation_and_full_width():
    assert japanese_ratio("日本の首都は東京です。") == 1.0
    assert japanese_ratio("「ＡＢＣ１２３」！") == 1.0  # full-width forms and Japanese brackets count
    assert japanese_ratio("東京 です\n。") == 1.0  # whitespace is not counted at all
    assert japanese_ratio("Tokyo is the capital.") == 0.0
    assert japanese_ratio("   ") == 0.0
    assert japanese_ratio("Pythonは言語です") == pytest.approx(5 / 11)


@pytest.mark.parametrize(
    "text, ended, failing",
    [
        ("日本の首都は東京です。", True, []),
        ("はい、ユーザーの皆さんの質問に答えます。", True, []),  # the word ユーザー is fine, a new turn is not
        ("", True, ["non_empty", "japanese"]),
        ("東京です。\nユーザー: ありがとう", True, ["no_new_user_turn"]),
        ("ユーザー：次の質問です", True, ["no_new_user_turn"]),
        ("The capital of Japan is Tokyo.", True, ["japanese"]),
        ("Pythonはプログラミング言語です。", True, ["japanese"]),  # 12 of 18 letters: below 80%
        ("1週間は168時間です。24時間×7日で計算できます。", True, []),  # digits and symbols are neutral
        ("「Australia」と書きます。", True, ["japanese"]),
        ("日本の首都は東京です。日本の首都は東京です。日本の", False, ["ends_with_eos"]),
    ],
)
def test_check_answer_applies_each_rule(text, ended, failing):
    check = demo_eval.check_answer(text, ended)
    rules = ["non_empty", "ends_with_eos", "no_new_user_turn", "japanese"]
    assert [r for r in rules if not getattr(check, r)] == failing
    assert check.compliant == (not failing)


# ---------------------------------------------------------------------------
# Corpus extraction

FAQ_PAGE = """<html><head><meta charset="Shift_JIS"><title>第1章</title><style>p{color:red}</style></head>
<body><div class="navheader"><a href="x.html">次へ</a> 戻る 目次 ナビゲーション見出し</div>
<div class="toc"><dl><dt>1.1. Debian とは何?</dt></dl></div>
<h2 class="title">1.1. Debian とは何?</h2>
<p>Debian は自由なオペレーティング
システムです。多くの<code>パッケージ</code>を収録しています。</p>
<pre class="screen">$ apt-get install 日本語のパッケージ</pre>
<h2>1.2. 発音は?</h2>
<p>次のとおり:</p><p>デビアンと発音します。創設者二人の名前から来ています。</p>
<h2>1.3. 歴史</h2><p>これは質問ではない見出しの節なので使われません。</p>
<script>var x = "スクリプトの中の日本語";</script>
</body></html>"""


def test_html_extraction_keeps_prose_and_drops_navigation_code_and_scripts():
    paragraphs = make_corpus.html_paragraphs(FAQ_PAGE.encode("shift_jis"))
    assert "Debian は自由なオペレーティングシステムです。多くのパッケージを収録しています。" in paragraphs
    text = "\n".join(paragraphs)
    for dropped in ("ナビゲーション見出し", "apt-get", "スクリプトの中", "color"):
        assert dropped not in text


ROFF_PAGE = r""".\" a comment with 日本語 that must not appear
.TH LS "1" "2021年5月" "GNU coreutils" "ユーザーコマンド"
.SH 名前
ls \- ディレクトリの内容をリスト表示する
.SH 書式
.B ls
[\fI\,オプション\/\fR]...
.SH 説明
.PP
FILE (デフォルトは現在のディレクトリ) に関する情報を一覧表示します。
\fB\-cftuvSUX\fR のいずれも指定されず、
要素はアルファベット順でソートされます。
.nf
$ ls \-l 例の中の日本語
.fi
.SH 著作権
Copyright \(co 2021 著作権の文章
"""


def test_man_page_extraction_joins_wrapped_lines_and_strips_roff():
    paragraphs = make_corpus.man_paragraphs(ROFF_PAGE.encode("utf-8"))
    assert paragraphs == [
        "ls - ディレクトリの内容をリスト表示する",
        "FILE (デフォルトは現在のディレクトリ) に関する情報を一覧表示します。"
        " -cftuvSUX のいずれも指定されず、要素はアルファベット順でソートされます。",
    ]
    assert make_corpus.man_paragraphs(b".so man1/other.1\n") is None


def test_keep_paragraph_wants_japanese_prose():
    assert make_corpus.keep_paragraph("この関数はファイルを開いて、その内容を読み込みます。")
    assert not make_corpus.keep_paragraph("This function opens the file and reads its contents.")
    assert not make_corpus.keep_paragraph("if (x == 0) { return -1; } /* 戻り値 */ $x = [a|b];")
    assert not make_corpus.keep_paragraph("目次")  # too short: headings and menu items
    assert not make_corpus.keep_paragraph("Copyright © 2020 著作権は各著者に帰属します。")


def _write_page(root: Path, name: str, body: str) -> None:
    path = root / "usr" / "share" / "doc" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"<html><body>{body}</body></html>", encoding="utf-8")


def test_build_corpus_deduplicates_and_drops_repeated_boilerplate(tmp_path):
    root = tmp_path / "root"
    footer = "<p>このページはドキュメントチームが管理しています。</p>"
    shared = "<p>" + "同じ説明文が二つのページに出てきます。" * 3 + "</p>"
    for i in range(4):
        own = f"<p>ページ{i}だけの本文です。" + "内容のある日本語の文章がここに続きます。" * 5 + "</p>"
        _write_page(root / "pkg-ja", f"page{i}.html", own + (shared if i < 2 else "") + footer)
    _write_page(root / "pkg-ja", "english.html", "<p>Only English text here, nothing to keep.</p>")
    man = root / "man-ja" / "usr" / "share" / "man" / "ja" / "man1" / "tool.1.gz"
    man.parent.mkdir(parents=True)
    man.write_bytes(gzip.compress(("説明文の段落がここにあります。" * 8 + "\n").encode()))

    out = tmp_path / "corpus.jsonl"
    stats = make_corpus.build_corpus(["pkg-ja", "man-ja"], root, out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["source"] for r in rows] == [
        *(f"pkg-ja/usr/share/doc/page{i}.html" for i in range(4)),
        "man-ja/usr/share/man/ja/man1/tool.1.gz",
    ]
    text = "\n".join(r["text"] for r in rows)
    assert "ドキュメントチーム" not in text  # in every page: boilerplate
    assert text.count("同じ説明文が二つのページ") == 3  # the repeated paragraph is kept once
    assert stats.documents == 5 and stats.paragraphs_duplicate == 1 and stats.paragraphs_boilerplate == 4
    assert stats.per_package["pkg-ja"]["pages"] == 5 and stats.per_package["pkg-ja"]["documents"] == 4
    assert stats.bytes == sum(len(r["text"].encode()) for r in rows)


# ---------------------------------------------------------------------------
# FAQ pairs


def test_faq_pairs_are_question_headings_with_their_short_answers():
    pairs = faq_pairs.faq_pairs_from_html(FAQ_PAGE.encode("shift_jis"))
    assert pairs == [
        ("Debian とは何？", "Debian は自由なオペレーティングシステムです。多くのパッケージを収録しています。"),
        ("発音は？", "デビアンと発音します。創設者二人の名前から来ています。"),
    ]


def test_faq_answer_is_cut_at_a_sentence_end():
    sentence = "これは回答の一文目でかなり長い説明をしています。"
    answer = faq_pairs.short_answer([sentence * 20])
    assert answer.endswith("。") and len(answer) <= faq_pairs.MAX_ANSWER_CHARS
    assert faq_pairs.short_answer(["(括弧が閉じないまま「途中で終わる回答です。"]) is None


# ---------------------------------------------------------------------------
# SFT data


def _conversation(question: str, answer: str = "はい、わかりました。") -> list[dict]:
    return [{"speaker": USER, "text": question}, {"speaker": SYSTEM, "text": answer}]


def test_conversation_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_conversation("こんにちは")) + "\n" + json.dumps([{"speaker": USER, "text": "終わらない"}]) + "\n",
                   encoding="utf-8")
    with pytest.raises(make_sft_data.ConversationFileError, match=r"bad\.jsonl:2: the last turn"):
        make_sft_data.read_conversation_file(bad)
    bad.write_text("[{\"speaker\": \"先生\", \"text\": \"x\"}]\n", encoding="utf-8")
    with pytest.raises(make_sft_data.ConversationFileError, match=r"bad\.jsonl:1: unknown speaker"):
        make_sft_data.read_conversation_file(bad)
    bad.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(make_sft_data.ConversationFileError, match=r"bad\.jsonl:1: not valid JSON"):
        make_sft_data.read_conversation_file(bad)


def test_other_conversation_shapes_are_read(tmp_path):
    path = tmp_path / "shapes.jsonl"
    messages = {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "やあ"},
                             {"role": "assistant", "content": "こんにちは。"}]}
    path.write_text(json.dumps({"conversation": _conversation("元気？")}) + "\n" + json.dumps(messages) + "\n",
                    encoding="utf-8")
    conversations = make_sft_data.read_conversation_file(path)
    assert conversations[1] == [Utterance(USER, "やあ"), Utterance(SYSTEM, "こんにちは。")]


def test_heldout_split_is_stable_deduplicated_and_hand_written_only():
    def parse(c):
        return make_sft_data.parse_conversation(c)

    handwritten = [parse(_conversation(f"質問その{i}ですか？")) for i in range(200)]
    handwritten.append(handwritten[0])  # an exact duplicate
    faq = [parse(_conversation(f"FAQの質問{i}は？")) for i in range(30)]
    train, heldout = make_sft_data.split_sft_data(handwritten, faq, heldout_percent=10)
    assert len(train) + len(heldout) == 200 + 30
    assert 5 <= len(heldout) <= 40
    assert all(c[0].text.startswith("質問その") for c in heldout)
    # the split depends on the question only, not on order or on what else is in the data
    train2, heldout2 = make_sft_data.split_sft_data(list(reversed(handwritten[:150])), [], heldout_percent=10)
    assert {c[0].text for c in heldout2} == {c[0].text for c in heldout if c in handwritten[:150]}
    # an FAQ pair asking a held-out question does not leak into training
    leaked = parse(_conversation(heldout[0][0].text, "別の答え。"))
    train3, _ = make_sft_data.split_sft_data(handwritten, [leaked], heldout_percent=10)
    assert leaked not in train3


def test_tokenizer_text_is_the_conversations_as_the_model_reads_them(tmp_path):
    turns = make_sft_data.parse_conversation(_conversation("一行目\n二行目", "はい。"))
    path = tmp_path / "conversations.txt"
    make_sft_data.write_tokenizer_text([turns, turns], path)
    assert path.read_text(encoding="utf-8") == "ユーザー: 一行目<NL>二行目<NL>システム: はい。\n" * 2


# ---------------------------------------------------------------------------
# Evaluation on tiny checkpoints made here


def _fixed_checkpoint(folder: Path, spiece_model: Path, favourite: int | None) -> Path:
    """A model whose next-token distribution never changes: uniform, or strongly one token."""
    from jneox.checkpoint import save
    from jneox.config import ModelConfig
    from jneox.model import GPTNeoX
    from jneox.tokenizer import Tokenizer

    vocab = Tokenizer(spiece_model).vocab_size
    config = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                         max_position_embeddings=256)
    torch.manual_seed(0)
    model = GPTNeoX(config)
    with torch.no_grad():
        model.norm_f.weight.zero_()
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 1.0  # the final hidden state is the same unit vector at every position
        model.lm_head.weight.zero_()
        if favourite is not None:
            model.lm_head.weight[favourite, 0] = 30.0
    return save(model, folder, tokenizer_file=spiece_model)


HELDOUT = [
    [{"speaker": USER, "text": "日本の首都はどこですか？"}, {"speaker": SYSTEM, "text": "東京です。"}],
    [{"speaker": USER, "text": "おすすめの本はある？"}, {"speaker": SYSTEM, "text": "どんな本が好きですか？"},
     {"speaker": USER, "text": "小説が好きです。"}, {"speaker": SYSTEM, "text": "では夏目漱石の「こころ」はいかがでしょう。"}],
    [{"speaker": USER, "text": "こんにちは"}, {"speaker": SYSTEM, "text": "こんにちは。\n何かお手伝いしましょうか？"}],
]


@pytest.fixture
def heldout_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in HELDOUT), encoding="utf-8")
    return path


def test_uniform_model_has_perplexity_equal_to_its_vocabulary(tmp_path, spiece_model, heldout_file):
    from jneox.loading import load

    model, tokenizer = load(_fixed_checkpoint(tmp_path / "uniform", spiece_model, None))
    conversations = demo_eval.load_heldout(heldout_file)
    nll, tokens = demo_eval.response_nll(model, tokenizer, conversations)
    # only answers and their </s> are scored, never the questions or the speaker names
    answers = [t for c in conversations for t in c if t.speaker == SYSTEM]
    assert tokens == sum(len(tokenizer.encode(a.text)) + 1 for a in answers)
    assert math.exp(nll / tokens) == pytest.approx(tokenizer.vocab_size, rel=1e-4)


def test_evaluation_reports_perplexities_and_catches_broken_answers(tmp_path, spiece_model, heldout_file, tokenizer):
    silent = _fixed_checkpoint(tmp_path / "silent", spiece_model, tokenizer.eos_id)  # answers </s> at once
    result = demo_eval.evaluate(silent, demo_eval.load_heldout(heldout_file),
                                pretrained_dir=_fixed_checkpoint(tmp_path / "uniform", spiece_model, None))
    assert result["perplexity_pretrained"] == pytest.approx(tokenizer.vocab_size, rel=1e-4)
    assert result["perplexity_sft"] > result["perplexity_pretrained"]  # only ever saying </s> is worse than guessing
    for mode in ("greedy", "sampling"):
        assert result[mode]["ends_with_eos"] == 1.0
        assert result[mode]["non_empty"] == 0.0 and result[mode]["compliant"] == 0.0
        assert len(result[mode]["answers"]) == len(HELDOUT)

    piece = tokenizer.encode("東")[0]
    babbler = _fixed_checkpoint(tmp_path / "babbler", spiece_model, piece)  # never stops
    result = demo_eval.evaluate(babbler, demo_eval.load_heldout(heldout_file, limit=1))
    answer = result["greedy"]["answers"][0]
    assert answer["prompt"] == "ユーザー: 日本の首都はどこですか？<NL>システム: "
    assert answer["answer"] == tokenizer.decode([piece] * demo_eval.MAX_NEW_TOKENS)
    assert answer["japanese"] and not answer["ends_with_eos"]
    assert result["greedy"]["compliant"] == 0.0


def test_evaluate_command_writes_json(tmp_path, spiece_model, heldout_file, tokenizer, capsys):
    model = _fixed_checkpoint(tmp_path / "silent", spiece_model, tokenizer.eos_id)
    out = tmp_path / "eval" / "result.json"
    code = demo_eval.main(["--model", str(model), "--heldout", str(heldout_file), "--limit", "2", "--json", str(out),
                           "--require", "0.95"])
    assert code == 1  # an empty answer is never compliant
    printed = capsys.readouterr().out
    assert "response perplexity after SFT" in printed and "greedy" in printed
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["heldout_conversations"] == 2 and saved["sampling"]["params"]["temperature"] == 0.7


# ---------------------------------------------------------------------------
# The shipped model (committed: a missing model or conversation set is a failure, not a skip)


def test_shipped_demo_model_answers_in_format(tmp_path):
    model_dir = ROOT / "models" / "demo"
    conversations_dir = RECIPE / "data" / "conversations"
    assert (model_dir / "config.json").is_file(), "models/demo is missing"
    files = make_sft_data.conversation_files([conversations_dir])
    assert files, "recipes/demo/data/conversations has no conversations"
    handwritten = [c for f in files for c in make_sft_data.read_conversation_file(f)]
    _, heldout = make_sft_data.split_sft_data(handwritten, [])
    result = demo_eval.evaluate(model_dir, heldout[:5])
    assert math.isfinite(result["perplexity_sft"])
    assert result["greedy"]["compliant"] >= 0.8, result["greedy"]["answers"]


def test_copy_tasks_answer_with_the_prompts_own_words():
    passages = [f"これは{i}番目の段落です。ここには説明の文が続きます。ここにも長い説明の文が続きます。最後の文はこの場所でようやく終わります。"
                for i in range(12)]  # 60+ characters: shorter passages are not used
    convs = [make_sft_data.parse_conversation(_conversation(f"質問{i}は何ですか？", p)) for i, p in enumerate(passages)]
    tasks = make_copy_data.copy_conversations(convs, 3, seed=0)
    kinds = {make_copy_data.QA_INSTRUCTION: 0, make_copy_data.REPEAT_INSTRUCTION: 0, make_copy_data.TYPO_INSTRUCTION: 0}
    for user, system in tasks:
        instruction, body = user.text.split("\n", 1)
        kinds[instruction] += 1
        if instruction == make_copy_data.TYPO_INSTRUCTION:  # one or two characters changed, length kept
            assert body != system.text and len(body) == len(system.text)
            assert 1 <= sum(a != b for a, b in zip(body, system.text)) <= 2
        elif instruction == make_copy_data.REPEAT_INSTRUCTION:
            assert body == system.text and system.text in passages
        else:  # a span of the context: the first sentences of the passage that answers the question
            assert system.text in body and body.count("番目の段落") == 1 + make_copy_data.DISTRACTORS
            asked = int(body.rsplit("質問: 質問", 1)[1].split("は")[0])
            assert system.text == "".join(make_copy_data.sentences(passages[asked])[:2])
    assert all(n == len(convs) for n in kinds.values())


def test_scrambled_repeats_are_the_passages_pieces_reordered():
    passages = ["これは一番目の段落です。説明の文が続きます。", "二つ目の段落には、別の言葉がいくつも並んでいます。"]
    for (user, system), passage in zip(make_copy_data.scrambled_conversations(passages, 5, seed=0), passages):
        assert user.text == f"{make_copy_data.REPEAT_INSTRUCTION}\n{system.text}"
        assert sorted(system.text) == sorted(passage) and system.text != passage


def test_copy_data_keeps_heldout_text_out_of_training(tmp_path):
    folder = tmp_path / "conversations"
    folder.mkdir()
    lines = [json.dumps(_conversation(f"質問その{i}ですか？", f"答えその{i}は、この文章の中にあります。続きの文もここにあります。三つ目の文も、この段落の最後にきちんと置いてあります。"),
                        ensure_ascii=False) for i in range(120)]
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    make_copy_data.main(["--conversations", str(folder), "--out-dir", str(tmp_path / "out"), "--short", "40"])
    train = (tmp_path / "out" / "train.jsonl").read_text(encoding="utf-8")
    short = (tmp_path / "out" / "short.jsonl").read_text(encoding="utf-8")
    assert short.count(make_copy_data.REPEAT_INSTRUCTION) == 40
    train += short  # the short spans come from training passages only
    heldout = [json.loads(line) for line in (tmp_path / "out" / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    chat = [json.loads(line) for line in (tmp_path / "out" / "chat.jsonl").read_text(encoding="utf-8").splitlines()]
    assert heldout and chat and len(chat) < 40
    for conv in heldout:
        assert conv[1]["text"] not in train
    for conv in chat:
        assert conv[0]["text"] not in train and conv[1]["text"] not in train
