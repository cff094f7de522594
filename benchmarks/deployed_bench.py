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
