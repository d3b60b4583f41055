"""The one output sink: written paths on stdout (or one JSON document), everything else on stderr."""

from __future__ import annotations

import json
import os
import sys
import time

from pixart_cli.errors import StdoutClosed, StdoutFailed

# What each stage's progress counts (encode also encodes the negative prompt, "" when none is given).
UNITS = {
    "encode": "texts (the prompts and the negative prompt)",
    "denoise": "steps, over all batches",
    "decode": "images",
    "encode-image": "images",
    "encode-control": "images",
    "convert": "tensors written and files copied",
}


READER_LEFT = "closed by its reader"


class Output:
    """Human mode prints each path on stdout and notes/progress on stderr; --quiet keeps only paths;
    --json prints one JSON document on stdout at the end and keeps stderr for progress."""

    def __init__(self, command: str, quiet: bool = False, as_json: bool = False):
        self.command = command
        self.quiet = quiet
        self.as_json = as_json
        self.record: dict = {"command": command, "outputs": []}
        self._progress = None
        self._tasks: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._console = None
        # stdout as the command found it: paths and the JSON document go there even if a library points sys.stdout
        # elsewhere (Ray's driver, which prints its own lines there, runs in a process of its own: scale/ray_driver.py)
        self.stream = sys.stdout
        # why stdout stopped taking text (its reader closed it, or writing failed), None while it takes it: the
        # paths written after that reached no one, and a failure's line must not say they are listed there
        self.stdout_lost: str | None = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            # soft_wrap: a line stays one line for scripts reading stderr, whatever the width; emoji off: a value
            # such as "f:abc:" is shown as typed, not with ":abc:" turned into an emoji
            self._console = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
        return self._console

    def note(self, message: str, **fields) -> None:
        """A line for people on stderr; ``fields`` also go into the JSON document."""
        self.record.update(fields)
        if not self.quiet:
            self.console.print(printable(message), markup=False)

    def wrote(self, path) -> None:
        """A file was written: its path goes to stdout (scripts read it); ``-`` (the bytes went to stdout) is
        recorded only."""
        self.record["outputs"].append(str(path))
        if not self.as_json and str(path) != "-" and self.stdout_lost is None:
            try:
                self.text(f"{path}\n")
            except StdoutClosed:
                pass  # the reader left (`| head -1`): the run goes on, every output is written and recorded,
                # and close() ends the command as coreutils end when their reader leaves

    def text(self, text: str) -> None:
        """Text for stdout (a written path, `info`'s table, the JSON document). A reader that closed the pipe
        early (``| head -1``) raises StdoutClosed once; the edge ends the command quietly."""
        try:
            if write_out(text, self.stream):
                return
        except StdoutFailed as error:
            self.stdout_lost = self.stdout_lost or error.reason
            raise
        self.stdout_lost = self.stdout_lost or READER_LEFT
        raise StdoutClosed()

    def progress(self, stage: str, done: int, total: int) -> None:
        """Progress callback for the stage functions: a rich bar on a terminal, one line per stage otherwise.

        A stage calls it with ``done=0`` when its work starts, so the time shown is the time of that work.
        """
        if self.quiet:
            return
        if done == 0 or stage not in self._started:
            self._started[stage] = time.perf_counter()
        if self.console.is_terminal:
            if self._progress is None:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TaskProgressColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self._progress = Progress(
                    TextColumn("{task.description:>8}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TaskProgressColumn(show_speed=True),
                    TimeElapsedColumn(),
                    TimeRemainingColumn(),
                    console=self.console,
                    transient=False,
                )
                self._progress.start()
            if stage not in self._tasks:
                self._tasks[stage] = self._progress.add_task(stage, total=total)
            self._progress.update(self._tasks[stage], completed=done, total=total)
        elif done == total:
            elapsed = time.perf_counter() - self._started[stage]
            unit = UNITS.get(stage.rsplit(" ", 1)[-1], "done")  # "cuda:1: denoise", "rank 0 denoise": the stage's
            self.console.print(f"{stage}: {done}/{total} {unit} in {elapsed:.1f} s", markup=False)

    def close(self) -> None:
        """Stop the progress display and, in JSON mode, print the document."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.as_json:
            self.text(document_text(self.record))
        elif self.stdout_lost == READER_LEFT:
            raise StdoutClosed()

    def error(self, message: str, exit_code: int, silent: bool = False) -> None:
        """The single red line of a failure, shown even with --quiet (``silent``: not shown, another process tells
        the run's account); with --json, stdout still gets one JSON document, so a script that parses stdout
        always can."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not silent:
            self.console.print(f"[bold red]error:[/] {_escape(printable(message))}", soft_wrap=True)
            sys.stderr.flush()
        if self.as_json:
            try:
                write_out(document_text({**self.record, "error": message, "exit_code": exit_code}), self.stream)
            except StdoutFailed:
                pass  # the line on stderr above says it all


def document_text(document: dict) -> str:
    """One JSON document; NaN and inf as strings, so that every JSON parser reads it."""
    from pixart_cli.files.atomic import json_safe

    return json.dumps(json_safe(document), indent=2, default=str, allow_nan=False) + "\n"


def write_out(text: str, stream=None) -> bool:
    """Write ``text`` to stdout (``stream``, else sys.stdout) and flush; False when its reader has closed the pipe,
    StdoutFailed when writing fails otherwise (a full disk, an I/O error). Then, and for the rest of the process,
    stdout goes to /dev/null, so that nothing fails on it again (Python's own flush at exit included)."""
    stream = sys.stdout if stream is None else stream
    try:
        binary = getattr(stream, "buffer", None)
        if binary is None:
            stream.write(text)
        else:  # a large write into a closed pipe can end as a short write, without an error: write until all is out
            stream.flush()
            data = memoryview(text.encode(stream.encoding or "utf-8", stream.errors or "strict"))
            while data:
                written = binary.write(data)
                if not written:  # nothing more can go out (a non-blocking stream would have raised)
                    break
                data = data[written:]
        stream.flush()
        return True
    except BrokenPipeError:
        _to_devnull(stream)
        return False
    except OSError as error:
        _to_devnull(stream)
        raise StdoutFailed(error.strerror or type(error).__name__) from None


def _to_devnull(stream) -> None:
    """stdout's descriptor pointed at /dev/null, and what is still buffered dropped."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        stream.flush()
    except (OSError, ValueError):
        pass


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


_CONTROL = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}


def printable(text: str) -> str:
    """``text`` with control characters (ANSI escapes, newlines, ...) shown as ``\\x1b`` etc., so a prompt or a
    file name cannot restyle the terminal or break the one-line error into several."""
    return str(text).translate(_CONTROL)


def info_table(described: dict) -> str:
    """Aligned `key  value` lines for people."""
    rows = [("file", described["file"]), ("kind", described["kind"])]
    for key, tensor in described.get("tensors", {}).items():
        rows.append((key, f"{tensor['dtype']} {tensor['shape']}"))
    if described["kind"] == "image":
        rows += [("format", described["format"]), ("size", "x".join(map(str, described["size"])))]
        if described["parameters"]:
            rows.append(("parameters", described["parameters"].replace("\n", " | ")))
    settings = described.get("meta") or described.get("settings") or {}
    rows += [(key, settings[key]) for key in sorted(settings)]
    width = max(len(key) for key, _ in rows)
    # printable: a prompt's ANSI escapes or newlines are shown escaped, never executed by the terminal
    return "".join(f"{printable(key):<{width}}  {printable(value)}\n" for key, value in rows)
