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
        sigint = isinstance(error, KeyboardInterrupt)
        message = f"{'interrupted' if sigint else 'terminated'}; no output was written"
        code = EXIT_SIGINT if sigint else EXIT_SIGTERM
        sys.stderr.write(f"error: {message}\n")
        if "--json" in sys.argv[1:]:  # the JSON error document that --json promises (output.py's, by hand)
            import json

            doc = {"command": "pixart", "outputs": [], "error": message, "exit_code": code}
            sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        leave(code)
    cli.main()


if __name__ == "__main__":
    main()
