"""The training loop: kill-and-resume, torchrun DDP/FSDP, LoRA merge, and the whole pipeline
(tokenizer -> pretrain -> sft -> generate, read back by transformers)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA
from jneox import cli
from jneox.loading import load, load_model
from jneox.config import ModelConfig
from jneox.model import GPTNeoX
from jneox.train.lora import LoRALinear, apply_lora, lora_scales, merge_lora_state
from jneox.train.loop import TrainConfig, lr_factor

TESTS = Path(__file__).parent
SCRIPT = TESTS / "tiny_train_run.py"


def run_script(*args, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--standalone", str(SCRIPT), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def read_log(out: Path) -> tuple[dict[int, float], dict[int, float]]:
    train, evals = {}, {}
    for line in (out / "train_log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            train[r["step"]] = r["loss"]
        if "eval_loss" in r:
            evals[r["step"]] = r["eval_loss"]
    return train, evals


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(out).state_dict()


# ---- learning-rate schedule ------------------------------------------------------------------
def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr():
    cfg = TrainConfig(out="x", lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    lrs = [cfg.lr * lr_factor(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert cfg.lr * lr_factor(110, cfg) == pytest.approx(1e-4)


# ---- resume ----------------------------------------------------------------------------------
def test_run_killed_with_sigkill_resumes_onto_the_same_loss_curve(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_script(whole, "--steps", 20, "--save-every", 10)
    killed = run_script(broken, "--steps", 20, "--save-every", 10, "--kill-at-step", 14, check=False)
    assert killed.returncode == -9, killed.stderr  # SIGKILL, after the step-10 checkpoint
    state = torch.load(broken / "trainer_state.pt", weights_only=False)
    assert state["step"] == 10
    assert max(read_log(broken)[0]) == 14  # the killed run logged steps 11..14 that the resume redoes
    run_script(broken, "--steps", 20, "--save-every", 10, "--resume")
    (train_w, eval_w), (train_b, eval_b) = read_log(whole), read_log(broken)
    assert sorted(train_b) == list(range(1, 21))  # no step twice, none missing
    for step in train_w:
        assert abs(train_w[step] - train_b[step]) <= 1e-6, (step, train_w[step], train_b[step])
    assert eval_w.keys() == eval_b.keys() and all(abs(eval_w[s] - eval_b[s]) <= 1e-6 for s in eval_w)
    for name, w in weights(whole).items():
        torch.testing.assert_close(weights(broken)[name], w, rtol=0, atol=1e-6)


# ---- torchrun ----------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, engine):
    """gloo on CPU. Tolerance 1e-5: the ranks sum the same per-token losses in another order.
    The FSDP run is also killed (SIGKILL on both ranks) after its step-4 checkpoint and resumed, so
    the sharded optimizer state goes through a full save and load."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--steps", 8, "--save-every", 0, "--grad-accum", 2]
    run_script(one, "--batch-size", 4, *common)
    if engine == "ddp":
        run_script(two, "--batch-size", 2, *common, nproc=2)
    else:
        fsdp = ["--batch-size", 2, *common, "--fsdp", "--save-every", 4]
        assert run_script(two, *fsdp, "--kill-at-step", 6, nproc=2, check=False).returncode != 0
        assert torch.load(two / "trainer_state.pt", weights_only=False)["step"] == 4
        run_script(two, *fsdp, "--resume", nproc=2)
    (train_1, eval_1), (train_2, eval_2) = read_log(one), read_log(two)
    assert sorted(train_2) == list(range(1, 9)) and train_1[8] < train_1[1]
    for step in train_1:
        assert train_2[step] == pytest.approx(train_1[step], rel=1e-5, abs=1e-5)
    for step in eval_1:
        assert eval_2[step] == pytest.approx(eval_1[step], rel=1e-5, abs=1e-5)
    w1, w2 = weights(one), weights(two)  # the saved folder loads, with the 1-process weights
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)


