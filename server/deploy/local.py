"""The whole recipe on one machine: SuperLink, N SuperNodes, one run, then every process stopped."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.deploy.commands import flower_env, superlink_command, supernode_command
from server.deploy.common import DeployError
from server.deploy.credentials import KeyPair, make_certificates, make_supernode_keys
from server.deploy.flwr_cli import FlwrCli, write_run_config
from server.deploy.processes import Processes, free_port, wait_for_port

logger = logging.getLogger(__name__)


@dataclass
class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1, secure unless ``insecure``.

    Use as a context manager (every process is stopped on exit); see :func:`run_local`.

    Args:
        workdir: Certificates, keys, FLWR_HOME and logs go here; it is also the
            SuperLink's working directory (relative ``out-dir`` paths land in it).
        insecure: No TLS, no SuperNode authentication.
        timeout: Seconds each start-up step may take.
    """

    workdir: Path
    insecure: bool = False
    timeout: float = 60.0

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.tls = None if self.insecure else make_certificates(self.workdir / "certs")
        self.processes = Processes(self.workdir / "logs")
        self.superlink_port = free_port()
        self.address = f"127.0.0.1:{self.superlink_port}"
        self.cli = FlwrCli(self.workdir / "flwr-home", self.address,
                           None if self.tls is None else self.tls.ca_cert, timeout=self.timeout)
        self._key_count = 0

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.processes.stop_all()

    def start_superlink(self) -> None:
        """Start the SuperLink and wait until it accepts connections."""
        self.processes.start("superlink", superlink_command(self.tls, "127.0.0.1", self.superlink_port),
                             flower_env(), cwd=self.workdir)
        wait_for_port("127.0.0.1", self.superlink_port, self.timeout, self.processes)

    def new_key(self, register: bool = True) -> KeyPair | None:
        """A fresh SuperNode key pair, registered with the SuperLink unless ``register`` is False.

        Returns None for an insecure deployment (no authentication).
        """
        if self.insecure:
            return None
        pair = make_supernode_keys(self.workdir / "keys", 1, prefix=f"supernode{self._key_count}")[0]
        self._key_count += 1
        if register:
            self.cli.register(pair.public_key)
        return pair

    def start_supernode(self, partition_id: int, num_partitions: int, key: KeyPair | None,
                        gpu: int | None = None, name: str | None = None) -> str:
        """Start a SuperNode for one partition; return its process name.

        Args:
            partition_id: Its partition.
            num_partitions: Number of partitions.
            key: Its key pair (from :meth:`new_key`); None only when insecure.
            gpu: The GPU it may use (None: as the environment says).
            name: Process name (default ``supernode-{partition_id}``).
        """
        name = name or f"supernode-{partition_id}"
        command = supernode_command(self.address, partition_id, num_partitions,
                                    ca_cert=None if self.tls is None else self.tls.ca_cert,
                                    private_key=None if key is None else key.private_key, port=free_port())
        self.processes.start(name, command, flower_env(gpu), cwd=self.workdir)
        return name

    def wait_for_nodes(self, count: int, timeout: float | None = None) -> None:
        """Wait until ``count`` SuperNodes are online (``flwr supernode ls``)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            self.processes.check_alive()
            online = [node for node in self.cli.registered_nodes() if node.get("status") == "online"]
            if len(online) >= count:
                return
            if time.monotonic() > deadline:
                raise DeployError(f"{len(online)} of {count} SuperNodes online after {timeout or self.timeout:.0f} s")
            time.sleep(1.0)

    def start_federation(self, num_supernodes: int, gpus: Sequence[int] | None = None) -> None:
        """Start the SuperLink and one SuperNode per partition, each with a registered key.

        Returns when all ``num_supernodes`` SuperNodes are online.

        Args:
            num_supernodes: Number of SuperNodes (partitions ``0..num_supernodes-1``).
            gpus: GPU of each SuperNode, cycled (None: leave ``CUDA_VISIBLE_DEVICES`` alone).
        """
        self.start_superlink()
        for partition_id in range(num_supernodes):
            gpu = None if not gpus else gpus[partition_id % len(gpus)]
            self.start_supernode(partition_id, num_supernodes, self.new_key(), gpu=gpu)
        self.wait_for_nodes(num_supernodes)

    def submit(self, app: Path, run_config: Mapping[str, Any] | None = None) -> int:
        """Submit a run of the app (``flwr run``); return its run id.

        Args:
            app: Folder of the Flower app (the repo root for fedcca).
            run_config: Run-config overrides.
        """
        config_file = None
        if run_config:
            config_file = write_run_config(self.workdir / "run-config.toml", run_config)
        run_id = self.cli.submit(app, config_file)
        logger.info("run %d submitted to %s", run_id, self.address)
        return run_id

    def wait(self, run_id: int, timeout: float) -> str:
        """Wait for the run to finish (logs to ``logs/run-ID.log``); return its final status."""
        return self.cli.wait(run_id, timeout, log_file=self.processes.log_path(f"run-{run_id}"))


def run_local(app: Path, num_supernodes: int, workdir: Path, run_config: Mapping[str, Any] | None = None, *,
              insecure: bool = False, gpus: Sequence[int] | None = None, timeout: float = 600.0) -> tuple[int, str]:
    """Start a SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1, run the app, stop all.

    Args:
        app: Folder of the Flower app.
        num_supernodes: SuperNodes, partitions ``0..num_supernodes-1``.
        workdir: Certificates, keys, logs (see :class:`LocalDeployment`).
        run_config: Run-config overrides.
        insecure: No TLS, no SuperNode authentication.
        gpus: GPU of each SuperNode, cycled (None: leave ``CUDA_VISIBLE_DEVICES`` alone).
        timeout: Seconds the run may take.

    Returns:
        ``(run id, final status)``; the status is ``finished:completed`` on success.
    """
    with LocalDeployment(workdir, insecure=insecure) as deployment:
        deployment.start_federation(num_supernodes, gpus)
        run_id = deployment.submit(app, run_config)
        return run_id, deployment.wait(run_id, timeout)


