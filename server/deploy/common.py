"""What every deployment step shares: the repository root, ports, file names, the error type."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "fedcca"  # name of the SuperLink connection in the private FLWR_HOME
SUPERLINK_PORT = 9092  # all SuperLink APIs (Fleet, Control, Runtime) share this HTTPS port
SUPERNODE_PORT = 9094  # each SuperNode's local Runtime API (ClientApp <-> SuperNode)
CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
# The SuperLink's own SuperExec reaches the Runtime API over loopback, so these names are
# always in the server certificate, whatever else it is issued for.
LOOPBACK_NAMES, LOOPBACK_IPS = ("localhost",), ("127.0.0.1", "::1")
FINISHED = "finished"  # run status prefix: finished:completed | finished:failed | finished:stopped
STOP_GRACE_S = 10.0


class DeployError(RuntimeError):
    """A deployment step failed (a process died, a timeout passed, a CLI call failed)."""

