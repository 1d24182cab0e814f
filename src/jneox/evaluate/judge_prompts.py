"""The judge prompts, as published, and the strict readers of the judge's verdicts.

MT-Bench's prompts are the texts of FastChat's ``fastchat/llm_judge/data/judge_prompts.jsonl``
(names kept: single-v1, single-v1-multi-turn, single-math-v1, single-math-v1-multi-turn, pair-v2,
pair-v2-multi-turn, pair-math-v1, pair-math-v1-multi-turn); the ``*-math-*`` ones are used when a
question carries reference answers. ELYZA-tasks-100's is the 1-5 rubric ELYZA published for its
GPT-4 grading (a user message only, with the question's ``eval_aspect``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    kind: str  # "single" (a score) or "pair" (a verdict)
    system: str | None  # None: the whole prompt is one user message
    # str.format fields: question(_1/_2), answer(_1/_2), answer_a/answer_b(_1/_2), ref_answer_1/2, eval_aspect
    template: str

    def messages(self, **fields: str) -> list[dict]:
        user = {"role": "user", "content": self.template.format(**fields)}
        return [user] if self.system is None else [{"role": "system", "content": self.system}, user]


_RATING = ('you must rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", '
           'for example: "Rating: [[5]]".')
_PAIR_VERDICT = ('Avoid any positional biases and ensure that the order in which the responses were presented does '
                 'not influence your decision. Do not allow the length of the responses to influence your '
                 'evaluation. Do not favor certain names of the assistants. Be as objective as possible. After '
                 'providing your explanation, output your final verdict by strictly following this format: '
                 '"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, and "[[C]]" for a tie.')
_FACTORS = ("factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of")


def _conversation(who: str, answer: str) -> str:
    """FastChat's two-turn transcript block for one assistant (``who``: "A" or "B"; ``answer``: the field prefix)."""
    return (f"<|The Start of Assistant {who}'s Conversation with User|>\n\n### User:\n{{question_1}}\n\n"
            f"### Assistant {who}:\n{{{answer}_1}}\n\n### User:\n{{question_2}}\n\n### Assistant {who}:\n"
            f"{{{answer}_2}}\n\n<|The End of Assistant {who}'s Conversation with User|>")


_REFERENCE_CONVERSATION = ("<|The Start of Reference Answer|>\n\n### User:\n{question_1}\n\n### Reference answer:\n"
                           "{ref_answer_1}\n\n### User:\n{question_2}\n\n### Reference answer:\n{ref_answer_2}\n\n"
                           "<|The End of Reference Answer|>\n\n\n")

SINGLE_V1 = JudgePrompt(
    "single-v1", "single", "You are a helpful assistant.",
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    f"assistant to the user question displayed below. Your evaluation should consider {_FACTORS} the response. "
    "Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your "
    f"explanation, {_RATING}\n\n[Question]\n{{question}}\n\n[The Start of Assistant's Answer]\n{{answer}}\n"
    "[The End of Assistant's Answer]")
SINGLE_MATH_V1 = JudgePrompt(
    "single-math-v1", "single", "You are a helpful assistant.",
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider correctness and helpfulness. "
    "You will be given a reference answer and the assistant's answer. Begin your evaluation by comparing the "
    "assistant's answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. "
    f"After providing your explanation, {_RATING}\n\n[Question]\n{{question}}\n\n[The Start of Reference Answer]\n"
    "{ref_answer_1}\n[The End of Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]")
SINGLE_V1_MULTI_TURN = JudgePrompt(
    "single-v1-multi-turn", "single",
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    f"user question displayed below. Your evaluation should consider {_FACTORS} the response. You evaluation "
    "should focus on the assistant's answer to the second user question. Begin your evaluation by providing a "
    f"short explanation. Be as objective as possible. After providing your explanation, {_RATING}\n\n",
    _conversation("A", "answer"))
SINGLE_MATH_V1_MULTI_TURN = JudgePrompt(
    "single-math-v1-multi-turn", "single",
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question. Your evaluation should consider correctness and helpfulness. You will be given a reference "
    "answer and the assistant's answer. You evaluation should focus on the assistant's answer to the second "
    "question. Begin your evaluation by comparing the assistant's answer with the reference answer. Identify and "
    f"correct any mistakes. Be as objective as possible. After providing your explanation, {_RATING}\n\n",
    _REFERENCE_CONVERSATION + _conversation("A", "answer"))
