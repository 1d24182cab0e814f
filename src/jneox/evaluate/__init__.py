"""Evaluation: the jp-stable lm-evaluation-harness's Japanese tasks (JGLUE in its own file shapes,
prompt version 0.4), perplexity, custom multiple-choice tasks from YAML, and the chat format check.

    from jneox import load
    from jneox.evaluate import evaluate, loglikelihoods
    model, tokenizer = load("models/demo")
    loglikelihoods(model, tokenizer, [("ユーザー: 日本の首都は？<NL>システム: ", "東京")])
    evaluate(model, tokenizer, "jcommonsenseqa", "valid-v1.1.json", limit=100)["metrics"]
"""
from .run import evaluate, evaluate_perplexity, evaluate_tasks, format_table, write_json_atomic
from .score import loglikelihoods, rolling_nll, score_ids
from .tasks import TASKS, CustomTask, Task, get_task, register

__all__ = ["CustomTask", "TASKS", "Task", "evaluate", "evaluate_perplexity", "evaluate_tasks", "format_table", "get_task",
           "loglikelihoods", "register", "rolling_nll", "score_ids", "write_json_atomic"]
