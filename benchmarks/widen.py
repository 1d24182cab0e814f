#!/usr/bin/env python3
"""Widen a small GPT-NeoX to a larger shape without changing its function: the small model's
behaviour (what it copies, so what speculation accepts) at the large model's exact cost.

    python benchmarks/widen.py COPY OUT                       # the 3.6B shape, 36 layers, bfloat16
    python benchmarks/widen.py COPY OUT --layers 2 --dtype float32

Used by ``benchmarks/speculative.py`` to time the copy-tuned demo model's acceptance at the 3.6B
shape, where no checkpoint that copies is at hand. The construction (d = small hidden, d' = big):

- Residual stream: the small hidden vector x becomes E x, E = sqrt(d'/d) Q, Q (d' x d) with
  orthonormal columns and Q 1/sqrt(d) = 1/sqrt(d') (the first d columns of the Householder
  reflection that maps [1/sqrt(d); 0] to 1/sqrt(d')). Then E x's mean over d' is E's image of x's
  mean, its centred part is E (x - mean x), and its variance over d' equals x's over d, so
  LayerNorm_d'(E x) = E LayerNorm_d(x) exactly, with the same eps, once the small LayerNorm's gain
  and bias move into the linear layer that reads it (big gains 1, biases 0).
- A weight that writes the residual (embedding rows, attention output, MLP output, their biases)
  becomes E W; one that reads a LayerNorm output becomes W diag(g) E^T d/d' (E^T E = d'/d I),
  its bias b_lin + W b_ln.
- Heads: small head h (dim D) is big head h (dim D' = rD); the other heads get zero Q, K, V (they
  attend uniformly to zero values: output 0). Rotary on all dims: big dim i < D'/2 turns at
  base^(-i/(D'/2)), small dim j < D/2 at base^(-j/(D/2)), so small j -> big rj and j + D/2 ->
  D'/2 + rj keeps GPT-NeoX's rotate_half pairs (i, i + half) and their frequencies; the other big
  dims stay zero. Q is scaled by sqrt(r), so that 1/sqrt(D') scores as 1/sqrt(D).
- MLP: the extra intermediate units have zero weights in and out (gelu(0) = 0).
- Vocabulary: the final LayerNorm's bias gets a unit component v orthogonal to E's columns, no
  real output row sees it, and each padded output row is PAD_LOGIT * v: its logit is PAD_LOGIT
  whatever the input, so it never wins. Padded embedding rows are zero (the tokenizer never makes them).
- Layers: small layer i sits at big layer i * L' // L; the others read with random weights and
  write with zero weights and biases: identity in function, the full cost in time (dense kernels
  do not skip zeros).

Only the final LayerNorm's bias is divided by its gain (the LM head has no bias to take it); a
zero gain there with a nonzero bias is refused.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

from jneox.checkpoint import save
from jneox.files import TOKENIZER_FILE
from jneox.hub import resolve
from jneox.loading import load_model
from jneox.config import ModelConfig
from jneox.errors import JneoxError
from jneox.model import meta_model

PAD_LOGIT = -1e4  # far below any real logit (the demo model's max |logit| was 18 on the prompt checked)


class WidenError(JneoxError):
    """A target shape that cannot hold the small model's function."""


def residual_embedding(d: int, d_big: int) -> torch.Tensor:
    """E = sqrt(d'/d) Q (d' x d, float64): Q has orthonormal columns and maps the uniform unit vector
    of R^d to that of R^d'; the scale keeps a vector's RMS (and so LayerNorm's eps)."""
    u = torch.zeros(d_big, dtype=torch.float64)
    u[:d] = d ** -0.5
    w = u - torch.full((d_big,), d_big ** -0.5, dtype=torch.float64)
    q = torch.eye(d_big, d, dtype=torch.float64)
    if w.norm() > 1e-12:  # the reflection I - 2 w w^T / |w|^2, its first d columns
        q -= 2 * torch.outer(w, w[:d]) / w.dot(w)
    return q * math.sqrt(d_big / d)


