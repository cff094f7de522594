"""Calibration data: the denoiser's own inputs while the FP model samples (data-free, spec §2.2).

``record_calibration(denoiser)`` hooks the denoiser's forward and records every call's arguments by name (x_t, t,
text/class conditioning including the unconditional half of CFG batches, SDXL's ``added_cond_kwargs``) while ANY
sampling loop runs. ``collect_calibration(pipe)`` runs a diffusers pipeline inside it and keeps sampler steps spread
over the whole trajectory (``spread_steps``). The result is a ``CalibrationSet``: one row per (sample, step),
kept in memory or saved as safetensors. Steps recorded but not selected as calibrated timesteps stay in
``CalibrationSet.range_steps``: they have no quantizer row of their own, but widen the activation ranges of the row
their timestep maps to, so that every sampler step is covered, not only the calibrated ones.
"""
from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..digest import stats_digest
from ..io_utils import atomic_path

CALIBRATION_VERSION = 1
_SEP = "."
_RANGE = f"range_steps{_SEP}"  # key prefix of the range-only rows in a saved set


def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor], static: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value
    elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        for k, v in value.items():
            tensors[f"{prefix}{_SEP}{k}"] = v
    else:
        static[prefix] = value


def _timestep_shape(t: torch.Tensor, batch: int) -> tuple[int, ...]:
    """The layout of a timestep argument as called, batch dimension written ``-1`` (see ``CalibrationSet``)."""
    if t.ndim >= 1 and t.shape[0] == batch and t.numel() == batch:
        return (-1, *t.shape[1:])
    if t.numel() == 1:
        return tuple(t.shape)
    raise ValueError(
        f"cannot record a timestep argument of shape {tuple(t.shape)} for a batch of {batch}: pass one timestep per "
        "sample ([N] or [N, 1]) or one for the whole batch"
    )


