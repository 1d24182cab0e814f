import pytest

from jneox.chat import (SYSTEM, USER, ChatSession, ConversationError, fit_to_window, format_prompt, parse_answer,
                        to_utterances)

CARD_PROMPT = [
    {"speaker": "ユーザー", "text": "日本のおすすめの観光地を教えてください。"},
    {"speaker": "システム", "text": "どの地域の観光地が知りたいですか?"},
    {"speaker": "ユーザー", "text": "渋谷の観光地を教えてください。"},
]
CARD_STRING = ("ユーザー: 日本のおすすめの観光地を教えてください。<NL>システム: どの地域の観光地が知りたいですか?"
               "<NL>ユーザー: 渋谷の観光地を教えてください。<NL>システム: ")


def test_card_example_byte_for_byte():
    assert format_prompt(CARD_PROMPT).encode("utf-8") == CARD_STRING.encode("utf-8")


def test_openai_messages_give_the_same_prompt():
    messages = [{"role": "user", "content": CARD_PROMPT[0]["text"]},
                {"role": "assistant", "content": CARD_PROMPT[1]["text"]},
                {"role": "user", "content": CARD_PROMPT[2]["text"]}]
    assert format_prompt(messages) == CARD_STRING


def test_newlines_inside_utterances_become_nl():
    prompt = format_prompt([{"speaker": USER, "text": "一行目\n二行目\r\n三行目"}])
    assert prompt == "ユーザー: 一行目<NL>二行目<NL>三行目<NL>システム: "
    assert "\n" not in prompt


def test_unknown_speaker_and_role_are_errors():
    with pytest.raises(ConversationError, match="unknown speaker"):
        format_prompt([{"speaker": "アシスタント", "text": "x"}])
    with pytest.raises(ConversationError, match="unknown role 'system'"):
        to_utterances([{"role": "system", "content": "x"}])


def test_answer_back_to_text():
    assert parse_answer("分かりました。<NL>1. ハチ公像です。</s>") == "分かりました。\n1. ハチ公像です。"
    assert parse_answer("はい。<NL>ユーザー: 次の質問") == "はい。"


def test_fit_to_window_drops_oldest_turns_first():
    turns = [(USER, "あ" * 10), (SYSTEM, "い" * 10), (USER, "う" * 10), (SYSTEM, "え" * 10), (USER, "お")]
    count = len  # one token per character is enough to test the policy
    kept, dropped = fit_to_window(turns, count, budget=len(format_prompt(turns[2:])))
    assert dropped == 2 and [u.text for u in kept] == ["う" * 10, "え" * 10, "お"]
    kept, dropped = fit_to_window(turns, count, budget=1000)
    assert dropped == 0 and len(kept) == 5
    with pytest.raises(ConversationError, match="last message alone"):
        fit_to_window([(USER, "長" * 100)], count, budget=50)


def test_session_keeps_history_and_resets(tiny_checkpoint):
    from jneox import SamplingParams, load

    model, tok = load(tiny_checkpoint)
    session = ChatSession(model, tok, SamplingParams(temperature=0, max_new_tokens=8))
    first = "".join(session.ask("こんにちは"))
    assert [u.speaker for u in session.history] == [USER, SYSTEM]
    assert session.history[1].text == first
    second_prompt = session.prompt_for("次の質問です")
    assert second_prompt.startswith("ユーザー: こんにちは<NL>システム: ")
    session.reset()
    assert session.history == [] and session.prompt_for("やあ") == "ユーザー: やあ<NL>システム: "


def test_session_drops_turns_when_the_window_is_full(tiny_checkpoint):
    from jneox import SamplingParams, load

    model, tok = load(tiny_checkpoint)  # 128-position window
    session = ChatSession(model, tok, SamplingParams(temperature=0, max_new_tokens=16))
    for _ in range(6):
        "".join(session.ask("日本のおすすめの観光地を教えてください。"))
    assert session.dropped_turns > 0
    assert len(tok.encode(session.prompt_for("もう一つ"))) <= 128 - 16
