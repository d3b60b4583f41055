"""Where a whole command's time goes: every line it prints, stamped with seconds since it was started.

    python benchmarks/timeline.py [--env NAME=VALUE ...] [--out FILE] -- COMMAND ...

stdout and stderr are read together, and a progress bar's carriage returns split lines too, so a stage's
start, its progress and its end each get a time. Prints the stamped lines (and writes them to FILE), then
the exit status and the wall time. Used by the GPU calls of issue 12 to split a run into imports, model loads,
stages and shutdown.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

_SPLIT = re.compile(rb"[\r\n]")


def stamped(command: list[str], env: dict[str, str]) -> tuple[list[tuple[float, str]], int, float]:
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **env})
    lines, pending = [], b""
    while chunk := proc.stdout.read1(65536):
        now = time.perf_counter() - started
        *complete, pending = _SPLIT.split(pending + chunk)
        lines += [(now, line.decode(errors="replace")) for line in complete if line.strip()]
    if pending.strip():
        lines.append((time.perf_counter() - started, pending.decode(errors="replace")))
    code = proc.wait()
    return lines, code, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the command")
    parser.add_argument("--out", help="also write the stamped lines here")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    env = dict(item.split("=", 1) for item in args.env)
    lines, code, wall = stamped(command, env)
    text = "".join(f"{at:8.2f}  {line}\n" for at, line in lines) + f"{wall:8.2f}  exit {code}\n"
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(f"$ {' '.join(command)}\n{text}")
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
