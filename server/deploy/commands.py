"""Steps 4 and 6: the command lines (and environment) of flower-superlink and flower-supernode."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from server.deploy.common import SUPERLINK_PORT, SUPERNODE_PORT
from server.deploy.credentials import TlsFiles


def flower_bin(name: str) -> str:
    """The Flower executable installed beside this interpreter (the venv's), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else name


def flower_env(gpu: int | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process started from here.

    The venv's bin folder goes first on PATH because the SuperLink and SuperNodes start
    ``flower-superexec`` by name; runtime dependency installation is switched off.

    Args:
        gpu: Index of the only GPU the process may see (``CUDA_VISIBLE_DEVICES``); None
            leaves the variable as it is.
        base: Starting environment (default: this process's).
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def superlink_command(tls: TlsFiles | None, host: str = "127.0.0.1", port: int = SUPERLINK_PORT,
                      database: Path | None = None) -> list[str]:
    """The ``flower-superlink`` command line.

    Args:
        tls: Certificates; None runs without TLS and without SuperNode authentication.
        host: Interface to listen on ("0.0.0.0" to accept other machines).
        port: The one port of the Fleet, Control and Runtime APIs.
        database: SQLite file keeping registered nodes and runs across restarts (None: memory).
    """
    command = [flower_bin("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                    "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]
    if database is not None:
        command += ["--database", str(database)]
    return command


def supernode_command(superlink: str, partition_id: int, num_partitions: int, *,
                      ca_cert: Path | None, private_key: Path | None,
                      port: int = SUPERNODE_PORT, max_wait_time: float | None = None) -> list[str]:
    """The ``flower-supernode`` command line for one partition.

    Args:
        superlink: The SuperLink's ``host:port`` as the certificate names it.
        partition_id: This node's partition (``partition-id`` node config).
        num_partitions: Number of partitions (``num-partitions`` node config).
        ca_cert: CA certificate to verify the SuperLink; None connects without TLS.
        private_key: The node's authentication key (required with TLS: the SuperLink
            started by this module only admits registered keys).
        port: Local port of the node's Runtime API (distinct per node on one machine).
        max_wait_time: Give up connecting after this many seconds (None: retry forever).
    """
    if ca_cert is not None and private_key is None:
        raise ValueError("a TLS SuperNode needs --key (its authentication private key)")
    command = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
               "--node-config", f"partition-id={partition_id} num-partitions={num_partitions}"]
    if ca_cert is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        command += ["--auth-supernode-private-key", str(private_key)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