def _replay_timestep(values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-row timesteps ``[B]`` in the recorded layout ``shape``: per sample where the call passed one per sample;
    one value for the batch where it passed one, unless the rows mix timesteps (then one per sample)."""
    if -1 in shape:
        return values.reshape(shape)
    if bool((values == values[:1]).all()):
        return values[:1].reshape(shape)
    return values.reshape(values.shape[0], *shape[1:])


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tensors.items():
        if _SEP in key:
            head, tail = key.split(_SEP, 1)
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


@dataclass
class CalibrationSet:
    """Recorded denoiser inputs, one row per (sample, sampler step).

    Attributes:
        inputs: forward-argument name -> tensor ``[N, ...]`` (nested dicts flattened as ``"parent.child"``);
            ``inputs[timestep_key]`` is ``[N]`` float.
        steps: ``[N]`` sampler step index of each row (0 = first, noisiest step).
        sample_key: name of the ``x_t`` argument; timestep_key: name of the timestep argument.
        static: non-tensor arguments, identical for every call (e.g. ``return_dict``).
        timestep_is_int: the sampler passed integer timesteps (replayed as int64).
        constants: tensor arguments without a batch dimension, identical for every call (e.g. FLUX's ``img_ids``
            ``[tokens, 3]``), replayed as they are.
        timestep_shape: the timestep argument's shape as the sampler passed it, batch dimension written ``-1``:
            ``(-1,)`` for ``[N]``, ``(-1, 1)`` for ``[N, 1]``, ``()`` for a scalar; ``model_kwargs`` replays it.
        range_steps: rows of the recorded sampler steps that ``select`` did not keep as calibrated timesteps (same
            inputs and settings), or ``None``. Activation init widens each quantizer row's range by the statistics
            of the steps mapped to it (``calibration.activations``; ``quantize(range_steps="rows")`` gives them rows
            of their own instead); nothing else reads them (finetuning and weight reconstruction run on the
            calibrated rows only).
    """

    inputs: dict[str, torch.Tensor]
    steps: torch.Tensor
    sample_key: str
    timestep_key: str
    static: dict[str, Any] = field(default_factory=dict)
    timestep_is_int: bool = True
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    timestep_shape: tuple[int, ...] = (-1,)
    range_steps: "CalibrationSet | None" = None

    def __len__(self) -> int:
        return int(self.steps.shape[0])

    @property
    def xs(self) -> torch.Tensor:
        return self.inputs[self.sample_key]

    @property
    def ts(self) -> torch.Tensor:
        return self.inputs[self.timestep_key]

    @property
    def timesteps(self) -> list[float]:
        """Distinct calibrated timesteps in sampling order (by step index, noisiest first)."""
        order = torch.argsort(self.steps, stable=True)
        seen: dict[float, None] = {}
        for t in self.ts[order].tolist():
            seen.setdefault(float(t), None)
        return list(seen)

    @property
    def recorded_timesteps(self) -> list[float]:
        """Every distinct timestep of the recorded trajectories, the calibrated ones and those of ``range_steps``, in
        sampling order."""
        if self.range_steps is None:
            return self.timesteps
        steps = torch.cat([self.steps, self.range_steps.steps])
        ts = torch.cat([self.ts, self.range_steps.ts])
        return list(dict.fromkeys(float(t) for t in ts[torch.argsort(steps, stable=True)].tolist()))

    def subset(self, index: torch.Tensor) -> "CalibrationSet":
        """Rows ``index`` of the calibrated rows (``range_steps`` are not carried over)."""
        return CalibrationSet(
            {k: v[index] for k, v in self.inputs.items()},
            self.steps[index],
            self.sample_key,
            self.timestep_key,
            dict(self.static),
            self.timestep_is_int,
            dict(self.constants),
            self.timestep_shape,
        )

    @classmethod
    def concat(cls, parts: "list[CalibrationSet]") -> "CalibrationSet":
        """The rows of ``parts`` one after another (sets recorded from the same denoiser, e.g. by several ranks).

        Settings come from the first part (the one recorded first, whose first call fixed the timestep layout);
        ``timestep_is_int`` holds if it holds for every part. A single part is returned as it is."""
        if not parts:
            raise ValueError("nothing to concatenate: no calibration rows were recorded")
        first = parts[0]
        if len(parts) == 1:
            return first
        for part in parts[1:]:
            if set(part.inputs) != set(first.inputs) or part.static != first.static:
                raise ValueError(f"cannot join calibration sets with different inputs or settings "
                                 f"({sorted(first.inputs)} {first.static} vs {sorted(part.inputs)} {part.static})")
            if set(part.constants) != set(first.constants) or not all(
                    torch.equal(part.constants[k], v) for k, v in first.constants.items()):
                raise ValueError("cannot join calibration sets whose batch-less inputs differ; record them with the "
                                 "same pipeline settings")
        ranges = [p.range_steps for p in parts if p.range_steps is not None]
        return cls(
            {k: torch.cat([p.inputs[k] for p in parts]) for k in first.inputs},
            torch.cat([p.steps for p in parts]),
            first.sample_key,
            first.timestep_key,
            dict(first.static),
            all(p.timestep_is_int for p in parts),
            dict(first.constants),
            first.timestep_shape,
            cls.concat(ranges) if ranges else None,
        )

    def digest(self) -> str:
        """A short hash of the rows' contents (shapes, dtypes, sums, sums of squares) and settings, to tell sets
        apart. Independent of the order of ``inputs`` (a recorded set and the same set loaded from safetensors,
        which sorts its keys, agree)."""
        keys = sorted(self.inputs)
        described = {k: [list(self.inputs[k].shape), str(self.inputs[k].dtype)] for k in keys}
        settings = [self.sample_key, self.timestep_key, self.timestep_is_int, list(self.timestep_shape), self.static]
        header = json.dumps([described, *settings], sort_keys=True, default=str)
        constants = sorted(self.constants)
        if constants:  # (kept out of the header otherwise, so digests of sets without constants are unchanged)
            header += json.dumps({k: list(self.constants[k].shape) for k in constants})
        if self.range_steps is not None:  # likewise
            header += "range_steps:" + self.range_steps.digest()
        return stats_digest(header, [*(self.inputs[k] for k in keys), self.steps, *(self.constants[k] for k in constants)])

    def at_timestep(self, t: float) -> "CalibrationSet":
        return self.subset(torch.nonzero(self.ts == t).flatten())

    def model_kwargs(self, index: torch.Tensor | slice | None = None, device: torch.device | str | None = None) -> dict[str, Any]:
        """Keyword arguments for ``denoiser(**kwargs)`` for rows ``index`` (all rows if ``None``); the timestep in
        the layout the sampler passed it (``timestep_shape``)."""
        rows = {k: (v if index is None else v[index]) for k, v in self.inputs.items()}
        if device is not None:
            rows = {k: v.to(device) for k, v in rows.items()}
        t = rows[self.timestep_key]
        rows[self.timestep_key] = _replay_timestep(t.round().long() if self.timestep_is_int else t, self.timestep_shape)
        constants = {k: v if device is None else v.to(device) for k, v in self.constants.items()}
        return {**_unflatten({**rows, **constants}), **self.static}

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[torch.Tensor]:
        """Row-index batches; with ``shuffle`` the rows are drawn i.i.d. across timesteps."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield order[start : start + batch_size]

    def select(self, calib_steps: int | None = None, samples_per_step: int | None = None, seed: int = 0,
               keep_range_steps: bool = True) -> "CalibrationSet":
        """Spec §2.2 selection: ``calib_steps`` recorded sampler steps spread over the whole trajectory
        (``spread_steps``: always the first and the last step) and at most ``samples_per_step`` rows of each (a
        seeded random subset, so CFG's cond/uncond halves mix evenly).

        The other recorded steps (same cap per step) go to ``range_steps`` unless ``keep_range_steps`` is off: they
        widen the activation ranges of the calibrated rows they map to (a static range calibrated at one step
        clips the larger activations of the cleaner steps that share its row)."""
        recorded = sorted(set(self.steps.tolist()))
        steps = recorded
        if calib_steps is not None:
            if calib_steps > len(recorded):
                raise ValueError(
                    f"asked for {calib_steps} calibration steps but only {len(recorded)} sampler steps were recorded; "
                    "use fewer calibration steps or sample with more inference steps"
                )
            steps = [recorded[i] for i in spread_steps(len(recorded), calib_steps)]
        generator = torch.Generator().manual_seed(seed)

        def rows_of(chosen: list[int]) -> torch.Tensor:
            keep = []
            for step in chosen:
                rows = torch.nonzero(self.steps == step).flatten()
                if samples_per_step is not None and len(rows) > samples_per_step:
                    rows = rows[torch.randperm(len(rows), generator=generator)[:samples_per_step]].sort().values
                keep.append(rows)
            return torch.cat(keep)

        picked = self.subset(rows_of(steps))
        others = [step for step in recorded if step not in set(steps)]
        if keep_range_steps:
            ranges = [self.subset(rows_of(others))] if others else []
            ranges += [self.range_steps] if self.range_steps is not None else []
            picked.range_steps = CalibrationSet.concat(ranges) if ranges else None
        return picked

    # -- checks --------------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` naming the problem if the data (``range_steps`` included) has NaN/Inf or does not fit
        ``model``."""
        if self.range_steps is not None:
            self.range_steps.validate(model)
        for key, value in {**self.inputs, **self.constants}.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise ValueError(
                    f"calibration input {key!r} contains NaN or Inf values; re-collect the calibration data "
                    "(check the FP model samples correctly)"
                )
        config = getattr(model, "config", None)
        in_channels = getattr(config, "in_channels", None) if config is not None else None
        channels = self.xs.shape[-1] if self.xs.ndim == 3 else self.xs.shape[1]  # [N, tokens, C] (FLUX) or [N, C, ...]
        if in_channels is not None and self.xs.ndim >= 2 and channels != in_channels:
            raise ValueError(
                f"calibration samples have {channels} channels but the model expects {in_channels} "
                f"(shape {tuple(self.xs.shape[1:])}); collect calibration data with this model"
            )
        # models that project their captions first (PixArt) take captions of width caption_channels
        cross = (getattr(config, "caption_channels", None) or getattr(config, "cross_attention_dim", None)
                 if config is not None else None)
        context = self.inputs.get("encoder_hidden_states")
        if isinstance(cross, int) and context is not None and context.shape[-1] != cross:
            raise ValueError(
                f"calibration conditioning has width {context.shape[-1]} but the model cross-attends to width "
                f"{cross}; collect calibration data with this model's pipeline"
            )
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            return
        unknown = [k for k in _unflatten({**self.inputs, **self.constants}) if k not in params]
        if unknown:
            raise ValueError(
                f"calibration data has inputs {unknown} that {type(model).__name__}.forward does not take; "
                "it was recorded from another model"
            )

    # -- persistence ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
        """Write the set to one safetensors file (atomically). ``settings``: JSON-able notes on how the set was
        made (e.g. the command line's collection options), stored in the same file; ``saved_settings`` reads them."""
        path = Path(path)
        tensors = {f"inputs{_SEP}{k}": v.contiguous() for k, v in self.inputs.items()}
        tensors.update({f"constants{_SEP}{k}": v.contiguous() for k, v in self.constants.items()})
        tensors["steps"] = self.steps.contiguous()
        if self.range_steps is not None:  # same settings and constants as the calibrated rows
            tensors.update({f"{_RANGE}inputs{_SEP}{k}": v.contiguous() for k, v in self.range_steps.inputs.items()})
            tensors[f"{_RANGE}steps"] = self.range_steps.steps.contiguous()
        meta = {
            "version": str(CALIBRATION_VERSION),
            "sample_key": self.sample_key,
            "timestep_key": self.timestep_key,
            "timestep_is_int": json.dumps(self.timestep_is_int),
            "timestep_shape": json.dumps(list(self.timestep_shape)),
            "static": json.dumps(self.static),
        }
        if settings is not None:
            meta["settings"] = json.dumps(dict(settings))
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @staticmethod
    def saved_settings(path: str | Path) -> dict[str, Any] | None:
        """The ``settings`` given to ``save`` (``None`` if none were, e.g. a file of an older questdiff)."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"calibration file {path} is truncated or corrupt ({err}); collect it again") from err
        return json.loads(meta["settings"]) if "settings" in meta else None

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} does not exist")
        try:
            # own storage for each tensor: safetensors (0.8) returns views into one file buffer at arbitrary byte
            # offsets, and CPU kernels round differently on unaligned inputs, so a reloaded set would not reproduce
            # the in-memory set's outputs bit for bit
            tensors = {k: v.clone() for k, v in load_file(str(path)).items()}
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"calibration file {path} is truncated or corrupt ({err}); collect it again") from err
        if meta.get("version") != str(CALIBRATION_VERSION):
            raise ValueError(f"calibration file {path} has version {meta.get('version')}, expected {CALIBRATION_VERSION}")
        def prefixed(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        def rows(inputs: dict[str, torch.Tensor], steps: torch.Tensor) -> "CalibrationSet":
            return cls(
                inputs,
                steps,
                meta["sample_key"],
                meta["timestep_key"],
                json.loads(meta["static"]),
                json.loads(meta["timestep_is_int"]),
                prefixed(f"constants{_SEP}"),
                tuple(json.loads(meta.get("timestep_shape", "[-1]"))),  # sets saved before it was recorded: [N]
            )

        calib = rows(prefixed(f"inputs{_SEP}"), tensors["steps"])
        if f"{_RANGE}steps" in tensors:
            calib.range_steps = rows(prefixed(f"{_RANGE}inputs{_SEP}"), tensors[f"{_RANGE}steps"])
        return calib


class CalibrationRecorder:
    """Collects the denoiser's inputs call by call; ``result()`` returns the ``CalibrationSet``.

    A call starts a new sampling run when its timestep is larger than the previous call's (samplers go from noisy
    to clean); ``step`` counts model calls within a run. ``keep_step`` (``step -> bool``) filters what is stored.
    A tensor argument is per sample when its first dim is the call's batch size (or 1, broadcast); one whose first
    dim differs from the batch size at its first call is a constant (e.g. FLUX's ``img_ids``), and must then stay
    identical in every call.
    """

    def __init__(self, forward: Callable[..., Any], timestep_argument: str, device: str | torch.device = "cpu") -> None:
        self.signature = inspect.signature(forward)
        params = list(self.signature.parameters)
        if timestep_argument not in params:
            raise ValueError(
                f"the denoiser's forward has no argument {timestep_argument!r} (it has {params}); pass the name of "
                "the timestep argument"
            )
        self.sample_key = params[0]
        self.timestep_key = timestep_argument
        self.device = torch.device(device)
        self.keep_step: Callable[[int], bool] = lambda step: True
        self._rows: list[dict[str, torch.Tensor]] = []
        self._steps: list[torch.Tensor] = []
        self._static: dict[str, Any] | None = None
        self._constants: dict[str, torch.Tensor] = {}
        self._last_t: float | None = None
        self._step = -1
        self.timestep_is_int = True
        self.timestep_shape: tuple[int, ...] | None = None
        self._shape_batch = 0  # batch size of the call that set timestep_shape
        self.calls = 0
        self.calls_per_run = 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self.signature.bind(*args, **kwargs)
        sample = bound.arguments[self.sample_key]
        batch = sample.shape[0]
        t = bound.arguments[self.timestep_key]
        t_tensor = torch.as_tensor(t).detach()
        self.timestep_is_int &= not t_tensor.is_floating_point() or bool((t_tensor == t_tensor.round()).all())
        t_value = float(t_tensor.flatten()[0])
        if self._last_t is not None and t_value <= self._last_t:
            self._step += 1
        else:
            self._step = 0
        self._last_t = t_value
        self.calls += 1
        self.calls_per_run = max(self.calls_per_run, self._step + 1)
        if not self.keep_step(self._step):
            return
        tensors: dict[str, torch.Tensor] = {}
        static: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            if name == self.timestep_key:
                self._note_timestep_shape(_timestep_shape(t_tensor, batch), batch)
                tensors[name] = t_tensor.float().flatten().expand(batch)
                continue
            _flatten(name, value, tensors, static)
        if self._static is None:
            self._static = static
        elif static != self._static:
            raise ValueError(f"non-tensor denoiser arguments changed between calls ({self._static} -> {static})")
        row = {}
        for key, value in tensors.items():
            if value.shape[:1] == (1,) and batch > 1:
                value = value.expand(batch, *value.shape[1:])
            if key in self._constants or (not self._rows and value.shape[:1] != (batch,)):
                self._record_constant(key, value)
                continue
            if value.shape[:1] != (batch,):
                raise ValueError(f"cannot record denoiser input {key!r} of shape {tuple(value.shape)} for batch {batch}")
            row[key] = value.detach().to(self.device, copy=True)
        self._rows.append(row)
        self._steps.append(torch.full((batch,), self._step, dtype=torch.long))

    def _record_constant(self, key: str, value: torch.Tensor) -> None:
        known = self._constants.get(key)
        if known is None:
            self._constants[key] = value.detach().to(self.device, copy=True)
        elif known.shape != value.shape or not torch.equal(known, value.detach().to(self.device)):
            raise ValueError(f"denoiser input {key!r} has no batch dimension (shape {tuple(known.shape)}) but changed "
                             "between calls; record calls whose batch-less inputs are identical")

    def _note_timestep_shape(self, shape: tuple[int, ...], batch: int) -> None:
        """Keep the timestep layout; a batch of one cannot tell ``[1]`` per sample from ``[1]`` for the batch, so it
        only has to agree with the others up to that, and a larger batch's layout wins."""
        if self.timestep_shape is None or shape == self.timestep_shape:
            self.timestep_shape, self._shape_batch = shape, max(batch, self._shape_batch)
            return

        def one(layout: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(1 if d == -1 else d for d in layout)

        if 1 in (batch, self._shape_batch) and one(shape) == one(self.timestep_shape):
            if batch > self._shape_batch:
                self.timestep_shape, self._shape_batch = shape, batch
            return
        raise ValueError(
            f"the timestep argument changed layout between calls ({self.timestep_shape} -> {shape}, -1 = batch); "
            "pass it the same way in every call"
        )

    def drop_rows(self, keep_step: Callable[[int], bool]) -> None:
        """Forget stored calls whose step ``keep_step`` rejects."""
        pairs = [(r, s) for r, s in zip(self._rows, self._steps) if keep_step(int(s[0]))]
        self._rows = [r for r, _ in pairs]
        self._steps = [s for _, s in pairs]

    def result(self) -> CalibrationSet:
        if not self._rows:
            raise ValueError(
                "no denoiser call was recorded: run the sampling loop inside record_calibration(denoiser) and make "
                "sure the pipeline calls this denoiser"
            )
        keys = list(self._rows[0])
        inputs = {k: torch.cat([r[k] for r in self._rows]) for k in keys}
        return CalibrationSet(
            inputs,
            torch.cat(self._steps),
            self.sample_key,
            self.timestep_key,
            self._static or {},
            self.timestep_is_int,
            dict(self._constants),
            (-1,) if self.timestep_shape is None else self.timestep_shape,
        )


@contextlib.contextmanager
def record_calibration(
    denoiser: nn.Module, timestep_argument: str | None = None, device: str | torch.device = "cpu"
) -> Iterator[CalibrationRecorder]:
    """Record the denoiser's inputs while any sampling loop runs inside the ``with`` block.

    ``timestep_argument`` defaults to the registered adapter's (``"timestep"`` for diffusers UNets). Recorded
    tensors are copied to ``device`` (CPU by default, to keep GPU memory free)::

        with questdiff.record_calibration(pipe.unet) as rec:
            pipe(batch_size=16, num_inference_steps=20)
        calib = rec.result().select(calib_steps=20)
    """
    if timestep_argument is None:
        from ..adapters import get_adapter

        timestep_argument = get_adapter(denoiser).timestep_argument
    recorder = CalibrationRecorder(denoiser.forward, timestep_argument, device)
    handle = denoiser.register_forward_pre_hook(recorder, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()


def spread_steps(n_steps: int, calib_steps: int) -> list[int]:
    """Indices of ``calib_steps`` of ``n_steps`` sampler steps spread evenly over the whole trajectory:
    ``round(i * (n_steps - 1) / (calib_steps - 1))`` for ``i = 0 .. calib_steps - 1`` (halves rounded up), so the
    first and the last step are always kept (one step: the first only) and every sampler timestep lies within one
    calibration gap of a calibrated one.

    The official code (spec §2.2) keeps ``range(0, n, n // calib_steps)`` instead: more steps than asked for when
    ``calib_steps`` does not divide ``n`` (25 of 50 for 20), and never the last ones; a truncated version of that
    left samplers outside the calibrated range.
    """
    if not 1 <= calib_steps <= n_steps:
        raise ValueError(f"calib_steps must be between 1 and the {n_steps} sampler steps, got {calib_steps}")
    if calib_steps == 1:
        return [0]
    span = calib_steps - 1
    return [(2 * i * (n_steps - 1) + span) // (2 * span) for i in range(calib_steps)]


def stride_filter(calls_per_run: int, calib_steps: int | None) -> Callable[[int], bool]:
    """Keep the ``spread_steps`` of runs with ``calls_per_run`` denoiser calls (all of them if ``calib_steps`` is
    ``None`` or not smaller)."""
    if calib_steps is None or calib_steps >= calls_per_run:
        return lambda step: True
    keep = set(spread_steps(calls_per_run, calib_steps))
    return lambda step: step in keep
