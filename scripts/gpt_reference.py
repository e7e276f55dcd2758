#!/usr/bin/env python3
"""Writes tests/data/gpt_reference.safetensors (and, with --model llama,
tests/data/llama_reference.safetensors): a tiny model's loss and the gradient of every parameter,
computed in float64 by PyTorch's own modules, for tests/model.rs to check the Rust model against
without Python.

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

The Llama variant (--model llama) differs where Llama differs: nn.RMSNorm (weight only) for every
norm, no biases, the output head its own nn.Linear, RoPE base 500000, and the SwiGLU MLP as Llama
writes it, three nn.Linear (gate_proj, up_proj: h -> F; down_proj: F -> h) and
down_proj(F.silu(gate_proj(x)) * up_proj(x)); the Rust model keeps gate and up as one [2F, h]
matrix (gate rows first), so the file stores torch.cat([gate, up]) as `mlp.fc.weight`. F = 40 is
no multiple of h = 16 (ffn_hidden).

Every weight is drawn from a fixed seed with non-trivial values (LayerNorm weights around 1 and
biases around 0 but not equal to them, random linear biases), so a parameter the Rust model
ignores or treats as its default shows up. The file holds every weight under the Rust
parameter name (src/model/gpt.rs), `tokens` and `targets` ([b, N] int64: next tokens, -100
for the last token of each sequence and for two "padding" tokens in the middle), `loss` (a
0-dim float64) and `grad.<name>` for each parameter; the metadata holds the GptConfig as JSON
under `config` and the settings under `reference`.

Needs torch and safetensors (any recent version, CPU is enough; pip install torch safetensors
numpy); not part of the test suite, which must run without PyTorch. The default output path is
relative to this script, so it runs from any folder. The tensors are deterministic (written with
torch 2.11.0: rerunning it gave the same tensors and metadata; safetensors may write the two
metadata entries in either order), so rerunning it only changes the numbers if PyTorch's float64
arithmetic changes in its last bits, and then by about 1e-16:

    python3 scripts/gpt_reference.py
    python3 scripts/gpt_reference.py --model llama
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
# The Llama variant: the fields that differ.
LLAMA = dict(
    CONFIG,
    ffn_hidden=40,
    mlp="swiglu",
    norm="rmsnorm",
    rope_theta=500000.0,
    tie_embeddings=False,
    bias=False,
)
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


class SwiGlu(nn.Module):
    """Llama's MLP, with Llama's three matrices."""

    def __init__(self, cfg: dict):
        super().__init__()
        h, f = cfg["n_embd"], cfg["ffn_hidden"]
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def norm(cfg: dict) -> nn.Module:
    if cfg.get("norm", "layernorm") == "rmsnorm":
        return nn.RMSNorm(cfg["n_embd"], eps=cfg["norm_eps"])
    return nn.LayerNorm(cfg["n_embd"], eps=cfg["norm_eps"])


class Block(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.ln1 = norm(cfg)
        self.attn = Attention(cfg)
        self.ln2 = norm(cfg)
        self.mlp = SwiGlu(cfg) if cfg.get("mlp", "gelu") == "swiglu" else Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Gpt(nn.Module):
    """Parameter names as the Rust model's: wte, h.{i}.ln1.weight, h.{i}.attn.qkv.weight, ..."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["n_embd"])
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layer"]))
        self.ln_f = norm(cfg)
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

    def rust_named(self, grads: bool) -> dict:
        """Parameters (or their gradients) as the Rust model holds them: SwiGLU's gate and up
        stacked into one `mlp.fc.weight` (gate rows first), its down_proj as `mlp.proj.weight`."""
        out = {}
        for name, p in self.named().items():
            t = (p.grad if grads else p).detach()
            if ".mlp.up_proj." in name:
                continue
            if ".mlp.gate_proj." in name:
                up = self.named()[name.replace("gate_proj", "up_proj")]
                t = torch.cat([t, (up.grad if grads else up).detach()])
                name = name.replace("gate_proj", "fc")
            name = name.replace(".mlp.down_proj.", ".mlp.proj.")
            out[name] = t.contiguous()
        return out


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
    ap.add_argument("--model", choices=["gpt", "llama"], default="gpt")
    ap.add_argument("--output", help="default: tests/data/{gpt,llama}_reference.safetensors")
    args = ap.parse_args()
    config = CONFIG if args.model == "gpt" else LLAMA
    output = args.output or os.path.join(root, "tests", "data", f"{args.model}_reference.safetensors")

    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(SEED)
    model = Gpt(config).to(torch.float64)
    draw_weights(model, gen)

    tokens = torch.randint(0, config["vocab_size"], (BATCH, SEQ), generator=gen, dtype=torch.int64)
    targets = torch.full_like(tokens, IGNORE)
    targets[:, :-1] = tokens[:, 1:]
    # Two unlabelled tokens inside the sequences: the mean is over the labelled ones only.
    targets[0, 5] = IGNORE
    targets[1, 9] = IGNORE

    loss = model(tokens, targets)
    loss.backward()

    named = model.rust_named(grads=False)
    out = dict(named)
    out.update({f"grad.{name}": g for name, g in model.rust_named(grads=True).items()})
    out.update({"tokens": tokens, "targets": targets, "loss": loss.detach().reshape([])})
    meta = {
        "config": json.dumps(config),
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
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    save_file(out, output, metadata=meta)
    size = os.path.getsize(output)
    print(f"{output}: {len(named)} parameters, loss {loss.item():.17g}, {size} bytes")


if __name__ == "__main__":
    main()
