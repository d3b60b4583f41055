"""`pixart generate --ray`: Ray's driver in a process of its own, pixart's process around it.

    pixart (plans, prints, accounts)  -- the run, pickled, on stdin -->  python -m pixart_cli.scale.ray_driver
                                      <-- JSON lines on a pipe ------   (ray.init, Ray Data: scale/ray_run.py)

Why a process: Ray's driver prints its own lines (a worker died, a task retried) from its threads on whatever
sys.stdout is then, and its C++ core ends the process outright (no exception, no Python exit) when the raylet of
its node dies. The driver's stdout and stderr are /dev/null (pixart's stderr with PIXART_DEBUG=1), so nothing Ray
prints reaches pixart's stdout; and whatever ends the driver, pixart is left to tell the run's account from the
manifest and the disk, as after a signal (scale/run.py). The pipe brings each path as its unit's results arrive,
the notes and the progress, a cluster left with nothing an actor can run on (the driver is then stopped), and how
the driver ended.

The driver runs in a session of its own: Ctrl-C and SIGTERM reach pixart, which passes the signal on once and
waits for the driver to shut Ray down; the driver stops by itself when pixart's end of its stdin closes (pixart
killed). Whatever is left in the driver's session once it has ended (the workers of a local Ray whose raylet died)
is ended with it.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from pixart_cli.errors import PixartError, StdoutClosed, Terminated, detail
from pixart_cli.scale.job import Callbacks
from pixart_cli.signals import GUARD

PIPE_ENV = "PIXART_RAY_PIPE"  # the driver's message pipe, as a file descriptor number
STOP_SECONDS = 60.0  # how long a stopped driver has to shut Ray down before it is killed
# How long the cluster may hold nothing an actor can run on (every GPU node lost, none come instead) before the run
# ends with its account; PIXART_RAY_NODE_WAIT (seconds) sets another.
NODE_WAIT_SECONDS = 60.0
NODE_WAIT_ENV = "PIXART_RAY_NODE_WAIT"
MAX_NODE_WAIT_SECONDS = 86_400


def drive(job, todo: list[int], seed: int, model, encoding, denoising, run, address, callbacks: Callbacks,
          new_manifest: bool, temp_tag: str) -> int:  # fmt: skip
    """Run images ``todo`` of ``job`` on Ray from a driver process; report each path through ``callbacks``.
    Returns the count. Raises ray_run.RayLost when Ray ended the run, PixartError for pixart's own failures, and
    KeyboardInterrupt or Terminated (once the driver has shut Ray down) for a signal."""
    import importlib.util

    from pixart_cli import process
    from pixart_cli.scale import ray_run

    if importlib.util.find_spec("ray") is None:
        raise PixartError(f"--ray: Ray Data is not installed; install it with: {ray_run.INSTALL}")
    node_wait = node_wait_seconds()
    ray_run.check_address(os.environ.get("RAY_ADDRESS") if address is None else address)
    arguments = {
        "job": job, "todo": todo, "seed": seed, "model": (model.id, model.revision), "encoding": encoding,
        "denoising": denoising, "run": run, "address": address, "new_manifest": new_manifest,
        "temp_tag": temp_tag, "node_wait": node_wait,
    }  # fmt: skip
    sink = _stderr_fd() if process.debugging() else subprocess.DEVNULL
    read_end, write_end = os.pipe()
    try:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pixart_cli.scale.ray_driver"],
            stdin=subprocess.PIPE,
            stdout=sink,
            stderr=sink,
            pass_fds=(write_end,),
            env={**os.environ, PIPE_ENV: str(write_end)},
            start_new_session=True,
        )
    except OSError:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    messages = _Messages(read_end)
    state = {"written": 0, "end": None, "lost": None, "closed": None}
    stopped_by = None
    try:
        try:
            try:
                driver.stdin.write(pickle.dumps(arguments))
                driver.stdin.flush()
            except OSError:
                pass  # the driver is gone already: its end is told below
            for message in messages.lines():
                _take(message, callbacks, state, driver)
        except (KeyboardInterrupt, Terminated) as error:
            stopped_by = error
            _signal(driver, signal.SIGINT if isinstance(error, KeyboardInterrupt) else signal.SIGTERM)
            with GUARD.deferred():  # the paths the driver still reports, while it shuts Ray down
                for message in messages.lines(deadline=time.monotonic() + STOP_SECONDS):
                    _take(message, callbacks, state, driver)
    finally:
        code = _wait(driver)
        end_session(driver.pid)
        messages.close()
        try:
            driver.stdin.close()
        except OSError:
            pass
    if stopped_by is not None:
        raise stopped_by
    end = state["end"] or {}
    if state["lost"] is not None:
        raise ray_run.RayLost(state["lost"])
    if end.get("end") == "error":
        raise PixartError(end["message"], int(end["code"]))
    if end.get("end") == "lost":
        raise ray_run.RayLost(end["reason"])
    if end.get("end") != "done":
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if end.get("end") == "stopped":
            how = "stopped by a signal sent to it"
        raise ray_run.RayLost(
            f"Ray lost the run: its driver process ended without a result ({how}; Ray's core ends it so when it "
            "loses its node's raylet or the cluster's head)"
        )
    if state["closed"] is not None:
        raise state["closed"]  # stdout's reader left early: every image was still made (the edge ends quietly)
    return state["written"]


def _take(message: dict, callbacks: Callbacks, state: dict, driver) -> None:
    """One message of the driver's: a path (reported), a note, progress, a lost node, or how it ended."""
    if "wrote" in message:
        state["written"] += 1
        try:
            callbacks.wrote(Path(message["wrote"]))
        except StdoutClosed as error:  # the images are made all the same; told at the end
            state["closed"] = error
    elif "log" in message and callbacks.log is not None:
        callbacks.log(message["log"])
    elif "progress" in message and callbacks.progress is not None:
        callbacks.progress(*message["progress"])
    elif "lost" in message and state["lost"] is None:
        state["lost"] = message["lost"]
        _signal(driver, signal.SIGTERM)  # the run cannot finish: the driver shuts Ray down and ends
    elif "end" in message:
        state["end"] = message


