"""The `pixart` console script. Signal handlers go in before anything heavy is imported, so that a Ctrl-C or a
SIGTERM at any moment ends in one line and an exit code, never a traceback."""

from __future__ import annotations

import signal
import sys


def main() -> None:
    from pixart_cli.errors import EXIT_SIGINT, EXIT_SIGTERM, Terminated, leave, on_signal

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        from pixart_cli import cli
    except (KeyboardInterrupt, Terminated) as error:
        from pixart_cli.output import Output

        sigint = isinstance(error, KeyboardInterrupt)
        code = EXIT_SIGINT if sigint else EXIT_SIGTERM
        # the one output sink: the error line, and under --json the JSON error document
        Output("pixart", as_json="--json" in sys.argv[1:]).error(
            f"{'interrupted' if sigint else 'terminated'}; no output was written", code
        )
        leave(code)
    cli.main()


if __name__ == "__main__":
    main()
