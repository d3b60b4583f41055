"""The one error type of pixart-cli. The CLI turns it into one line on stderr and its exit code."""

from __future__ import annotations

from contextlib import contextmanager

# Exit codes, as scripts see them.
EXIT_RUNTIME = 1  # the work failed: out of memory, model missing, broken model folder
EXIT_USAGE = 2  # bad input: an option, a prompt, a file; nothing was loaded or written
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Terminated(BaseException):
    """SIGTERM, raised inside the work (as KeyboardInterrupt is for SIGINT) so that temp files are cleaned up."""


class PixartError(Exception):
    """A failure the user can fix. ``str(error)`` is the single line shown; it names the value and the fix.

    Built from parts (``option``, ``value``, ``reason``, ``fix``), the line is "OPTION VALUE: REASON; FIX", and a
    caller that knows better where a value came from (an image's own size, say) builds its own line from the same
    parts, never by parsing the text.
    """

    def __init__(
        self,
        message: str | None = None,
        exit_code: int = EXIT_USAGE,
        *,
        option: str | None = None,
        value=None,
        reason: str | None = None,
        fix: str | None = None,
    ):
        if message is None:
            message = f"{option}{'' if value is None else f' {value}'}: {reason}" + (f"; {fix}" if fix else "")
        super().__init__(message)
        self.exit_code = exit_code
        self.option, self.value, self.reason, self.fix = option, value, reason, fix


def bad_file(path, problem: str) -> PixartError:
    """An input file that cannot be used: the line names the file first."""
    return PixartError(f"{path}: {problem}")


def detail(error: BaseException) -> str:
    """The first line of an error, short enough for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


_stopping = False
_last_raised = float("-inf")
SIGNAL_QUIET_SECONDS = 3.0
_finished = False  # the work is complete: a signal now interrupts nothing
_deferring = 0  # depth of signals_deferred blocks
_pending: int | None = None  # a signal that arrived inside one


@contextmanager
def signals_deferred():
    """A signal that arrives inside the block takes effect at its end: an output placed inside is also reported
    inside, so a failure line never says "not written" about a file that is there."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if _deferring == 0 and _pending is not None:
        signum, _pending = _pending, None
        _stop(signum)


def on_signal(signum, frame) -> None:
    """SIGINT/SIGTERM handler: a signal stops the work (KeyboardInterrupt / Terminated, so temp files are removed on
    the way out); more signals within SIGNAL_QUIET_SECONDS do nothing, so that a burst never interrupts the way out
    (cleanup, the one error line) into a traceback. A signal after that raises again, in case library code
    swallowed the first. The handler stays installed: switching to SIG_IGN from inside a handler while more
    signals are pending makes Python raise "Signal N ignored due to race condition"."""
    global _pending
    import time

    if _finished or time.monotonic() - _last_raised < SIGNAL_QUIET_SECONDS:
        return
    if _deferring:
        _pending = signum
        return
    _stop(signum)


def ignore_signals() -> None:
    """From now on SIGINT and SIGTERM do nothing (the work is complete; the interpreter's exit must not be cut
    short). The flag comes first, so a signal that arrives while the handlers are switched is ignored too."""
    global _finished
    import signal

    _finished = True
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def stopped() -> bool:
    """Whether a signal has stopped this process's work."""
    return _stopping


def _stop(signum: int) -> None:
    global _stopping, _last_raised
    import signal
    import time

    _stopping, _last_raised = True, time.monotonic()
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def leave(code: int) -> None:
    """Exit with ``code``. After a signal, skip the interpreter's finalization: it puts the default handlers
    back, so one more signal of a burst would kill the process mid-exit (a wrong exit code, "lost sys.stderr")."""
    import sys

    if not _stopping:
        sys.exit(code)
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)
