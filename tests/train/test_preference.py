"""Preference tuning: the data (both JSONL shapes, every bad line), DPO and the reward model against
TRL's own computation, the reward model read back by transformers, and PPO on a toy reward."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jneox.chat import SYSTEM, USER, Utterance, escape, format_prompt
from jneox.loading import load_model, load_reward_model
from jneox.train.data import IGNORE_INDEX, DataError, DataStats, encode_conversation
from jneox.train.dpo import DPOObjective, dpo, dpo_loss
from jneox.train.loop import TrainConfig
from jneox.train.preference import PairBatch, answer_logps, collate_pairs, encode_pair, read_preferences, read_prompts
from jneox.train.reward import RewardObjective, reward, score_answers

TESTS = Path(__file__).parent

PROMPT = [{"speaker": USER, "text": "日本で一番高い山は?"}, {"speaker": SYSTEM, "text": "富士山です。"},
          {"speaker": USER, "text": "では\n二番目は?"}]
PAIRS = [
    {"prompt": PROMPT, "chosen": "北岳です。\n標高は3193mです。", "rejected": "It is Kitadake."},
    {"prompt": "こんにちは", "chosen": "こんにちは。ご用件は何でしょうか。", "rejected": "こんにちはこんにちはこんにちは"},
    {"prompt": {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "水の沸点は?"}]},
     "chosen": "一気圧で100度です。", "rejected": "一気圧で", "margin": 1.5},
    {"prompt": [{"role": "user", "content": "おすすめの本は?"}], "chosen": "夏目漱石の『こころ』です。",
     "rejected": "本です本です本です"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def answer_span(labels: list[int]) -> list[int]:
    return [y for y in labels if y != IGNORE_INDEX]


# ---- data ------------------------------------------------------------------------------------
def test_the_answer_is_tokenized_as_sft_tokenizes_a_system_turn(tokenizer, tmp_path):
    record = read_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS[:1]))[0]
    pair = encode_pair(record, tokenizer, max_len=256)
    prompt_text = format_prompt(PROMPT)
    assert prompt_text.endswith(f"{SYSTEM}: ")  # the card's prompt ends in a space
    prompt_ids = tokenizer.encode(prompt_text)
    for example, answer in ((pair.chosen, PAIRS[0]["chosen"]), (pair.rejected, PAIRS[0]["rejected"])):
        # the prompt tokens are exactly inference's prompt, the space of "システム: " included
        assert example.input_ids[:len(prompt_ids)] == prompt_ids
        assert example.labels[:len(prompt_ids) - 1] == [IGNORE_INDEX] * (len(prompt_ids) - 1)
        # the answer: its own pieces (what the model generates after that prompt), then </s>
        assert answer_span(example.labels) == tokenizer.encode(escape(answer)) + [tokenizer.eos_id]
        assert example.input_ids[len(prompt_ids):] == tokenizer.encode(escape(answer))  # </s> is only a target
        # and the same ids and labels as `jneox sft` gives the conversation, less its earlier システム turn
        ids, labels, _ = encode_conversation([*PROMPT, {"speaker": SYSTEM, "text": answer}], tokenizer, 256)
        assert example.input_ids == ids
        assert example.labels[len(prompt_ids) - 1:] == labels[len(prompt_ids) - 1:]
        assert answer_span(labels) == tokenizer.encode(escape("富士山です。")) + [tokenizer.eos_id] + answer_span(example.labels)


def test_hh_rlhf_records_read_as_the_same_pair(tokenizer, tmp_path):
    hh = {"chosen": "\n\nHuman: 日本で一番高い山は?\n\nAssistant: 富士山です。\n\nHuman: では\n二番目は?"
                    "\n\nAssistant: 北岳です。\n標高は3193mです。",
          "rejected": "\n\nHuman: 日本で一番高い山は?\n\nAssistant: 富士山です。\n\nHuman: では\n二番目は?"
                      "\n\nAssistant: It is Kitadake."}
    a = read_preferences(write_jsonl(tmp_path / "a.jsonl", PAIRS[:1]))[0]
    b = read_preferences(write_jsonl(tmp_path / "b.jsonl", [hh]))[0]
    assert b.prompt == a.prompt == [Utterance(t["speaker"], t["text"]) for t in PROMPT]
    assert (b.chosen, b.rejected) == (a.chosen, a.rejected)
    assert encode_pair(a, tokenizer, 256) == encode_pair(b, tokenizer, 256)


def test_prompt_shapes_and_margin(tmp_path):
    records = read_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    assert records[1].prompt == [Utterance(USER, "こんにちは")]
    assert records[2].prompt == [Utterance(USER, "水の沸点は?")] and records[2].margin == 1.5
    assert records[3].prompt == [Utterance(USER, "おすすめの本は?")] and records[3].margin == 0.0
    prompts = read_prompts(write_jsonl(tmp_path / "c.jsonl", [PROMPT + [{"speaker": SYSTEM, "text": "北岳"}]]))
    assert prompts == [[Utterance(t["speaker"], t["text"]) for t in PROMPT]]


BAD_LINES = [
    ("{not json", "not valid JSON"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": "q", "chosen": "a"}', "no 'rejected' field"),
    ('{"prompt": "q", "rejected": "a"}', "no 'chosen' field"),
    ('{"prompt": "q", "chosen": 1, "rejected": "a"}', "'chosen' must be a string"),
    ('{"prompt": "q", "chosen": "a", "rejected": ["a"]}', "'rejected' must be a string"),
    ('{"prompt": "", "chosen": "a", "rejected": "b"}', "'prompt' is an empty string"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "'prompt' must be a string, a list of turns"),
    ('{"prompt": [], "chosen": "a", "rejected": "b"}', "'prompt' is an empty conversation"),
    ('{"prompt": [{"speaker": "ユーザー", "text": "q"}, {"speaker": "システム", "text": "a"}], "chosen": "a", '
     '"rejected": "b"}', "'prompt' must end with a ユーザー turn"),
    ('{"prompt": [{"speaker": "誰か", "text": "q"}], "chosen": "a", "rejected": "b"}', "unknown speaker"),
    ('{"prompt": {"messages": 5}, "chosen": "a", "rejected": "b"}', "the turns must be a JSON array"),
    ('{"prompt": "q", "chosen": " ", "rejected": "b"}', "'chosen' is an empty answer"),
    ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "are the same answer"),
    ('{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1"}', "'margin' must be a number"),
    ('{"chosen": "no transcript", "rejected": "b"}', "not an HH-RLHF transcript"),
    ('{"chosen": "\\n\\nHuman: q", "rejected": "\\n\\nHuman: q\\n\\nAssistant: b"}', "'chosen' must end with an Assistant turn"),
    ('{"chosen": "\\n\\nHuman: q\\n\\nAssistant: a", "rejected": "\\n\\nHuman: p\\n\\nAssistant: b"}',
     "differ before their last Assistant turn"),
    ('{"chosen": "\\n\\nAssistant: a", "rejected": "\\n\\nAssistant: b"}', "must follow a Human turn"),
]


@pytest.mark.parametrize("line,problem", BAD_LINES, ids=[p for _, p in BAD_LINES])
def test_every_bad_line_is_named_by_file_and_line_or_skipped(tmp_path, line, problem):
    good = json.dumps(PAIRS[1], ensure_ascii=False)
    path = tmp_path / "pairs.jsonl"
    path.write_text(good + "\n\n" + line + "\n" + good + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        read_preferences(path)
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value), str(e.value)
    stats = DataStats()
    assert len(read_preferences(path, skip_bad_lines=True, stats=stats)) == 2
    assert stats.skipped_lines == 1 and stats.skipped[0].startswith(f"{path}:3: ")


def test_no_pairs_at_all_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["[1]"])
    with pytest.raises(DataError, match="no preference pairs"):
        read_preferences(path, skip_bad_lines=True)


# ---- DPO against TRL -------------------------------------------------------------------------
def fake_trainer(model, **attrs):
    """The attributes TRL's trainers read in their loss code, without building a whole trainer
    (which would tokenize a dataset with a transformers tokenizer)."""
    from accelerate import Accelerator

    return SimpleNamespace(model=model, accelerator=Accelerator(cpu=True), _metrics=defaultdict(lambda: defaultdict(list)),
                           _total_train_tokens=0, _tp_size=1, aux_loss_enabled=False, **attrs)


def trl_dpo_inputs(pairs, batch: PairBatch, ref_chosen, ref_rejected, pad_id: int) -> dict:
    """TRL's DPO batch: rows prompt + answer + </s> (chosen rows, then rejected), completion_mask on the answer."""
    rows, masks = [], []
    for example in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
        first = next(t for t, y in enumerate(example.labels) if y != IGNORE_INDEX)
        seq = example.input_ids[:first + 1] + answer_span(example.labels)
        rows.append(seq)
        masks.append([0] * (first + 1) + [1] * (len(seq) - first - 1))
    width = max(map(len, rows))
    pad = lambda r, v: r + [v] * (width - len(r))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r, pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
            "completion_mask": torch.tensor([pad(m, 0) for m in masks]),
            "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}


