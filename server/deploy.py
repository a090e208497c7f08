"""Run fedcca on Flower's deployment engine: one SuperLink, one SuperNode per client machine.

``python -m server.deploy SUBCOMMAND --help`` documents each step; docs/deployment.md gives
the recipe across real machines. Secure by default: TLS on every connection and SuperNode
authentication (only registered public keys may join); ``--insecure`` turns both off.

  certs      a local CA and a server certificate (SANs for the SuperLink's names/addresses)
  keys       SuperNode EC key pairs (OpenSSH format, as flower-supernode reads them)
  superlink  start flower-superlink (foreground)
  register   register SuperNode public keys with a running SuperLink
  supernode  start flower-supernode for one partition on one GPU (foreground)
  run        submit the app with ``flwr run`` and wait for it to finish
  local      all of the above on 127.0.0.1: SuperLink + N SuperNodes + one run, then stop

Every ``flwr`` CLI call gets a private FLWR_HOME holding only a ``config.toml`` connection,
so nothing under the user's ~/.flwr or in the repo is read or rewritten. Runtime dependency
installation (``uv sync`` of the app's dependencies) is off: the machines run the app
in the environment they were set up with.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------------------
# Certificates and keys
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """Where the TLS material of a deployment lies.

    Args:
        ca_cert: The CA certificate: every SuperNode and ``flwr`` client verifies the
            SuperLink against it (copy it to every machine).
        server_cert: The SuperLink's certificate, signed by the CA.
        server_key: The SuperLink's private key (stays on the server).
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> TlsFiles:
        """The files :func:`make_certificates` writes into ``folder``."""
        return cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)


@dataclass(frozen=True)
class KeyPair:
    """A SuperNode's authentication key pair (OpenSSH format).

    Args:
        private_key: Stays on the SuperNode's machine (``--auth-supernode-private-key``).
        public_key: Registered with the SuperLink (``flwr supernode register``).
    """

    private_key: Path
    public_key: Path


