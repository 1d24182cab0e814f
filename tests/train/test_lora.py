"""LoRA: the frozen base held in bf16 saves the original tensors and merges against them."""
from __future__ import annotations


import torch

from jneox.loading import load_model
from jneox.train.loop import TrainConfig


# ---- LoRA merges against the original weights, not their bf16 copies ----------------------
def test_lora_with_a_bf16_base_saves_the_frozen_weights_exactly(tiny_checkpoint, tmp_path):
    """On CUDA with bf16 autocast the frozen base is stored in bf16; forced here on the CPU. With
    --save-dtype float32 the saved checkpoint must hold the original fp32 norms, embeddings and head,
    and each adapted weight as original + B @ A * alpha / r."""
    from test_train_loop import write_conversations

    from jneox.train.sft import sft

    out = tmp_path / "out"
    cfg = TrainConfig(out=str(out), batch_size=2, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0, log_every=1,
                      device="cpu", precision="bf16", save_dtype="float32", progress=False)
    sft(tiny_checkpoint, [str(write_conversations(tmp_path / "c.jsonl"))], cfg, max_steps=2, lora_rank=4,
        lora_alpha=8.0, frozen_dtype=torch.bfloat16)
    base, tuned = load_model(tiny_checkpoint).state_dict(), load_model(out).state_dict()
    lora = torch.load(out / "trainer_state.pt", weights_only=True)["lora"]
    adapted = 0
    for name, original in base.items():
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and f"{module}.lora_a" in lora:
            delta = (lora[f"{module}.lora_b"].float() @ lora[f"{module}.lora_a"].float()) * (8.0 / 4)
            assert delta.abs().max() > 0, name  # it trained
            torch.testing.assert_close(tuned[name], original + delta, rtol=0, atol=1e-7)
            adapted += 1
        else:
            assert torch.equal(tuned[name], original), name  # bit for bit, not rounded to bf16
    assert adapted == 4 * 2  # qkv, attn.proj, mlp.fc, mlp.proj in both layers
