"""The console-script entry point, and the only place that sets process-wide state: the SIGINT/SIGTERM handlers
(installed before anything heavy is imported, so that a signal at any moment ends in one line and an exit code,
never a traceback), the libraries' warning filters and environment, and gc freezing (``edge.run_command``). The
parser runs outside Typer's standalone mode, so that its errors end as ours do."""

from __future__ import annotations

import sys
from typing import Optional


def main(args: Optional[list[str]] = None) -> None:
    """Console-script entry point: a bad value, an unknown option, a missing argument end as our errors do (one
    line, exit 2, and with --json the JSON error document on stdout)."""
    from pixart_cli.errors import EXIT_SIGINT, EXIT_SIGTERM, Terminated
    from pixart_cli.signals import GUARD

    GUARD.install()
    _closed_streams_to_devnull()
    sys.stderr = _StderrThatNeverFails(sys.stderr)
    try:
        _parse_and_run(args)
    except (KeyboardInterrupt, Terminated) as error:  # while importing the commands
        from pixart_cli.cli.output import Output

        sigint = isinstance(error, KeyboardInterrupt)
        code = EXIT_SIGINT if sigint else EXIT_SIGTERM
        # the one output sink: the error line, and under --json the JSON error document
        Output("pixart", as_json="--json" in sys.argv[1:]).error(
            f"{'interrupted' if sigint else 'terminated'}; no output was written", code
        )
        GUARD.leave(code)


def _closed_streams_to_devnull() -> None:
    """A shell's `>&-` or `2>&-` starts the process without that stream (Python sets it to None): what would go
    there is dropped, as it would be into /dev/null, and the command runs as it would otherwise (the same exit code;
    the written files are the account)."""
    import os

    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))


class _StderrThatNeverFails:
    """stderr for people: a write it cannot take (`2>/dev/full`, a full disk behind `2>log`, a reader that left)
    is dropped, as a closed stderr's is, so that progress and notes never fail the work; the exit code, the files
    and stdout (paths, or the JSON document) still tell the outcome. Everything else is the stream's own."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: a stream closed under it
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _parse_and_run(args: Optional[list[str]]) -> None:
    import typer

    from pixart_cli.cli.commands import app
    from pixart_cli.cli.edge import Outcome, asks_json, failure, parser_failure
    from pixart_cli.cli.output import Output
    from pixart_cli.errors import EXIT_RUNTIME, Terminated
    from pixart_cli.signals import GUARD

    Outcome.completed = Outcome.reported = False
    args = sys.argv[1:] if args is None else list(args)
    try:
        command = typer.main.get_command(app)
        result = command.main(args, prog_name="pixart", standalone_mode=False)
        code = result if isinstance(result, int) else 0  # --help, --version, typer.Exit(code): the code
    except typer.TyperException as error:  # the parser's (Typer's click): show it as one line
        if not args:  # `pixart` alone: the help, as Typer shows it (exit 2)
            error.show()
            code = error.exit_code
        else:
            name, message = parser_failure(command, args, error)
            code = error.exit_code
            Output(name, as_json=asks_json(args)).error(message, code)
    except typer.Abort:  # end of input while Typer read from stdin
        code = EXIT_RUNTIME
        Output("pixart", as_json=asks_json(args)).error("aborted; no output was written", code)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except (KeyboardInterrupt, Terminated) as error:  # a signal outside a command's work
        code = 0
        if not Outcome.completed:  # while starting or parsing
            code, message = failure(error)
            Output("pixart", as_json=asks_json(args)).error(message, code)
            Outcome.reported = True
    if Outcome.completed:
        code = 0  # a signal after the work and its output completed interrupted nothing
        GUARD.ignore()  # nor may one during the interpreter's exit
    elif GUARD.stopping and not Outcome.reported:
        # Typer's own handler turned a SIGINT during start-up into exit 130 without a word
        code, message = failure(KeyboardInterrupt())
        Output("pixart", as_json=asks_json(args)).error(message, code)
    GUARD.leave(code)


if __name__ == "__main__":
    main()
