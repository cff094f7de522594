"""Small file-system helpers: atomic writes, writability checks and output folders that a failed command does not
leave behind (no work is lost on a crash or bad path, and nothing half-made stays)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def ensure_writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check it is writable; raise ``PermissionError`` naming the fix."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise PermissionError(f"output folder {path} is not writable ({err.strerror or err}); choose another folder") from err
    return path


def _missing_ancestors(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove_empty_tree(top: Path) -> None:
    """Remove every empty folder under ``top`` (and ``top``), bottom-up; files are never touched."""
    for folder, _, _ in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):  # not empty (or gone): keep it
            os.rmdir(folder)


@contextlib.contextmanager
def output_dir(path: str | Path) -> Iterator[Path]:
    """``ensure_writable_dir(path)`` for the duration of a command: if the block raises (or is interrupted), the
    folders this call created are removed again when they hold no file, so a failed command leaves no empty
    ``--out`` behind. A folder that existed before is left as it is."""
    path = Path(path)
    created = _missing_ancestors(path.absolute())
    ensure_writable_dir(path)
    try:
        yield path
    except BaseException:
        if created:
            _remove_empty_tree(created[-1])
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    The result gets the permissions of a normally created file (``0666`` minus the umask), not the private ``0600``
    of the temporary file."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
