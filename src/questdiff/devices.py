"""Torch devices checked before use: a misspelt device or one this machine does not have is a ``ValueError``
naming the fix, not torch's assertion from deep inside a ``.to()``."""
from __future__ import annotations

import torch


def check_device(device: str | torch.device, option: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` that exists here; raises ``ValueError`` naming ``option`` (the argument the
    caller took it from, e.g. ``--device``) and the fix."""
    name = str(device)
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError) as err:
        reason = "unknown device type" if "Expected one of" in str(err) else str(err).splitlines()[0]
        raise ValueError(f"{option} {name!r} is not a torch device ({reason}); use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None) if device.type != "mps" else torch.backends.mps
    if backend is None or not hasattr(backend, "is_available"):
        raise ValueError(f"{option} {name!r} cannot run models; use cpu, cuda or cuda:N")
    if not backend.is_available():
        built = " (this torch is built without CUDA)" if device.type == "cuda" and torch.version.cuda is None else ""
        raise ValueError(f"{option} {name!r}: no {device.type.upper()} device is available here{built}; use {option} cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"{option} {name!r}: this machine has {count} {device.type} device(s), "
                         f"{device.type}:0 to {device.type}:{count - 1}; use one of them")
    return device
