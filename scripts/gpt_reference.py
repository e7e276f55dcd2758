#!/usr/bin/env python3
"""Writes tests/data/gpt_reference.safetensors: the tiny GPT's loss and the gradient of every
parameter, computed in float64 by PyTorch's own modules, for tests/model.rs to check the Rust
model against without Python.

The model is the one src/model/ defines, built here from torch.nn and torch.nn.functional
rather than translated from the Rust code:
- token embedding nn.Embedding, no positional embedding (positions enter through RoPE);
- L pre-norm blocks: x + proj(attn(ln1(x))), then x + fc_out(gelu_tanh(fc(ln2(x))));
  nn.LayerNorm with weight and bias, eps = norm_eps;
- attention: one nn.Linear for q, k and v (output rows: the H query heads, then the H_kv key
  heads, then the H_kv value heads, d rows each), rotary embedding on q and k in the rotate-half
  form (GPT-NeoX / Llama: the pairs are (i, i + d/2), inverse frequencies theta^(-2i/d), positions
  0..N-1), then F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) (query head h
  reads kv head h // (H / H_kv)), then the nn.Linear output projection;
- MLP: nn.Linear h -> mlp_ratio h, F.gelu(approximate="tanh"), nn.Linear back to h;
- final nn.LayerNorm, output projection tied to the token embedding (logits = x wte^T, no bias);
- loss: F.cross_entropy, the mean over the labelled tokens (ignore_index -100).
RoPE is the one piece torch.nn has no module for; it is written out below from its definition.

Every weight is drawn from a fixed seed with non-trivial values (LayerNorm weights around 1 and
biases around 0 but not equal to them, random linear biases), so a parameter the Rust model
ignores or treats as its default shows up. The file holds every weight under the Rust
parameter name (src/model/gpt.rs), `tokens` and `targets` ([b, N] int64: next tokens, -100
for the last token of each sequence and for two "padding" tokens in the middle), `loss` (a
0-dim float64) and `grad.<name>` for each parameter; the metadata holds the GptConfig as JSON
under `config` and the settings under `reference`.

Needs torch and safetensors (any recent version, CPU is enough; pip install torch safetensors
numpy); not part of the test suite, which must run without PyTorch. The default output path is
relative to this script, so it runs from any folder. The output is deterministic (written with
torch 2.11.0: rerunning it gave the same bytes), so rerunning it only changes the file if
PyTorch's float64 arithmetic changes in its last bits, and then by about 1e-16:

    python3 scripts/gpt_reference.py
    python3 scripts/gpt_reference.py --output /tmp/gpt_reference.safetensors
"""
import argparse
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

# The Rust GptConfig (src/model/config.rs), every field. The seed is the Rust model's own
# initialisation seed: unused here, since the test overwrites every weight with this file's.
CONFIG = {
    "vocab_size": 32,
    "n_layer": 2,
    "n_head": 4,
    "n_kv_head": 2,
    "n_embd": 16,
    "mlp_ratio": 4,
    "rope_theta": 10000.0,
    "norm_eps": 1e-5,
    "tie_embeddings": True,
    "bias": True,
    "seed": 1234,
}
BATCH, SEQ, SEED = 2, 16, 20240611
IGNORE = -100


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1), halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021) in the rotate-half form."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.register_buffer(
            "inv_freq", theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, heads, N, d]
        pos = torch.arange(x.shape[-2], dtype=torch.float64)
        freqs = torch.outer(pos, self.inv_freq)  # [N, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, d]
        return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h, self.hq, self.hkv = cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"]
        self.d = h // self.hq
        self.qkv = nn.Linear(h, (self.hq + 2 * self.hkv) * self.d, bias=cfg["bias"])
        self.proj = nn.Linear(h, h, bias=cfg["bias"])
        self.rotary = Rotary(self.d, cfg["rope_theta"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(b, n, self.hq, self.d).transpose(1, 2)  # [b, H, N, d]
        k = k.view(b, n, self.hkv, self.d).transpose(1, 2)  # [b, H_kv, N, d]
        v = v.view(b, n, self.hkv, self.d).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.hkv != self.hq)
        return self.proj(o.transpose(1, 2).reshape(b, n, self.hq * self.d))


class Mlp(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        h = cfg["n_embd"]
        self.fc = nn.Linear(h, cfg["mlp_ratio"] * h, bias=cfg["bias"])
        self.proj = nn.Linear(cfg["mlp_ratio"] * h, h, bias=cfg["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg["n_embd"], eps=cfg["norm_eps"])
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg["n_embd"], eps=cfg["norm_eps"])
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Gpt(nn.Module):
    """Parameter names as the Rust model's: wte, h.{i}.ln1.weight, h.{i}.attn.qkv.weight, ..."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(cfg["n_embd"], eps=cfg["norm_eps"])
        self.lm_head = None
        if not cfg["tie_embeddings"]:
            self.lm_head = nn.Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.wte.weight)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def named(self) -> dict:
        """Parameters under the Rust names (nn.Embedding's `wte.weight` is the Rust `wte`)."""
        return {("wte" if name == "wte.weight" else name): p for name, p in self.named_parameters()}


def draw_weights(model: Gpt, gen: torch.Generator) -> None:
    """Weights of the scale that keeps activations of order 1, biases and norms off their defaults."""
    with torch.no_grad():
        for name, p in model.named().items():
            randn = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if name == "wte":
                p.copy_(0.5 * randn)
            elif ".ln" in name or name.startswith("ln_f"):
                p.copy_((1.0 + 0.2 * randn) if name.endswith("weight") else 0.1 * randn)
            elif name.endswith("bias"):
                p.copy_(0.1 * randn)
            else:  # a linear weight [out, in]
                p.copy_(randn / math.sqrt(p.shape[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    ap.add_argument("--output", default=os.path.join(root, "tests", "data", "gpt_reference.safetensors"))
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)
    model = Gpt(CONFIG).to(torch.float64)
    draw_weights(model, gen)

    tokens = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen, dtype=torch.int64)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = tokens[:, 1:]
    # Two unlabelled tokens inside the sequences: the mean is over the labelled ones only.
    targets[0, 5] = IGNORE
    targets[1, 9] = IGNORE

    loss = model(tokens, targets)
    loss.backward()

    named = model.named()
    out = {name: p.detach().contiguous() for name, p in named.items()}
    out.update({f"grad.{name}": p.grad.detach().contiguous() for name, p in named.items()})
    out.update({"tokens": tokens, "targets": targets, "loss": loss.detach().reshape([])})
    meta = {
        "config": json.dumps(CONFIG),
        "reference": json.dumps(
            {
                "batch": BATCH,
                "seq": SEQ,
                "seed": SEED,
                "dtype": "float64",
                "torch": torch.__version__,
                "script": "scripts/gpt_reference.py",
            }
        ),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file(out, args.output, metadata=meta)
    size = os.path.getsize(args.output)
    print(f"{args.output}: {len(named)} parameters, loss {loss.item():.17g}, {size} bytes")


if __name__ == "__main__":
    main()
