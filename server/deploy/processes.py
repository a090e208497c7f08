"""Flower processes started in their own process group and stopped by PID; free and awaited ports."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path

from server.deploy.common import STOP_GRACE_S, DeployError

logger = logging.getLogger(__name__)



class Processes:
    """Starts long-running Flower processes and stops every one of them by PID.

    Each process starts in a new session (its own process group). Flower starts
    ``flower-superexec`` and the app processes detached (new sessions too), so on stop
    the descendants are collected by PID first, then the group and those PIDs get
    SIGTERM, and whatever outlives :data:`STOP_GRACE_S` gets SIGKILL. Use as a context
    manager: everything is stopped on exit, also on errors.

    Args:
        log_dir: Each process writes stdout+stderr to ``log_dir/NAME.log``.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(self, name: str, command: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
              ) -> subprocess.Popen[bytes]:
        """Start ``command`` as process ``name`` (unique), logging to ``log_dir/NAME.log``."""
        if name in self.started:
            raise ValueError(f"a process named {name!r} was already started")
        with open(self.log_path(name), "ab") as log:
            process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=dict(env), cwd=cwd, start_new_session=True)
        self.started[name] = process
        logger.info("started %s (pid %d): %s", name, process.pid, shlex.join(command))
        return process

    def log_path(self, name: str) -> Path:
        """The log file of process ``name``."""
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, chars: int = 3000) -> str:
        """The last ``chars`` characters of the log of process ``name``."""
        path = self.log_path(name)
        return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else ""

    def check_alive(self) -> None:
        """Raise :class:`DeployError` (with its log) if any started process has exited."""
        for name, process in self.started.items():
            if process.poll() is not None:
                raise DeployError(f"{name} exited with {process.returncode}:\n{self.log_tail(name)}")

    def wait_for_log(self, name: str, text: str, timeout: float) -> None:
        """Wait until the log of process ``name`` contains ``text``.

        Raises:
            DeployError: After ``timeout`` seconds, or when the process exits first.
        """
        deadline = time.monotonic() + timeout
        while text not in self.log_tail(name, chars=1 << 30):
            if self.started[name].poll() is not None or time.monotonic() > deadline:
                raise DeployError(f"{name}: no {text!r} in its log within {timeout:.0f} s "
                                  f"(exit code {self.started[name].returncode}):\n{self.log_tail(name)}")
            time.sleep(0.2)

    def stop(self, name: str, crash: bool = False) -> int | None:
        """Stop process ``name`` and its descendants; return its exit code.

        Args:
            name: The process.
            crash: SIGKILL at once, as when its machine fails (default: SIGTERM first).
        """
        process = self.started[name]
        family = [process.pid, *_descendants(process.pid)]
        first = signal.SIGKILL if crash else signal.SIGTERM
        _signal_group(process.pid, first)
        _signal_pids(family, first)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and (process.poll() is None or any(map(_alive, family[1:]))):
            time.sleep(0.1)
        survivors = [pid for pid in family if _alive(pid)]
        if survivors:
            logger.warning("%s: SIGKILL to %s (still alive after SIGTERM)", name, survivors)
            _signal_group(process.pid, signal.SIGKILL)
            _signal_pids(survivors, signal.SIGKILL)
        try:
            return process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) did not exit even after SIGKILL", name, process.pid)
            return None

    def stop_all(self) -> None:
        """Stop every started process, most recent first (SuperNodes before the SuperLink)."""
        for name in reversed(list(self.started)):
            if self.started[name].returncode is None:
                self.stop(name)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name in field 2 may hold spaces/parentheses: split after its ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    """PIDs of all descendants of ``pid`` (Linux /proc; empty elsewhere)."""
    if not Path("/proc").is_dir():
        return []
    children, found, queue = _children_by_parent(), [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited already (its parent reaps it)
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: kill(0) has the last word


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # started with start_new_session: the group id is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pids(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, processes: Processes | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises:
        DeployError: After ``timeout`` seconds, or at once when a started process dies.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if processes is not None:
            processes.check_alive()
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise DeployError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


