"""How the command line reports a failure: one line on stderr and an exit status.

    2    refused: a missing or unreadable file, a bad option, data or a model
         that fastedge cannot use (nothing was computed, or nothing came of it)
    1    a run started and failed (a non-finite loss, a full disk, a model
         whose own outputs are not finite)
    130  interrupted (Ctrl-C)

`fastedge --debug ...` lets the exception through with its traceback
instead. An exception not listed here is a bug in fastedge, and keeps its
traceback.
"""
from __future__ import annotations

import errno
from typing import Optional

EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_INTERRUPTED = 130

# a full disk or quota during a run: the run failed, the input was fine
_RUN_FAILURE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class CliError(Exception):
    """A failure the command line reports as ``fastedge: <message>`` with
    exit status `status` (2: the input was refused; 1: the run failed)."""

    def __init__(self, message: str, status: int = EXIT_REFUSED):
        super().__init__(message)
        self.status = status


def one_line(text: str) -> str:
    """`text` on one line: its lines joined with '; ' (a multi-line message,
    such as a backend dispatch error that lists every backend, stays whole)."""
    parts = [p.strip() for p in str(text).splitlines() if p.strip()]
    return "; ".join(parts)


def _os_error_message(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def describe(exc: BaseException) -> Optional[tuple[str, int]]:
    """(one-line message, exit status) for an exception the command line
    reports itself; None for one it does not know (a bug: traceback)."""
    import torch
    from fastedge.backends import NoBackendError
    from fastedge.draw import GraphvizNotFoundError
    from fastedge.prune import CheckpointWriteError, NonFiniteLossError

    if isinstance(exc, CliError):
        return one_line(str(exc)), exc.status
    if isinstance(exc, (NonFiniteLossError, CheckpointWriteError)):
        return one_line(str(exc)), EXIT_FAILED
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        first = one_line(str(exc)).split(". ")[0]
        return (f"out of GPU memory ({first}); use a smaller --micro-batch-size, or "
                f"--recompute-readers for a large model", EXIT_FAILED)
    if isinstance(exc, OSError):
        status = EXIT_FAILED if exc.errno in _RUN_FAILURE_ERRNOS else EXIT_REFUSED
        return one_line(_os_error_message(exc)), status
    if isinstance(exc, KeyError):  # str() of a KeyError quotes its message
        return one_line(str(exc.args[0]) if exc.args else "KeyError"), EXIT_REFUSED
    if isinstance(exc, (ValueError, NoBackendError, GraphvizNotFoundError)):
        # ValueError covers TaskDataError, UnsupportedArchitectureError,
        # UnicodeDecodeError, JSONDecodeError and every option check
        return one_line(str(exc)) or type(exc).__name__, EXIT_REFUSED
    if type(exc).__name__ == "ExtensionUnavailable":  # the CUDA backend's, imported lazily
        return one_line(str(exc)), EXIT_REFUSED
    return None
