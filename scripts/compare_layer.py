#!/usr/bin/env python3
"""Checks `ulysses layer` against PyTorch's own attention, for any strategy and mask.

Makes random q, k, v and grad_out, runs one attention layer of a strategy on P ranks through the
`ulysses` binary (with --lse), and compares its output, input gradients and log-sum-exp with
torch.nn.functional.scaled_dot_product_attention on one device, in float64, element by element
(torch.testing.assert_close's rule |got - want| <= atol + rtol |want|, tolerances per dtype).
Needs torch and safetensors (pip install torch safetensors); not part of the test suite, which
must run without a full PyTorch.

    python3 scripts/compare_layer.py --ranks 4 --seq 1000 --heads 12 --kv-heads 4 --dtype float32
    python3 scripts/compare_layer.py --strategy ring_zigzag --mask window:100 --seq 1024
    python3 scripts/compare_layer.py --strategy megatron_sp --mask sparse-causal:16,4,1 --seq 512 --kv-heads 4
    python3 scripts/compare_layer.py --strategy ring_zigzag --documents 7 --seq 1024   # packed: cu_seqlens
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def allowed(mask: str, n: int) -> torch.Tensor:
    """The library's masks (src/attention/mask.rs) as an [N, N] boolean matrix, True = attend."""
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    kind, _, args = mask.partition(":")
    if kind == "none":
        return torch.ones(n, n, dtype=torch.bool)
    if kind == "causal":
        return j <= i
    if kind == "window":
        w = int(args)
        return (j <= i) & (j > i - w)
    if kind in ("sparse", "sparse-causal"):
        block, local, glob = (int(a) for a in args.split(","))
        qb, kb = i // block, j // block
        ok = (qb // local == kb // local) | (kb % local >= local - glob)
        return ok & (j <= i) if kind == "sparse-causal" else ok
    raise SystemExit(f"unknown mask {mask!r}: none, causal, window:W, sparse:B,L,G, sparse-causal:B,L,G")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "ulysses"))
    ap.add_argument("--strategy", default="ulysses", help="any of `ulysses layer --strategy`")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1000)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--mask", default="causal", help="none, causal, window:W, sparse:B,L,G or sparse-causal:B,L,G")
    ap.add_argument("--logits", type=float, default=1.0, help="standard deviation of the attention logits")
    ap.add_argument("--documents", type=int, default=1,
                    help="documents packed into each sample, of random lengths (cu_seqlens in the input file)")
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    b, n, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    # q.k / sqrt(d) has standard deviation `logits` for unit-variance q and k scaled by sqrt(logits).
    s = args.logits ** 0.5
    q = (torch.randn(b, n, h, d, dtype=torch.float64) * s).to(dtype)
    k = (torch.randn(b, n, hkv, d, dtype=torch.float64) * s).to(dtype)
    v = torch.randn(b, n, hkv, d, dtype=dtype)
    grad_out = torch.randn(b, n, h, d, dtype=dtype)
    # Packed documents: random cut points per sample, one flat cu_seqlens over the b x N tokens
    # (FlashAttention's varlen convention), and each token's document for the reference's mask.
    doc = torch.zeros(b, n, dtype=torch.long)
    offsets = [0]
    for i in range(b):
        cuts = sorted(torch.randperm(n - 1)[: args.documents - 1].add(1).tolist())
        for c in cuts:
            doc[i, c:] += 1
        offsets += [i * n + c for c in cuts] + [(i + 1) * n]
    cu_seqlens = torch.tensor(offsets, dtype=torch.int32)

    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        tensors = {"q": q, "k": k, "v": v, "grad_out": grad_out}
        if args.documents > 1:
            tensors["cu_seqlens"] = cu_seqlens
        save_file(tensors, inp)
        cmd = [args.binary, "layer", "--strategy", args.strategy, "--ranks", str(args.ranks), "--mask", args.mask,
               "--lse", "--input", inp, "--output", out]
        subprocess.run(cmd, check=True)
        got = load_file(out)

    # PyTorch on one device, in float64 for the reference: [b, N, H, d] -> [b, H, N, d].
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    g = h // hkv
    ke = kr.repeat_interleave(g, dim=2).transpose(1, 2)
    ve = vr.repeat_interleave(g, dim=2).transpose(1, 2)
    # The rule on global positions equals the rule within each document for none, causal and
    # window (they depend on distances only), so a same-document mask on top is the packed rule.
    m = allowed(args.mask, n) & (doc.unsqueeze(2) == doc.unsqueeze(1)).unsqueeze(1)  # [b, 1, N, N]
    o = F.scaled_dot_product_attention(qr.transpose(1, 2), ke, ve, attn_mask=m).transpose(1, 2)
    o.backward(grad_out.double())
    with torch.no_grad():
        scores = qr.transpose(1, 2) @ ke.transpose(-2, -1) / d ** 0.5
        lse = scores.masked_fill(~m, float("-inf")).logsumexp(-1).transpose(1, 2)  # [b, N, H]
    want = {"out": o.detach(), "grad_q": qr.grad, "grad_k": kr.grad, "grad_v": vr.grad, "lse": lse}

    # The tolerances of tests/common/parity.rs; atol scales with the tensor's RMS when it is above 1.
    atol, rtol = {"float64": (1e-10, 1e-10), "float32": (3e-5, 3e-5), "bfloat16": (5e-2, 3e-2)}[args.dtype]
    ok = True
    for name, w in want.items():
        x = got[name].double()
        scale = max(1.0, w.pow(2).mean().sqrt().item())
        bound = atol * scale + rtol * w.abs()
        diff = (x - w).abs()
        bad = int((~(diff <= bound)).sum())
        ok &= bad == 0
        worst = (diff / bound).max().item()
        print(f"{name:7s} {str(tuple(got[name].shape)):20s} {str(got[name].dtype):15s} max abs diff {diff.max().item():.3e}"
              f"  worst diff/bound {worst:.3f}  elements beyond {bad}")
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