PAIR_V2 = JudgePrompt(
    "pair-v2", "pair",
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    f"answers the user's question better. Your evaluation should consider {_FACTORS} their responses. Begin your "
    f"evaluation by comparing the two responses and provide a short explanation. {_PAIR_VERDICT}",
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")
PAIR_MATH_V1 = JudgePrompt(
    "pair-math-v1", "pair",
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. Your evaluation should consider correctness and helpfulness. You will be "
    "given a reference answer, assistant A's answer, and assistant B's answer. Your job is to evaluate which "
    "assistant's answer is better. Begin your evaluation by comparing both assistants' answers with the reference "
    f"answer. Identify and correct any mistakes. {_PAIR_VERDICT}",
    "[User Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of Reference "
    "Answer]\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n[The Start of "
    "Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]")
PAIR_V2_MULTI_TURN = JudgePrompt(
    "pair-v2-multi-turn", "pair",
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user questions. You should choose the assistant that follows the user's instructions and answers the "
    f"user's questions better. Your evaluation should consider {_FACTORS} their responses. You should focus on who "
    "provides a better answer to the second user question. Begin your evaluation by comparing the responses of the "
    f"two assistants and provide a short explanation. {_PAIR_VERDICT}",
    _conversation("A", "answer_a") + "\n\n\n" + _conversation("B", "answer_b"))
PAIR_MATH_V1_MULTI_TURN = JudgePrompt(
    "pair-math-v1-multi-turn", "pair",
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user questions. Your evaluation should consider correctness and helpfulness. You will be given reference "
    "answers, the assistant A's answers, the assistant B's answers. Your job is to determine which assistant "
    "provides correct and helpful answers to the second user question. Begin your evaluation by comparing both "
    f"assistants' answers with the reference answers. Identify and correct any mistakes. {_PAIR_VERDICT}",
    _REFERENCE_CONVERSATION + _conversation("A", "answer_a") + "\n\n\n" + _conversation("B", "answer_b"))

ELYZA_RUBRIC = JudgePrompt(
    "elyza-tasks-100", "single", None,
    "あなたは採点者です。\n\n問題, 正解例, 採点基準, 回答 が与えられます。\n\n"
    "採点基準と正解例を参考にして、回答を1,2,3,4,5の5段階で採点し、数字のみを出力してください。\n\n"
    "# 問題\n{question}\n\n# 正解例\n{ref_answer_1}\n\n# 採点基準\n基本的な採点基準\n"
    "- 1点: 誤っている、 指示に従えていない\n- 2点: 誤っているが、方向性は合っている\n"
    "- 3点: 部分的に誤っている、 部分的に合っている\n- 4点: 合っている\n- 5点: 役に立つ\n\n"
    "基本的な減点項目\n- 不自然な日本語: -1点\n- 部分的に事実と異なる内容を述べている: -1点\n"
    "- 「倫理的に答えられません」のように過度に安全性を気にしてしまっている: 2点にする\n\n"
    "問題固有の採点基準\n{eval_aspect}\n\n# 回答\n{answer}\n")

PROMPTS = {p.name: p for p in (SINGLE_V1, SINGLE_MATH_V1, SINGLE_V1_MULTI_TURN, SINGLE_MATH_V1_MULTI_TURN, PAIR_V2,
                               PAIR_MATH_V1, PAIR_V2_MULTI_TURN, PAIR_MATH_V1_MULTI_TURN, ELYZA_RUBRIC)}

MT_BENCH_SCALE = (1, 10)
ELYZA_SCALE = (1, 5)
VERDICTS = ("A", "B", "C")  # C: a tie
_BRACKETED_NUMBER = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_BRACKETED_VERDICT = re.compile(r"\[\[([ABC])\]\]")
_BARE_NUMBER = re.compile(r"\s*([1-9]\d*)\s*")


def parse_rating(reply: str, scale: tuple[int, int] = MT_BENCH_SCALE) -> float | None:
    """The ``[[N]]`` rating in a judge's reply ("Rating: [[8]]" and "[[8]]" alike); None unless exactly one
    value appears (a reply that names two different ratings is not read as either) and it lies on ``scale``."""
    found = {float(m) for m in _BRACKETED_NUMBER.findall(reply)}
    if len(found) != 1:
        return None
    value = found.pop()
    return value if scale[0] <= value <= scale[1] else None


def parse_bare_score(reply: str, scale: tuple[int, int] = ELYZA_SCALE) -> float | None:
    """ELYZA's rubric asks for the number only: the whole reply must be one integer on ``scale``."""
    m = _BARE_NUMBER.fullmatch(reply)
    if not m:
        return None
    value = float(m.group(1))
    return value if scale[0] <= value <= scale[1] else None


def parse_verdict(reply: str) -> str | None:
    """"A", "B" or "C" (a tie) from ``[[A]]``/``[[B]]``/``[[C]]``; None when none or more than one of them appears."""
    found = set(_BRACKETED_VERDICT.findall(reply))
    return found.pop() if len(found) == 1 else None
