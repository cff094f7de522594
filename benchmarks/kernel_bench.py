"""Kernel microbenchmark at SD-1.5 UNet shapes (batch 8, 64x64 latent): questdiff's Triton int8 kernels against
the bf16 torch ops they replace (cuDNN conv in channels-last, cuBLAS linear, SDPA flash attention), cuBLAS 8-bit
(``torch._int_mm``, fp8 ``torch._scaled_mm``) and a plain autotuned Triton int8 matmul (``plain_triton.py``: the
speed any Triton GEMM should reach). Linear layers are timed with TMA tiles and with pointer tiles. Correctness
first: every kernel's output is checked against ``kernels/reference.py`` on fresh random codes before it is timed.

    python benchmarks/kernel_bench.py --out benchmarks/results/kernel_bench-h200.json   # GPU machine

Prints a table (TFLOP/s, time, ratio to bf16) and writes json.
"""
from __future__ import annotations

import argparse
import json
import os
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
    ("attention", (8, 8, 4096, 77, 40)), ("attention", (2, 8, 4096, 4096, 40)), ("attention", (1, 24, 4608, 4608, 128)),
]


def bench(fn: Callable[[], Any]) -> float:
    """Median device milliseconds of ``fn`` replayed in a CUDA graph (``triton.testing.do_bench_cudagraph``: no
    CPU launch cost, which would dominate the small shapes), after one eager call (it autotunes)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _codes(*shape: int) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, device="cuda")


def _tables(rows: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scale = torch.rand(rows, device="cuda") * 0.01 + 0.005
    offset = torch.randint(-20, 20, (rows,), device="cuda").float()
    return scale, offset, torch.tensor([1], device="cuda")


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def _weights(n: int, taps: int, c: int, w4: bool) -> tuple[torch.Tensor, ...]:
    if w4:
        w = reference.pack_int4(torch.randint(0, 16, (n, taps, c), device="cuda"))
        w_zero, w_offset = torch.randint(0, 16, (n,), device="cuda", dtype=torch.int16), None
    else:
        w, w_zero = _codes(n, taps, c), None
        w_offset = torch.randint(-5, 5, (n,), device="cuda").float()
    w_sum = reference.weight_integers(w, w_zero).flatten(1).sum(1).float()
    return w, w_zero, w_offset, w_sum


def _set_tma(enabled: bool) -> None:
    """Switch the linear kernel's TMA tiles on or off (``QUESTDIFF_TMA``)."""
    os.environ["QUESTDIFF_TMA"] = "1" if enabled else "0"
    triton_gemm.tma_available.cache_clear()


def run_linear(m: int, k: int, n: int, w4: bool) -> dict[str, Any]:
    from plain_triton import int8_matmul

    a = _codes(m, k)
    scale, offset, rows = _tables()
    w_scale = torch.rand(n, device="cuda") * 0.01
    w, w_zero, w_offset, w_sum = _weights(n, 1, k, w4)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    a_sum = a.sum(1, dtype=torch.int32)
    args = (a, w, scale, offset, rows, w_scale, w_offset, w_sum, w_zero)
    tail = (bias, None, torch.bfloat16)
    ref = reference.gemm(*args, *tail)
    result: dict[str, Any] = {"flops": 2 * m * n * k}
    for tma in (False, True):
        _set_tma(tma)
        name = "tma" if tma else "ptr"
        result[f"rel_err_{name}"] = _rel_err(triton_gemm.gemm(*args, a_sum, *tail), ref)
        result[f"ours_{name}_ms"] = bench(lambda: triton_gemm.gemm(*args, a_sum, *tail))
    result["tma_used"] = triton_gemm.tma_available()  # False: this GPU or Triton has none (both rows are pointers)
    result["ours_ms"] = min(result["ours_tma_ms"], result["ours_ptr_ms"])
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wf = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    result["bf16_ms"] = bench(lambda: F.linear(x, wf, bias))
    result["quantize_ms"] = bench(lambda: triton_quant.quantize(x, scale, offset, rows, -128, 127, False, not w4))
    if not w4:
        wt = w.view(n, k).t()
        result["plain_triton_ms"] = bench(lambda: int8_matmul(a, wt))
        result["int_mm_ms"] = bench(lambda: torch._int_mm(a, wt)) if m > 16 else None
    try:
        x8, w8 = x.to(torch.float8_e4m3fn), wf.to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device="cuda")
        result["fp8_scaled_mm_ms"] = bench(lambda: torch._scaled_mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16))
    except (RuntimeError, AttributeError):
        pass
    result["rel_err"] = max(result["rel_err_tma"], result["rel_err_ptr"])
    return result


