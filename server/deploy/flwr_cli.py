"""Steps 5 and 7: the flwr CLI against one SuperLink (register keys, submit and follow a run), through a private FLWR_HOME."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.deploy.commands import flower_bin, flower_env
from server.deploy.common import CONNECTION, FINISHED, DeployError


class FlwrCli:
    """Runs ``flwr`` commands against one SuperLink through a private FLWR_HOME.

    The FLWR_HOME holds only a ``config.toml`` with one connection (named
    :data:`CONNECTION`, also the default), so the user's configuration is never read or
    changed, and ``flwr run`` finds no ``[tool.flwr.federations]`` to migrate.

    Args:
        home: The private FLWR_HOME (created).
        superlink: The SuperLink's ``host:port``.
        ca_cert: CA certificate verifying the SuperLink; None for an insecure SuperLink.
        timeout: Seconds any single CLI call may take.
    """

    def __init__(self, home: Path, superlink: str, ca_cert: Path | None, timeout: float = 60.0) -> None:
        self.home = home
        self.timeout = timeout
        home.mkdir(parents=True, exist_ok=True)
        security = ("insecure = true" if ca_cert is None
                    else f'root-certificates = "{_toml_path(ca_cert)}"')
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{superlink}"\n{security}\n', encoding="utf-8")

    def call(self, *args: str, timeout: float | None = None, cwd: Path | None = None) -> str:
        """Run ``flwr ARGS...``; return its stdout.

        Raises:
            DeployError: The command failed or ran past its timeout (output included).
        """
        command = [flower_bin("flwr"), *args]
        env = flower_env()
        env["FLWR_HOME"] = str(self.home)
        try:
            done = subprocess.run(command, cwd=cwd or self.home, env=env, capture_output=True, text=True,
                                  timeout=timeout or self.timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise DeployError(f"`{shlex.join(command)}` did not finish within {err.timeout:.0f} s") from err
        if done.returncode != 0:
            raise DeployError(f"`{shlex.join(command)}` exited with {done.returncode}:\n"
                              f"{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return done.stdout

    def call_json(self, *args: str, timeout: float | None = None, cwd: Path | None = None) -> dict[str, Any]:
        """Run ``flwr ARGS... --format json`` and parse its answer."""
        output = self.call(*args, "--format", "json", timeout=timeout, cwd=cwd)
        try:
            return json.loads(output[output.index("{"):])
        except ValueError as err:
            raise DeployError(f"flwr {' '.join(args)}: no JSON in its output:\n{output[-2000:]}") from err

    def register(self, public_key: Path) -> int:
        """Register a SuperNode public key; return the node id the SuperLink assigned."""
        answer = self.call_json("supernode", "register", str(public_key.resolve()), CONNECTION)
        if not answer.get("success"):
            raise DeployError(f"registering {public_key} failed: {answer}")
        return int(answer["node-id"])

    def registered_nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's node list (``flwr supernode ls``), one dict per registered node."""
        return list(self.call_json("supernode", "ls", CONNECTION).get("nodes", []))

    def _stream_log(self, run_id: int, timeout: float) -> str:
        """``flwr log --stream`` of the run: every line kept, the progress lines (``[fedcca]``) echoed as they come."""
        command = [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        env = flower_env()
        env["FLWR_HOME"] = str(self.home)
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        with subprocess.Popen(command, cwd=self.home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as process:
            assert process.stdout is not None
            for line in process.stdout:  # ends when the run finishes (or the stream breaks)
                lines.append(line)
                if "[fedcca]" in line:
                    print(line.rstrip(), flush=True)
                if time.monotonic() > deadline:
                    process.kill()
                    break
        return "".join(lines)  # a broken stream is judged by the run's status

    def submit(self, app: Path, run_config: Path | None = None) -> int:
        """Start a run of the Flower app in ``app`` (``flwr run``); return its run id.

        Args:
            app: Folder with the app's pyproject.toml (packed into a FAB and sent).
            run_config: A TOML file of run-config overrides (keys of ``[tool.flwr.app.config]``).
        """
        args = ["run", str(app.resolve()), CONNECTION]
        if run_config is not None:
            args += ["--run-config", str(run_config.resolve())]
        answer = self.call_json(*args)
        if not answer.get("success") or answer.get("run-id") is None:
            raise DeployError(f"flwr run failed: {answer}")
        return int(answer["run-id"])

    def status(self, run_id: int) -> str:
        """The run's status text, e.g. ``running`` or ``finished:completed``."""
        runs = self.call_json("ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        if not runs:
            raise DeployError(f"the SuperLink knows no run {run_id}")
        return str(runs[0]["status"])

    def wait(self, run_id: int, timeout: float, log_file: Path | None = None) -> str:
        """Stream the run's logs until it finishes; return its final status.

        ``flwr log --stream`` returns when the SuperLink marks the run finished, so no
        polling loop is needed; the wait is bounded by ``timeout`` all the same.

        Args:
            run_id: The run.
            timeout: Seconds to wait at most.
            log_file: Where the streamed logs go (None: discarded).

        Raises:
            DeployError: The run did not finish in time.
        """
        deadline = time.monotonic() + timeout
        logs = self._stream_log(run_id, timeout)
        if log_file is not None:
            log_file.write_text(logs, encoding="utf-8")
        status = self.status(run_id)
        while not status.startswith(FINISHED) and time.monotonic() < deadline:
            time.sleep(1.0)
            status = self.status(run_id)
        if not status.startswith(FINISHED):
            raise DeployError(f"run {run_id} still '{status}' after {timeout:.0f} s")
        return status


def _toml_path(path: Path) -> str:
    return str(path.resolve()).replace("\\", "/")


def write_run_config(path: Path, values: Mapping[str, Any]) -> Path:
    """Write run-config overrides as a TOML file for ``flwr run --run-config FILE``.

    Args:
        path: The file to write.
        values: Keys of ``[tool.flwr.app.config]`` -> str | int | float | bool.
    """
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float, str)):
            text = json.dumps(value)  # a JSON string or number is valid TOML
        else:
            raise TypeError(f"run config '{key}': {type(value).__name__} is not str/int/float/bool")
        lines.append(f'"{key}" = {text}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


