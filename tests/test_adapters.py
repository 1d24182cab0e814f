"""LoRA adapters in PEFT's format: read and written so that PEFT itself agrees (the reference), applied per
row of a batch without touching the rows that have none, and refused in one line when they do not fit."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_hf_model, save_hf
from jneox.adapters import load_adapter, save_adapter
from jneox.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MARKER
from jneox.errors import CheckpointError
from jneox.loading import load_model
from jneox.quantize import quantize_model
from jneox.train.lora import apply_lora, lora_scales, lora_state, merge_lora_state

peft = pytest.importorskip("peft")
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny transformers GPT-NeoX checkpoint folder."""
    return save_hf(make_hf_model(seed=1), tmp_path_factory.mktemp("base") / "hf")


def peft_adapter(base, folder, seed: int, r: int = 4, alpha: float = 8, **config):
    """An adapter that PEFT itself makes and saves, with random (non-zero) A and B; returns PEFT's model."""
    from transformers import GPTNeoXForCausalLM

    hf = GPTNeoXForCausalLM.from_pretrained(base).eval()
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=config.pop("targets", TARGETS),
                                                    init_lora_weights=False, **config))
    model.save_pretrained(folder)
    return model.eval()


def ids(n: int = 12, seed: int = 0, vocab: int = 1024):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_peft_adapter_gives_peft_logits(base, tmp_path):
    ref = peft_adapter(base, tmp_path / "a", seed=3)
    model = load_model(base)
    adapter = load_adapter(tmp_path / "a", model.config)
    x = ids()
    want = ref(x).logits
    got = model(x, adapters={0: adapter.layers})
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(model(x), want, atol=1e-3)  # the adapter does change the answer


@torch.no_grad()
def test_rslora_scale(base, tmp_path):
    ref = peft_adapter(base, tmp_path / "a", seed=4, use_rslora=True, targets=["dense_h_to_4h"])
    model = load_model(base)
    adapter = load_adapter(tmp_path / "a", model.config)
    assert [sorted(layer) for layer in adapter.layers] == [["mlp.fc"], ["mlp.fc"]]
    x = ids(seed=1)
    torch.testing.assert_close(model(x, adapters={0: adapter.layers}), ref(x).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_saved_adapter_loads_in_peft(base, tmp_path):
    """jneox's LoRA training state, saved as a PEFT folder, is what PeftModel.from_pretrained computes."""
    from transformers import GPTNeoXForCausalLM

    model = load_model(base)
    apply_lora(model, rank=4, alpha=16.0)
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if name.endswith("lora_b"):
            p.normal_(0, 0.05)
    out = save_adapter(tmp_path / "ad", lora_state(model.state_dict()), rank=4, alpha=16.0, base_model=base)
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, MARKER])
    ref = peft.PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(base), out).eval()
    x = ids(seed=2)
    want = model(x)
    torch.testing.assert_close(ref(x).logits, want, rtol=1e-4, atol=1e-4)
    # and back: jneox reads its own file to the same numbers, unmerged, as the merged checkpoint's
    plain = load_model(base)
    adapter = load_adapter(out, plain.config)
    torch.testing.assert_close(plain(x, adapters={0: adapter.layers}), want, rtol=1e-5, atol=1e-5)
    merged = load_model(base)
    merged.load_state_dict(merge_lora_state(model.state_dict(), lora_scales(model)))
    torch.testing.assert_close(merged(x), want, rtol=1e-4, atol=1e-4)


def decode(model, prompts: list[torch.Tensor], adapters, steps: int = 6) -> torch.Tensor:
    """Prefill each prompt alone into its own row, then ``steps`` greedy decode steps of the whole batch
    (each row at its own position, as the server runs them); every step's logits (steps, rows, V)."""
    rows = len(prompts)
    cache = model.new_cache(rows, 64)
    nxt, pos = [], []
    for i, p in enumerate(prompts):
        one = {0: adapters[i]} if adapters.get(i) is not None else None
        logits = model(p, input_pos=torch.arange(p.shape[1]), cache=[c.rows(i, i + 1) for c in cache],
                       last_only=True, adapters=one)
        nxt.append(int(logits[0, -1].argmax()))
        pos.append(p.shape[1])
    out = []
    for _ in range(steps):
        tok = torch.tensor(nxt)[:, None]
        p = torch.tensor(pos)[:, None]
        logits = model(tok, input_pos=p, cache=cache, adapters={i: a for i, a in adapters.items() if a is not None})
        out.append(logits[:, 0])
        nxt = logits[:, 0].argmax(-1).tolist()
        pos = [q + 1 for q in pos]
    return torch.stack(out)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "int4"])