class _Messages:
    """The driver's JSON lines, read as they come (a signal interrupts the wait)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def lines(self, deadline: float | None = None):
        while self.fd is not None:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                try:
                    yield json.loads(line)
                except ValueError:
                    continue
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], wait)[0]:
                return  # the deadline passed
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            self.buffer += chunk

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _signal(driver, signum: int) -> None:
    try:
        driver.send_signal(signum)
    except OSError:
        pass


def _wait(driver) -> int:
    """The driver's exit status, killing it if it has not ended within STOP_SECONDS."""
    try:
        return driver.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        driver.kill()
        return driver.wait()
    except (KeyboardInterrupt, Terminated):  # a later signal: the driver is ended now
        driver.kill()
        return driver.wait()


def end_session(session: int) -> None:
    """SIGKILL every process left in session ``session`` (the driver's; Linux's /proc lists them): the workers of a
    local Ray outlive a raylet that died."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) == session and pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue


def _stderr_fd() -> int:
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def node_wait_seconds() -> float:
    """NODE_WAIT_SECONDS, or PIXART_RAY_NODE_WAIT's seconds (checked)."""
    from pixart_cli.scale.launch import env_seconds

    return env_seconds(NODE_WAIT_ENV, NODE_WAIT_SECONDS, MAX_NODE_WAIT_SECONDS)


# --- the driver process ---------------------------------------------------------------------------------------
def main() -> None:
    """The driver: read the run from stdin, run it on Ray, tell pixart on the pipe; exit 0 whatever happened
    (how it ended is the last message)."""
    GUARD.install()
    pipe = os.fdopen(int(os.environ.pop(PIPE_ENV)), "w", encoding="utf-8")
    lock = threading.Lock()

    def send(**message) -> None:
        with lock:
            try:
                pipe.write(json.dumps(message) + "\n")
                pipe.flush()
            except (OSError, ValueError):
                pass  # pixart is gone: its closed stdin stops this process

    try:
        arguments = pickle.load(sys.stdin.buffer)
        threading.Thread(target=_stop_with_pixart, name="pixart-stdin", daemon=True).start()
        from pixart_cli import process
        from pixart_cli.scale import ray_run

        process.quiet_libraries()
        process.compile_cache()
        callbacks = Callbacks(
            lambda path: send(wrote=str(path)),
            lambda text: send(log=text),
            lambda stage, done, total: send(progress=[stage, done, total]),
            None,
        )
        try:
            written = ray_run.run_ray(**arguments, callbacks=callbacks, on_lost=lambda reason: send(lost=reason))
            send(end="done", written=written)
        except ray_run.RayLost as error:
            send(end="lost", reason=str(error))
        except PixartError as error:
            send(end="error", message=str(error), code=error.exit_code)
        except Exception as error:  # the driver's own failure: Ray's, or an unexpected one
            send(end="lost", reason=f"Ray lost the run ({type(error).__name__}: {detail(error)})")
            if os.environ.get("PIXART_DEBUG") == "1":
                import traceback

                traceback.print_exc()
    except (KeyboardInterrupt, Terminated):
        send(end="stopped")
    finally:
        try:
            pipe.close()
        except OSError:
            pass
        os._exit(0)  # Ray is shut down; its exit hook would only sleep


def _stop_with_pixart() -> None:
    """pixart's end of stdin closed (pixart ended, even killed): stop as for its SIGTERM."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except (OSError, ValueError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    main()
