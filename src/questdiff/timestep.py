"""Timestep ownership: which row of the per-timestep activation scales is active.

One owner (DESIGN §3): a forward pre-hook on the denoiser reads its timestep argument, maps it through a
``TimestepSchedule`` and writes the row index into a ``TimestepState`` that every activation quantizer of that
denoiser shares. Samplers are never edited, so DDIM, PNDM/PLMS, DPM-Solver++, Euler, CFG batches and step counts
other than the calibration's all work.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch import nn

Rule = Literal["at_or_before", "nearest"]


class TimestepError(ValueError):
    """A timestep cannot be mapped to a calibrated quantizer row."""


@dataclass(frozen=True)
class TimestepSchedule:
    """Calibrated timesteps (sampling order, noisiest first) and the rule mapping any timestep to a row.

    Rules:
    - ``"at_or_before"`` (default, the official sampler's behaviour): the row of the most recent calibrated step at
      or before the current one in sampling order, i.e. the smallest calibrated ``t_k >= t``.
    - ``"nearest"``: the calibrated step closest in ``t``.

    Timesteps up to one calibration gap (the largest spacing between calibrated keys) outside
    ``[min(t_k), max(t_k)]`` map to the end row, so samplers whose grid starts slightly higher (Euler's 999 after
    DDIM's 981) work; anything further raises ``TimestepError``. A schedule with one key (one shared scale set)
    maps every timestep to row 0.

    ``recorded``: every timestep of the calibration trajectories, the calibrated ones and those whose statistics only
    widened a row's ranges (``CalibrationSet.range_steps``); empty when unknown (schedules saved before it existed).
    ``coverage_warning`` names sampler timesteps outside them.
    """

    timesteps: tuple[float, ...]
    rule: Rule = "at_or_before"
    recorded: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.timesteps:
            raise ValueError("a TimestepSchedule needs at least one calibrated timestep")
        if self.rule not in ("at_or_before", "nearest"):
            raise ValueError(f"unknown timestep rule {self.rule!r}: use 'at_or_before' or 'nearest'")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"calibrated timesteps must be distinct, got {list(self.timesteps)}")

    @classmethod
    def from_timesteps(cls, timesteps: Sequence[float] | torch.Tensor, rule: Rule = "at_or_before",
                       recorded: Sequence[float] = ()) -> "TimestepSchedule":
        values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
        return cls(tuple(float(t) for t in values), rule, tuple(float(t) for t in recorded))

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def gap(self) -> float:
        keys = sorted(self.timesteps)
        return max((b - a for a, b in zip(keys, keys[1:])), default=0.0)

    def describe(self) -> str:
        return f"{len(self)} calibrated timesteps in [{min(self.timesteps):g}, {max(self.timesteps):g}]"

    def index(self, t: float) -> int:
        """Row of timestep ``t``; raises ``TimestepError`` outside the calibrated range (plus one gap)."""
        if len(self.timesteps) == 1:
            return 0
        lo, hi, gap = min(self.timesteps), max(self.timesteps), self.gap
        if not (lo - gap <= t <= hi + gap):
            raise TimestepError(
                f"timestep {t:g} is outside the calibrated range ({self.describe()}, tolerance {gap:g}); "
                "recalibrate with a sampler that covers it or sample with the calibration's scheduler"
            )
        if self.rule == "nearest":
            return min(range(len(self.timesteps)), key=lambda i: abs(self.timesteps[i] - t))
        at_or_after = [i for i, k in enumerate(self.timesteps) if k >= t]
        if not at_or_after:  # t above every key (within tolerance): first row in sampling order
            return max(range(len(self.timesteps)), key=lambda i: self.timesteps[i])
        return min(at_or_after, key=lambda i: self.timesteps[i])

    def rows_of_batch(self, t: torch.Tensor | float | int) -> list[int]:
        """Row of every entry of a timestep argument that may be a scalar or a per-sample ``[B]`` tensor."""
        values = t.detach().flatten().tolist() if isinstance(t, torch.Tensor) else [float(t)]
        if not values:
            raise TimestepError("empty timestep tensor")
        rows = {v: self.index(float(v)) for v in set(values)}
        return [rows[v] for v in values]

    def index_of_batch(self, t: torch.Tensor | float | int) -> int:
        """Row of a timestep argument whose samples all map to the same row (CFG batches)."""
        rows = set(self.rows_of_batch(t))
        if len(rows) > 1:
            raise TimestepError(
                f"one batch holds timesteps that map to different quantizer rows {sorted(rows)}; "
                "run samples of different timesteps in separate forward calls"
            )
        return rows.pop()

    def rows_on_device(self, t: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``index`` for every entry of ``t`` (``[R]``), computed on ``t``'s device with no host read, so CUDA graphs
        and ``torch.compile`` capture it: the same rows as ``index`` inside the calibrated range; outside it the end
        rows (``index`` raises there; ``TimestepState.set_timestep_on_device`` checks on the host when it may).
        ``keys`` is ``device_keys(t.device)``. Returns int64 ``[R]``."""
        if len(self.timesteps) == 1:
            return torch.zeros(t.shape, dtype=torch.long, device=t.device)
        t = t.to(keys.dtype)
        if self.rule == "nearest":  # argmin takes the first of equally near keys, as ``index`` does
            return (keys[None, :] - t[:, None]).abs().argmin(dim=1)
        ascending, order = keys.sort()  # at or before: the smallest key >= t (the largest key above them all)
        position = torch.searchsorted(ascending, t).clamp_(max=len(self.timesteps) - 1)
        return order[position]
    def coverage_warning(self, t: torch.Tensor | float | int | Sequence[float]) -> str | None:
        """Why sampling at timestep(s) ``t`` runs on activation ranges the calibration never measured, naming the fix,
        or ``None``: a timestep outside the calibrated span (it borrows the end row), or one the calibration
        trajectories never visited (another scheduler or step count: it borrows a neighbouring step's row)."""
        if isinstance(t, torch.Tensor):
            t = t.detach().flatten().tolist()
        values = {float(v) for v in (t if isinstance(t, Sequence) else [t])}
        span = (*self.timesteps, *self.recorded)  # a one-row schedule is calibrated on every recorded timestep
        lo, hi = min(span), max(span)
        outside = sorted(v for v in values if not lo <= v <= hi)
        unseen = sorted(values - set(self.recorded) - set(outside)) if self.recorded else []
        if not outside and not unseen:
            return None
        where = (f"timestep(s) {', '.join(f'{v:g}' for v in (outside or unseen)[:4])} "
                 + (f"outside the calibrated span [{lo:g}, {hi:g}]" if outside
                    else "that the calibration trajectories never visited (another scheduler or step count)"))
        return (f"questdiff: sampling at {where}: they use the static activation ranges of a neighbouring calibrated "
                "step, which can clip. Calibrate on the sampler you sample with: collect_calibration(pipe) with that "
                "scheduler and step count set on pipe (or record_calibration around your own loop); CLI: questdiff "
                "quantize --scheduler NAME --steps N")

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"timesteps": list(self.timesteps), "rule": self.rule}
        if self.recorded:
            data["recorded"] = list(self.recorded)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TimestepSchedule":
        return cls(tuple(float(t) for t in data["timesteps"]), data.get("rule", "at_or_before"),
                   tuple(float(t) for t in data.get("recorded", ())))


class TimestepState:
    """Mutable holder of the active row(s), shared by all activation quantizers of one denoiser (not a module).

    Fake-quant models (host side): ``index`` is the row of a batch whose samples share one row (sampling, CFG); a
    batch that mixes timesteps of different rows (finetuning batches across timesteps) sets ``rows`` instead: the
    per-sample rows ``[B]`` (long, on the timestep argument's device), and every quantizer picks its scale row
    sample by sample. Deployed models (device side): their hook sets ``device_rows``, the rows of the timestep
    argument ``[R]`` found on the device; deployed modules read ``row_vector``, whichever way the rows were set.
    """

    def __init__(self, schedule: TimestepSchedule) -> None:
        self.schedule = schedule
        self._index_tensors: dict[torch.device, torch.Tensor] = {}
        self.index: int | None = None
        self.rows: torch.Tensor | None = None
        self.device_rows: torch.Tensor | None = None
        self.coverage_warned = False  # TimestepSchedule.coverage_warning is shown once per denoiser

    @property
    def index(self) -> int | None:
        return self._index

    @index.setter
    def index(self, value: int | None) -> None:
        self._index = value
        if value is not None:
            for tensor in self._index_tensors.values():
                tensor.fill_(value)

    def index_tensor(self, device: torch.device) -> torch.Tensor:
        """The active row as a 0-d int64 tensor on ``device``, kept up to date in place by every row change: kernels
        read it on the device (no host sync per layer, and a captured CUDA graph replays with the current row)."""
        tensor = self._index_tensors.get(device)
        if tensor is None:
            tensor = torch.full((), self.require_index(), dtype=torch.long, device=device)
            self._index_tensors[device] = tensor
        return tensor

    def set_timestep(self, t: torch.Tensor | float | int) -> int | None:
        """Select the row(s) of timestep argument ``t``; returns the single row, or ``None`` for a mixed batch."""
        rows = self.schedule.rows_of_batch(t)
        self.device_rows = None
        self._warn_coverage(t)
        if len(set(rows)) == 1:
            self.index, self.rows = rows[0], None
        else:
            device = t.device if isinstance(t, torch.Tensor) else None
            self.index, self.rows = None, torch.tensor(rows, dtype=torch.long, device=device)
        return self.index

    def _warn_coverage(self, t: torch.Tensor | float | int) -> None:
        """``TimestepSchedule.coverage_warning`` of ``t`` (a host value), once per denoiser."""
        if not self.coverage_warned:
            message = self.schedule.coverage_warning(t)
            if message:
                warnings.warn(message, stacklevel=3)
                self.coverage_warned = True

    def set_timestep_on_device(self, t: torch.Tensor | float | int, keys: torch.Tensor) -> None:
        """Select the rows of timestep argument ``t`` on the device (deployed models): ``device_rows`` becomes
        ``[R]`` int64 on ``keys``' device (``R`` = entries of ``t``; ``keys``: the calibrated timesteps there, a
        ``TimestepKeys`` buffer). Nothing is read on the host where that would cost a device sync or break a trace: a
        timestep given as a number or a CPU tensor is checked (outside the calibrated span it raises
        ``TimestepError``, as in the fake-quant model); a GPU, traced or captured one takes the end row there."""
        if not isinstance(t, torch.Tensor) or (t.device.type == "cpu" and not _traced(t)):
            self.schedule.rows_of_batch(t)
            self._warn_coverage(t)
        t = torch.as_tensor(t, device=keys.device).reshape(-1)
        self.index, self.rows = None, None
        self.device_rows = self.schedule.rows_on_device(t, keys)

    def row_vector(self, device: torch.device) -> torch.Tensor:
        """The active rows as int64 ``[R]`` on ``device`` (``R`` = 1 when the batch shares one row; else one per
        entry of the timestep argument), a device tensor whatever set them: deployed kernels index their
        ``[T, ...]`` tables with it sample by sample (sample ``n`` of a batch of ``N`` takes entry ``n // (N / R)``)."""
        if self.device_rows is not None:
            return self.device_rows if self.device_rows.device == device else self.device_rows.to(device)
        if self.rows is not None:
            return self.rows.to(device)
        return self.index_tensor(device).reshape(1)

    def require_index(self) -> int:
        if self.index is None:
            if len(self.schedule) == 1:
                return 0
            if self.rows is not None:
                raise TimestepError("this batch mixes timesteps of different rows: use the per-sample rows (state.rows)")
            raise TimestepError(
                "no timestep is active: call the denoiser through its forward (the timestep hook sets it) or "
                "wrap the call in questdiff.at_timestep(model, t)"
            )
        return self.index

    @contextlib.contextmanager
    def _restoring(self) -> Iterator[None]:
        previous = self.index, self.rows, self.device_rows
        try:
            yield
        finally:
            self.index, self.rows, self.device_rows = previous

    @contextlib.contextmanager
    def at_timestep(self, t: torch.Tensor | float | int) -> Iterator[int | None]:
        with self._restoring():
            yield self.set_timestep(t)

    @contextlib.contextmanager
    def at_index(self, index: int) -> Iterator[int]:
        with self._restoring():
            self.index, self.rows, self.device_rows = index, None, None
            yield index


class TimestepArgument:
    """Picks the timestep out of a forward call's ``(args, kwargs)``: by keyword ``name``, else at ``position``.

    A plain module-level class (not a closure) so that deep copies and pickles of a hooked model keep working.
    """

    def __init__(self, name: str, position: int) -> None:
        self.name, self.position = name, position

    def __call__(self, args: tuple, kwargs: dict) -> Any:
        if self.name in kwargs:
            return kwargs[self.name]
        if self.position < len(args):
            return args[self.position]
        raise TimestepError(f"the denoiser was called without its timestep argument {self.name!r}")


def timestep_getter(forward: Callable[..., Any], name: str) -> TimestepArgument:
    """Function ``(args, kwargs) -> timestep value`` for a forward signature and argument ``name``.

    Raises ``ValueError`` naming the available arguments if ``forward`` has no parameter ``name``.
    """
    params = list(inspect.signature(forward).parameters)
    if name not in params:
        raise ValueError(
            f"the denoiser's forward has no argument {name!r} (it has {params}); pass the name of the argument that "
            "carries the diffusion timestep, e.g. GenericAdapter(timestep_argument='t')"
        )
    return TimestepArgument(name, params.index(name))


class TimestepHook:
    """Forward pre-hook that selects the active row from the timestep argument.

    It reaches the ``TimestepState`` through the module it is called on (``getattr(module, owner).state``), never
    through a reference of its own, so a ``copy.deepcopy``, an EMA copy or an unpickled model routes its own
    quantizers, not the original's (DESIGN §3).
    """

    def __init__(self, argument: TimestepArgument, owner: str) -> None:
        self.argument, self.owner = argument, owner

    # never traced by torch.compile: the row lookup reads timesteps on the host, and compiled code reads the row
    # through ``TimestepState.index_tensor`` (one graph for every timestep instead of one per row)
    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        holder = getattr(module, self.owner, None)
        if holder is None:
            raise TimestepError(f"{type(module).__name__} has a timestep hook but no {self.owner!r} state holder")
        holder.state.set_timestep(self.argument(args, kwargs))


def _traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is being traced (``torch.compile``, fake tensors) or captured into a CUDA graph: no host read."""
    from torch._subclasses.fake_tensor import is_fake

    return (torch.compiler.is_compiling() or is_fake(t)
            or (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()))


KEYS_ATTR = "questdiff_timesteps"


class TimestepKeys(nn.Module):
    """The calibrated timesteps ``keys [T]`` (row order) as a non-persistent buffer of the deployed denoiser: it moves
    with ``.to(device)`` and stays fp32 through ``.to(dtype)`` (a bf16 981 would read 980), so the device hook finds
    rows with no host copy per call and one compiled graph or CUDA graph serves every timestep."""

    def __init__(self, schedule: TimestepSchedule) -> None:
        super().__init__()
        self.register_buffer("keys", torch.tensor(schedule.timesteps, dtype=torch.float32), persistent=False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "TimestepKeys":  # type: ignore[override]
        keys = self.keys
        super()._apply(fn, recurse)
        self.keys = keys.to(device=self.keys.device)
        return self


class DeviceTimestepHook(TimestepHook):
    """The deployed models' pre-hook: the rows are found on the device (``TimestepState.set_timestep_on_device``,
    against the model's ``TimestepKeys``), traced by ``torch.compile`` and captured by CUDA graphs, so one graph
    serves every step of a sampling run."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        holder = getattr(module, self.owner, None)
        if holder is None:
            raise TimestepError(f"{type(module).__name__} has a timestep hook but no {self.owner!r} state holder")
        holder.state.set_timestep_on_device(self.argument(args, kwargs), getattr(module, KEYS_ATTR).keys)


def install_timestep_hook(model: nn.Module, timestep_argument: str, owner: str) -> torch.utils.hooks.RemovableHandle:
    """Register the forward pre-hook that selects the active row from the timestep argument (fake-quant models).

    ``owner`` is the attribute of ``model`` whose ``.state`` is the ``TimestepState`` (e.g. ``"_questdiff"``).
    """
    hook = TimestepHook(timestep_getter(model.forward, timestep_argument), owner)
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def install_device_timestep_hook(model: nn.Module, timestep_argument: str, owner: str,
                                 schedule: TimestepSchedule) -> torch.utils.hooks.RemovableHandle:
    """The deployed models' ``DeviceTimestepHook``, and the ``TimestepKeys`` of ``schedule`` it reads (attached to
    ``model`` as ``questdiff_timesteps``, on the device of the model's first tensor)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    model.add_module(KEYS_ATTR, TimestepKeys(schedule).to(device))
    hook = DeviceTimestepHook(timestep_getter(model.forward, timestep_argument), owner)
    return model.register_forward_pre_hook(hook, with_kwargs=True)