@pytest.fixture
def pair_set(tokenizer, tmp_path):
    records = read_preferences(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    return [encode_pair(r, tokenizer, 128) for r in records]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_rewards_and_accuracies_equal_trl(tmp_path, spiece_model, tokenizer, pair_set, loss_type):
    pytest.importorskip("trl")
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from conftest import make_hf_model, save_hf

    hf = make_hf_model(seed=1)
    ours = load_model(save_hf(hf, tmp_path / "m", spiece=spiece_model))
    batch = collate_pairs(pair_set, tokenizer.pad_id)
    with torch.no_grad():  # a reference a few nats off the policy either way, so the numbers are not trivial
        logps = answer_logps(ours(batch.input_ids), batch.labels)[0]
    n = len(pair_set)
    shift = torch.tensor([3.0, -2.0, 1.0, -4.0, 2.5, -1.5, -3.0, 0.5])
    ref_c, ref_r = logps[:n] + shift[:n], logps[n:] + shift[n:]
    batch.ref_chosen, batch.ref_rejected = ref_c.double(), ref_r.double()
    objective = DPOObjective(beta=0.1, loss_type=loss_type)
    with torch.no_grad():
        loss_sum, sums = objective.loss(ours, batch)
    mine = {k: float(v) / len(pair_set) for k, v in sums.items()}

    add_fused_lm_head(hf, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    trainer = fake_trainer(hf, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
                           loss_types=[loss_type], loss_weights=[1.0], beta=0.1, label_smoothing=0.0)
    hf.train()
    with torch.no_grad():
        trl_loss = DPOTrainer._compute_loss(trainer, hf, trl_dpo_inputs(pair_set, batch, ref_c, ref_r, tokenizer.pad_id),
                                            return_outputs=False)
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert float(loss_sum) / len(pair_set) == pytest.approx(float(trl_loss), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected"):
        assert mine[name] == pytest.approx(theirs[name], abs=1e-5, rel=1e-6), name
    assert 0 < mine["rewards/accuracies"] < 1  # the fixed batch has pairs either way


def test_dpo_label_smoothing_is_conservative_dpo():
    """TRL 1.x's sigmoid loss has no label smoothing (its ``robust`` loss is another thing), so the
    conservative-DPO formula of the DPO authors is written out here independently."""
    c, r = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0])
    rc, rr = torch.tensor([-10.5, -11.0]), torch.tensor([-10.0, -10.0])
    losses, _, _ = dpo_loss(c, r, rc, rr, beta=0.5, label_smoothing=0.2)
    for i in range(2):
        h = 0.5 * ((c[i] - rc[i]) - (r[i] - rr[i]))
        p = 1 / (1 + math.exp(-h))
        assert float(losses[i]) == pytest.approx(-0.8 * math.log(p) - 0.2 * math.log(1 - p), abs=1e-6)


def train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(out=str(out), batch_size=2, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_every=0, eval_batches=2,
                save_every=0, log_every=1, device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [0, 4])
def test_dpo_starts_at_ln2_with_zero_margins_and_learns(tmp_path, tiny_checkpoint, lora):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "dpo"
    metrics = dpo(tiny_checkpoint, [str(data)], train_cfg(out), val_data=[str(data)], max_steps=8, max_len=128,
                  beta=0.5, lora_rank=lora, lora_alpha=8)
    log = read_log(out)
    first_eval, first_step = log[0], next(r for r in log if "loss" in r)
    # the policy is the reference before the first update: loss ln 2, every reward 0
    assert first_eval["step"] == 0 and first_eval["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first_step["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first_step[name] == pytest.approx(0.0, abs=1e-6)
    assert {"rewards/accuracies", "logps/chosen", "logps/rejected"} <= set(first_step)
    # the held-out pairs are the training pairs here: after 8 steps they are told apart
    assert metrics["eval_loss"] < math.log(2) - 0.1 and metrics["eval_rewards/margins"] > 0
    assert metrics["eval_rewards/accuracies"] > 0.5
    load_model(out)  # a plain causal-LM checkpoint (LoRA merged)


# ---- reward model ----------------------------------------------------------------------------
def test_reward_model_loads_in_transformers_and_its_loss_equals_trl(tmp_path, tiny_checkpoint, tokenizer, pair_set):
    from transformers import GPTNeoXForSequenceClassification

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "rm"
    metrics = reward(tiny_checkpoint, [str(data)], train_cfg(out, lr=3e-3), val_data=[str(data)], max_steps=8, max_len=128)
    assert metrics["eval_accuracy"] == 1.0 and metrics["eval_margin"] > 0  # the held-out pairs are the train pairs
    assert [r for r in read_log(out) if "accuracy" in r], "accuracy is logged with every step"
    hf = GPTNeoXForSequenceClassification.from_pretrained(out).eval()
    assert hf.config.num_labels == 1
    ours = load_reward_model(out)
    records = read_preferences(data)
    answers = [(r.prompt, a) for r in records for a in (r.chosen, r.rejected)]
    batch = collate_pairs(pair_set, tokenizer.pad_id)
    with torch.no_grad():  # transformers reads the last non-padding token of each right-padded row
        theirs = hf(input_ids=batch.input_ids, attention_mask=(batch.input_ids != tokenizer.pad_id).long()).logits[:, 0]
    mine = score_answers(ours, tokenizer, answers, batch_size=3)
    order = [i * 2 for i in range(len(pair_set))] + [i * 2 + 1 for i in range(len(pair_set))]  # chosen, then rejected
    torch.testing.assert_close(torch.tensor([mine[i] for i in order]), theirs, atol=1e-4, rtol=1e-4)

    pytest.importorskip("trl")
    from trl.trainer.reward_trainer import RewardTrainer

    hf.train()
    trainer = fake_trainer(hf, args=SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"input_ids": batch.input_ids, "attention_mask": (batch.input_ids != tokenizer.pad_id).long(),
              "margin": batch.margin}
    with torch.no_grad():
        trl_loss = RewardTrainer.compute_loss(trainer, hf, inputs)
        loss_sum, sums = RewardObjective().loss(ours, batch)
    assert float(loss_sum) / len(pair_set) == pytest.approx(float(trl_loss), abs=1e-5)
    theirs_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert float(sums["accuracy"]) / len(pair_set) == pytest.approx(theirs_metrics["accuracy"], abs=1e-6)
    assert float(sums["margin"]) / len(pair_set) == pytest.approx(theirs_metrics["margin"], abs=1e-5)


def test_cli_reward_score_and_dpo(tmp_path, tiny_checkpoint, capsys):
    from jneox import cli

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = ["--data", str(data), "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--no-progress",
              "--max-len", "128", "--val-fraction", "0.25"]
    assert cli.main(["reward", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "rm"), *common]) == 0
    assert cli.main(["score", "--reward-model", str(tmp_path / "rm"), "--data", str(data)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == len(PAIRS) and set(lines[0]) == {"score_chosen", "score_rejected"}
    assert cli.main(["dpo", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "dpo"), "--loss-type", "ipo",
                     *common]) == 0
    assert "rewards/margins" in read_log(tmp_path / "dpo")[-1] or "eval_rewards/margins" in read_log(tmp_path / "dpo")[-1]
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops"])
    assert cli.main(["dpo", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "x"), "--data", str(bad)]) == 2
    assert f"{bad}:1: not valid JSON" in capsys.readouterr().err


# ---- PPO -------------------------------------------------------------------------------------
def test_ppo_raises_a_toy_reward_with_bounded_kl_and_resumes_exactly_after_sigkill(tmp_path, tiny_checkpoint):
    from tiny_ppo_run import STEPS, run

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run(tiny_checkpoint, whole)
    log = [r for r in read_log(whole) if "loss" in r]
    scores = [r["objective/scores"] for r in log]
    assert len(log) == STEPS and {"objective/kl", "objective/rlhf_reward", "policy/approxkl_avg", "policy/clipfrac_avg",
                                   "val/num_eos_tokens"} <= set(log[0])
    assert sum(scores[-4:]) / 4 > sum(scores[:4]) / 4 + 0.2, scores  # the toy reward rises
    assert log[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference's own
    assert all(0 <= r["objective/kl"] < 8.0 for r in log), [r["objective/kl"] for r in log]  # nats per 8-token answer
    # SIGKILL at the 4th rollout (step 7), after the step-5 checkpoint, which holds the 3rd rollout half used
    # (the same thread count as this process, so that the floating-point sums are the same)
    killed = subprocess.run([sys.executable, str(TESTS / "tiny_ppo_run.py"), str(tiny_checkpoint), str(broken),
                             "--kill-at-rollout", "4"], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    assert killed.returncode == -9, killed.stderr
    assert torch.load(broken / "trainer_state.pt", weights_only=False)["step"] == 5
    run(tiny_checkpoint, broken, resume=True)
    resumed = [r for r in read_log(broken) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(log, resumed):
        for k in ("loss", "objective/scores", "objective/kl", "policy/approxkl_avg", "loss/value_avg"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)
    for name, w in load_model(whole).state_dict().items():
        torch.testing.assert_close(load_model(broken).state_dict()[name], w, rtol=0, atol=1e-6)


def test_ppo_under_torchrun_ddp_equals_fsdp_logs_every_rank_and_resumes_exactly(tmp_path, tiny_checkpoint):
    """Two ranks (gloo), each answering its own prompts with its own seed. FSDP shards the blocks inside
    the policy-with-value-head and decodes in step with the other rank, so it trains as DDP does (1e-5:
    other sums order); the logged scores are the mean of both ranks' rewards; a run killed after its
    step-5 checkpoint resumes each rank on its own saved rollout and ends as the whole run."""
    from tiny_ppo_run import BATCH, PPO_EPOCHS, STEPS

    def torchrun(out, *flags, check=True):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               str(TESTS / "tiny_ppo_run.py"), str(tiny_checkpoint), str(out), *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        assert r.returncode == 0 or not check, r.stdout + r.stderr
        return r

    ddp, fsdp, broken = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "broken"
    torchrun(ddp)
    torchrun(fsdp, "--fsdp")
    log = [r for r in read_log(ddp) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    keys = ("loss", "objective/scores", "objective/kl", "policy/approxkl_avg", "loss/value_avg", "val/answer_length")
    for a, b in zip(log, [r for r in read_log(fsdp) if "loss" in r]):
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    rewards = [[json.loads(line) for line in (tmp_path / f"ddp-rewards-{rank}.jsonl").read_text().splitlines()]
               for rank in (0, 1)]
    assert len(rewards[0]) == len(rewards[1]) == STEPS // PPO_EPOCHS
    for n, (r0, r1) in enumerate(zip(*rewards)):
        assert len(r0) == len(r1) == BATCH
        for r in log[n * PPO_EPOCHS:(n + 1) * PPO_EPOCHS]:  # no missing-</s> penalty in this run
            assert r["objective/scores"] == pytest.approx(sum(r0 + r1) / (2 * BATCH), abs=1e-9)
    assert torchrun(broken, "--kill-at-rollout", "4", check=False).returncode != 0
    assert torch.load(broken / "trainer_state.pt", weights_only=False)["step"] == 5
    torchrun(broken, "--resume")
    resumed = [r for r in read_log(broken) if "loss" in r]
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(log, resumed):
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)
    whole = load_model(ddp).state_dict()
    for name, w in load_model(broken).state_dict().items():
        torch.testing.assert_close(w, whole[name], rtol=0, atol=1e-6)
    for name, w in load_model(fsdp).state_dict().items():
        torch.testing.assert_close(w, whole[name], rtol=1e-4, atol=1e-5)


def test_dpo_under_torchrun_equals_one_process(tmp_path, tiny_checkpoint):
    """`jneox dpo` with 2 ranks x 2 pairs (DDP, then FSDP) logs what 1 process x 4 pairs logs (1e-5:
    the ranks' sums in another order); every rank computes the reference log-probabilities itself."""
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    common = ["-m", "jneox", "dpo", "--model", str(tiny_checkpoint), "--data", str(data), "--max-steps", "4",
              "--log-every", "1", "--device", "cpu", "--no-progress", "--max-len", "128", "--val-fraction", "0.25",
              "--lr", "1e-3", "--save-every", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, *common, "--batch-size", "4"],
            "ddp": [*torchrun, *common, "--batch-size", "2"], "fsdp": [*torchrun, *common, "--batch-size", "2", "--fsdp"]}
    logs = {}
    for name, cmd in runs.items():
        r = subprocess.run([*cmd, "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        logs[name] = read_log(tmp_path / name)
    assert [r["step"] for r in logs["one"] if "loss" in r] == [1, 2, 3, 4]
    for name in ("ddp", "fsdp"):
        assert len(logs[name]) == len(logs["one"])
        for a, b in zip(logs["one"], logs[name]):
            for k in ("loss", "eval_loss", "rewards/margins", "rewards/accuracies", "eval_rewards/margins"):
                assert (k in a) == (k in b) and b.get(k, 0) == pytest.approx(a.get(k, 0), abs=1e-5), (name, a, b)
