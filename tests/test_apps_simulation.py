"""`flwr run` end to end: a real SuperLink, Ray simulation, 2 clients, 1 round, tiny data.

Everything runs in private folders (FLWR_HOME, RAY_TMPDIR) against a private SuperLink on a
free port; every process started here carries a marker in its environment and is stopped
by PID at the end, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_dataset import ROOT, write_tiny_fashion_mnist

BIN = Path(sys.executable).parent
MARKER = "FEDCCA_APPS_TEST_RUN"
CONNECTION = "fedcca-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _marked_pids(marker: str) -> list[int]:
    """PIDs of the processes whose environment holds ``MARKER=marker`` (ours and descendants)."""
    needle = f"{MARKER}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return pids


def _stop_marked(marker: str, timeout: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, every marked process; returns the PIDs that were running."""
    pids = _marked_pids(marker)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _marked_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while _marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _marked_pids(marker):
            break
    return pids


def _wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "flower-superlink exited during start-up"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"SuperLink on port {port} not healthy after {timeout} s")


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path]]:
    """A private SuperLink; yields (environment for `flwr`, FLWR_HOME), then stops everything."""
    marker = uuid.uuid4().hex
    home = tmp_path / "flwr-home"
    home.mkdir()
    # Short path: Ray's Unix sockets live under RAY_TMPDIR (108-byte limit).
    ray_dir = Path(tempfile.mkdtemp(prefix="fedcca-ray-", dir="/tmp"))
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, MARKER: marker, "FLWR_HOME": str(home), "RAY_TMPDIR": str(ray_dir),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    process = subprocess.Popen(
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
        env=env, cwd=tmp_path, stdout=(home / "superlink.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        _wait_healthy(port, process)
        yield env, home
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        leftovers = _stop_marked(marker)  # SuperExec, simulation, Ray workers, if any remain
        subprocess.run(["rm", "-rf", str(ray_dir)], check=False)
        assert not _marked_pids(marker), "processes of the simulation survived"
        if leftovers:
            print(f"stopped leftover processes {leftovers}")


@pytest.mark.slow
def test_flwr_run_simulation_writes_history_and_leaves_pyproject_alone(
    superlink: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, home = superlink
    data_dir = write_tiny_fashion_mnist(tmp_path / "data")
    out_dir = tmp_path / "out"
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    overrides = {"data-dir": f"'{data_dir}'", "out-dir": f"'{out_dir}'", "num-server-rounds": "2",
                 "partitioning": "'iid'", "calibration-size": "40", "holdout-size": "20", "batch-size": "32",
                 "max-examples-per-client": "0", "max-test-examples": "0"}
    command = [str(BIN / "flwr"), "run", str(ROOT), CONNECTION, "--stream",
               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    for key, value in overrides.items():
        command += ["--run-config", f"{key}={value}"]
    started = time.monotonic()
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject, "flwr run modified pyproject.toml"
    history_file = out_dir / "history.json"
    assert history_file.is_file(), f"no history after {elapsed:.0f} s:\n{log[-4000:]}"
    history = json.loads(history_file.read_text())
    assert [entry["round"] for entry in history["rounds"]] == [1, 2]
    first, second = history["rounds"]
    assert first["num_dropped"] == second["num_dropped"] == 0
    # Round 1 aligns to a client (server statistics); round 2 to the global model (the clients' statistics).
    assert first["client_statistics"] == 0 and second["client_statistics"] == 2
    assert "[fedcca] round 2/2: accuracy" in log  # progress reaches the streamed log
    assert (out_dir / "checkpoints" / "round-002.pt").is_file() and (out_dir / "accuracy.png").is_file()
