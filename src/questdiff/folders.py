"""What a questdiff folder holds: at most one kind of checkpoint, told by the json it carries. A fake-quant
checkpoint (``questdiff.save`` / ``questdiff quantize``) and a deployed one (``questdiff.save_deployed`` /
``questdiff convert``) never share a folder: a reader of a mixed folder could not tell which model is current.

No torch here: the command line asks before it imports anything heavy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

Kind = Literal["fake-quant", "deployed"]

FAKE_QUANT_CONFIG = "questdiff.json"
DEPLOYED_CONFIG = "questdiff-deployed.json"
_CONFIGS: dict[Kind, str] = {"fake-quant": FAKE_QUANT_CONFIG, "deployed": DEPLOYED_CONFIG}
_WRITERS: dict[Kind, str] = {"fake-quant": "questdiff.save / questdiff quantize",
                             "deployed": "questdiff.save_deployed / questdiff convert"}


def describe(kind: Kind) -> str:
    """``"a deployed checkpoint (questdiff-deployed.json, written by ...)"``."""
    return f"a {kind} checkpoint ({_CONFIGS[kind]}, written by {_WRITERS[kind]})"


def checkpoint_kinds(directory: str | Path) -> list[Kind]:
    """The kinds of checkpoint in ``directory`` (none, one, or both in a folder mixed by an older questdiff)."""
    return [kind for kind, name in _CONFIGS.items() if (Path(directory) / name).is_file()]


def other_kind(directory: str | Path, kind: Kind) -> Kind | None:
    """The kind of checkpoint in ``directory`` that is not ``kind``, if any."""
    return next((k for k in checkpoint_kinds(directory) if k != kind), None)


def refuse_other_kind(directory: str | Path, kind: Kind) -> None:
    """Raise ``ValueError`` if ``directory`` holds a checkpoint of another kind than ``kind`` (checked before anything
    is written into it)."""
    other = other_kind(directory, kind)
    if other is not None:
        raise ValueError(f"{directory} holds {describe(other)}; a folder holds one kind of checkpoint: save the "
                         f"{kind} model into another folder")