# ---- LoRA ------------------------------------------------------------------------------------
def test_lora_starts_as_the_base_model_and_merges_into_plain_weights():
    torch.manual_seed(0)
    config = ModelConfig.from_name("tiny", vocab_size=50, hidden_size=32, num_heads=2, intermediate_size=64)
    model = GPTNeoX(config)
    model.init_weights(seed=0)
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        base_logits = model(idx)
    wrapped = apply_lora(model, rank=4, alpha=8)
    assert len(wrapped) == 4 * config.num_layers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{w}.lora_{x}" for w in wrapped for x in "ab"}
    with torch.no_grad():
        torch.testing.assert_close(model(idx), base_logits, rtol=0, atol=0)  # B starts at zero
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)
        lora_logits = model(idx)
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    merged = merge_lora_state(model.state_dict(), lora_scales(model))
    plain = GPTNeoX(config)
    plain.load_state_dict(merged)  # strict: exactly the plain parameter names
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), lora_logits, rtol=1e-5, atol=1e-5)


# ---- the whole pipeline ------------------------------------------------------------------------
CONVERSATIONS = [
    ("日本で一番高い山は?", "富士山です。"),
    ("富士山の高さは?", "3776メートルです。"),
    ("日本の首都はどこですか?", "東京です。"),
    ("おすすめの観光地を教えてください。", "京都がおすすめです。"),
    ("こんにちは", "こんにちは。何かお手伝いできることはありますか?"),
    ("ありがとう", "どういたしまして。"),
]


