"""Kernel microbenchmark at SD-1.5 UNet shapes (batch 8, 64x64 latent): questdiff's Triton int8 kernels against
the bf16 torch ops they replace (cuDNN conv in channels-last, cuBLAS linear, SDPA flash attention) and cuBLAS 8-bit
(``torch._int_mm``, fp8 ``torch._scaled_mm``) where one exists. Correctness first: every kernel's output is checked
against ``kernels/reference.py`` on fresh random codes before it is timed.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernel_bench-h200.json   # GPU machine

Prints a table (TFLOP/s, time, ratio to bf16) and writes json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from questdiff.kernels import reference
from questdiff.kernels import triton_attention, triton_gemm, triton_quant

# (kind, shape): conv (batch, C_in, H, C_out, k), linear (M, K, N), attention (batch, heads, Lq, Lk, head_dim)
SHAPES: list[tuple[str, tuple[int, ...]]] = [
    ("conv", (8, 320, 64, 320, 3)), ("conv", (8, 640, 32, 640, 3)), ("conv", (8, 1280, 16, 1280, 3)),
    ("conv", (8, 1280, 8, 1280, 3)), ("conv", (8, 2560, 16, 1280, 3)), ("conv", (8, 640, 64, 320, 3)),
    ("conv", (8, 320, 64, 320, 1)), ("conv", (2, 320, 64, 320, 3)), ("conv", (1, 1280, 16, 1280, 3)),
    ("linear", (32768, 320, 2560)), ("linear", (8192, 640, 5120)), ("linear", (2048, 1280, 10240)),
    ("linear", (32768, 320, 320)), ("linear", (8192, 640, 640)), ("linear", (2048, 1280, 1280)),
    ("linear", (32768, 1280, 320)), ("linear", (616, 768, 1280)), ("linear", (8192, 320, 320)),
    ("attention", (8, 8, 4096, 4096, 40)), ("attention", (8, 8, 1024, 1024, 80)), ("attention", (8, 8, 256, 256, 160)),
    ("attention", (8, 8, 4096, 77, 40)), ("attention", (2, 8, 4096, 4096, 40)),
]


def bench(fn: Callable[[], Any]) -> float:
    """Median milliseconds (CUDA events via triton.testing.do_bench)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _codes(*shape: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, device="cuda")


