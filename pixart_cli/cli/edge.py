"""The failure edge: every failure becomes one line and an exit code (a traceback only with PIXART_DEBUG=1), and the
parser's errors are told in the same words."""

from __future__ import annotations

import difflib
import os
import re
import sys
import traceback
from collections.abc import Callable

import typer

from pixart_cli.cli.output import Output
from pixart_cli.errors import (
    EXIT_RUNTIME,
    EXIT_SIGINT,
    EXIT_SIGPIPE,
    EXIT_SIGTERM,
    PixartError,
    RunStopped,
    StdoutClosed,
    StdoutFailed,
    Terminated,
    detail,
)


class Outcome:
    """What the command's work came to, for main(): a signal after the work completed interrupts nothing, and
    a failure already given its line must not get a second."""

    completed = False
    reported = False


def run_command(out: Output, work: Callable[[], None], quantized: bool = False) -> None:
    """Run one command's work; turn every failure into one line and an exit code (traceback: PIXART_DEBUG=1)."""
    debug = os.environ.get("PIXART_DEBUG") == "1"
    from pixart_cli import process

    process.quiet_libraries()
    process.lean_imports(quantized)
    process.compile_cache()
    try:
        work()
        out.close()
        Outcome.completed = True
    except (Exception, KeyboardInterrupt, Terminated) as error:  # the edge: one line, not a traceback
        planned, written = getattr(out, "planned", None), out.record["outputs"]
        if isinstance(error, StdoutClosed) and (planned is None or all_written(written, planned)):
            # the reader of stdout stopped early (`| head -1`) and no output file is missing: quiet, as coreutils
            Outcome.reported = True
            raise typer.Exit(EXIT_SIGPIPE) from None
        if isinstance(error, (KeyboardInterrupt, Terminated)) and all_written(written, planned):
            # every output is in place and reported: the signal came too late to interrupt anything
            out.note("interrupted after every output was written; nothing is missing")
            out.close()
            Outcome.completed = True
            return
        code, message = failure(error, written, planned, listed=out.stdout_lost is None)
        if debug:
            traceback.print_exception(error)
        out.error(message, code, silent=isinstance(error, RunStopped) and error.silent)
        Outcome.reported = True
        raise typer.Exit(code) from None


def all_written(written: list[str], planned: int | None) -> bool:
    return bool(planned) and len(written) >= planned


def failure(
    error: BaseException, written: list[str] = (), planned: int | None = None, listed: bool = True
) -> tuple[int, str]:
    """Exit code and one-line message for any failure, saying truthfully which outputs were written before it;
    ``listed``: whether their paths reached stdout (not once its reader closed it or writing it failed, when the
    line names them itself)."""
    if isinstance(error, RunStopped):  # the run's account, over every process: complete as it is
        return error.exit_code, str(error)
    if isinstance(error, KeyboardInterrupt):
        code, message = EXIT_SIGINT, "interrupted"
    elif isinstance(error, Terminated):
        code, message = EXIT_SIGTERM, "terminated"
    elif isinstance(error, PixartError):
        code, message = error.exit_code, str(error)
    elif isinstance(error, StdoutClosed):  # before every output file was written
        code, message = EXIT_RUNTIME, "stdout was closed by its reader (Broken pipe)"
    elif isinstance(error, StdoutFailed):  # a full disk behind `> file`, /dev/full, an I/O error
        code, message = EXIT_RUNTIME, str(error)
    elif isinstance(error, OSError) and error.strerror:  # a full disk, a vanished folder: the file is named
        code, message = EXIT_RUNTIME, f"cannot write {error.filename or 'an output'} ({error.strerror})"
    else:
        code, message = EXIT_RUNTIME, unexpected(error)
    if not written:
        if code in (EXIT_SIGINT, EXIT_SIGTERM):
            message += "; no output was written"
        return code, message
    names = ", ".join(written) if len(written) <= 3 else f"{written[0]} ... {written[-1]}"
    if all_written(written, planned):
        if len(written) == 1:
            return (
                code,
                f"{message}; the output had been written ({written[0]}{'; listed on stdout' if listed else ''})",
            )
        return (
            code,
            f"{message}; all {len(written)} outputs had been written ({'listed on stdout' if listed else names})",
        )
    of = f" of {planned}" if planned else ""
    listing = "; listed on stdout" if listed else ""
    return code, f"{message}; {len(written)}{of} outputs had been written ({names}{listing}), the rest were not"


