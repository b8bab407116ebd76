"""Writing a folder the user named (`--out`) safely: everything is written into a fresh folder beside
it, then moved into place, so a failure (a full disk, a refused format) leaves the target as it was,
and a symlink planted in the target is replaced, never written through."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged(out: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder to write `out`'s files into. On success they take their places in `out`
    (the folder itself is renamed into place when `out` does not exist); on failure it is removed."""
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"{out} exists and is not a folder: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()  # (not mkdtemp: its 0700 would become the output's mode)
    try:
        yield tmp
        if out.exists():
            for f in tmp.iterdir():
                os.replace(f, out / f.name)  # replaces a symlink there, does not follow it
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
