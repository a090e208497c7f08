"""Flower's deployment engine on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication.

Every test starts real ``flower-superlink`` / ``flower-supernode`` processes through
``server.deploy.LocalDeployment`` on free loopback ports, runs the repo's ServerApp and
ClientApp on a tiny dataset, and stops every process by PID in the fixture's teardown.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.deploy import REPO_ROOT, LocalDeployment

pytestmark = pytest.mark.slow

COMPLETED = "finished:completed"
RUN_TIMEOUT_S = 75.0  # a run of these tests takes ~15-40 s; past this something hangs
CLIENTAPP_STARTED = "Start `flwr-clientapp` process"  # SuperNode log line: a train message arrived


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Fashion-MNIST-format dataset of the app tests."""
    # Imported here: tiny_dataset imports the apps, which the key-refusal test does not need.
    from tests.tiny_dataset import write_tiny_fashion_mnist  # pylint: disable=import-outside-toplevel

    return write_tiny_fashion_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[LocalDeployment]:
    """A secure (TLS + SuperNode authentication) deployment; every process stopped afterwards."""
    with LocalDeployment(tmp_path / "deploy", timeout=45.0) as local:
        yield local
    alive = {name: p.pid for name, p in local.processes.started.items() if p.poll() is None}
    assert not alive, f"processes left running: {alive}"


def _run_config(data_dir: Path, out_dir: Path, **overrides: Any) -> dict[str, Any]:
    from tests.tiny_dataset import tiny_run_config  # pylint: disable=import-outside-toplevel

    return tiny_run_config(data_dir, out_dir, **{"strategy": "cca", "num_server_rounds": 1, **overrides})


def _history(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "history.json").read_text())


def test_one_round_of_cca_merge_over_tls_with_node_auth(deployment: LocalDeployment, data_dir: Path,
                                                         tmp_path: Path) -> None:
    pyproject = (REPO_ROOT / "pyproject.toml").read_bytes()
    deployment.start_federation(2)
    out_dir = tmp_path / "out"
    run_id = deployment.submit(REPO_ROOT, _run_config(data_dir, out_dir))
    assert deployment.wait(run_id, RUN_TIMEOUT_S) == COMPLETED, deployment.processes.log_tail(f"run-{run_id}")

    (entry,) = _history(out_dir)["rounds"]
    assert (entry["num_sent"], entry["num_replies"], entry["skipped"]) == (2, 2, False)
    assert len(entry["bytes_received"]) == 2  # both SuperNodes replied
    assert (out_dir / "checkpoints" / "round-001.pt").is_file()
    # The Fleet/Control/Runtime APIs were served over TLS, and flwr run rewrote nothing.
    assert "Uvicorn running on https://" in deployment.processes.log_tail("superlink", chars=1 << 20)
    assert (REPO_ROOT / "pyproject.toml").read_bytes() == pyproject


def test_round_completes_when_a_supernode_dies_mid_round(deployment: LocalDeployment, data_dir: Path,
                                                          tmp_path: Path) -> None:
    deployment.start_federation(2)
    out_dir = tmp_path / "out"
    # min-nodes=1: one valid reply suffices; round-timeout bounds the wait for the dead node
    # (generous: a fresh ClientApp process imports torch and trains on a loaded 2-core machine).
    config = _run_config(data_dir, out_dir, min_nodes=1, round_timeout=30.0)
    run_id = deployment.submit(REPO_ROOT, config)
    # Kill partition 1 the moment its ClientApp starts on the round's train message (SIGKILL,
    # as a machine failure: no goodbye to the SuperLink).
    deployment.processes.wait_for_log("supernode-1", CLIENTAPP_STARTED, timeout=RUN_TIMEOUT_S)
    deployment.processes.stop("supernode-1", crash=True)
    assert deployment.wait(run_id, RUN_TIMEOUT_S) == COMPLETED, deployment.processes.log_tail(f"run-{run_id}")

    (entry,) = _history(out_dir)["rounds"]
    assert (entry["num_sent"], entry["num_replies"], entry["skipped"]) == (2, 1, False)
    assert entry["train_seconds_wall"] >= 29.0  # it waited out the timeout for the dead node
    # The run went on past the failure: merged model evaluated and checkpointed.
    assert 0.0 <= entry["accuracy"] <= 1.0
    assert (out_dir / "checkpoints" / "round-001.pt").is_file()
    assert deployment.processes.started["supernode-0"].poll() is None  # the survivor is unharmed


def test_supernode_with_unregistered_key_is_refused(deployment: LocalDeployment) -> None:
    deployment.start_superlink()
    deployment.start_supernode(0, 2, deployment.new_key())
    deployment.wait_for_nodes(1)  # a registered key is admitted: the set-up itself works
    refused = deployment.start_supernode(1, 2, deployment.new_key(register=False))

    process = deployment.processes.started[refused]
    process.wait(timeout=45)
    assert process.returncode != 0
    assert "Failed to activate SuperNode" in deployment.processes.log_tail(refused)
    superlink_log = deployment.processes.log_tail("superlink", chars=1 << 20)
    assert "No SuperNode found with the given public key" in superlink_log
    nodes = deployment.cli.registered_nodes()
    assert [node["status"] for node in nodes] == ["online"]  # the stranger never got a node id


def test_keys_and_certificates_are_not_replaced_without_force(tmp_path: Path) -> None:
    from server.deploy import DeployError, main, make_supernode_keys  # pylint: disable=import-outside-toplevel

    (first,) = make_supernode_keys(tmp_path / "keys", 1)
    before = first.public_key.read_bytes()
    with pytest.raises(DeployError, match="exists .*pass --force"):
        make_supernode_keys(tmp_path / "keys", 1)
    assert first.public_key.read_bytes() == before  # untouched
    assert main(["certs", "--out", str(tmp_path / "certs")]) == 0
    ca = (tmp_path / "certs" / "ca.crt").read_bytes()
    assert main(["certs", "--out", str(tmp_path / "certs")]) != 0
    assert (tmp_path / "certs" / "ca.crt").read_bytes() == ca
    assert main(["certs", "--out", str(tmp_path / "certs"), "--force"]) == 0
    assert (tmp_path / "certs" / "ca.crt").read_bytes() != ca
