"""Content digests: statistics digests that tell runs apart in resume checks (base weights, calibration sets) and
exact sha256 digests that verify saved files."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def file_digest(path: str | Path) -> str:
    """``"sha256:<hex>"`` of a file's bytes, read in chunks (constant memory)."""
    with open(path, "rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def json_digest(value: Any) -> str:
    """``"sha256:<hex>"`` of a JSON-able value in canonical form (sorted keys, no whitespace), so key order and
    indentation do not count."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
