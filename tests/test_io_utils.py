"""Atomic writes keep the user's file modes; a failed command removes the output folders it created empty."""
import os

import pytest

from questdiff.io_utils import atomic_write_text, output_dir


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "summary.json", "{}")
        plain = tmp_path / "plain.txt"
        plain.write_text("")  # what open() makes under this umask
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_block_removes_the_empty_folders_it_created(tmp_path):
    out = tmp_path / "runs" / "new"
    with pytest.raises(KeyboardInterrupt), output_dir(out) as folder:
        (folder / "work" / "stages").mkdir(parents=True)
        raise KeyboardInterrupt
    assert not (tmp_path / "runs").exists()


def test_failed_block_keeps_files_and_folders_that_existed(tmp_path):
    kept = tmp_path / "kept"
    with pytest.raises(ValueError), output_dir(kept / "out") as folder:
        (folder / "calibration.safetensors").write_text("x")
        (folder / "empty").mkdir()
        raise ValueError("failed after writing a file")
    assert sorted(p.name for p in (kept / "out").iterdir()) == ["calibration.safetensors"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError), output_dir(existing):
        raise ValueError("failed at once")
    assert existing.is_dir()  # not ours to remove