@torch.inference_mode()
def test_rows_of_one_batch_use_their_own_adapter(base, tmp_path, fmt):
    """Base row: the very bits of a batch without adapters; adapter rows: the bits of that row alone.
    On the packed weights the server runs (their kernels compute each row alone); the low-rank path runs
    in fp32 beside them."""
    model = load_model(base)
    quantize_model(model, fmt, group_size=32)
    peft_adapter(base, tmp_path / "a", seed=6)
    peft_adapter(base, tmp_path / "b", seed=7, r=2)
    a, b = (load_adapter(tmp_path / n, model.config).layers for n in "ab")
    prompts = [ids(5, seed=10), ids(9, seed=11), ids(7, seed=12)]
    mixed = decode(model, prompts, {0: None, 1: a, 2: b})
    plain = decode(model, prompts, {})
    assert torch.equal(mixed[:, 0], plain[:, 0])
    for row, adapter in ((1, a), (2, b)):
        alone = decode(model, [prompts[row]], {0: adapter})
        assert torch.equal(mixed[:, row], alone[:, 0]), f"row {row}"
        assert not torch.allclose(mixed[:, row], plain[:, row], atol=1e-3)


def write_adapter(folder, config: dict, tensors: dict[str, torch.Tensor]):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                     "target_modules": TARGETS, **config}))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    return folder


NAME = "base_model.model.gpt_neox.layers.{layer}.attention.query_key_value.lora_{ab}.weight"


@pytest.mark.parametrize("config, tensors, message", [
    ({}, {NAME.format(layer=0, ab="A"): torch.zeros(2, 32), NAME.format(layer=0, ab="B"): torch.zeros(192, 2)},
     r"layers\.0\.attention\.query_key_value\.lora_A\.weight has shape \[2, 32\]; .* need \[2, 64\]"),
    ({}, {NAME.format(layer=0, ab="A"): torch.zeros(3, 64), NAME.format(layer=0, ab="B"): torch.zeros(192, 3)},
     r"lora_A\.weight has shape \[3, 64\]; the base model and r=2 need \[2, 64\]"),
    ({}, {NAME.format(layer=5, ab="A"): torch.zeros(2, 64)}, r"is for layer 5; the base model has 2 layers"),
    ({}, {NAME.format(layer=0, ab="A"): torch.zeros(2, 64)}, r"layer 0 query_key_value has no lora_B weight"),
    ({}, {"base_model.model.embed_out.lora_A.weight": torch.zeros(2, 64)}, r"embed_out\.lora_A\.weight is not"),
    ({"target_modules": ["embed_out"]}, {}, r"target module 'embed_out' is not a linear layer jneox adapts"),
    ({"use_dora": True}, {}, r"use_dora is True; jneox serves plain LoRA only"),
    ({"peft_type": "IA3"}, {}, r"peft_type is 'IA3'"),
])
def test_an_adapter_that_does_not_fit_is_refused_in_one_line(base, tmp_path, config, tensors, message):
    folder = write_adapter(tmp_path / "bad", config, tensors or {"x": torch.zeros(1)})
    config_of_base = load_model(base).config
    with pytest.raises(CheckpointError, match=message) as e:
        load_adapter(folder, config_of_base)
    text = str(e.value)
    assert "\n" not in text and str(folder) in text


def test_a_missing_adapter_folder_names_the_file(base, tmp_path):
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'none' / ADAPTER_CONFIG}: not found"):
        load_adapter(tmp_path / "none", load_model(base).config)


# ---- training writes adapters ------------------------------------------------------------------
QA = [("日本の首都は?", "東京です。"), ("猫は何と鳴く?", "にゃあと鳴きます。"), ("一足す一は?", "二です。")]


def test_sft_save_adapter_loads_in_peft_as_the_merged_checkpoint(tmp_path, tiny_checkpoint):
    """`jneox sft --lora-rank R --save-adapter DIR`: DIR is a PEFT folder that PeftModel.from_pretrained puts
    on transformers' model of the base checkpoint, giving the logits of the merged checkpoint in OUT."""
    from transformers import GPTNeoXForCausalLM

    from jneox import cli

    data = tmp_path / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                                       ensure_ascii=False) + "\n" for q, a in QA * 4), encoding="utf-8")
    out, adapter = tmp_path / "out", tmp_path / "adapter"
    assert cli.main(["sft", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--batch-size", "2",
                     "--max-steps", "3", "--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--warmup-steps", "1",
                     "--eval-every", "0", "--device", "cpu", "--no-progress", "--save-adapter", str(adapter)]) == 0
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8.0, str(tiny_checkpoint))
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    ref = peft.PeftModel.from_pretrained(GPTNeoXForCausalLM.from_pretrained(tiny_checkpoint), adapter).eval()
    x = ids(seed=3)
    with torch.no_grad():
        merged = load_model(out)(x)
        torch.testing.assert_close(ref(x).logits, merged, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(load_model(tiny_checkpoint)(x), merged, atol=1e-3)  # training moved it


def test_save_adapter_needs_lora_and_is_checked_before_training(tmp_path, tiny_checkpoint, capsys):
    from jneox import cli

    argv = ["dpo", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--save-adapter", str(tmp_path / "a")]
    assert cli.main(argv) == 2
    assert "--save-adapter writes LoRA adapters: give --lora-rank too" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert cli.main([*argv[:-1], str(taken), "--lora-rank", "2"]) == 2
    assert str(taken) in capsys.readouterr().err and (taken / "notes.txt").exists()
