"""The one error type of pixart-cli. The CLI turns it into one line on stderr and its exit code."""

from __future__ import annotations

# Exit codes, as scripts see them.
EXIT_RUNTIME = 1  # the work failed: out of memory, model missing, broken model folder
EXIT_USAGE = 2  # bad input: an option, a prompt, a file; nothing was loaded or written
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Terminated(BaseException):
    """SIGTERM, raised inside the work (as KeyboardInterrupt is for SIGINT) so that temp files are cleaned up."""


class PixartError(Exception):
    """A failure the user can fix. ``str(error)`` is the single line shown; it names the value and the fix."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code


def bad_file(path, problem: str) -> PixartError:
    """An input file that cannot be used: the line names the file first."""
    return PixartError(f"{path}: {problem}")


def detail(error: BaseException) -> str:
    """The first line of an error, short enough for a one-line message."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
