"""Shared pieces of the deployed-model speed benchmarks (``deploy_latency.py``, ``dit_latency.py``): timing, CUDA
graphs of a whole denoiser call, run modes, deployed models with constant quantizer values, and the torchao peer.
Speed does not depend on the values, so the quantized models get min-max weight grids and constant activation
scales instead of a calibration."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from questdiff.calibration.weights import init_weights
from questdiff.config import WeightSpec, preset
from questdiff.deploy import convert
from questdiff.prepare import act_quantizers, prepare
from questdiff.timestep import TimestepSchedule

MODES = ("eager", "cuda-graph", "compile", "compile+graph")


def median_ms(fn: Callable[[], Any], reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after 3 warm-ups (CUDA events on a GPU, else wall time)."""
    cuda = torch.cuda.is_available()
    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def graphed(model: Callable[..., Any], inputs: dict[str, Any]) -> Callable[[], Any]:
    """One denoiser call captured in a CUDA graph, timestep hook included (a deployed model finds its rows on the
    device): the returned ``replay()`` runs it with no CPU launch cost, for whatever the input tensors hold then,
    and returns the graph's output."""
    with torch.no_grad():
        model(**inputs)  # autotunes the kernels
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(**inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(**inputs)

    def replay() -> Any:
        graph.replay()
        return out

    return replay


def runner(model: nn.Module, mode: str, inputs: dict[str, Any], compiled: dict[str, Any]) -> Callable[[], Any]:
    """A no-argument call of ``model`` on ``inputs`` in ``mode`` (``MODES``): eager, cuda-graph, compile (Inductor,
    default mode) or compile+graph (the compiled model captured in a CUDA graph); the compiled module is made once
    per model and kept in ``compiled``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    if mode.startswith("compile"):
        if "module" not in compiled:
            compiled["module"] = torch.compile(model)
        run = compiled["module"]
    else:
        run = model
    if mode.endswith("graph"):
        return graphed(run, inputs)
    return lambda: run(**inputs)


def measure_modes(model: nn.Module, label: str, modes: list[str], batches: Callable[[str], list[int]],
                  inputs: Callable[[int], dict[str, Any]], reps: int, tag: str, rows: list[dict[str, Any]],
                  save: Callable[[], None], extra: Callable[[dict[str, Any], str, Callable[[], Any], dict[str, Any]], None]
                  | None = None) -> None:
    """Time ``model`` (named ``label``) in each of ``modes`` at each of ``batches(mode)``, appending one row per
    measurement to ``rows`` (``{model, mode, batch, ms, weight_mib, peak_mib, first_call_s}``, or ``error``) and
    calling ``save`` after each; ``extra(row, mode, call, inputs)`` may add fields. The torchao peer runs compiled
    modes only. Printed lines start with ``tag``."""
    weight_mib = model_bytes(model) / 2**20
    cuda = torch.cuda.is_available()
    compiled: dict[str, Any] = {}
    for mode in modes:
        if label == "torchao-fp8-row" and not mode.startswith("compile"):
            continue  # torchao's fp8 path is meant to be compiled
        for batch in batches(mode):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                with torch.no_grad():
                    args = inputs(batch)
                    call = runner(model, mode, args, compiled)
                    call()
                    if cuda:
                        torch.cuda.synchronize()
                    first = time.perf_counter() - start
                    ms = median_ms(call, reps)
            except Exception as err:  # noqa: BLE001 - record the failure, time the rest
                rows.append({"model": label, "mode": mode, "batch": batch, "error": repr(err)})
                print(f"{tag} {label} {mode} batch {batch}: FAILED {err!r}", flush=True)
                continue
            row = {"model": label, "mode": mode, "batch": batch, "ms": ms, "weight_mib": weight_mib,
                   "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "first_call_s": first}
            if extra is not None:
                extra(row, mode, call, args)
            rows.append(row)
            save()
            print(f"{tag} {label:15s} {mode:13s} batch {batch:2d}: {ms:8.2f} ms  weights {weight_mib:8.1f} MiB  "
                  f"(first call {first:.1f} s)", flush=True)
    torch._dynamo.reset()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def deployed_constant(model: nn.Module, label: str, rows: int = 20, high: float = 981.0, low: float = 1.0,
                      dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """``model`` fake-quantized at preset ``label`` (min-max weight grids, constant activation scales, ``rows``
    calibrated timesteps from ``high`` to ``low``), converted and cast to ``dtype``."""
    config = preset(label)
    config = config.replace(weight=WeightSpec(bits=config.weight.bits, scale_method="minmax"))
    prepare(model, config, TimestepSchedule.from_timesteps(torch.linspace(high, low, rows)))
    init_weights(model)
    with torch.no_grad():
        for q in act_quantizers(model).values():
            q.scale.fill_(0.02)
            q.zero_point.fill_(0 if q.symmetric or q.always_zero else (q.qmax + 1) // 2)
    convert(model)
    return model.to(dtype).eval()


def torchao_fp8(model: nn.Module) -> nn.Module:
    """The peer: torchao's dynamic fp8 row-wise quantization of every Linear (no calibration; convs stay bf16)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return model
