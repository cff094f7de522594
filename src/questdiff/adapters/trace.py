"""One traced forward of a full-precision denoiser: which modules it calls and in what order, which layers read the
model's input tensor and which produce its output, and where it computes attention (``F.scaled_dot_product_attention``
calls, and softmax calls outside them). The generic adapter takes its layers, ``first`` / ``last`` roles,
reconstruction blocks and quantized attention calls from it instead of guessing from registration order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..nn.layers import QuantLayerMixin, holds_quant_layer, is_quantizable
from ..nn.sdpa import sdpa_arguments
from .base import AttentionCall

# containers are never called themselves (ModuleList/ModuleDict) or only sequence their children (Sequential): the
# reconstruction blocks are their children
CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


@dataclass
class LayerCalls:
    """How the forward used one quantizable layer: call indices (over all module calls, in call order), whether its
    first input was the model's sample tensor itself, the identity of that input, whether an output of it is the
    model's output."""

    first: int
    last: int
    input_id: int
    reads_sample: bool
    makes_output: bool = False


@dataclass
class ForwardTrace:
    """``called``: every module name by first call (``""`` is the model); ``layers``: the quantizable layers called;
    ``attention``: the SDPA calls of each module's first run, in call order; ``softmax``: modules that call softmax
    themselves (outside SDPA), e.g. a hand-written ``softmax(q @ k^T) @ v``."""

    called: dict[str, int] = field(default_factory=dict)
    layers: dict[str, LayerCalls] = field(default_factory=dict)
    attention: list[AttentionCall] = field(default_factory=list)
    softmax: list[str] = field(default_factory=list)

    def first_layers(self, candidates: Iterable[str]) -> list[str]:
        """The candidate layers that read the sample tensor itself; if none does (the forward rescales or
        concatenates it first), the earliest-called candidate and every candidate reading the same tensor."""
        calls = {n: self.layers[n] for n in candidates if n in self.layers}
        direct = [n for n, c in calls.items() if c.reads_sample]
        if direct or not calls:
            return sorted(direct, key=lambda n: calls[n].first)
        earliest = min(calls, key=lambda n: calls[n].first)
        return sorted((n for n, c in calls.items() if c.input_id == calls[earliest].input_id), key=lambda n: calls[n].first)

    def last_layers(self, candidates: Iterable[str]) -> list[str]:
        """The candidate layers whose output is the model's output; if none is (the forward post-processes it), the
        candidate called last."""
        calls = {n: self.layers[n] for n in candidates if n in self.layers}
        direct = [n for n, c in calls.items() if c.makes_output]
        if direct or not calls:
            return sorted(direct, key=lambda n: calls[n].first)
        return [max(calls, key=lambda n: calls[n].last)]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a forward output: a tensor, a tuple/list/dict of them, or an object with ``.sample``."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(getattr(value, "sample", None), torch.Tensor):
        yield value.sample


_SOFTMAX = (torch.softmax, F.softmax, torch.Tensor.softmax)


class _RecordAttention(TorchFunctionMode):
    """Records SDPA and softmax calls with the module running them (the innermost one on ``stack``), except inside
    the ``skip`` modules (attention modules quantized otherwise) and in runs after a module's first."""

    def __init__(self, trace: ForwardTrace, stack: list[str], runs: dict[str, int], skip: Collection[str]) -> None:
        super().__init__()
        self.trace, self.stack, self.runs, self.skip = trace, stack, runs, set(skip)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (func is F.scaled_dot_product_attention or func in _SOFTMAX) and not self.skip.intersection(self.stack):
            owner = self.stack[-1] if self.stack else ""
            if func in _SOFTMAX:
                self.trace.softmax.append(owner)
            elif self.runs.get(owner, 1) == 1:
                a = sdpa_arguments(args, kwargs)
                self.trace.attention.append(AttentionCall(owner, a["query"].shape[-1], a["key"].shape[-1], a["value"].shape[-1]))
        return func(*args, **kwargs)


@torch.no_grad()
def trace_forward(model: nn.Module, example: Mapping[str, Any], sample_argument: str,
                  skip_attention: Collection[str] = ()) -> ForwardTrace:
    """Run ``model(**example)`` once with hooks on every module and record a ``ForwardTrace``.

    ``example[sample_argument]`` is the noisy-sample tensor whose readers are the model's first layers; attention
    inside the ``skip_attention`` modules (quantized by attention processors) is not recorded."""
    if sample_argument not in example:
        raise ValueError(f"the example input has no sample argument {sample_argument!r} (it has {sorted(example)})")
    sample = example[sample_argument]
    trace = ForwardTrace()
    names = {id(m): n for n, m in model.named_modules()}
    alive: list[Any] = []  # every recorded tensor stays referenced, so ids are not reused during the forward
    outputs: dict[str, set[int]] = {}
    counter = [0]
    stack: list[str] = []
    runs: dict[str, int] = {}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        name, index = names[id(module)], counter[0]
        counter[0] += 1
        stack.append(name)
        runs[name] = runs.get(name, 0) + 1
        trace.called.setdefault(name, index)
        if not (is_quantizable(module) or isinstance(module, QuantLayerMixin)):
            return
        if name in trace.layers:
            trace.layers[name].last = index
            return
        x = args[0] if args else next(iter(kwargs.values()), None)
        alive.append(x)
        trace.layers[name] = LayerCalls(index, index, id(x), x is sample)

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        name = stack.pop()
        if name in trace.layers:
            alive.append(output)
            outputs.setdefault(name, set()).update(id(t) for t in _tensors(output))

    handles = []
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook, always_call=True))
        with _RecordAttention(trace, stack, runs, skip_attention):
            result = model(**example)
    finally:
        for h in handles:
            h.remove()
    produced = {id(t) for t in _tensors(result)}
    for name, ids in outputs.items():
        trace.layers[name].makes_output = bool(ids & produced)
    return trace


def reconstruction_blocks(model: nn.Module, called: Mapping[str, int] | None = None) -> list[str]:
    """Units for block reconstruction: the modules below ``model`` that hold quantizable (or wrapped) layers and are
    neither a bare layer nor a container, outermost first; containers (``ModuleList``, ``ModuleDict``,
    ``Sequential``) and modules the forward never calls are replaced by their children. ``called``: module name ->
    first-call index from a ``ForwardTrace`` (the result follows it); without it every module counts as called and
    the result follows registration order."""
    units: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if not holds_quant_layer(child) or is_quantizable(child) or isinstance(child, QuantLayerMixin):
                continue
            if isinstance(child, CONTAINERS) or (called is not None and full not in called):
                visit(full + ".", child)
            else:
                units.append(full)

    visit("", model)
    return units if called is None else sorted(units, key=called.__getitem__)