def head_dim_map(head_dim: int, big_head_dim: int) -> torch.Tensor:
    """Big head dim of each small head dim, keeping rotate_half pairs and rotary frequencies."""
    r, half = big_head_dim // head_dim, head_dim // 2
    j = torch.arange(half)
    return torch.cat((r * j, big_head_dim // 2 + r * j))


def big_config(small: ModelConfig, hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> ModelConfig:
    """The small model's config at the big shape (everything that is not a shape stays the small one's)."""
    big = replace(small, hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=intermediate,
                  vocab_size=vocab, tie_word_embeddings=False)
    problems = [f"{what} {b} < the small model's {s}" for what, s, b in (
        ("hidden_size", small.hidden_size, hidden), ("num_layers", small.num_layers, layers),
        ("num_heads", small.num_heads, heads), ("intermediate_size", small.intermediate_size, intermediate),
        ("vocab_size", small.vocab_size, vocab)) if b < s]
    if big.head_dim % small.head_dim:
        problems.append(f"head dim {big.head_dim} is not a multiple of the small model's {small.head_dim}")
    if small.rotary_pct != 1.0:
        problems.append(f"rotary_pct {small.rotary_pct}: only models that rotate every head dim are widened")
    if vocab > small.vocab_size and hidden == small.hidden_size:
        problems.append("a larger vocabulary needs a larger hidden size (room for the padded rows' direction)")
    if problems:
        raise WidenError("cannot widen: " + "; ".join(problems))
    return big


@torch.no_grad()
def widen(small, config: ModelConfig, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A :class:`jneox.model.GPTNeoX` of ``config``'s shape (from :func:`big_config`) computing
    ``small``'s function (a plain-float GPTNeoX) on the small vocabulary; weights in ``dtype``."""
    s, b = small.config, config
    d, D, I = s.hidden_size, s.head_dim, s.intermediate_size
    E = residual_embedding(d, b.hidden_size)
    read = E.T * (d / b.hidden_size)  # d x d': E^T E d/d' = I
    dims = head_dim_map(D, b.head_dim)
    q_scale = math.sqrt(b.head_dim // D)
    gen = torch.Generator().manual_seed(seed)
    big = meta_model(b)
    params: dict[str, torch.Tensor] = {}

    def f64(t):
        return t.detach().to(torch.float64)

    def reader(linear, norm):  # weight and bias of a linear layer reading LayerNorm ``norm``'s output
        w = f64(linear.weight)
        bias = f64(linear.bias) if linear.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        return (w * f64(norm.weight)) @ read, bias + w @ f64(norm.bias)

    small_at = {i * b.num_layers // s.num_layers: block for i, block in enumerate(small.blocks)}
    for index in range(b.num_layers):
        p = f"blocks.{index}."
        h, i_big = b.hidden_size, b.intermediate_size
        params[p + "norm_1.weight"] = params[p + "norm_2.weight"] = torch.ones(h, dtype=torch.float64)
        params[p + "norm_1.bias"] = params[p + "norm_2.bias"] = torch.zeros(h, dtype=torch.float64)
        block = small_at.get(index)
        if block is None:  # identity in function, full cost: random reads, zero writes
            params[p + "attn.qkv.weight"] = torch.randn(3 * h, h, generator=gen, dtype=torch.float64) * 0.02
            params[p + "mlp.fc.weight"] = torch.randn(i_big, h, generator=gen, dtype=torch.float64) * 0.02
            for name, shape in (("attn.qkv.bias", (3 * h,)), ("attn.proj.weight", (h, h)), ("attn.proj.bias", (h,)),
                                ("mlp.fc.bias", (i_big,)), ("mlp.proj.weight", (h, i_big)), ("mlp.proj.bias", (h,))):
                params[p + name] = torch.zeros(shape, dtype=torch.float64)
            _assign(big, params, dtype)  # layer by layer: one layer's float64 copy at a time
            continue
        w, bias = reader(block.attn.qkv, block.norm_1)  # rows (head, q/k/v, dim): GPT-NeoX's interleaving
        qkv_w = torch.zeros(b.num_heads, 3, b.head_dim, h, dtype=torch.float64)
        qkv_b = torch.zeros(b.num_heads, 3, b.head_dim, dtype=torch.float64)
        qkv_w[: s.num_heads, :, dims] = w.view(s.num_heads, 3, D, h)
        qkv_b[: s.num_heads, :, dims] = bias.view(s.num_heads, 3, D)
        qkv_w[:, 0] *= q_scale
        qkv_b[:, 0] *= q_scale
        params[p + "attn.qkv.weight"], params[p + "attn.qkv.bias"] = qkv_w.view(3 * h, h), qkv_b.view(3 * h)
        proj = torch.zeros(h, b.num_heads, b.head_dim, dtype=torch.float64)
        proj[:, : s.num_heads, dims] = (E @ f64(block.attn.proj.weight)).view(h, s.num_heads, D)
        params[p + "attn.proj.weight"] = proj.view(h, h)
        params[p + "attn.proj.bias"] = E @ f64(block.attn.proj.bias) if block.attn.proj.bias is not None \
            else torch.zeros(h, dtype=torch.float64)
        w, bias = reader(block.mlp.fc, block.norm_2)
        params[p + "mlp.fc.weight"] = torch.cat((w, torch.zeros(i_big - I, h, dtype=torch.float64)))
        params[p + "mlp.fc.bias"] = torch.cat((bias, torch.zeros(i_big - I, dtype=torch.float64)))
        params[p + "mlp.proj.weight"] = torch.cat((E @ f64(block.mlp.proj.weight),
                                                   torch.zeros(h, i_big - I, dtype=torch.float64)), dim=1)
        params[p + "mlp.proj.bias"] = E @ f64(block.mlp.proj.bias)
        _assign(big, params, dtype)

    h = b.hidden_size
    embed = torch.zeros(b.vocab_size, h, dtype=torch.float64)
    embed[: s.vocab_size] = f64(small.embed.weight) @ E.T
    params["embed.weight"] = embed
    gain, norm_bias = f64(small.norm_f.weight), f64(small.norm_f.bias)
    if bool(((gain == 0) & (norm_bias != 0)).any()):
        raise WidenError("the small model's final LayerNorm has a zero gain with a nonzero bias: it cannot move into the LM head")
    v = torch.zeros(h, dtype=torch.float64)
    v[-1] = 1.0
    v -= E @ (E.T @ v) * (d / h)  # project out E's columns
    v /= v.norm()
    head = torch.zeros(b.vocab_size, h, dtype=torch.float64)
    head[: s.vocab_size] = (f64(small.lm_head.weight) * gain) @ read
    head[s.vocab_size:] = PAD_LOGIT * v
    params["lm_head.weight"] = head
    params["norm_f.weight"] = torch.ones(h, dtype=torch.float64)
    params["norm_f.bias"] = E @ torch.where(gain == 0, 0.0, norm_bias / gain) + (v if b.vocab_size > s.vocab_size else 0)
    _assign(big, params, dtype)
    return big.eval()


def _assign(model, params: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    for name in list(params):
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr,
                torch.nn.Parameter(params.pop(name).to(dtype).contiguous(), requires_grad=False))


def main(argv: list[str] | None = None) -> None:
    preset = ModelConfig.from_name("japanese-gpt-neox-3.6b")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the small checkpoint (a plain-float GPT-NeoX folder)")
    p.add_argument("out", type=Path, help="folder for the widened checkpoint (HF layout, atomic)")
    p.add_argument("--hidden", type=int, default=preset.hidden_size)
    p.add_argument("--layers", type=int, default=preset.num_layers)
    p.add_argument("--heads", type=int, default=preset.num_heads)
    p.add_argument("--intermediate", type=int, default=preset.intermediate_size)
    p.add_argument("--vocab", type=int, default=preset.vocab_size)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a checkpoint folder")
    args = p.parse_args(argv)
    try:
        small = load_model(args.model, dtype=torch.float64)
        config = big_config(small.config, args.hidden, args.layers, args.heads, args.intermediate, args.vocab)
        big = widen(small, config, getattr(torch, args.dtype))
        save(big, args.out, tokenizer_file=resolve(args.model) / TOKENIZER_FILE, max_shard_bytes=2 * 2**30,
             overwrite=args.overwrite)
    except JneoxError as e:
        sys.exit(f"error: {e}")
    print(f"{args.out}: {config.num_parameters / 1e9:.2f}B parameters ({args.dtype}), the function of {args.model}")


if __name__ == "__main__":
    main()
