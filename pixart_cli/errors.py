"""The one error type of pixart-cli. The CLI turns it into one line on stderr and its exit code."""

from __future__ import annotations

# Exit codes, as scripts see them.
EXIT_RUNTIME = 1  # the work failed: out of memory, model missing, broken model folder
EXIT_USAGE = 2  # bad input: an option, a prompt, a file; nothing was loaded or written
EXIT_SIGINT = 130
EXIT_SIGTERM = 143
# stdout closed by its reader (`pixart info x.png | head -1`): no line, and the status a shell gives coreutils
# killed by SIGPIPE (128 + 13), so `set -o pipefail` sees what it sees for `yes | head -1`
EXIT_SIGPIPE = 141


class Terminated(BaseException):
    """SIGTERM, raised inside the work (as KeyboardInterrupt is for SIGINT) so that temp files are cleaned up."""


class StdoutClosed(Exception):
    """Standard output's reader went away (a closed pipe): raised by the output sink, ended quietly at the edge."""


class StdoutFailed(Exception):
    """Standard output cannot be written (a full disk behind ``> file``, /dev/full, an I/O error): raised once by the
    output sink, whose stdout then points at /dev/null; the edge's line names the files written, not stdout."""

    def __init__(self, reason: str):
        super().__init__(f"cannot write to stdout ({reason})")
        self.reason = reason


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


class RunStopped(PixartError):
    """A run of several processes (or Ray's actors) stopped by a signal. Its line is the whole run's account, what
    is complete on disk over every process, told once: by rank 0 or Ray's driver; ``silent`` on every other rank
    (its images are in that account). The edge adds nothing to it."""

    def __init__(self, message: str, exit_code: int, silent: bool = False, complete: int | None = None):
        super().__init__(message, exit_code)
        self.silent = silent
        self.complete = complete  # the run's images complete on disk (None where another process counts them)


def bad_file(path, problem: str) -> PixartError:
    """An input file that cannot be used: the line names the file first (``-``: standard input; ``reason`` holds
    the problem alone)."""
    return PixartError(option="- (standard input)" if str(path) == "-" else str(path), reason=problem)


def detail(error: BaseException) -> str:
    """The first line of an error, short enough for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
