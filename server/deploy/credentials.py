"""Steps 1-2 of docs/deployment.md: a local CA, the SuperLink's certificate and SuperNode key pairs."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.deploy.common import (
    CA_CERT,
    CA_KEY,
    LOOPBACK_IPS,
    LOOPBACK_NAMES,
    SERVER_CERT,
    SERVER_KEY,
    DeployError,
)

logger = logging.getLogger(__name__)



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