def make_certificates(folder: Path, names: Sequence[str] = (), ips: Sequence[str] = (),
                      days: int = 365, *, force: bool = False) -> TlsFiles:
    """Create a CA and a SuperLink server certificate it signs (for a test deployment).

    Args:
        folder: Created if missing; receives ca.crt, ca.key, server.pem, server.key.
        names: DNS names the SuperNodes use to reach the SuperLink (localhost is always added).
        ips: IP addresses they use (127.0.0.1 and ::1 are always added).
        days: Validity of both certificates.
        force: Replace existing files (a new CA invalidates every certificate the old one signed).

    Raises:
        DeployError: A file exists and ``force`` is not set.
    """
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.in_folder(folder)
    _refuse_to_replace([files.ca_cert, folder / CA_KEY, files.server_cert, files.server_key], force)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcca deployment CA")])
    ca_cert = (_certificate_builder(ca_name, ca_name, ca_key.public_key(), now, days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True)
               .sign(ca_key, hashes.SHA384()))
    all_names = list(dict.fromkeys([*LOOPBACK_NAMES, *names]))
    all_ips = list(dict.fromkeys([*LOOPBACK_IPS, *ips]))
    san = [x509.DNSName(name) for name in all_names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in all_ips]
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_names[-1])])
    server_cert = (_certificate_builder(server_name, ca_name, server_key.public_key(), now, days)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_key_usage(cert_sign=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName(san), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    _write_private(folder / CA_KEY, _pem_private_key(ca_key))
    _write_private(files.server_key, _pem_private_key(server_key))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    logger.info("certificates in %s for %s", folder, ", ".join(all_names + all_ips))
    return files


def make_supernode_keys(folder: Path, count: int, prefix: str = "supernode", *, force: bool = False) -> list[KeyPair]:
    """Create ``count`` SuperNode key pairs ``{prefix}-{i}`` / ``{prefix}-{i}.pub`` (EC P-384).

    Args:
        folder: Created if missing.
        count: Number of key pairs (one per SuperNode).
        prefix: File name prefix.
        force: Replace existing key files (registered public keys then no longer match).

    Raises:
        DeployError: A key file exists and ``force`` is not set.
    """
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_to_replace([folder / f"{prefix}-{i}{suffix}" for i in range(count) for suffix in ("", ".pub")], force)
    pairs = []
    for index in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        pair = KeyPair(folder / f"{prefix}-{index}", folder / f"{prefix}-{index}.pub")
        _write_private(pair.private_key, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        pair.public_key.write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
        pairs.append(pair)
    return pairs


def _refuse_to_replace(paths: Sequence[Path], force: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise DeployError(f"{existing[0]} exists (and {len(existing) - 1} more); pass --force to replace "
                          "it — replaced keys or CA invalidate what was registered or signed with them")


def _certificate_builder(subject: x509.Name, issuer: x509.Name, public_key: Any,
                         now: datetime.datetime, days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock skew
            .not_valid_after(now + datetime.timedelta(days=days)))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start: a private key is never readable by others, not even briefly.
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


# --------------------------------------------------------------------------------------
# Commands of the Flower processes
# --------------------------------------------------------------------------------------


def _flower_bin(name: str) -> str:
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
    command = [_flower_bin("flower-superlink"), "--host", host, "--port", str(port),
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
    command = [_flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port),
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


# --------------------------------------------------------------------------------------
# The flwr CLI against one SuperLink, through a private FLWR_HOME
# --------------------------------------------------------------------------------------


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
        command = [_flower_bin("flwr"), *args]
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
        command = [_flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"]
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


# --------------------------------------------------------------------------------------
# Processes: started in their own process group, stopped by PID
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# A whole federation on one machine
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs (TOML values, e.g. ``strategy='cca' num-server-rounds=3``)."""
    from fedcca.app.task import parse_override  # pylint: disable=import-outside-toplevel

    values: dict[str, Any] = {}
    for pair in pairs:
        for item in shlex.split(pair):
            try:
                key, value = parse_override(item)
                values[key] = value
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"run config: {err}") from None
    return values


def _exec(command: Sequence[str], env: Mapping[str, str]) -> None:
    """Replace this process with ``command`` (signals reach Flower directly)."""
    print("+", shlex.join(command), flush=True)
    os.execvpe(command[0], list(command), dict(env))


def _cmd_certs(args: argparse.Namespace) -> int:
    files = make_certificates(args.out, args.name, args.ip, args.days, force=args.force)
    print(f"CA certificate (copy to every SuperNode and flwr machine): {files.ca_cert}")
    print(f"server certificate/key (SuperLink only): {files.server_cert} {files.server_key}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    for pair in make_supernode_keys(args.out, args.count, args.prefix, force=args.force):
        print(f"{pair.private_key} (SuperNode machine)  {pair.public_key} (register)")
    return 0


def _cmd_superlink(args: argparse.Namespace) -> int:
    tls = None if args.insecure else TlsFiles.in_folder(args.certs)
    _exec(superlink_command(tls, args.host, args.port, args.database), flower_env())
    return 0


def _cmd_supernode(args: argparse.Namespace) -> int:
    command = supernode_command(args.superlink, args.partition_id, args.num_partitions,
                                ca_cert=None if args.insecure else args.ca_cert,
                                private_key=None if args.insecure else args.key, port=args.port)
    _exec(command, flower_env(args.gpu))
    return 0


def _cli_for(args: argparse.Namespace, home: Path) -> FlwrCli:
    return FlwrCli(home, args.superlink, None if args.insecure else args.ca_cert, timeout=args.cli_timeout)


def _cmd_register(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fedcca-flwr-") as home:
        cli = _cli_for(args, Path(home))
        for public_key in args.public_keys:
            print(f"{public_key}: node id {cli.register(public_key)}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fedcca-flwr-") as home:
        cli = _cli_for(args, Path(home))
        overrides = _parse_overrides(args.run_config)
        config_file = write_run_config(Path(home) / "run-config.toml", overrides) if overrides else None
        run_id = cli.submit(args.app, config_file)
        print(f"run {run_id} started; waiting up to {args.timeout:.0f} s", flush=True)
        status = cli.wait(run_id, args.timeout, log_file=args.log_file)
    print(f"run {run_id}: {status}")
    return 0 if status == f"{FINISHED}:completed" else 1


def _cmd_local(args: argparse.Namespace) -> int:
    # SIGTERM unwinds like Ctrl-C, so the context managers below stop every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedcca-deploy-")))
        run_id, status = run_local(args.app, args.num_supernodes, workdir, _parse_overrides(args.run_config),
                                   insecure=args.insecure, gpus=args.gpus, timeout=args.timeout)
        print(f"run {run_id}: {status} (logs in {workdir / 'logs'})")
    return 0 if status == f"{FINISHED}:completed" else 1


def _add_connection_args(parser: argparse.ArgumentParser, certs_help: str) -> None:
    parser.add_argument("--superlink", default=f"127.0.0.1:{SUPERLINK_PORT}",
                        help="the SuperLink's host:port, as its certificate names it")
    parser.add_argument("--ca-cert", type=Path, default=Path("certs") / CA_CERT, help=certs_help)
    parser.add_argument("--insecure", action="store_true", help="no TLS (only for a SuperLink started --insecure)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m server.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every step")
    sub = parser.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="create a CA and the SuperLink's certificate")
    certs.add_argument("--out", type=Path, default=Path("certs"))
    certs.add_argument("--name", action="append", default=[], help="DNS name of the SuperLink (repeatable)")
    certs.add_argument("--ip", action="append", default=[], help="IP address of the SuperLink (repeatable)")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--force", action="store_true", help="replace an existing CA and certificate")
    certs.set_defaults(handler=_cmd_certs)

    keys = sub.add_parser("keys", help="create SuperNode authentication key pairs")
    keys.add_argument("--out", type=Path, default=Path("keys"))
    keys.add_argument("--count", type=int, default=2)
    keys.add_argument("--prefix", default="supernode")
    keys.add_argument("--force", action="store_true", help="replace existing key files")
    keys.set_defaults(handler=_cmd_keys)

    link = sub.add_parser("superlink", help="start flower-superlink (TLS + SuperNode authentication)")
    link.add_argument("--certs", type=Path, default=Path("certs"), help="folder written by `certs`")
    link.add_argument("--host", default="127.0.0.1",
                      help="interface to listen on (default loopback: register keys first, restrict the port, then "
                           "0.0.0.0; docs/deployment.md)")
    link.add_argument("--port", type=int, default=SUPERLINK_PORT)
    link.add_argument("--database", type=Path, help="SQLite file: keep registered nodes across restarts")
    link.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    link.set_defaults(handler=_cmd_superlink)

    register = sub.add_parser("register", help="register SuperNode public keys with the SuperLink")
    _add_connection_args(register, "CA certificate from `certs`")
    register.add_argument("public_keys", type=Path, nargs="+")
    register.add_argument("--cli-timeout", type=float, default=60.0)
    register.set_defaults(handler=_cmd_register)

    node = sub.add_parser("supernode", help="start flower-supernode for one partition")
    _add_connection_args(node, "CA certificate copied from the SuperLink")
    node.add_argument("--key", type=Path, help="this node's private key from `keys` (registered)")
    node.add_argument("--partition-id", type=int, required=True)
    node.add_argument("--num-partitions", type=int, required=True)
    node.add_argument("--gpu", type=int, help="the GPU this node uses (sets CUDA_VISIBLE_DEVICES)")
    node.add_argument("--port", type=int, default=SUPERNODE_PORT,
                      help="local Runtime API port (distinct per SuperNode on one machine)")
    node.set_defaults(handler=_cmd_supernode)

    run = sub.add_parser("run", help="`flwr run` the app against the SuperLink and wait for it")
    _add_connection_args(run, "CA certificate from `certs`")
    run.add_argument("--app", type=Path, default=REPO_ROOT,
                     help="folder of the Flower app (default: this repository's, where server/ lives)")
    run.add_argument("--run-config", action="append", default=[], help="overrides: \"key=value key2='text'\"")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take")
    run.add_argument("--log-file", type=Path, help="write the run's logs here")
    run.add_argument("--cli-timeout", type=float, default=60.0)
    run.set_defaults(handler=_cmd_run)

    local = sub.add_parser("local", help="SuperLink + N SuperNodes on 127.0.0.1, one run, then stop all")
    local.add_argument("--num-supernodes", type=int, default=2)
    local.add_argument("--app", type=Path, default=REPO_ROOT,
                       help="folder of the Flower app (default: this repository's, where server/ lives)")
    local.add_argument("--run-config", action="append", default=[], help="overrides: \"key=value key2='text'\"")
    local.add_argument("--gpus", type=int, nargs="+", help="GPU of each SuperNode (cycled)")
    local.add_argument("--workdir", type=Path, help="keep certificates, keys and logs here (default: temporary)")
    local.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take")
    local.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication")
    local.set_defaults(handler=_cmd_local)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m server.deploy``; returns the exit code.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).
    """
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "local" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except DeployError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