def run_conv(batch: int, c: int, h: int, n: int, k: int, w4: bool) -> dict[str, Any]:
    from plain_triton import int8_matmul

    x = _codes(batch, c, h, h).contiguous(memory_format=torch.channels_last)
    scale, offset, rows = _tables()
    pad = k // 2
    w_scale = torch.rand(n, device="cuda") * 0.01
    w, w_zero, w_offset, w_sum = _weights(n, k * k, c, w4)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    a_sum = x.permute(0, 2, 3, 1).sum(-1, dtype=torch.int32).reshape(-1)
    head = (w, scale, offset, rows, w_scale, w_offset, w_sum, w_zero)
    tail = (bias, None, (k, k), (1, 1), (pad, pad), (1, 1), torch.bfloat16)
    small = x[:1, :, :16, :16].contiguous(memory_format=torch.channels_last)  # the reference is float64
    small_sum = small.permute(0, 2, 3, 1).sum(-1, dtype=torch.int32).reshape(-1)
    err = _rel_err(triton_gemm.conv2d(small, *head, small_sum, *tail), reference.conv2d(small, *head, *tail))
    ours = bench(lambda: triton_gemm.conv2d(x, *head, a_sum, *tail))
    xf = torch.randn(batch, c, h, h, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    wf = torch.randn(n, c, k, k, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    bf16 = bench(lambda: F.conv2d(xf, wf, bias, padding=pad))
    quant = bench(lambda: triton_quant.quantize(xf, scale, offset, rows, -128, 127, True, not w4))
    result = {"flops": 2 * batch * h * h * n * c * k * k, "ours_ms": ours, "bf16_ms": bf16, "quantize_ms": quant,
              "rel_err": err}
    if not w4:  # the same GEMM with the taps already gathered (no implicit-GEMM address arithmetic)
        a = _codes(batch * h * h, c * k * k)
        result["plain_triton_ms"] = bench(lambda: int8_matmul(a, w.view(n, -1).t()))
    return result


def run_attention(batch: int, heads: int, lq: int, lk: int, d: int) -> dict[str, Any]:
    q, k = _codes(batch, lq, heads, d).clamp_(min=-127), _codes(batch, lk, heads, d).clamp_(min=-127)
    v = torch.randn(batch, lk, heads, d, device="cuda", dtype=torch.bfloat16)
    q_scale, k_scale = (torch.rand(4, device="cuda") * 0.02 + 0.01 for _ in range(2))
    rows = torch.tensor([1], device="cuda")
    args = (q, k, v, q_scale, k_scale, rows, d**-0.5, torch.bfloat16)
    small = (q[:1, :512], k[:1, :512], v[:1, :512]) + args[3:]
    err = _rel_err(triton_attention.attention_qk(*small), reference.attention_qk(*small))
    ours = bench(lambda: triton_attention.attention_qk(*args))
    qf, kf, vf = (torch.randn(batch, heads, length, d, device="cuda", dtype=torch.bfloat16) for length in (lq, lk, lk))
    bf16 = bench(lambda: F.scaled_dot_product_attention(qf, kf, vf))
    result = {"flops": 4 * batch * heads * lq * lk * d, "ours_ms": ours, "bf16_ms": bf16, "rel_err": err}
    if lq * lk <= 4096 * 4096 and d <= 160:  # the two-pass "qkvp" kernel, for comparison
        scales = torch.rand(4, 4, device="cuda") * 0.02 + 0.01
        scales[:, 3] = 1 / 255
        offsets = torch.randint(-10, 10, (4, 4), device="cuda").float()
        vq = _codes(batch, lk, heads, d)
        result["qkvp_ms"] = bench(lambda: triton_attention.attention(q, k, vq, scales, offsets, rows, d**-0.5, 255,
                                                                     torch.bfloat16))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/kernel_bench.json")
    parser.add_argument("--w4", action="store_true", help="also time the packed 4-bit weight variants")
    parser.add_argument("--kinds", nargs="+", default=["conv", "linear", "attention"], help="which shapes to time")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for kind, shape in (entry for entry in SHAPES if entry[0] in args.kinds):
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
            extra = "".join(f" {key[:-3]} {tf(result[key]):6.1f}" for key in
                            ("ours_tma_ms", "ours_ptr_ms", "plain_triton_ms", "fp8_scaled_mm_ms", "qkvp_ms")
                            if result.get(key))
            print(f"{kind:9s} {str(shape):28s} {result['weights']:4s} ours {result['ours_ms']:.3f} ms "
                  f"({tf(result['ours_ms']):6.1f} TOP/s) bf16 {result['bf16_ms']:.3f} ms ({tf(result['bf16_ms']):6.1f}) "
                  f"ratio {result['ours_ms'] / result['bf16_ms']:.2f} quant {result.get('quantize_ms') or 0:.3f} ms "
                  f"err {result['rel_err']:.1e} |{extra}", flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                                  indent=2))  # after every shape: a killed run keeps what it measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
