"""Writing one file atomically (a whole folder: :func:`jneox.checkpoint.staged_folder`)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error it is renamed over
    ``path`` (a reader never sees half a file; a hard link to the old file keeps the old content), else
    it is deleted and any previous ``path`` is left as it was. Beside, not in /tmp: a rename cannot cross
    file systems."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp makes it 0600; the file is an ordinary output
    try:
        yield Path(name)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
