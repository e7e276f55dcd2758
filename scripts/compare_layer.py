#!/usr/bin/env python3
"""Checks `ulysses layer` against PyTorch's own attention.

Makes random q, k, v (and grad_out), runs one Ulysses layer on P ranks through the `ulysses`
binary, and compares its output and input gradients with torch.nn.functional.
scaled_dot_product_attention on one device. Needs torch and safetensors (pip install torch
safetensors); not part of the test suite, which must run without a full PyTorch.

    python3 scripts/compare_layer.py --ranks 4 --seq 1000 --heads 12 --kv-heads 4 --dtype float32
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "ulysses"))
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1000)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    b, n, h, hkv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    q = torch.randn(b, n, h, d, dtype=dtype)
    k = torch.randn(b, n, hkv, d, dtype=dtype)
    v = torch.randn(b, n, hkv, d, dtype=dtype)
    grad_out = torch.randn(b, n, h, d, dtype=dtype)

    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
        save_file({"q": q, "k": k, "v": v, "grad_out": grad_out}, inp)
        mask = "causal" if args.causal else "none"
        cmd = [args.binary, "layer", "--ranks", str(args.ranks), "--mask", mask, "--input", inp, "--output", out]
        subprocess.run(cmd, check=True)
        got = load_file(out)

    # PyTorch on one device, in float64 for the reference: [b, N, H, d] -> [b, H, N, d].
    qr, kr, vr = (t.double().requires_grad_(True) for t in (q, k, v))
    g = h // hkv
    o = F.scaled_dot_product_attention(
        qr.transpose(1, 2),
        kr.repeat_interleave(g, dim=2).transpose(1, 2),
        vr.repeat_interleave(g, dim=2).transpose(1, 2),
        is_causal=args.causal,
    ).transpose(1, 2)
    o.backward(grad_out.double())
    want = {"out": o.detach(), "grad_q": qr.grad, "grad_k": kr.grad, "grad_v": vr.grad}

    tol = {"float64": 1e-10, "float32": 1e-4, "bfloat16": 3e-2}[args.dtype]
    ok = True
    for name, w in want.items():
        diff = (got[name].double() - w).abs().max().item()
        scale = max(w.abs().max().item(), 1e-6)
        rel = diff / scale
        ok &= rel <= tol
        print(f"{name:7s} {str(tuple(got[name].shape)):20s} max abs diff {diff:.3e}  relative {rel:.3e}  (tolerance {tol:.0e})")
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
