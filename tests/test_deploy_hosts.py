"""docs/deployment.md across hosts: network namespaces stand for machines (root only; skipped elsewhere).

A SuperLink host (10.77.x.1) whose firewall (nftables, as the docs say) admits the SuperLink's
port from the two client hosts and itself only; two client hosts run SuperNodes with
registered keys; an outsider host holds ``ca.crt`` and a key of its own. The documented
commands (``python -m server.deploy ...``) run verbatim inside the namespaces. Shown: the
outsider can neither register its key nor join; the listed hosts complete a run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.tiny_dataset import ROOT, write_tiny_fashion_mnist

PORT = 9092


def _can_use_namespaces() -> str | None:
    """Why this test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (the docs' firewall recipe uses nftables)"
    probe = f"fcprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False)
    if made.returncode != 0:
        return f"cannot create network namespaces: {made.stderr.decode().strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


def _sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True)


class Hosts:
    """Namespaces ``srv``, ``c1``, ``c2``, ``out`` on one bridge, 10.77.<n>.{1,2,3,9}."""

    NAMES = {"srv": 1, "c1": 2, "c2": 3, "out": 9}

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.subnet = f"10.77.{int(self.tag, 16) % 200 + 20}"
        self.bridge = f"fc{self.tag}br"
        self.processes: list[subprocess.Popen[bytes]] = []

    def ns(self, host: str) -> str:
        return f"fc{self.tag}{host}"

    def address(self, host: str) -> str:
        return f"{self.subnet}.{self.NAMES[host]}"

    def up(self) -> None:
        _sh("ip", "netns", "add", self.bridge)
        _sh("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for host in self.NAMES:
            ns, inner, outer = self.ns(host), f"v{self.tag}{host}"[:15], f"b{self.tag}{host}"[:15]
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
            _sh("ip", "link", "set", inner, "netns", ns)
            _sh("ip", "link", "set", outer, "netns", self.bridge)
            _sh("ip", "-n", self.bridge, "link", "set", outer, "master", "br0", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", inner)
            _sh("ip", "-n", ns, "link", "set", inner, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")

    def firewall(self, allowed: list[str]) -> None:
        """The docs' allow-list: the SuperLink's port only from ``allowed`` (and loopback)."""
        rules = (f"table inet fedcca {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n"
                 f"    tcp dport {PORT} ip saddr {{ 127.0.0.1, {', '.join(allowed)} }} accept\n"
                 f"    tcp dport {PORT} drop\n  }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", self.ns("srv"), "nft", "-f", "-"], input=rules.encode(), check=True)

    def run(self, host: str, *args: str, timeout: float, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(host), sys.executable, "-m", "server.deploy", *args],
                              cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, host: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(["ip", "netns", "exec", self.ns(host), sys.executable, "-m", "server.deploy",
                                    *args], cwd=log.parent, env=_env(), stdout=log.open("wb"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def down(self) -> None:
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for host in self.NAMES:
            for pid in subprocess.run(["ip", "netns", "pids", self.ns(host)], capture_output=True, text=True,
                                      check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", self.ns(host)], check=False)
        subprocess.run(["ip", "netns", "del", self.bridge], check=False)


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = _can_use_namespaces()
    if reason is not None:
        pytest.skip(reason)
    made = Hosts()
    try:
        made.up()
        yield made
    finally:
        made.down()


@pytest.mark.slow
def test_an_outsider_can_neither_register_nor_join_while_the_listed_hosts_complete_a_run(
        hosts: Hosts, tmp_path: Path) -> None:
    work = tmp_path
    data_dir = write_tiny_fashion_mnist(work / "data")
    server = hosts.address("srv")
    # 1. certificates and keys (the docs' steps 1-2)
    assert hosts.run("srv", "certs", "--out", "certs", "--ip", server, timeout=60, cwd=work).returncode == 0
    assert hosts.run("srv", "keys", "--out", "keys", "--count", "2", timeout=60, cwd=work).returncode == 0
    assert hosts.run("out", "keys", "--out", "outsider", "--count", "1", timeout=60, cwd=work).returncode == 0
    # 2. the port restricted to the client hosts, then the SuperLink (step 3)
    hosts.firewall([hosts.address("c1"), hosts.address("c2")])
    hosts.start("srv", work / "superlink.log", "superlink", "--certs", "certs", "--host", "0.0.0.0",
                "--port", str(PORT), "--database", str(work / "superlink.db"))
    time.sleep(5)
    # 3. keys registered from the server itself (step 4)
    registered = hosts.run("srv", "register", "--superlink", f"127.0.0.1:{PORT}", "--ca-cert", "certs/ca.crt",
                           "keys/supernode-0.pub", "keys/supernode-1.pub", timeout=120, cwd=work)
    assert registered.returncode == 0, registered.stdout + registered.stderr
    # 4. the outsider, holding ca.crt, cannot register its key: the port does not answer it
    started = time.monotonic()
    try:
        outsider = hosts.run("out", "register", "--superlink", f"{server}:{PORT}", "--ca-cert", "certs/ca.crt",
                             "--cli-timeout", "20", "outsider/supernode-0.pub", timeout=60, cwd=work)
        assert outsider.returncode != 0, outsider.stdout
    except subprocess.TimeoutExpired:
        pass  # no answer at all: refused as well
    assert time.monotonic() - started >= 5  # refused by silence (the firewall), not by a quick error elsewhere
    # 5. SuperNodes: two listed hosts and the outsider's (step 5)
    for index, host in enumerate(("c1", "c2")):
        hosts.start(host, work / f"{host}.log", "supernode", "--superlink", f"{server}:{PORT}", "--ca-cert",
                    "certs/ca.crt", "--key", f"keys/supernode-{index}", "--partition-id", str(index),
                    "--num-partitions", "2")
    hosts.start("out", work / "out.log", "supernode", "--superlink", f"{server}:{PORT}", "--ca-cert",
                "certs/ca.crt", "--key", "outsider/supernode-0", "--partition-id", "0", "--num-partitions", "2")
    # 6. a run submitted from the server (step 6)
    overrides = {"data-dir": f"'{data_dir}'", "out-dir": f"'{work / 'out'}'", "num-server-rounds": "1",
                 "partitioning": "'iid'", "calibration-size": "20", "holdout-size": "10", "batch-size": "25",
                 "min-nodes": "2", "max-test-examples": "0", "round-timeout": "120"}
    run = hosts.run("srv", "run", "--superlink", f"127.0.0.1:{PORT}", "--ca-cert", "certs/ca.crt", "--timeout", "300",
                    "--run-config", " ".join(f"{k}={v}" for k, v in overrides.items()), timeout=400, cwd=work)
    logs = "\n".join((work / name).read_text(errors="replace")[-2000:] for name in ("superlink.log", "c1.log", "out.log"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs
    history = json.loads((work / "out" / "history.json").read_text())
    assert [entry["round"] for entry in history["rounds"]] == [1]
    assert history["rounds"][0]["num_valid"] == 2  # the two listed hosts, and no one else
    assert "Failed to activate" in (work / "out.log").read_text(errors="replace") or \
        hosts.processes[-1].poll() is None  # the outsider never joined: refused, or still waiting for an answer