def _tables(rows: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = torch.rand(rows, device="cuda") * 0.01 + 0.005
    offset = torch.randint(-20, 20, (rows,), device="cuda").float()
    return scale, offset, torch.tensor(1, device="cuda")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def run_linear(m: int, k: int, n: int, w4: bool) -> dict[str, Any]:
    a = _codes(m, k)
    scale, offset, row = _tables()
    w_scale = torch.rand(n, device="cuda") * 0.01
    if w4:
        w = reference.pack_int4(torch.randint(0, 16, (n, 1, k), device="cuda"))
        w_zero = torch.randint(0, 16, (n,), device="cuda", dtype=torch.int16)
        w_offset = None
    else:
        w, w_zero = _codes(n, 1, k), None
        w_offset = torch.randint(-5, 5, (n,), device="cuda").float()
    w_sum = reference.weight_integers(w, w_zero).flatten(1).sum(1).float()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    args = (a, w, scale, offset, row, w_scale, w_offset, w_sum, w_zero, bias, None, torch.bfloat16)
    err = _rel_err(triton_gemm.gemm(*args), reference.gemm(*args))
    ours = bench(lambda: triton_gemm.gemm(*args))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wf = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    bf16 = bench(lambda: F.linear(x, wf, bias))
    quant = bench(lambda: triton_quant.quantize_codes(x, scale, offset, row, -128, 127))
    int_mm = bench(lambda: torch._int_mm(a, w.view(n, k).t())) if not w4 and m > 16 else None
    fp8 = None
    try:
        x8, w8 = x.to(torch.float8_e4m3fn), wf.to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device="cuda")
        fp8 = bench(lambda: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        pass
    return {"flops": 2 * m * n * k, "ours_ms": ours, "bf16_ms": bf16, "quantize_ms": quant, "int_mm_ms": int_mm,
            "fp8_scaled_mm_ms": fp8, "rel_err": err}


def run_conv(batch: int, c: int, h: int, n: int, k: int, w4: bool) -> dict[str, Any]:
    x = _codes(batch, c, h, h).contiguous(memory_format=torch.channels_last)
    scale, offset, row = _tables()
    pad = k // 2
    w_scale = torch.rand(n, device="cuda") * 0.01
    if w4:
        w = reference.pack_int4(torch.randint(0, 16, (n, k * k, c), device="cuda"))
        w_zero, w_offset = torch.randint(0, 16, (n,), device="cuda", dtype=torch.int16), None
    else:
        w, w_zero = _codes(n, k * k, c), None
        w_offset = torch.randint(-5, 5, (n,), device="cuda").float()
    w_sum = reference.weight_integers(w, w_zero).flatten(1).sum(1).float()
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    args = (x, w, scale, offset, row, w_scale, w_offset, w_sum, w_zero, bias, None, (k, k), (1, 1), (pad, pad),
            torch.bfloat16)
    small = (x[:1, :, :16, :16].contiguous(memory_format=torch.channels_last),) + args[1:]  # reference is float64
    err = _rel_err(triton_gemm.conv2d(*small), reference.conv2d(*small))
    ours = bench(lambda: triton_gemm.conv2d(*args))
    xf = torch.randn(batch, c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wf = torch.randn(n, c, k, k, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bf16 = bench(lambda: F.conv2d(xf, wf, bias, padding=pad))
    quant = bench(lambda: triton_quant.quantize_codes(xf, scale, offset, row, -128, 127))
    return {"flops": 2 * batch * h * h * n * c * k * k, "ours_ms": ours, "bf16_ms": bf16, "quantize_ms": quant,
            "rel_err": err}


def run_attention(batch: int, heads: int, lq: int, lk: int, d: int) -> dict[str, Any]:
    q, k, v = _codes(batch, lq, heads, d), _codes(batch, lk, heads, d), _codes(batch, lk, heads, d)
    scales = torch.rand(4, 4, device="cuda") * 0.02 + 0.01
    scales[:, 3] = 1 / 255
    offsets = torch.randint(-10, 10, (4, 4), device="cuda").float()
    row = torch.tensor(1, device="cuda")
    args = (q, k, v, scales, offsets, row, d**-0.5, 255, torch.bfloat16)
    small = (q[:1, :512], k[:1, :512], v[:1, :512]) + args[3:]
    err = _rel_err(triton_attention.attention(*small), reference.attention(*small))
    ours = bench(lambda: triton_attention.attention(*args))
    qf, kf, vf = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16) for length in (lq, lk, lk))
    bf16 = bench(lambda: F.scaled_dot_product_attention(qf, kf, vf))
    return {"flops": 4 * batch * heads * lq * lk * d, "ours_ms": ours, "bf16_ms": bf16, "rel_err": err}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernel_bench.json")
    parser.add_argument("--w4", action="store_true", help="also time the packed 4-bit weight variants")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for kind, shape in SHAPES:
        variants = [False, True] if args.w4 and kind != "attention" else [False]
        for w4 in variants:
            try:
                if kind == "conv":
                    result = run_conv(*shape, w4=w4)
                elif kind == "linear":
                    result = run_linear(*shape, w4=w4)
                else:
                    result = run_attention(*shape)
            except Exception as err:  # noqa: BLE001 - record the failure, time the other shapes
                rows.append({"kind": kind, "shape": list(shape), "weights": "int4" if w4 else "int8", "error": repr(err)})
                print(f"{kind:9s} {str(shape):28s} FAILED: {err!r}", flush=True)
                continue
            result.update(kind=kind, shape=list(shape), weights="int4" if w4 else "int8")
            rows.append(result)
            tf = lambda ms: result["flops"] / ms / 1e9  # noqa: E731
            print(f"{kind:9s} {str(shape):28s} {result['weights']:4s} ours {result['ours_ms']:.3f} ms "
                  f"({tf(result['ours_ms']):6.1f} TOP/s) bf16 {result['bf16_ms']:.3f} ms ({tf(result['bf16_ms']):6.1f}) "
                  f"ratio {result['ours_ms'] / result['bf16_ms']:.2f} quant {result.get('quantize_ms') or 0:.3f} ms "
                  f"err {result['rel_err']:.1e}", flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                                  indent=2))  # after every shape: a killed run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
