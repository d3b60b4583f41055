"""SIGINT and SIGTERM: one guard object, ``GUARD``, whose handlers ``main`` installs (``GUARD.install()``) before
anything heavy is imported. A signal stops the work by raising (KeyboardInterrupt, ``errors.Terminated``) so that
temp files are removed on the way out; the edge turns it into one line and an exit code.

Library code only marks the moments a signal must wait for (``GUARD.deferred()``: an output placed and reported
together); without installed handlers that is a no-op.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from pixart_cli.errors import Terminated

# more signals within this many seconds of the first do nothing: a burst never interrupts the way out
QUIET_SECONDS = 3.0


class SignalGuard:
    """The state of this process's signal handling, in one place."""

    def __init__(self):
        self.stopping = False  # a signal has stopped this process's work
        self.last_raised = float("-inf")
        self.finished = False  # the work is complete: a signal now interrupts nothing
        self.deferring = 0  # depth of deferred() blocks
        self.pending: int | None = None  # a signal that arrived inside one

    def install(self) -> None:
        signal.signal(signal.SIGINT, self.on_signal)
        signal.signal(signal.SIGTERM, self.on_signal)

    @contextmanager
    def deferred(self):
        """A signal that arrives inside the block takes effect at its end: an output placed inside is also
        reported inside, so a failure line never says "not written" about a file that is there.

        Only the main thread's blocks count: Python runs signal handlers, and so raises the stop, in the main thread
        alone. A block on another thread (an image writer placing its file) is never interrupted; counted, its end
        would raise the main thread's signal in that thread, failing a write that had succeeded."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1
        if self.deferring == 0 and self.pending is not None:
            signum, self.pending = self.pending, None
            self._stop(signum)

    def on_signal(self, signum, frame) -> None:
        """The handler: a signal stops the work; more signals within QUIET_SECONDS do nothing, so that a burst
        never interrupts the way out (cleanup, the one error line) into a traceback. A signal after that raises
        again, in case library code swallowed the first. The handler stays installed: switching to SIG_IGN from
        inside a handler while more signals are pending makes Python raise "Signal N ignored due to race
        condition"."""
        if self.finished or time.monotonic() - self.last_raised < QUIET_SECONDS:
            return
        if self.deferring:
            self.pending = signum
            return
        self._stop(signum)

    def ignore(self) -> None:
        """From now on SIGINT and SIGTERM do nothing (the work is complete; the interpreter's exit must not be cut
        short). The flag comes first, so a signal that arrives while the handlers are switched is ignored too."""
        self.finished = True
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)

    def _stop(self, signum: int) -> None:
        self.stopping, self.last_raised = True, time.monotonic()
        raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated()

    def leave(self, code: int) -> None:
        """Exit with ``code``. After a signal, skip the interpreter's finalization: it puts the default handlers
        back, so one more signal of a burst would kill the process mid-exit (a wrong exit code, "lost
        sys.stderr")."""
        if not self.stopping:
            sys.exit(code)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


GUARD = SignalGuard()
