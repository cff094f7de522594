"""Content digests that tell runs apart in resume checks (base weights, calibration sets)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


@torch.no_grad()
def stats_digest(header: str, tensors: Sequence[torch.Tensor]) -> str:
    """16-hex hash of ``header`` and of each tensor's sum and sum of squares, printed to 9 significant digits so
    CPU and GPU sums of the same values agree. The order of ``tensors`` counts: pass them in a fixed order (sorted
    by name, not in the order of a dict that a load may rebuild differently)."""
    h = hashlib.sha256(header.encode())
    if tensors:
        stats = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors])
        h.update(" ".join(f"{v:.9g}" for v in stats.flatten().tolist()).encode())
    return h.hexdigest()[:16]
