"""Run fedcca on Flower's deployment engine: one SuperLink, one SuperNode per client machine.

``python -m server.deploy SUBCOMMAND --help`` documents each step; docs/deployment.md gives
the recipe across real machines, and the modules follow its steps: ``credentials`` (1-2:
certificates and keys), ``commands`` (4 and 6: the SuperLink's and SuperNodes' command lines),
``flwr_cli`` (5 and 7: registering keys, submitting a run), ``processes`` (starting and stopping
Flower's processes), ``local`` (everything on one machine), ``cli`` (the subcommands).

Secure by default: TLS on every connection and SuperNode authentication (only registered public keys may join); ``--insecure`` turns both off.

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

from server.deploy.cli import main
from server.deploy.commands import flower_env, superlink_command, supernode_command
from server.deploy.common import REPO_ROOT, DeployError
from server.deploy.credentials import (
           KeyPair,
           TlsFiles,
           make_certificates,
           make_supernode_keys,
)
from server.deploy.flwr_cli import FlwrCli, write_run_config
from server.deploy.local import LocalDeployment, run_local
from server.deploy.processes import Processes, free_port, wait_for_port

__all__ = ["REPO_ROOT", "DeployError", "FlwrCli", "KeyPair", "LocalDeployment", "Processes", "TlsFiles", "flower_env",
           "free_port", "main", "make_certificates", "make_supernode_keys", "run_local", "superlink_command",
           "supernode_command", "wait_for_port", "write_run_config"]