def write_conversations(path: Path) -> Path:
    lines = []
    for i in range(24):
        (q1, a1), (q2, a2) = CONVERSATIONS[i % 6], CONVERSATIONS[(i + 1) % 6]
        if i % 2:  # the card's shape
            turns = [{"speaker": "ユーザー", "text": q1}, {"speaker": "システム", "text": a1},
                     {"speaker": "ユーザー", "text": q2}, {"speaker": "システム", "text": a2}]
        else:  # the messages shape
            turns = {"messages": [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]}
        lines.append(json.dumps(turns, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def first_and_last_eval(out: Path) -> tuple[float, float]:
    evals = read_log(out)[1]
    return evals[min(evals)], evals[max(evals)]


def test_tokenizer_pretrain_sft_generate_and_transformers_reads_the_result(tmp_path, capsys):
    from transformers import GPTNeoXForCausalLM

    tok, pre, ft = tmp_path / "tok", tmp_path / "pretrained", tmp_path / "sft"
    opts = ["--device", "cpu", "--no-progress", "--log-every", "50", "--seed", "0"]
    assert cli.main(["train-tokenizer", "--input", str(DATA / "ja_sample.txt"), "--vocab-size", "1000",
                     "--out", str(tok)]) == 0
    assert cli.main(["pretrain", "--model-config", "tiny", "--tokenizer", str(tok), "--out", str(pre),
                     "--data", str(DATA / "ja_sample.txt"), "--block-size", "32", "--batch-size", "4",
                     "--max-steps", "200", "--warmup-steps", "20", "--lr", "2e-3", "--min-lr", "2e-4",
                     "--eval-every", "100", "--save-every", "100", "--val-fraction", "0.1", "--report", *opts]) == 0
    first, last = first_and_last_eval(pre)
    assert last < first - 1.0, (first, last)
    assert (pre / "loss.png").stat().st_size > 1000
    assert cli.main(["train-report", str(pre / "train_log.jsonl"), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    data = write_conversations(tmp_path / "conversations.jsonl")
    assert cli.main(["sft", "--model", str(pre), "--data", str(data), "--out", str(ft), "--batch-size", "4",
                     "--max-steps", "40", "--lr", "1e-3", "--warmup-steps", "5", "--eval-every", "20",
                     "--val-fraction", "0.2", *opts]) == 0
    first, last = first_and_last_eval(ft)
    assert last < first - 0.5, (first, last)
    out = capsys.readouterr().out
    assert "step 200 loss" in out and "eval step 40 loss" in out and "tok/s" in out

    assert cli.main(["generate", "--model", str(ft), "日本で一番高い山は?", "--temperature", "0",
                     "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()  # an answer, from the saved folder

    model, tokenizer = load(ft)
    hf = GPTNeoXForCausalLM.from_pretrained(ft).eval()
    idx = torch.tensor([tokenizer.encode("ユーザー: 日本の首都はどこですか?<NL>システム: ")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)
    assert math.isfinite(first)


def test_sft_with_lora_saves_a_plain_checkpoint_that_resumes(tmp_path, tiny_checkpoint, monkeypatch):
    """LoRA is merged on save (the folder is an ordinary checkpoint); --resume reloads the base model
    and the adapters from trainer_state.pt and goes on as if never stopped."""
    import shutil

    from jneox.train.loop import Trainer

    save = Trainer.save

    def save_and_keep_step_3(self, *args, **kw):
        save(self, *args, **kw)
        if args[3] == 3:
            shutil.copytree(self.out, tmp_path / "at3")

    monkeypatch.setattr(Trainer, "save", save_and_keep_step_3)
    data = write_conversations(tmp_path / "conversations.jsonl")
    argv = ["sft", "--model", str(tiny_checkpoint), "--data", str(data), "--batch-size", "2", "--max-steps", "6",
            "--save-every", "3", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--warmup-steps", "2",
            "--eval-every", "0", "--log-every", "1", "--device", "cpu", "--no-progress", "--grad-checkpointing"]
    assert cli.main([*argv, "--out", str(tmp_path / "whole")]) == 0
    monkeypatch.undo()
    state = torch.load(tmp_path / "at3" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 3 and state["lora"] and all(k.endswith(("lora_a", "lora_b")) for k in state["lora"])
    assert cli.main([*argv, "--out", str(tmp_path / "at3"), "--resume"]) == 0
    whole, resumed = read_log(tmp_path / "whole")[0], read_log(tmp_path / "at3")[0]
    assert sorted(resumed) == list(range(1, 7))
    assert all(abs(whole[s] - resumed[s]) <= 1e-6 for s in whole)
    base, tuned, tuned_again = (load_model(p).state_dict() for p in (tiny_checkpoint, tmp_path / "whole", tmp_path / "at3"))
    assert set(tuned) == set(base)  # a plain checkpoint: no LoRA tensors
    for name in base:
        changed = not torch.equal(tuned[name], base[name])
        assert changed == (name.endswith("weight") and any(t in name for t in ("qkv", "attn.proj", "mlp."))), name
        torch.testing.assert_close(tuned_again[name], tuned[name], rtol=0, atol=1e-6)


def test_a_bad_data_line_stops_sft_with_file_and_line_unless_skipped(tmp_path, tiny_checkpoint, capsys):
    data = write_conversations(tmp_path / "conversations.jsonl")
    lines = data.read_text(encoding="utf-8").splitlines()
    lines.insert(2, '[{"speaker": "ロボット", "text": "?"}, {"speaker": "システム", "text": "!"}]')
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = ["sft", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "out"),
            "--max-steps", "1", "--batch-size", "2", "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}:3:" in err and "ロボット" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert cli.main([*argv, "--skip-bad-lines"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_activation_checkpointing_keeps_the_loss_and_the_gradients(lora):
    """--grad-checkpointing recomputes each block in the backward pass: same loss, same gradients, same
    parameter names; with grad off (eval, generation) the blocks run as they are."""
    import copy

    from jneox.train.loop import checkpoint_blocks, token_loss_sum

    torch.manual_seed(0)
    plain = GPTNeoX(ModelConfig.from_name("tiny", parallel_residual=False))
    plain.init_weights(seed=3)
    if lora:
        apply_lora(plain, 4, 8.0)
        with torch.no_grad():
            for m in plain.modules():
                if isinstance(m, LoRALinear):
                    m.lora_b.normal_()
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed)
    checkpoint_blocks(checkpointed)  # twice is once
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 1000, (2, 33), generator=torch.Generator().manual_seed(1))
    saved = {}  # model -> elements it keeps for the backward pass
    losses = []
    for m in (plain, checkpointed):
        saved[m] = 0

        def keep(t, m=m):
            saved[m] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            losses.append(token_loss_sum(m(ids[:, :-1]), ids[:, 1:]))
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for n, p in checkpointed.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-7, msg=n)
    with torch.no_grad():
        assert torch.equal(checkpointed(ids), plain(ids))
    # the point of it: the checkpointed model keeps far fewer activations for the backward pass
    assert saved[checkpointed] < saved[plain] / 2