def unexpected(error: Exception) -> str:
    torch = sys.modules.get("torch")  # an out-of-memory error means torch is loaded; never import it here
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return (
            "out of device memory; pass a smaller --vram budget (for example --vram 4GB), use --dtype fp16, "
            "or --device cpu"
        )
    return f"{type(error).__name__}: {detail(error)} (run with PIXART_DEBUG=1 for the traceback)"


def asks_json(args: list[str]) -> bool:
    """Whether the command line asks for --json (before a ``--`` that ends the options)."""
    return "--json" in (args[: args.index("--")] if "--" in args else args)


# Typer's conversion errors (pydantic's error types) in our words
_CONVERSION = {
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
}


def parser_failure(group, args: list[str], error: Exception) -> tuple[str, str]:
    """(command name, one line) for an error of the parser: what was wrong, with the option and the value, and
    where to look (the command's --help)."""
    name = next((arg for arg in args if arg in group.commands), None)
    context = getattr(error, "ctx", None)
    if context is not None and context.command is not group:
        name = context.info_name
    see = f"see `pixart {name} --help`" if name else "see `pixart --help`"
    param = getattr(error, "param", None)
    option = getattr(error, "option_name", None)
    if param is not None:
        flag = max(param.opts, key=len) if param.opts and param.opts[0].startswith("-") else None
        shown = flag or getattr(param, "metavar", None) or param.name.upper()
        if isinstance(error, typer.BadParameter) and error.message:  # a value that does not convert
            value = _given_value(args, param.opts, error)
            cause = error.__cause__
            kind = cause.errors()[0].get("type") if hasattr(cause, "errors") else None
            reason = _CONVERSION.get(kind) or _sentence(error.message)
            return name or "pixart", f"{shown}{'' if value is None else f' {value!r}'}: {reason}; {see}"
        what = "option" if flag else "argument"
        return name or "pixart", f"{shown}: missing; this {what} is required; {see}"
    message = error.format_message()
    if context is not None and context.command is group and message.startswith("No such command"):
        typed = next((arg for arg in args if not arg.startswith("-")), "")
        close = difflib.get_close_matches(typed, list(group.commands))
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        return "pixart", f"{typed}: no such command{hint}; {see}"
    extra = _EXTRA.match(message)
    if extra and context is not None:
        return name or "pixart", _extra_arguments(context.command, name, extra.group(1).split(), see)
    if option is not None:
        possible = [p for p in getattr(error, "possibilities", None) or () if p not in ("--help", "-h")]
        if error.format_message().startswith("No such option"):
            hint = f" (did you mean {' or '.join(sorted(possible))}?)" if possible else ""
            return name or "pixart", f"{option}: no such option{hint}; {see}"
        message = error.format_message()
        if "requires an argument" in message:
            return name or "pixart", f"{option}: needs a value; {see}"
        if "does not take a value" in message:
            return name or "pixart", f"{option}: takes no value (it is a flag); {see}"
    return name or "pixart", f"{_sentence(error.format_message())}; {see}"


_EXTRA = re.compile(r"Got unexpected extra arguments?(?:\(s\))? \((.*)\)$")


def _extra_arguments(command, name: str | None, extra: list[str], see: str) -> str:
    """`pixart denoise emb.pt latents.pt`: what the command takes, and -o where the extra word looks like the
    output's name."""
    takes = [param.metavar or param.name.upper() for param in command.params if param.param_type_name == "argument"]
    shown = " ".join(extra)
    count = {1: "one argument", 2: "two arguments"}.get(len(takes), f"{len(takes)} arguments")
    line = f"{shown}: unexpected extra argument{'s' if len(extra) > 1 else ''}; {name} takes {count}, {' and '.join(takes)}"
    if len(extra) == 1 and any("--output" in param.opts for param in command.params):
        line += f"; to write the output to {extra[0]}, pass -o {extra[0]}"
    return f"{line}; {see}"


def _given_value(args: list[str], opts: list[str], error: Exception):
    """The text given for an option, as the parser saw it (the conversion error's input, else the last value
    after the flag on the command line), or None."""
    cause = error.__cause__
    if hasattr(cause, "errors"):
        value = cause.errors()[0].get("input")
        if isinstance(value, str):
            return value
    value = None
    for index, arg in enumerate(args):
        if arg == "--":
            break
        for opt in opts:
            if arg == opt and index + 1 < len(args):
                value = args[index + 1]
            elif opt.startswith("--") and arg.startswith(opt + "="):
                value = arg[len(opt) + 1 :]
    return value


def _sentence(text: str) -> str:
    """A message as part of our line: one line, lower case first, no final period."""
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:]
