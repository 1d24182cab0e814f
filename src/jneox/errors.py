"""The project's error types. ``JneoxError`` is a problem with what the user gave (a file, a flag, a
request): the CLI prints its message as one line and exits 2. Anything else is a bug and keeps its
traceback. Subclasses of ``ValueError``, so ``except ValueError`` in callers still sees them."""
from __future__ import annotations


class JneoxError(ValueError):
    """Bad input; the message names the problem (and the file, line or tensor where it is)."""


class UsageError(JneoxError):
    """An option or argument value that cannot work (a flag, a sampling parameter, a device)."""


class CheckpointError(JneoxError):
    """A checkpoint that cannot be loaded or written; the message names the file and the tensor."""
