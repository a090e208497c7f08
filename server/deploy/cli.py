"""``python -m server.deploy SUBCOMMAND``: one subcommand per step of docs/deployment.md."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from server.deploy.commands import flower_env, superlink_command, supernode_command
from server.deploy.common import (
    CA_CERT,
    FINISHED,
    REPO_ROOT,
    SUPERLINK_PORT,
    SUPERNODE_PORT,
    DeployError,
)
from server.deploy.credentials import TlsFiles, make_certificates, make_supernode_keys
from server.deploy.flwr_cli import FlwrCli, write_run_config
from server.deploy.local import run_local


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
    parser = argparse.ArgumentParser(prog="python -m server.deploy", description=_description(),
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


def _description() -> str:
    """The package docstring: what each subcommand does."""
    import server.deploy  # pylint: disable=import-outside-toplevel  # the package imports this module

    return server.deploy.__doc__ or ""
